"""The control server over a real unix socket, with the blocking client."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from lazystore.control import protocol, server
from lazystore.control.client import ControlClient
from lazystore.errors import ControlError, StoreError


async def handler(op: str, args: dict[str, Any]) -> Any:
    if op in ("status", "prefetch"):
        return {"echo": args, "paths_materialized": []}
    if op == "evict":
        raise StoreError("nothing to evict here")
    raise RuntimeError("a bug")


async def _with_server(path: Path, fn: Any) -> Any:
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, str(path), handler)
        try:
            return await trio.to_thread.run_sync(fn)
        finally:
            nursery.cancel_scope.cancel()


async def test_requests_on_one_connection(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"

    def client() -> list[Any]:
        with ControlClient(str(sock), timeout=10) as c:
            return [c.call("prefetch", paths=["a"]), c.call("status")]

    first, second = await _with_server(sock, client)
    assert first["echo"] == {"paths": ["a"], "closure": False} and second["echo"] == {}
    assert not sock.exists()  # removed when the server stops


async def test_socket_is_private(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    mode = await _with_server(sock, lambda: os.stat(sock).st_mode)
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


@pytest.mark.allow_log('control request failed unexpectedly')
async def test_errors_come_back_as_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"

    def client() -> list[str]:
        messages = []
        with ControlClient(str(sock), timeout=10) as c:
            for op, args in (("evict", {}), ("view_remove", {"id": "x"}), ("no_such_op", {})):
                try:
                    c.call(op, **args)
                except ControlError as exc:
                    messages.append(str(exc))
            c.call("status")  # the connection survived all of them
        return messages

    messages = await _with_server(sock, client)
    assert messages[0] == "nothing to evict here"
    assert messages[1].startswith("internal error")
    assert "unknown control operation" in messages[2]
    assert all("\n" not in m for m in messages)


async def test_malformed_frame_is_answered_and_dropped(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"

    def client() -> Any:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
            header = s.recv(4)
            body = s.recv(protocol.frame_length(header))
            return protocol.decode_body(body)

    reply = await _with_server(sock, client)
    assert reply["ok"] is False and "malformed" in reply["error"]


async def test_live_socket_refused_stale_socket_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound but never listening: what a killed daemon leaves
    stale.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, str(sock), handler)
        with pytest.raises(ControlError, match="another lazystore daemon"):
            server.claim_socket_path(str(sock))
        nursery.cancel_scope.cancel()


def test_client_reports_absent_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="cannot reach the lazystore daemon"):
        ControlClient(str(tmp_path / "none.sock")).call("status")
