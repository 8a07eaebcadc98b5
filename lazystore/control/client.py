"""Blocking control-socket client (the CLI, the snapshotter via a thread)."""

from __future__ import annotations

import socket
from typing import Any

from lazystore.control import protocol
from lazystore.errors import ControlError


class DaemonUnavailable(ControlError):
    """The daemon could not be reached, or closed the connection before it
    answered (it is stopping, restarting or gone): a request that changes
    nothing twice may be sent again. Not a refusal, not a timeout."""


class ControlClient:
    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                raise DaemonUnavailable(
                    f"cannot reach the lazystore daemon at {self.path}: {exc.strerror or exc}"
                ) from None
            self._sock = sock
        return self._sock

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; daemon errors raise ControlError."""
        sock = self._connect()
        try:
            sock.sendall(protocol.encode_frame(protocol.request(op, **args)))
            length = protocol.frame_length(self._recv_exact(sock, protocol.HEADER_SIZE))
            body = self._recv_exact(sock, length)
        except TimeoutError:
            self.close()
            raise ControlError(f"control socket {self.path}: timed out") from None
        except OSError as exc:
            self.close()
            raise DaemonUnavailable(
                f"control socket {self.path}: {exc.strerror or exc}") from None
        return protocol.parse_response(protocol.decode_body(body))

    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                self.close()
                raise DaemonUnavailable(
                    f"the lazystore daemon at {self.path} closed the connection")
            buf += chunk
        return bytes(buf)
