"""A small HTTP/1.1 server on trio + h11 (h11 parses; this module does the I/O).

One task per connection, owned by the server's nursery; keep-alive; request
bodies are read and dropped (the registry is read-only); response bodies are
bytes or a file streamed in chunks, so memory stays bounded whatever the size.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio

log = logging.getLogger(__name__)

CHUNK = 1 << 16
IDLE_TIMEOUT = 60.0  # a kept-alive connection with no request is closed after this
MAX_HEADER = 16 * 1024  # larger request heads are refused (431)
MAX_CONNECTIONS = 512  # open at once; idle ones close after IDLE_TIMEOUT


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # the raw path (no query string)
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined by ", "


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Path = b""
    length: int | None = None  # of a file body (checked when opened)


Handler = Callable[[Request], Awaitable[Response]]


async def serve(handler: Handler, listeners: list[trio.SocketListener],
                max_connections: int = MAX_CONNECTIONS,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve *handler* on *listeners* until cancelled; beyond *max_connections*
    open connections, new ones wait in the listen backlog."""
    limiter = trio.CapacityLimiter(max_connections)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, handler, listener, limiter, nursery)
        task_status.started()


async def _accept(handler: Handler, listener: trio.SocketListener,
                  limiter: trio.CapacityLimiter, nursery: trio.Nursery) -> None:
    async with listener:
        while True:
            token = object()
            await limiter.acquire_on_behalf_of(token)
            stream = await listener.accept()
            nursery.start_soon(_connection, handler, stream, limiter, token)


async def _connection(handler: Handler, stream: trio.SocketStream,
                      limiter: trio.CapacityLimiter, token: object) -> None:
    try:
        await _exchanges(handler, stream)
    finally:
        limiter.release_on_behalf_of(token)


async def _exchanges(handler: Handler, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
    async with stream:
        try:
            while await _one_exchange(handler, stream, conn):
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the client went away
        except h11.RemoteProtocolError as exc:
            await _refuse(stream, conn, exc)


async def _one_exchange(handler: Handler, stream: trio.SocketStream,
                        conn: h11.Connection) -> bool:
    """Read one request, answer it; whether the connection can carry another."""
    request = await _read_request(stream, conn)
    if request is None:
        return False
    response = await handler(request)
    await _send(stream, conn, request, response)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    head: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with trio.move_on_after(IDLE_TIMEOUT) as scope:
                data = await stream.receive_some(CHUNK)
            if scope.cancelled_caught:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return _request(head)
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: a request body, which no read-only route uses


def _request(head: h11.Request) -> Request:
    size = len(head.target) + sum(len(k) + len(v) for k, v in head.headers)
    if size > MAX_HEADER:  # h11 checks only heads that arrive in pieces
        raise h11.RemoteProtocolError(f"request head of {size} bytes exceeds {MAX_HEADER}",
                                      error_status_hint=431)
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target, _, query = head.target.decode("latin-1").partition("?")
    return Request(head.method.decode("ascii", "replace"), target, query, headers)


async def _send(stream: trio.SocketStream, conn: h11.Connection, request: Request,
                response: Response) -> None:
    headers = dict(response.headers)
    body = response.body
    if isinstance(body, bytes):
        headers.setdefault("Content-Length", str(len(body)))
    else:
        headers.setdefault("Content-Length", str(response.length))
    head = h11.Response(status_code=response.status,
                        headers=[(k.encode(), v.encode()) for k, v in headers.items()])
    await stream.send_all(conn.send(head))
    if request.method != "HEAD":
        if isinstance(body, bytes):
            if body:
                await stream.send_all(conn.send(h11.Data(data=body)))
        else:
            await _send_file(stream, conn, body)
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _send_file(stream: trio.SocketStream, conn: h11.Connection, path: Path) -> None:
    async with await trio.open_file(path, "rb") as f:
        while chunk := await f.read(CHUNK):
            await stream.send_all(conn.send(h11.Data(data=chunk)))


async def _refuse(stream: trio.SocketStream, conn: h11.Connection,
                  exc: h11.RemoteProtocolError) -> None:
    """Answer a request h11 could not parse (431 for a too large head), then close."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = exc.error_status_hint
    body = f"{exc}\n".encode()
    try:
        await stream.send_all(conn.send(h11.Response(
            status_code=status, headers=[("Content-Length", str(len(body))),
                                         ("Connection", "close")])))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
