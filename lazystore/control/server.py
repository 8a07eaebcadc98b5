"""The daemon's side of the control socket (trio).

One task per connection, owned by the server's nursery; requests on one
connection are answered in order. The *handler* maps (op, args) to a result
or raises LazystoreError, whose one-line message goes back to the client.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from lazystore import unixsocket
from lazystore.control import protocol
from lazystore.errors import ControlError, LazystoreError

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


def claim_socket_path(path: str) -> None:
    """Remove a stale socket at *path*; refuse if a live daemon answers there."""
    unixsocket.claim(path, ControlError, "another lazystore daemon is listening on")


async def open_listener(path: str) -> trio.SocketListener:
    """A listening unix socket at *path*, mode 0600."""
    claim_socket_path(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return trio.SocketListener(sock)


async def serve(
    path: str, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control protocol at *path* until cancelled; removes the socket after."""
    listener = await open_listener(path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_connection, stream, handler)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        await listener.aclose()


async def _connection(stream: trio.SocketStream, handler: Handler) -> None:
    buf = bytearray()
    async with stream:
        try:
            while True:
                header = await _recv_exact(stream, buf, protocol.HEADER_SIZE)
                if header is None:
                    return
                body = await _recv_exact(stream, buf, protocol.frame_length(header))
                if body is None:
                    return
                reply = await _answer(protocol.decode_body(body), handler)
                await stream.send_all(protocol.encode_frame(reply))
        except ControlError as exc:
            log.info("dropping a control connection: %s", exc)
            await _try_send(stream, protocol.error(str(exc)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _answer(message: dict[str, Any], handler: Handler) -> dict[str, Any]:
    try:
        op, args = protocol.parse_request(message)
        return protocol.ok(await handler(op, args))
    except LazystoreError as exc:
        return protocol.error(str(exc))
    except Exception as exc:
        log.exception("control request failed unexpectedly")
        return protocol.error(f"internal error: {exc!r}")


async def _recv_exact(stream: trio.SocketStream, buf: bytearray, n: int) -> bytes | None:
    while len(buf) < n:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buf:
                raise ControlError("connection closed in the middle of a frame")
            return None
        buf += chunk
    data = bytes(buf[:n])
    del buf[:n]
    return data


async def _try_send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    try:
        await stream.send_all(protocol.encode_frame(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
