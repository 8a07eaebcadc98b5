"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT = 2.0


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send *state* (e.g. ``"READY=1"``) to the service manager.

    Returns False when not run under a manager that asked for notifications
    (no ``NOTIFY_SOCKET``) or when the message could not be sent (logged).
    Abstract sockets (a leading ``@``) are supported, as systemd uses them.
    A manager whose queue is full holds the sender up for at most
    :data:`SEND_TIMEOUT` seconds; then the message is dropped (logged).
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
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", env["NOTIFY_SOCKET"], exc.strerror or exc)
        return False
    return True
