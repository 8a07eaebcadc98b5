"""The daemon's control operations: the protocol's table, its checks before
dispatch, and the handlers over a real store and Vfs behind the real control
server and client (a fake substituter underneath)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from lazystore.control import protocol, server
from lazystore.control.client import ControlClient
from lazystore.daemon.operations import ControlOperations
from lazystore.errors import ControlError
from lazystore.fs.vfs import Vfs
from lazystore.store.cache import LocalStore
from tests.test_store_cache import A, B, C, FakeSubstituters, sample_paths


def test_every_operation_has_a_handler_taking_its_declared_arguments() -> None:
    ops = ControlOperations(None, None, "/mnt", [])  # type: ignore[arg-type]
    assert sorted(ops.handlers) == sorted(protocol.OPERATIONS)
    for name, handler in ops.handlers.items():
        params = inspect.signature(handler).parameters.values()
        assert tuple(p.name for p in params) == protocol.OPERATIONS[name].arg_names, name
        assert all(p.default is inspect.Parameter.empty for p in params), name  # table's


@pytest.mark.parametrize("message, error", [
    ({"op": "mount"}, "unknown control operation 'mount' (known: status, prefetch,"),
    ({"op": 7}, "unknown control operation 7"),
    ({}, "unknown control operation None"),
    ({"op": "status", "args": [1]}, "status: the arguments are not a map"),
    ({"op": "status", "args": {"a": 1}}, "status: unknown argument 'a' (takes no arguments)"),
    ({"op": "prefetch", "args": {}}, "prefetch: missing argument 'paths'"),
    ({"op": "prefetch", "args": {"paths": "/nix/store/x"}},
     "prefetch: paths must be a list of store paths, not str"),
    ({"op": "prefetch", "args": {"paths": [1]}},
     "prefetch: paths must be a list of store paths, not list"),
    ({"op": "prefetch", "args": {"paths": [], "closure": 1}},
     "prefetch: closure must be true or false, not int"),
    ({"op": "view_create", "args": {"id": "v", "bogus": 1}},
     "view_create: unknown argument 'bogus' (takes id, paths, closure_info, prefetch)"),
    ({"op": "view_create", "args": {"id": "v"}}, "view_create: needs paths or closure_info"),
    ({"op": "view_create", "args": {"id": None, "paths": []}},
     "view_create: id must be a string, not nil"),
    ({"op": "view_remove", "args": {}}, "view_remove: missing argument 'id'"),
])
def test_bad_requests_are_refused_with_one_line(message: dict[str, Any], error: str) -> None:
    with pytest.raises(ControlError) as info:
        protocol.parse_request(message)
    assert str(info.value).startswith(error) and "\n" not in str(info.value)


def test_good_requests_get_their_defaults() -> None:
    assert protocol.parse_request({"op": "status"}) == ("status", {})
    assert protocol.parse_request({"op": "evict", "args": {}}) == ("evict", {"paths": ()})
    assert protocol.parse_request({"op": "view_create", "args": {"id": "v", "closure_info": "x"}}) \
        == ("view_create", {"id": "v", "paths": (), "closure_info": "x", "prefetch": ()})


async def _serve(
    tmp_path: Path, subs: FakeSubstituters, client_fn: Callable[[ControlClient], Any]
) -> tuple[Any, LocalStore]:
    """Run *client_fn* (in a thread) against a real control server answering
    with ControlOperations over a LocalStore and Vfs."""
    sock = str(tmp_path / "ctl.sock")
    async with LocalStore(subs, tmp_path / "cache") as store:
        ops = ControlOperations(store, Vfs(store), str(tmp_path / "mnt"), ["http://cache"])
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, sock, ops.handle)

            def call() -> Any:
                with ControlClient(sock, timeout=30) as client:
                    return client_fn(client)

            try:
                return await trio.to_thread.run_sync(call), store
            finally:
                nursery.cancel_scope.cancel()


def _errors(client: ControlClient, requests: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for op, args in requests:
        with pytest.raises(ControlError) as info:
            client.call(op, **args)
        out.append(str(info.value))
    return out


async def test_bad_requests_reach_no_handler(tmp_path: Path) -> None:
    subs = FakeSubstituters(sample_paths())
    requests = [
        ("prefetch", {"paths": A}),  # a string, not a list: never fetched
        ("prefetch", {"paths": [A], "closure": "yes"}),
        ("prefetch", {"paths": [A], "parallel": 100}),
        ("view_create", {"id": "v", "path": [A]}),
        ("evict", {"paths": [A, 3]}),
        ("status", {"verbose": True}),
    ]

    def client(c: ControlClient) -> tuple[list[str], Any]:
        return _errors(c, requests), c.call("status")

    (messages, status), _ = await _serve(tmp_path, subs, client)
    assert [m.split(":")[0] for m in messages] == [op for op, _ in requests]
    assert subs.queries == [] and subs.fetches == [] and status["views"] == []


async def test_what_the_vfs_refuses_is_a_control_error(tmp_path: Path) -> None:
    subs = FakeSubstituters(sample_paths())

    def client(c: ControlClient) -> list[str]:
        c.call("view_create", id="v", paths=[A])
        return _errors(c, [
            ("view_create", {"id": ".hidden", "paths": [A]}),
            ("view_create", {"id": "v", "paths": [B]}),
        ])

    messages, _ = await _serve(tmp_path, subs, client)
    assert messages == [
        "view_create: invalid view id '.hidden'",
        "view_create: view v exists with other store paths",
    ]


async def test_view_from_closure_info_and_paths(tmp_path: Path) -> None:
    info = "g" * 32 + "-closure-info"
    paths = sample_paths()
    paths[info] = {"store-paths": f"/nix/store/{A}\n/nix/store/{B}\n".encode()}

    def client(c: ControlClient) -> list[Any]:
        created = c.call("view_create", id="c1", paths=[f"/nix/store/{C}"], closure_info=info)
        pinned = c.call("status")["pinned"]
        removed = [c.call("view_remove", id="c1"), c.call("view_remove", id="c1")]  # idempotent
        return [created, pinned, removed, c.call("status")["pinned"]]

    (created, pinned, removed, after), _ = await _serve(tmp_path, FakeSubstituters(paths), client)
    assert created == {"path": f"{tmp_path}/mnt/.views/c1", "paths": [C, A, B]}
    assert pinned == sorted([A, B, C])  # not the closure-info path itself
    assert removed == [{}, {}] and after == []


async def test_status_names_the_mount_and_the_substituters(tmp_path: Path) -> None:
    status, _ = await _serve(
        tmp_path, FakeSubstituters(sample_paths()), lambda c: c.call("status")
    )
    assert status["mount_point"] == f"{tmp_path}/mnt"
    assert status["substituters"] == ["http://cache"]
    assert status["views"] == [] and status["open_files"] == 0 and status["inodes"] == 2


async def test_vfs_refusals_are_raised_as_control_errors_not_fs_errors(tmp_path: Path) -> None:
    async with LocalStore(FakeSubstituters(sample_paths()), tmp_path) as store:
        ops = ControlOperations(store, Vfs(store), "/mnt", [])
        with pytest.raises(ControlError) as info:
            await ops.handle("view_create", {"id": "a/b", "paths": [A], "closure_info": None,
                                            "prefetch": ()})
        assert type(info.value) is ControlError and not hasattr(info.value, "errno")
