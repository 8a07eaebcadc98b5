"""The registry's HTTP layer (trio + h11) over real sockets on 127.0.0.1,
in process: keep-alive, streamed file bodies, the connection cap."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from lazystore.registry import http


async def _serve(nursery: trio.Nursery, handler: http.Handler, **kw: int) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(lambda task_status: http.serve(handler, listeners, **kw,
                                                       task_status=task_status))
    return int(listeners[0].socket.getsockname()[1])


async def _read_response(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head.split(b"\r\n")[0] + b"\n" + body


async def test_keep_alive_and_streamed_files(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: several chunks

    async def handler(request: http.Request) -> http.Response:
        if request.target == "/file":
            return http.Response(200, {}, blob, blob.stat().st_size)
        return http.Response(200, {}, request.target.encode())

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        for target in ("/a", "/file", "/b"):
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, _, body = (await _read_response(stream)).partition(b"\n")
            assert status == b"HTTP/1.1 200 "
            assert body == (blob.read_bytes() if target == "/file" else target.encode())
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_cap_wait_until_one_closes() -> None:
    served: list[str] = []

    async def handler(request: http.Request) -> http.Response:
        served.append(request.target)
        return http.Response(200, {}, b"ok")

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler, max_connections=2)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        third = await trio.open_tcp_stream("127.0.0.1", port)  # in the listen backlog
        await third.send_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        assert served == []  # two idle connections hold both places
        await idle[0].aclose()
        assert (await _read_response(third)).endswith(b"\nok")
        assert served == ["/third"]
        for s in (idle[1], third):
            await s.aclose()
        nursery.cancel_scope.cancel()
