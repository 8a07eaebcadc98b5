"""The service manager's side of sd_notify(3) and the file descriptor store,
as systemd does it, for tests and benchmarks of daemon restarts.

A :class:`Supervisor` binds a notify socket (``NOTIFY_SOCKET``), takes the
descriptors a service sends with ``FDSTORE=1`` (SCM_RIGHTS, named by
``FDNAME=``, removed by ``FDSTOREREMOVE=1``), and starts the next process with
them numbered from 3, ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` set
to that process's own pid (set after the fork, as systemd does: here by
:func:`launch`, which execs the service). It sets ``FDSTORE`` to its store's
size, as systemd 254 and later do. One simplification: a descriptor stored
under a name already held replaces it (systemd keeps both unless they are the
same file; the daemon stores one descriptor per name).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import sys
from pathlib import Path

FDSTORE_MAX = 8


class Supervisor:
    def __init__(self, directory: Path) -> None:
        self.address = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.stored: dict[str, int] = {}
        self.messages: list[dict[str, str]] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(NOTIFY_SOCKET=self.address, FDSTORE=str(FDSTORE_MAX))
        return env

    def argv(self, argv: list[str]) -> list[str]:
        """*argv* started through :func:`launch` with the stored descriptors."""
        names = ":".join(self.stored)
        fds = ",".join(str(fd) for fd in self.stored.values())
        return [sys.executable, "-m", "lazystore.testing.supervisor", fds, names, "--", *argv]

    def pass_fds(self) -> tuple[int, ...]:
        return tuple(self.stored.values())

    def receive(self) -> list[dict[str, str]]:
        """Take every notification waiting on the socket (and its descriptors)."""
        got = []
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 16))
            except BlockingIOError:
                break
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            message = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            self._apply(message, fds)
            got.append(message)
        self.messages.extend(got)
        return got

    def _apply(self, message: dict[str, str], fds: list[int]) -> None:
        name = message.get("FDNAME", "stored")
        if message.get("FDSTOREREMOVE") == "1":
            old = self.stored.pop(name, None)
            if old is not None:
                os.close(old)
        if message.get("FDSTORE") == "1" and fds and len(self.stored) < FDSTORE_MAX:
            old = self.stored.pop(name, None)
            if old is not None:
                os.close(old)
            self.stored[name] = fds.pop(0)
        for fd in fds:  # not taken: closed, as systemd does
            os.close(fd)

    def flush(self) -> None:
        """Close every stored descriptor, as systemd does when the unit stops."""
        for fd in self.stored.values():
            os.close(fd)
        self.stored.clear()

    def close(self) -> None:
        self.flush()
        self.sock.close()
        Path(self.address).unlink(missing_ok=True)


def launch(fds: list[int], names: str, argv: list[str]) -> None:
    """In the new process: the descriptors to 3, 4, …, LISTEN_* set, exec *argv*."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64 + len(fds)) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    if fds:
        os.environ.update(
            LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid())
        )
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    fd_arg, name_arg, sep, *command = sys.argv[1:]
    assert sep == "--"
    launch([int(f) for f in fd_arg.split(",") if f], name_arg, command)
