"""The mounted tree without a mount: the Vfs and the pyfuse3 Operations called
directly (s3ql's t3 tier), over a fake substituter."""

from __future__ import annotations

import errno
import importlib
import inspect
import logging
import os
import pkgutil
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

import lazystore
from lazystore.errors import LazystoreError, StoreError, SubstituterError
from lazystore.fs.operations import Operations, to_errno
from lazystore.fs.vfs import (
    ROOT_INODE,
    VIEWS_INODE,
    BadHandle,
    FsError,
    InvalidRequest,
    IsADir,
    NoEntry,
    NotADir,
    Vfs,
)
from lazystore.store.cache import LocalStore, PathNotFound
from lazystore.store.sink import CacheFullError
from tests.test_store_cache import (
    EMPTY,
    LINK,
    MISSING,
    ROOTS,
    SCRIPT,
    TEXT,
    A,
    B,
    C,
    FakeSubstituters,
    sample_paths,
)


async def _walk(vfs: Vfs, *names: str) -> int:
    ino = ROOT_INODE
    for name in names:
        ino = (await vfs.lookup(ino, name)).ino
    return ino


@pytest.fixture
def subs() -> FakeSubstituters:
    return FakeSubstituters(sample_paths())


async def test_stat_and_list_need_no_fetch(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        attr = await vfs.lookup(ROOT_INODE, A)
        assert attr.kind == "d" and stat.S_IMODE(attr.mode) == 0o555
        lib = await vfs.lookup(attr.ino, "lib")
        names = [n for _, n, _ in await vfs.listdir(lib.ino, 0)]
        assert sorted(names) == ["data", "link"]
        data = await vfs.lookup(lib.ino, "data")
        assert data.size == 16 and stat.S_IMODE(data.mode) == 0o444
        assert subs.fetches == []


async def test_readdir_resumes_from_stable_key(tmp_path: Path) -> None:
    subs = FakeSubstituters({A: {f"f{i}": b"x" for i in range(100)}})
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        ino = await _walk(vfs, A)
        entries = list(await vfs.listdir(ino, 0))
        cut = entries[40][0]
        rest = await vfs.listdir(ino, cut)
        assert [n for _, n, _ in entries[41:]] == [n for _, n, _ in rest]


async def test_invalid_and_missing_names_are_enoent(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        for name in ("bogus", ".hidden", MISSING, "a" * 32):
            with pytest.raises(NoEntry):
                await vfs.lookup(ROOT_INODE, name)
    assert subs.queries == [MISSING]  # invalid names never reach the network


async def test_same_inode_through_root_and_view(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        await vfs.create_view("v1", [A, B])
        via_view = await _walk(vfs, ".views", "v1", "nix", "store", A, "lib", "data")
        via_root = await _walk(vfs, A, "lib", "data")
        assert via_view == via_root
        view_dir = await _walk(vfs, ".views", "v1", "nix", "store")
        assert sorted(n for _, n, _ in await vfs.listdir(view_dir, 0)) == sorted([A, B])
        with pytest.raises(NoEntry):
            await vfs.lookup(view_dir, C)  # known store path, not in this view
        assert store.pinned(A) and store.pinned(B)
        vfs.remove_view("v1")
        assert not store.pinned(A)
        with pytest.raises(NoEntry):
            await vfs.lookup(view_dir, B)  # the kernel may still hold the removed dir
        with pytest.raises(NoEntry):
            await vfs.lookup(VIEWS_INODE, "v1")


async def test_view_queries_its_paths_in_parallel(tmp_path: Path, subs: FakeSubstituters) -> None:
    # Each query waits until all three are in flight: one at a time would never finish.
    in_flight, all_asked = 0, trio.Event()
    plain_query = subs.query

    async def gathered_query(path):  # type: ignore[no-untyped-def]
        nonlocal in_flight
        in_flight += 1
        if in_flight == 3:
            all_asked.set()
        await all_asked.wait()
        return await plain_query(path)

    subs.query = gathered_query  # type: ignore[method-assign]
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        with trio.fail_after(10):
            await vfs.create_view("v", [A, B, C])
        assert sorted(vfs.views["v"].bases) == sorted([A, B, C])


async def test_view_asked_twice_at_once_is_one_view(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    # Both requests wait on the same narinfo queries; the second to finish must
    # neither replace the first's view (whose inodes a mount may already use)
    # nor pin its paths a second time.
    gate = trio.Event()
    plain_query = subs.query

    async def slow_query(path):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await plain_query(path)

    subs.query = slow_query  # type: ignore[method-assign]
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vfs.create_view, "v", [A, B])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(vfs.create_view, "v", [A, B])
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        view = vfs.views["v"]
        assert len(vfs.views) == 1
        view_ino = (await vfs.lookup(VIEWS_INODE, "v")).ino
        assert view_ino == view.dirs[0]
        store_dir = await vfs.lookup(await _walk(vfs, ".views", "v", "nix"), "store")
        assert (await vfs.lookup(store_dir.ino, A)).kind == "d"
        vfs.remove_view("v")
        assert not store.pinned(A) and not store.pinned(B)


@pytest.mark.allow_log(r"view v: .* is in none of the substituters")
async def test_view_of_an_unknown_path_is_made_at_once_and_the_path_is_absent(
        tmp_path: Path, subs: FakeSubstituters, caplog: pytest.LogCaptureFixture) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        await vfs.create_view("v", [A, MISSING])  # nothing asked yet: made at once
        store_dir = await _walk(vfs, ".views", "v", "nix", "store")
        assert (await vfs.lookup(store_dir, A)).kind == "d"
        with pytest.raises(NoEntry):
            await vfs.lookup(store_dir, MISSING)
        assert store.pinned(A)
    assert any(MISSING in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


async def test_view_is_made_before_any_narinfo_arrives(
        tmp_path: Path, subs: FakeSubstituters) -> None:
    # Every query waits for the gate; the view exists anyway, and a lookup of
    # one of its paths waits only for that path's narinfo.
    gate: dict[str, trio.Event] = {A: trio.Event(), B: trio.Event()}
    plain_query = subs.query

    async def gated_query(path):  # type: ignore[no-untyped-def]
        await gate[path.basename].wait()
        return await plain_query(path)

    subs.query = gated_query  # type: ignore[method-assign]
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        with trio.fail_after(10):
            await vfs.create_view("v", [A, B])
            store_dir = await _walk(vfs, ".views", "v", "nix", "store")
            gate[A].set()
            assert (await vfs.lookup(store_dir, A)).kind == "d"  # B still waits
            assert B not in store.records
            gate[B].set()


async def test_forget_drops_unreferenced_inodes(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        ino = await _walk(vfs, A)
        await vfs.lookup(ROOT_INODE, A)
        vfs.forget(ino, 1)
        assert ino in vfs.inodes
        vfs.forget(ino, 1)
        assert ino not in vfs.inodes
        vfs.forget(ino, 1)  # never raises
        assert (await _walk(vfs, A)) == ino  # a path's number is always its own
        assert vfs.inodes[ino].lookups == 1


async def test_open_read_fetches_once_and_pins(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        ops = Operations(Vfs(store))
        a = (await ops.lookup(ROOT_INODE, A.encode())).st_ino
        lib = (await ops.lookup(a, b"lib")).st_ino
        data = (await ops.lookup(lib, b"data")).st_ino
        link = (await ops.lookup(lib, b"link")).st_ino
        info = await ops.open(data, 0, None)
        assert info.keep_cache
        assert await ops.read(info.fh, 0, 100) == b"hello from liba\n"
        assert await ops.readlink(link, None) == b"data"
        assert subs.fetches == [A]
        assert await store.evict([]) == []  # open file: pinned
        await ops.release(info.fh)
        assert await store.evict([]) == [A]


async def test_fuse_requests_are_counted_by_kind_failed_ones_too(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        ops = Operations(vfs)
        a = (await ops.lookup(ROOT_INODE, A.encode())).st_ino
        lib = (await ops.lookup(a, b"lib")).st_ino
        with pytest.raises(pyfuse3.FUSEError):
            await ops.lookup(lib, b"missing")
        data = (await ops.lookup(lib, b"data")).st_ino
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.getxattr(data, b"trusted.overlay.metacopy", None)
        assert info.value.errno == errno.ENODATA
        fh = (await ops.open(data, os.O_RDONLY, None)).fh
        await ops.read(fh, 0, 100)
        await ops.release(fh)
        await ops.forget([(data, 1)])
        assert vfs.fuse_requests == {"lookup": 4, "getxattr": 1, "open": 1, "read": 1,
                                     "release": 1, "forget": 1}


# pyfuse3.Operations handlers that change nothing; every other one writes.
NON_WRITING = {
    "access", "flush", "forget", "fsync", "fsyncdir", "getattr", "getxattr", "init",
    "listxattr", "lookup", "open", "opendir", "poll", "read", "readdir", "readlink",
    "release", "releasedir", "stacktrace", "statfs",
}


def _write_handlers() -> list[str]:
    names = [n for n, f in vars(pyfuse3.Operations).items()
             if callable(f) and not n.startswith("_") and n not in NON_WRITING]
    assert {"setattr", "mkdir", "write", "create", "rename", "setxattr"} <= set(names)
    return sorted(names)


@pytest.mark.parametrize("handler", _write_handlers())
async def test_writes_are_erofs(tmp_path: Path, subs: FakeSubstituters, handler: str) -> None:
    async with LocalStore(subs, tmp_path) as store:
        ops = Operations(Vfs(store))
        a = (await ops.lookup(ROOT_INODE, A.encode())).st_ino
        lib = (await ops.lookup(a, b"lib")).st_ino
        data = (await ops.lookup(lib, b"data")).st_ino
        fh = (await ops.open(data, os.O_RDONLY, None)).fh
        # arguments by pyfuse3's parameter names, naming things that exist
        values = {
            "inode": data, "parent_inode": lib, "parent_inode_old": lib,
            "parent_inode_new": a, "new_parent_inode": a, "name": b"data",
            "name_old": b"data", "name_new": b"new", "new_name": b"new", "target": b"data",
            "mode": 0o644, "rdev": 0, "flags": os.O_WRONLY | os.O_CREAT, "value": b"v",
            "attr": pyfuse3.EntryAttributes(), "fields": pyfuse3.SetattrFields(), "fh": fh,
            "off": 0, "buf": b"x", "ctx": None,
        }
        params = list(inspect.signature(getattr(pyfuse3.Operations, handler)).parameters)[1:]
        assert all(p in values for p in params), f"give {handler}'s arguments a value"
        with pytest.raises(pyfuse3.FUSEError) as info:
            await getattr(ops, handler)(*(values[p] for p in params))
        assert info.value.errno == errno.EROFS
        await ops.release(fh)
        assert subs.fetches == [A]  # only the read-only open above


@pytest.mark.parametrize("flags", [
    os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND,
    os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_TRUNC,
])
async def test_open_for_writing_is_erofs(
    tmp_path: Path, subs: FakeSubstituters, flags: int
) -> None:
    async with LocalStore(subs, tmp_path) as store:
        ops = Operations(Vfs(store))
        a = (await ops.lookup(ROOT_INODE, A.encode())).st_ino
        data = (await ops.lookup((await ops.lookup(a, b"lib")).st_ino, b"data")).st_ino
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(data, flags, None)
        assert info.value.errno == errno.EROFS
        assert subs.fetches == []  # refused before anything is fetched
        assert await ops.access(data, os.W_OK, None) is False
        assert await ops.access(data, os.R_OK, None) is True
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(a, os.O_RDONLY, None)
        assert info.value.errno == errno.EISDIR


@pytest.mark.allow_log('NAR hash mismatch')
async def test_fetch_failure_is_eio_then_retry_succeeds(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    subs.fail.add(B)
    async with LocalStore(subs, tmp_path) as store:
        ops = Operations(Vfs(store))
        big = (await ops.lookup((await ops.lookup(ROOT_INODE, B.encode())).st_ino, b"big")).st_ino
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(big, 0, None)
        assert info.value.errno == errno.EIO
        assert not store.pinned(B)
        subs.fail.clear()
        fh = (await ops.open(big, 0, None)).fh
        assert await ops.read(fh, 9990, 100) == b"b" * 10


# Errors the fs layer answers with their own errno; every FsError subclass is here.
FS_ERRNOS = {
    FsError: errno.EIO, NoEntry: errno.ENOENT, NotADir: errno.ENOTDIR,
    IsADir: errno.EISDIR, InvalidRequest: errno.EINVAL, BadHandle: errno.EBADF,
}


def _all_subclasses(root: type[BaseException]) -> list[type[BaseException]]:
    found, todo = [], [root]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += [c for c in cls.__subclasses__() if c not in found and c not in todo]
    return found


def _every_lazystore_module() -> None:
    """Import the whole package, so that every exception class it defines exists."""
    for info in pkgutil.walk_packages(lazystore.__path__, "lazystore."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def _instance(cls: type[BaseException]) -> BaseException:
    exc = cls.__new__(cls)
    BaseException.__init__(exc, "boom")
    return exc


def _exception_cases() -> list[tuple[type[BaseException], int, int | None]]:
    """(class, errno, level of the record it logs or None), for every exception
    of lazystore, every built-in OSError and every trio exception a handler can
    meet, found by walking the hierarchies (a new class cannot be missed)."""
    _every_lazystore_module()
    cases: list[tuple[type[BaseException], int, int | None]] = []
    for cls in _all_subclasses(LazystoreError):
        if issubclass(cls, FsError):
            cases.append((cls, FS_ERRNOS.get(cls, -1), None))  # -1: add it to FS_ERRNOS
        elif issubclass(cls, PathNotFound):
            cases.append((cls, errno.ENOENT, None))
        elif issubclass(cls, CacheFullError):  # the reader is told the cause
            cases.append((cls, errno.ENOSPC, logging.WARNING))
        else:
            cases.append((cls, errno.EIO, logging.WARNING))
    # what os calls raise (the classes of other libraries are theirs to map)
    os_errors = [cls for cls in _all_subclasses(OSError) if cls.__module__ == "builtins"]
    cases += [(cls, errno.EIO, logging.WARNING) for cls in os_errors]
    trio_errors = [obj for _, obj in inspect.getmembers(trio, inspect.isclass)
                   if issubclass(obj, Exception) and obj.__module__.startswith("trio")]
    cases += [(cls, errno.EIO, logging.ERROR) for cls in trio_errors]
    cases += [(RuntimeError, errno.EIO, logging.ERROR), (KeyError, errno.EIO, logging.ERROR)]
    return cases


def test_the_exception_walk_finds_the_hierarchies() -> None:
    classes = {cls for cls, _, _ in _exception_cases()}
    assert set(FS_ERRNOS) <= classes, "FS_ERRNOS names a class that is gone"
    assert sorted(c.__name__ for c in _all_subclasses(FsError) if c not in FS_ERRNOS) == []
    assert {StoreError, PathNotFound, SubstituterError, FileNotFoundError,
            PermissionError, trio.TooSlowError, trio.BrokenResourceError} <= classes
    assert len(classes) > 40


# The record each logged level stands for: the error's message, or a bug's.
_LOGGED = {logging.WARNING: "boom", logging.ERROR: "internal error answered with EIO"}


@pytest.mark.parametrize(
    "cls, expected, level",
    [pytest.param(*case, marks=[pytest.mark.allow_log(_LOGGED[case[2]])] if case[2] else [])
     for case in _exception_cases()],
    ids=lambda v: f"{v.__module__}.{v.__qualname__}" if isinstance(v, type) else None,
)
def test_every_exception_maps_to_an_errno(
    cls: type[BaseException], expected: int, level: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lazystore.fs.operations")
    assert to_errno(_instance(cls)) == expected
    levels = [r.levelno for r in caplog.records if r.name == "lazystore.fs.operations"]
    assert levels == ([] if level is None else [level])
    if level == logging.ERROR:  # a bug: logged with its traceback
        assert caplog.records[-1].exc_info is not None


def test_a_fuse_error_keeps_its_errno() -> None:
    assert to_errno(pyfuse3.FUSEError(errno.ENOTDIR)) == errno.ENOTDIR


@pytest.mark.allow_log('internal error answered with EIO')
async def test_handler_bug_is_eio_not_a_crash(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)

        async def broken(ino: int) -> None:
            raise RuntimeError("bug")

        vfs.getattr = broken  # type: ignore[method-assign]
        with pytest.raises(pyfuse3.FUSEError) as info:
            await Operations(vfs).getattr(ROOT_INODE, None)
        assert info.value.errno == errno.EIO


async def test_statfs_shows_the_quota_and_what_the_cache_holds(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    async with LocalStore(subs, tmp_path, cache_limit=1 << 30) as store:
        ops = Operations(Vfs(store))
        empty = await ops.statfs(None)
        await store.materialize(B)
        st = await ops.statfs(None)
        disk = os.statvfs(tmp_path)
    assert st.f_bsize == st.f_frsize == 4096 and st.f_namemax == 255
    assert st.f_blocks == empty.f_blocks == (1 << 30) // 4096  # the quota
    used = -(-store.cache_bytes // 4096)
    assert store.cache_bytes >= 10_000 and used >= 3
    if disk.f_bavail * disk.f_frsize > 2 << 30:  # the disk has more room than the quota
        assert empty.f_bfree == empty.f_blocks
        assert st.f_bfree == st.f_bavail == st.f_blocks - used  # df: used = the cache's bytes
    else:
        assert st.f_bfree <= disk.f_bavail * disk.f_frsize // 4096
    assert st.f_files == 1 + 2  # B's record; the root and .views inodes


async def test_statfs_without_a_quota_is_the_cache_file_system(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    async with LocalStore(subs, tmp_path) as store:
        st = await Operations(Vfs(store)).statfs(None)
    disk = os.statvfs(tmp_path)
    assert st.f_blocks == disk.f_blocks * disk.f_frsize // 4096
    assert 0 < st.f_bfree == st.f_bavail <= st.f_blocks


@pytest.mark.allow_log('disagrees with its verified NAR')
async def test_listing_is_a_hint_until_the_nar_verified(
    tmp_path: Path, subs: FakeSubstituters, caplog: pytest.LogCaptureFixture
) -> None:
    real_listing = subs.listing

    async def lying_listing(path: object) -> object:
        doc = await real_listing(path)  # type: ignore[arg-type]
        doc["root"]["entries"]["big"]["size"] = 5  # type: ignore[index]
        return doc

    subs.listing = lying_listing  # type: ignore[method-assign]
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        big = await _walk(vfs, B, "big")
        assert (await vfs.getattr(big)).size == 5
        assert vfs.timeouts(big) == (1.0, 1.0)  # short: the kernel asks again soon
        fh = await vfs.open(big)
        assert (await vfs.getattr(big)).size == 10_000  # the verified tree wins
        assert vfs.timeouts(big)[0] > 3600
        assert len(await vfs.read(fh, 0, 20_000)) == 10_000
        vfs.release(fh)
    assert any("disagrees" in r.getMessage() for r in caplog.records)


async def test_cached_readdir_rows_never_hand_out_forgotten_inodes(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        await store.materialize(A)  # verified tree: its rows are kept
        lib = await _walk(vfs, A, "lib")
        first = {name: attr.ino for _, name, attr in await vfs.listdir(lib, 0)}
        vfs.remember(first["data"])
        vfs.forget(first["data"], 1)
        assert first["data"] not in vfs.inodes
        again = {name: attr.ino for _, name, attr in await vfs.listdir(lib, 0)}
        assert again["link"] == first["link"]
        assert again["data"] == first["data"] and again["data"] in vfs.inodes
        assert vfs.inodes[again["data"]].rel == ("lib", "data")


async def test_only_view_ids_are_looked_up_again(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        await vfs.create_view("v", [A])
        view, nix, store_dir = (
            await _walk(vfs, ".views", "v"), await _walk(vfs, ".views", "v", "nix"),
            await _walk(vfs, ".views", "v", "nix", "store"),
        )
        assert vfs.timeouts(view)[0] == 0  # the id may be removed and made again
        assert vfs.timeouts(nix)[0] > 3600 and vfs.timeouts(store_dir)[0] > 3600
        vfs.remove_view("v")
        await vfs.create_view("v", [B])
        assert await _walk(vfs, ".views", "v") != view  # new inodes for the new view
        assert await _walk(vfs, ".views", "v", "nix", "store", B)


@pytest.mark.parametrize("verified", [False, True], ids=["listing", "verified"])
async def test_file_and_symlink_roots_read_as_in_the_nix_store(
    tmp_path: Path, verified: bool
) -> None:
    subs = FakeSubstituters({**ROOTS, A: sample_paths()[A]})
    async with LocalStore(subs, tmp_path) as store:
        if verified:
            for b in ROOTS:
                await store.materialize(b)
        vfs = Vfs(store)
        ops = Operations(vfs)
        await vfs.create_view("v", [TEXT, SCRIPT, EMPTY, LINK, A])
        in_view = await _walk(vfs, ".views", "v", "nix", "store")
        expected = {
            TEXT: (stat.S_IFREG | 0o444, 10), SCRIPT: (stat.S_IFREG | 0o555, 18),
            EMPTY: (stat.S_IFREG | 0o444, 0), LINK: (stat.S_IFLNK | 0o777, 24),
        }
        for parent in (ROOT_INODE, in_view):
            for b, (mode, size) in expected.items():
                entry = await ops.lookup(parent, b.encode())
                assert (entry.st_mode, entry.st_size) == (mode, size), b
                assert (await ops.getattr(entry.st_ino, None)).st_mode == mode
            listed = {n: a for _, n, a in await vfs.listdir(parent, 0)}
            assert {b: (listed[b].mode, listed[b].size) for b in expected} == expected
        contents = {TEXT: b"some text\n", SCRIPT: b"#!/bin/sh\necho hi\n", EMPTY: b""}
        for b, data in contents.items():
            ino = (await ops.lookup(ROOT_INODE, b.encode())).st_ino
            fh = (await ops.open(ino, 0, None)).fh
            assert await ops.read(fh, 0, 100) == data
            await ops.release(fh)
            with pytest.raises(pyfuse3.FUSEError) as info:
                await ops.opendir(ino, None)
            assert info.value.errno == errno.ENOTDIR
            with pytest.raises(pyfuse3.FUSEError) as info:
                await ops.lookup(ino, b"x")
            assert info.value.errno == errno.ENOTDIR
        link = (await ops.lookup(in_view, LINK.encode())).st_ino
        assert await ops.readlink(link, None) == b"/nix/store/somewhereelse"
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(link, 0, None)
        assert info.value.errno == errno.EINVAL
        assert sorted(subs.fetches) == sorted(ROOTS)


async def test_inode_numbers_are_the_same_in_the_next_daemon(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    """The kernel keeps the numbers a daemon handed out after it restarts: the
    next one (a new Vfs on the same cache) knows them without a lookup."""
    async with LocalStore(subs, tmp_path) as store:
        first = Vfs(store)
        a, lib, data = (await _walk(first, A), await _walk(first, A, "lib"),
                        await _walk(first, A, "lib", "data"))
        assert len({a, lib, data, ROOT_INODE, VIEWS_INODE}) == 5
        fh = await first.open(data)
        later = Vfs(store)
        assert (await later.getattr(data)).size == len(b"hello from liba\n")
        assert [n for _, n, _ in await later.listdir(lib, 0)] == ["data", "link"]
        assert (await later.lookup(lib, "data")).ino == data
        # a handle of the earlier daemon is opened again from its inode
        assert await later.read(fh, 0, 100) == b"hello from liba\n"
        assert later.open_files() == 1 and store.pinned(A)
        later.release(fh)
        assert later.open_files() == 0
        later.release(fh)  # the kernel's release of the earlier daemon's open
        with pytest.raises(BadHandle):
            await later.read(12345, 0, 1)  # names nothing
        with pytest.raises(NoEntry):
            await later.getattr(12345)
        first.release(fh)
        assert not store.pinned(A)


async def test_inodes_of_paths_the_index_lost_are_found_again(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    """A daemon killed before its index save: the next one learns the trees of
    the store paths the session journal names, then knows their inodes."""
    async with LocalStore(subs, tmp_path) as store:
        handed: list[str] = []
        first = Vfs(store)
        first.handed_out = handed.append
        data = await _walk(first, A, "lib", "data")
        assert handed == [A]
        store.records.clear()  # what the index had lost
        later = Vfs(store)
        with pytest.raises(NoEntry):
            await later.getattr(data)
        later = Vfs(store)
        later.adopt_handed_out(handed)
        assert (await later.getattr(data)).kind == "r"



async def test_inodes_of_a_path_whose_saved_record_had_no_tree_are_found_again(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    """The index was saved after a path's narinfo and before its tree, then the
    daemon was killed: the next one learns the tree of the path the journal
    names (the number of records stays the same) and knows its inodes, also
    for a second miss that comes while the tree is being learnt."""
    async with LocalStore(subs, tmp_path) as store:
        handed: list[str] = []
        first = Vfs(store)
        first.handed_out = handed.append
        lib, data = await _walk(first, A, "lib"), await _walk(first, A, "lib", "data")
        rec = store.records[A]
        rec.tree, rec.tree_verified = None, False  # what the index had
        later = Vfs(store)
        later.adopt_handed_out(handed)
        kinds: dict[int, str] = {}

        async def getattr_(ino: int) -> None:
            kinds[ino] = (await later.getattr(ino)).kind

        async with trio.open_nursery() as nursery:
            nursery.start_soon(getattr_, data)
            nursery.start_soon(getattr_, lib)
        assert kinds == {data: "r", lib: "d"}

async def test_views_come_back_with_their_inodes(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        saved: list[dict[str, list[str]]] = []
        first = Vfs(store)
        first.views_changed = saved.append
        await first.create_view("v", [A])
        inos = list(first.views["v"].dirs)
        assert saved[-1] == {"v": [A]}
        first.remove_view("v")
        assert saved[-1] == {}
        await first.create_view("v", [A])
        later = Vfs(store)
        later.restore_views(saved[-1])
        assert later.views["v"].dirs == first.views["v"].dirs == inos
        assert (await later.lookup(inos[-1], A)).ino == await _walk(first, A)


async def test_a_data_view_has_inodes_of_its_own_with_overlay_redirects(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    """Overlay reads a materialised file of a ``.data`` view from the cache (a
    data-only layer) by its metacopy/redirect xattrs; any other overlay (of the
    root or a plain view, without that layer) must never see them."""
    from lazystore.control.protocol import DATA_VIEW_SUFFIX
    from lazystore.fs.vfs import METACOPY, REDIRECT, REDIRECTS_SUFFIX

    assert REDIRECTS_SUFFIX == DATA_VIEW_SUFFIX  # the daemon and the snapshotter agree
    async with LocalStore(subs, tmp_path) as store:
        vfs = Vfs(store)
        await vfs.create_view("v1", [A])
        await vfs.create_view("v1.data", [A])
        plain = await _walk(vfs, ".views", "v1", "nix", "store", A, "lib", "data")
        data = await _walk(vfs, ".views", "v1.data", "nix", "store", A, "lib", "data")
        root = await _walk(vfs, A, "lib", "data")
        assert plain == root != data
        assert await vfs.overlay_xattr(data, METACOPY) is None  # not materialised yet
        await store.materialize(A)
        assert await vfs.overlay_xattr(data, METACOPY) == b""
        assert await vfs.overlay_xattr(data, REDIRECT) == f"/{A}/lib/data".encode()
        assert (store.data_path(A) / "lib/data").read_bytes() == b"hello from liba\n"
        for ino in (plain, root):
            assert await vfs.overlay_xattr(ino, METACOPY) is None
            assert await vfs.overlay_xattr(ino, REDIRECT) is None
        lib = await _walk(vfs, ".views", "v1.data", "nix", "store", A, "lib")
        assert await vfs.overlay_xattr(lib, METACOPY) is None  # directories: looked up as they are
        assert await vfs.overlay_xattr(data, b"user.other") is None
        # a restarted daemon finds the data view's inodes again by their numbers,
        # also when overlay's first request for one is for its xattrs (a lookup
        # across the restart: metacopy from the last daemon, redirect from this
        # one; "metacopy with no lower data found", EIO, if it said none)
        later = Vfs(store)
        later.restore_views({"v1.data": [A]})
        assert await later.overlay_xattr(data, REDIRECT) == f"/{A}/lib/data".encode()
        assert await later.overlay_xattr(data, METACOPY) == b""
        assert (await later.getattr(data)).size == len(b"hello from liba\n")
