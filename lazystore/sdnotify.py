"""sd_notify(3) and sd_listen_fds(3) without libsystemd.

A notification is one datagram to ``$NOTIFY_SOCKET``; descriptors for the
service manager's file descriptor store ride along as SCM_RIGHTS
(``FDSTORE=1`` + ``FDNAME=``). What the manager passes back on the next start
arrives as ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``, the descriptors
numbered from 3.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence

log = logging.getLogger(__name__)

SEND_TIMEOUT = 2.0


LISTEN_FDS_START = 3


def notify(
    state: str, environ: Mapping[str, str] | None = None, fds: Sequence[int] = ()
) -> bool:
    """Send *state* (e.g. ``"READY=1"``) to the service manager.

    Returns False when not run under a manager that asked for notifications
    (no ``NOTIFY_SOCKET``) or when the message could not be sent (logged).
    Abstract sockets (a leading ``@``) are supported, as systemd uses them.
    A manager whose queue is full holds the sender up for at most
    :data:`SEND_TIMEOUT` seconds; then the message is dropped (logged).
    *fds* are sent with the message (for ``FDSTORE=1``).
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("sd_notify: unsupported NOTIFY_SOCKET %r", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sock.sendmsg([state.encode()], rights)
            else:
                sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", env["NOTIFY_SOCKET"], exc.strerror or exc)
        return False
    return True


def store_fd(name: str, fd: int, environ: Mapping[str, str] | None = None) -> bool:
    """Hand *fd* to the manager's file descriptor store under *name*."""
    return notify(f"FDSTORE=1\nFDNAME={name}", environ, fds=[fd])


def fdstore_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when the manager keeps stored descriptors across a restart: systemd
    (254 and later) sets ``$FDSTORE`` to the unit's ``FileDescriptorStoreMax=``."""
    env = os.environ if environ is None else environ
    try:
        return bool(env.get("NOTIFY_SOCKET")) and int(env.get("FDSTORE", "0")) > 0
    except ValueError:
        return False


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, list[int]]:
    """The descriptors passed to this process, by name (``unknown`` when the
    manager named none), as sd_listen_fds(3) with unset_environment: the
    variables are removed so that children do not take them for their own,
    and the descriptors are made close-on-exec."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        count = pid = 0
    names = env.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return {}
    labels = names.split(":") if names else []
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        label = labels[i] if i < len(labels) and labels[i] else "unknown"
        out.setdefault(label, []).append(fd)
    return out
