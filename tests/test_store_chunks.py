"""Chunk-granular reads from caches indexed by ``lazystore cache index``:
the store over the real substituter and a real HTTP server (one that honours
Range and one that ignores it) or a file:// cache. Only the chunks a read
needs are fetched, each verified; every hostile index or data file, and every
server that does not answer a range exactly, falls back to the whole NAR with
one warning naming the cache and the path, and serves the right bytes."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from lazystore import cacheindex
from lazystore.daemon.operations import ControlOperations
from lazystore.errors import ControlError
from lazystore.fs.vfs import Vfs
from lazystore.nix import fileindex
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey
from lazystore.store.cache import INDEX_WHOLE, LocalStore
from lazystore.store.chunks import ChunkCache
from lazystore.substituter.chunks import encode
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig
from lazystore.testing import nixcache
from lazystore.testing.httpserver import serve_directory
from tests.support.faultserver import Fault, FaultServer

CHUNK = 64 << 10
MANUAL = ("share", "doc", "manual.txt")  # 1 MiB of "d" in the docs path


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, binary_cache: nixcache.BinaryCache
            ) -> nixcache.BinaryCache:
    """The sample cache, indexed with 64 KiB chunks."""
    root = tmp_path_factory.mktemp("indexed") / "cache"
    shutil.copytree(binary_cache.root, root)
    secret = SecretKey.parse(binary_cache.key.secret_file.read_text())
    results = cacheindex.index_cache(root, secret, CHUNK, jobs=2)
    assert all(isinstance(r, cacheindex.Result) for r in results)
    return nixcache.BinaryCache(root, binary_cache.key, binary_cache.top, binary_cache.paths)


def copy_of(cache: nixcache.BinaryCache, dest: Path) -> nixcache.BinaryCache:
    shutil.copytree(cache.root, dest)
    return nixcache.BinaryCache(dest, cache.key, cache.top, cache.paths)


@asynccontextmanager
async def store_over(url: str, key: str, cache_dir: Path, read_ahead: int = 0,
                     **store_args: Any) -> AsyncIterator[LocalStore]:
    """The store over *url*; without read-ahead unless asked (exact counts)."""
    config = SubstituterConfig(urls=[url], trusted_public_keys=[key], netrc_file=None,
                               attempts=2, backoff_base=0.01, backoff_max=0.05)
    async with Substituters(config) as subs:
        async with LocalStore(subs, cache_dir, **store_args) as store:
            store.read_ahead = read_ahead
            yield store


def base_of(cache: nixcache.BinaryCache, name: str) -> str:
    return next(Path(p).name for p in cache.paths if p.endswith(f"-{name}"))


def real(cache: nixcache.BinaryCache, base: str, rel: tuple[str, ...]) -> bytes:
    return Path("/nix/store", base, *rel).read_bytes()


async def read(store: LocalStore, base: str, rel: tuple[str, ...], offset: int, size: int
               ) -> bytes:
    """What the Vfs does for one read of an opened file (see fs/vfs.py)."""
    await store.tree(base)
    entry = await store.open_indexed(base, rel)
    try:
        if entry is not None:
            data = await store.read_indexed(base, entry, offset, size)
            if data is not None:
                return data
        path = (await store.materialize(base)).joinpath(*rel)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    finally:
        if entry is not None:
            store.close_indexed(entry)


@contextmanager
def served(cache: nixcache.BinaryCache, **options: Any) -> Iterator[Any]:
    with serve_directory(cache.root, **options) as server:
        yield server


def nar_of(cache: nixcache.BinaryCache, base: str) -> str:
    return "/" + NarInfo.parse(cache.narinfo_path(base).read_text()).url


def index_of(cache: nixcache.BinaryCache, base: str) -> fileindex.FileIndex:
    return fileindex.parse(cache.narinfo_path(base).with_suffix(".lzindex").read_bytes())


# --- the good path ------------------------------------------------------------


async def test_a_read_fetches_only_the_chunks_it_needs(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    manual = index_of(indexed, docs).files[-1]
    assert [listing_name.decode() for listing_name in manual.path] == list(MANUAL)
    last = manual.chunks[-1]
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            node = await store.tree(docs)  # from the index: no .ls, no NAR
            assert node.child("share").child("doc").child("manual.txt").size == 1 << 20
            tail = await read(store, docs, MANUAL, (1 << 20) - 10, 100)
            assert tail == real(indexed, docs, MANUAL)[-10:]
            stats = store.subs.stats  # type: ignore[attr-defined]
            assert stats.chunk_bytes == stats.bytes_downloaded == last.length
            again = await read(store, docs, MANUAL, (1 << 20) - 10, 100)  # the chunk cache
            assert again == tail and stats.bytes_downloaded == last.length
            assert not store.records[docs].materialized
        assert server.range_requests == [f"/{index_of(indexed, docs).data}"]
        assert f"/{docs[:32]}.ls" not in server.requests
        assert nar_of(indexed, docs) not in server.requests


async def test_adjacent_chunks_come_in_one_range_request(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            data = await read(store, docs, MANUAL, CHUNK - 5, 3 * CHUNK)  # 4 chunks
            assert data == real(indexed, docs, MANUAL)[CHUNK - 5:4 * CHUNK - 5]
        assert len(server.range_requests) == 1


async def test_read_ahead_takes_the_next_chunks_in_a_request_of_their_own(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    """The chunks after a read's come in a request of their own (its reader
    waits only for its own); a read of them meanwhile or after asks nothing."""
    busybox = base_of(indexed, "busybox")
    binary = ("bin", "busybox")
    chunks = index_of(indexed, busybox).files[0].chunks
    budget = chunks[1].length + chunks[2].length  # room for exactly two more
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path,
                              read_ahead=budget) as store:
            assert await read(store, busybox, binary, 0, 10) == real(
                indexed, busybox, binary)[:10]
            assert store.chunk_bytes_read == chunks[0].length
            # the read-ahead may still be under way (its own request): a read
            # of its chunks now waits for it, and one after finds them held
            got = await read(store, busybox, binary, CHUNK, 2 * CHUNK)
            assert got == real(indexed, busybox, binary)[CHUNK:3 * CHUNK]
            stats = store.subs.stats  # type: ignore[attr-defined]
            assert stats.chunk_bytes == chunks[0].length + budget
        assert len(server.range_requests) == 2  # the read's, and the read-ahead's


async def test_the_chunks_of_a_read_are_kept_by_one_worker_thread_and_a_failure_is_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-ahead brings many small chunks: they go to disk in one thread
    hop, not one each; a chunk the directory refuses is reported and not
    counted, the others are kept. One small chunk needs no hop at all."""
    cache = ChunkCache(tmp_path / "chunks")
    cache.prepare()
    good = {hashlib.sha256(data).digest(): data for data in (b"a" * 10, b"b" * 20, b"c" * 30)}
    bad = hashlib.sha256(b"x").digest()
    cache.path(bad).mkdir()  # the rename into place fails for this one
    hops: list[Callable[..., Any]] = []
    run_sync = trio.to_thread.run_sync

    async def counted(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(fn)
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    failed = await cache.put({**good, bad: b"x"})
    assert len(hops) == 1
    assert [type(exc) for exc in failed] == [IsADirectoryError]
    assert cache.bytes == 60 and not cache.has(bad)
    assert all(cache.read(digest, 0, 100) == data for digest, data in good.items())
    assert await cache.put(good) == [] and len(hops) == 1  # kept already: no hop at all
    # One small chunk (a read's own, of a small file) is written without a hop.
    small = b"d" * 100
    assert await cache.put({hashlib.sha256(small).digest(): small}) == [] and len(hops) == 1
    assert cache.read(hashlib.sha256(small).digest(), 0, 200) == small
    assert cache.path(hashlib.sha256(small).digest()).read_bytes() == small


async def test_a_read_does_not_wait_for_the_writing_of_the_chunks_read_ahead_with_it(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk a read needs is on disk when it is answered; those read
    ahead with it are held in memory and written after, and a read of them
    meanwhile is answered from memory (nothing asked again)."""
    busybox = base_of(indexed, "busybox")
    binary = ("bin", "busybox")
    want = real(indexed, busybox, binary)
    chunks = index_of(indexed, busybox).files[0].chunks
    gate, writes = threading.Event(), []
    write_all = ChunkCache._write_all

    def gated(self: ChunkCache, todo: dict[bytes, bytes]) -> Any:
        writes.append(set(todo))
        if chunks[1].sha256 in todo:  # the read-ahead's
            gate.wait(30)
        return write_all(self, todo)

    monkeypatch.setattr(ChunkCache, "_write_all", gated)
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path,
                              read_ahead=chunks[1].length + chunks[2].length) as store:
            try:
                with trio.fail_after(20):
                    assert await read(store, busybox, binary, 0, 10) == want[:10]
                    assert await read(store, busybox, binary, CHUNK, 2 * CHUNK) == want[
                        CHUNK:3 * CHUNK]
                    while len(writes) < 2:  # the read-ahead's write started, and waits
                        await trio.sleep(0.01)
                assert sorted(writes, key=len) == [
                    {chunks[0].sha256}, {chunks[1].sha256, chunks[2].sha256}]
                assert store.chunks.path(chunks[0].sha256).exists()
                assert not store.chunks.path(chunks[1].sha256).exists()
            finally:
                gate.set()
            with trio.fail_after(20):
                while store.chunks.bytes < sum(c.size for c in chunks[:3]):
                    await trio.sleep(0.01)
            assert store.chunks.read(chunks[2].sha256, 0, chunks[2].size) == want[
                2 * CHUNK:3 * CHUNK]
        assert len(server.range_requests) == 2  # the read's, the read-ahead's: none again


def the_binary(cache: nixcache.BinaryCache) -> tuple[str, tuple[str, ...], bytes, tuple[Any, ...]]:
    """busybox's path, its binary's path in it, bytes and chunks."""
    busybox = base_of(cache, "busybox")
    binary = ("bin", "busybox")
    return busybox, binary, real(cache, busybox, binary), index_of(cache, busybox).files[0].chunks


async def test_chunks_read_ahead_wait_in_memory_while_chunks_come_and_are_kept_at_exit(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks read ahead are not written while chunks are still being
    fetched (WRITE_QUIET, here never): they are served from memory, do not
    count toward the quota yet, and are written when the store closes, so a
    restart has them on disk and asks for nothing."""
    monkeypatch.setattr("lazystore.store.cache.WRITE_QUIET", 3600.0)
    busybox, binary, want, chunks = the_binary(indexed)
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path,
                              read_ahead=chunks[1].length + chunks[2].length) as store:
            assert await read(store, busybox, binary, 0, 10) == want[:10]
            with trio.fail_after(20):
                while not all(store.chunks.has(c.sha256) for c in chunks[1:3]):
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert not any(store.chunks.path(c.sha256).exists() for c in chunks[1:3])
            assert store.chunks.bytes == chunks[0].size
            assert await read(store, busybox, binary, CHUNK, 2 * CHUNK) == want[
                CHUNK:3 * CHUNK]
        assert len(server.range_requests) == 2  # the read's, the read-ahead's
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            assert store.chunks.bytes == sum(c.size for c in chunks[:3])
            assert await read(store, busybox, binary, 0, 3 * CHUNK) == want[:3 * CHUNK]
        assert len(server.range_requests) == 2


@pytest.mark.parametrize("why", ["quiet", "held"])
async def test_chunks_read_ahead_are_written_once_fetches_pause_or_too_many_wait(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        why: str) -> None:
    """The chunks read ahead are written WRITE_QUIET seconds after the last
    chunk fetch ended ("quiet"), or at once when more than WRITE_HELD bytes
    of them wait ("held"); then the quota counts them."""
    quiet = 0.3 if why == "quiet" else 3600.0
    monkeypatch.setattr("lazystore.store.cache.WRITE_QUIET", quiet)
    if why == "held":
        monkeypatch.setattr("lazystore.store.cache.WRITE_HELD", 1)
    busybox, binary, _, chunks = the_binary(indexed)
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path,
                              read_ahead=chunks[1].length + chunks[2].length) as store:
            started = trio.current_time()
            await read(store, busybox, binary, 0, 10)
            with trio.fail_after(20):
                while store.chunks.bytes < sum(c.size for c in chunks[:3]):
                    await trio.sleep(0.01)
            assert all(store.chunks.path(c.sha256).exists() for c in chunks[:3])
            if why == "quiet":  # not before the read-ahead's fetch ended, plus WRITE_QUIET
                assert trio.current_time() - started >= quiet


async def test_read_ahead_takes_the_chunks_just_before_a_read_too(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    """With the chunks after a read's, those right before its first (at most
    read_behind compressed bytes: python reads a module's source after its
    __pycache__ entry) come ahead too."""
    busybox = base_of(indexed, "busybox")
    binary = ("bin", "busybox")
    want = real(indexed, busybox, binary)
    chunks = index_of(indexed, busybox).files[0].chunks
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path,
                              read_ahead=chunks[6].length) as store:
            store.read_behind = chunks[3].length + chunks[4].length
            assert await read(store, busybox, binary, 5 * CHUNK, 10) == want[
                5 * CHUNK:5 * CHUNK + 10]
            with trio.fail_after(20):
                while not all(store.chunks.has(c.sha256) for c in chunks[3:7]):
                    await trio.sleep(0.01)
            stats = store.subs.stats  # type: ignore[attr-defined]
            assert stats.chunk_bytes == sum(c.length for c in chunks[3:7])
            assert await read(store, busybox, binary, 3 * CHUNK, 4 * CHUNK) == want[
                3 * CHUNK:7 * CHUNK]
        assert len(server.range_requests) == 3  # the read's, the chunks after, before


@pytest.mark.parametrize("capped", [False, True])
async def test_a_read_that_goes_on_to_another_chunk_of_a_file_brings_the_rest_of_it(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capped: bool) -> None:
    """A program that reads a second chunk of a file (the loader faulting a
    binary in all over it) gets the rest of the file ahead, the chunks after
    that one first, so its next reads of it ask nothing; unless the file has
    more than FILE_AHEAD compressed bytes (read here and there, it would
    bring megabytes each time)."""
    busybox = base_of(indexed, "busybox")
    binary = ("bin", "busybox")
    want = real(indexed, busybox, binary)
    chunks = index_of(indexed, busybox).files[0].chunks
    assert len(chunks) > 8
    if capped:
        monkeypatch.setattr("lazystore.store.cache.FILE_AHEAD",
                            sum(c.length for c in chunks) - 1)
    rest = [] if capped else chunks[1:5] + chunks[6:]
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            assert await read(store, busybox, binary, 0, 10) == want[:10]
            assert len(server.range_requests) == 1  # its chunk, nothing ahead (read_ahead 0)
            assert await read(store, busybox, binary, 5 * CHUNK + 3, 10) == want[
                5 * CHUNK + 3:5 * CHUNK + 13]
            with trio.fail_after(20):
                while not all(store.chunks.has(c.sha256) for c in rest):
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            stats = store.subs.stats  # type: ignore[attr-defined]
            assert stats.chunk_bytes == sum(c.length for c in [chunks[0], chunks[5], *rest])
            # chunk 5's own request, then the rest after it and the rest before it
            assert len(server.range_requests) == (2 if capped else 4)
            if not capped:
                assert await read(store, busybox, binary, 0, len(want)) == want
                assert len(server.range_requests) == 4


async def test_concurrent_overlapping_reads_get_their_own_bytes(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    busybox = base_of(indexed, "busybox")
    binary = ("bin", "busybox")
    want = real(indexed, busybox, binary)
    spans = [(0, 3 * CHUNK), (CHUNK + 7, CHUNK), (2 * CHUNK - 1, 2 * CHUNK), (5, 10)] * 2
    got: dict[int, bytes] = {}
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path,
                              read_ahead=CHUNK) as store:
            await store.tree(busybox)

            async def one(i: int, offset: int, size: int) -> None:
                got[i] = await read(store, busybox, binary, offset, size)

            async with trio.open_nursery() as nursery:
                for i, (offset, size) in enumerate(spans):
                    nursery.start_soon(one, i, offset, size)
    assert got == {i: want[o:o + n] for i, (o, n) in enumerate(spans)}


async def test_whole_files_read_through_chunks_are_the_real_bytes(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            for path in indexed.paths:
                base = Path(path).name
                for entry in index_of(indexed, base).files:
                    rel = tuple(p.decode() for p in entry.path)
                    got = await read(store, base, rel, 0, entry.size + 10)
                    assert got == real(indexed, base, rel)
            assert store.subs.stats.nars_fetched == 0  # type: ignore[attr-defined]
        assert not [r for r in server.requests if r.startswith("/nar/")]


async def test_a_profile_prefetches_only_its_files_chunks_and_reads_then_ask_nothing(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs, busybox = base_of(indexed, "docs"), base_of(indexed, "busybox")
    manual = index_of(indexed, docs).files[-1]
    binary = ("bin", "busybox")
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await store.prefetch_in_order([docs, busybox],
                                          files={docs: ["/".join(MANUAL)]})
            stats = store.subs.stats  # type: ignore[attr-defined]
            assert stats.chunk_bytes == sum(c.length for c in manual.chunks)
            assert store.records[busybox].materialized  # not in files: the whole path
            assert not store.records[docs].materialized
            asked = len(server.requests)
            assert await read(store, docs, MANUAL, 0, 1 << 20) == real(indexed, docs, MANUAL)
            assert len(server.requests) == asked and stats.chunk_bytes == sum(
                c.length for c in manual.chunks)
            assert await read(store, busybox, binary, 0, 10) == real(
                indexed, busybox, binary)[:10]
        # adjacent chunks of the profile's files in groups of at most PROFILE_GROUP bytes
        assert 1 <= len(server.range_requests) <= 1 + manual.size // (1 << 20)
        assert nar_of(indexed, docs) not in server.requests


async def test_a_views_prefetch_of_a_file_fetches_that_files_chunks_and_whole_paths_else(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    """What a nix layer's profile label hands the daemon (``BASENAME/FILE``
    entries, lazystore.profile): only that file's chunks, no NAR of its path."""
    docs, busybox = base_of(indexed, "docs"), base_of(indexed, "busybox")
    manual = index_of(indexed, docs).files[-1]
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            ops = ControlOperations(store, Vfs(store), "/mnt", [])
            await ops.handle("view_create", {
                "id": "v", "paths": [docs, busybox], "closure_info": None,
                "prefetch": [f"/nix/store/{docs}/{'/'.join(MANUAL)}", busybox]})
            stats = store.subs.stats  # type: ignore[attr-defined]
            with trio.fail_after(30):
                while not (store.records.get(busybox) and store.records[busybox].materialized
                           and stats.chunk_bytes >= sum(c.length for c in manual.chunks)):
                    await trio.sleep(0.01)
            assert stats.chunk_bytes == sum(c.length for c in manual.chunks)
            assert not store.records[docs].materialized
            asked = len(server.requests)
            assert await read(store, docs, MANUAL, 0, 1 << 20) == real(indexed, docs, MANUAL)
            assert len(server.requests) == asked  # the read found every chunk here
            with pytest.raises(ControlError, match="neither a store path nor a file of one"):
                await ops.handle("view_create", {"id": "w", "paths": [docs],
                                                 "closure_info": None,
                                                 "prefetch": [f"{docs}/../{busybox}"]})
            assert "w" not in ops.vfs.views
        assert nar_of(indexed, docs) not in server.requests


async def test_a_read_during_a_profiles_prefetch_waits_for_it_and_asks_nothing_again(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await store.tree(docs)
            got = {}

            async def reader() -> None:
                await trio.sleep(0)  # the prefetch has claimed the chunks by now
                got["tail"] = await read(store, docs, MANUAL, (1 << 20) - 10, 10)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.prefetch_files, docs, ["/".join(MANUAL)])
                nursery.start_soon(reader)
            assert got["tail"] == real(indexed, docs, MANUAL)[-10:]
            manual = index_of(indexed, docs).files[-1]
            stats = store.subs.stats  # type: ignore[attr-defined]
            assert stats.chunk_bytes == sum(c.length for c in manual.chunks)  # each once


async def test_file_cache_reads_chunks_with_pread(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    async with store_over(indexed.url, indexed.key.public_key, tmp_path) as store:
        data = await read(store, docs, MANUAL, 5, 10)
        assert data == real(indexed, docs, MANUAL)[5:15]
        assert store.subs.stats.nars_fetched == 0  # type: ignore[attr-defined]
        assert store.subs.stats.chunk_bytes == index_of(indexed, docs).files[-1].chunks[0].length  # type: ignore[attr-defined]  # noqa: E501


async def test_chunks_stay_on_disk_across_a_restart_and_under_a_quota(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await read(store, docs, MANUAL, 0, 1)
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            assert await read(store, docs, MANUAL, 0, 1) == b"d"
            assert store.subs.stats.bytes_downloaded == 0  # type: ignore[attr-defined]
        assert len(server.range_requests) == 1
        busybox = base_of(indexed, "busybox")
        binary = ("bin", "busybox")
        async with store_over(server.url, indexed.key.public_key, tmp_path / "q",
                              cache_limit=2 * CHUNK) as store:
            await store.tree(busybox)
            entry = await store.open_indexed(busybox, binary)  # pins the file's chunks
            assert entry is not None
            data = await store.read_indexed(busybox, entry, 0, 4 * CHUNK)
            assert data == real(indexed, busybox, binary)[:4 * CHUNK]
            assert store.chunks.bytes == 4 * CHUNK and store.chunks.evictions == 0
            store.close_indexed(entry)
            await read(store, base_of(indexed, "liba"), ("lib", "data"), 0, 100)
            assert store.chunks.bytes <= 2 * CHUNK and store.chunks.evictions >= 3
            # What was evicted is fetched again, verified.
            assert await read(store, busybox, binary, 0, 10) == data[:10]


async def test_chunks_and_paths_share_one_quota_least_recently_used_first(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    busybox, liba = base_of(indexed, "busybox"), base_of(indexed, "liba")
    binary = ("bin", "busybox")
    with served(indexed) as server:
        # Chunks older than the path just fetched go first (the path is kept).
        async with store_over(server.url, indexed.key.public_key, tmp_path / "a",
                              cache_limit=4 * CHUNK + 10_000) as store:
            await read(store, busybox, binary, 0, 4 * CHUNK)
            assert store.chunks.bytes == 4 * CHUNK
            await store.materialize(liba)
            disk = store.records[liba].disk_bytes
            assert store.records[liba].materialized and disk > 10_000
            assert store.chunks.bytes == 3 * CHUNK and store.chunks.evictions == 1
            assert store.used_bytes == store.cache_bytes + store.chunks.bytes
            assert store.used_bytes <= 4 * CHUNK + 10_000
            statfs = Vfs(store).statfs()  # df counts both
            assert statfs["f_blocks"] - statfs["f_bfree"] == -(-store.used_bytes // 4096)
        # A path older than the chunks read after it goes first.
        async with store_over(server.url, indexed.key.public_key, tmp_path / "b",
                              cache_limit=4 * CHUNK + 10_000) as store:
            await store.materialize(liba)
            await read(store, busybox, binary, 0, 4 * CHUNK)
            assert not store.records[liba].materialized and store.evictions == 1
            assert store.chunks.bytes == 4 * CHUNK and store.chunks.evictions == 0
            # Chunks of an open file are not evicted, whatever their age.
            entry = await store.open_indexed(busybox, binary)
            assert entry is not None
            await store.materialize(liba)
            assert store.chunks.bytes == 4 * CHUNK and store.records[liba].materialized
            assert store.used_bytes > 4 * CHUNK + 10_000  # over: the rest is in use
            store.close_indexed(entry)


async def test_an_unindexed_cache_asks_once_for_the_marker(
        binary_cache: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs, liba = base_of(binary_cache, "docs"), base_of(binary_cache, "liba")
    with served(binary_cache) as server:
        async with store_over(server.url, binary_cache.key.public_key, tmp_path) as store:
            assert await read(store, docs, MANUAL, 0, 3) == b"ddd"
            assert await read(store, liba, ("lib", "data"), 0, 100) == b"hello from liba\n"
        assert server.requests.count("/lzindex-info") == 1
        assert not [r for r in server.requests if r.endswith(".lzindex")]
        assert not server.range_requests


# --- round trips before the first chunk -------------------------------------------


async def test_the_marker_is_asked_with_the_first_narinfo(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    # Each is held until both are held: asked one after the other, the lookup
    # would wait for the gather's 60 s. (The daemon asks it even before, with
    # nix-cache-info as it starts: test_mount_requests.py.)
    docs = base_of(indexed, "docs")
    with FaultServer(indexed.root) as server:
        for name in (f"/{docs[:32]}.narinfo", "/lzindex-info"):
            server.always(name, Fault.gather(2))
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            with trio.fail_after(30):
                await store.tree(docs)
        assert server.most_held == 2
        assert server.count("/lzindex-info") == 1


async def test_the_index_is_asked_with_the_narinfo(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    narinfo, index = f"/{docs[:32]}.narinfo", f"/{docs[:32]}.lzindex"
    with FaultServer(indexed.root) as server:
        for name in (narinfo, index):
            server.always(name, Fault.gather(2))
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            with trio.fail_after(30):
                assert await store.lookup(docs) is not None
                node = await store.tree(docs)
            assert node.child("share").child("doc").child("manual.txt").size == 1 << 20
            assert (await store.file_index(docs)) is not None
        assert server.most_held == 2
        assert server.count(narinfo) == server.count(index) == 1
        assert f"/{docs[:32]}.ls" not in server.requests


async def test_references_file_indexes_are_learnt_ahead_of_their_first_read(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    top = Path(indexed.top).name
    refs = [Path(r).name for r in nixcache.references(indexed.top) if Path(r).name != top]
    assert refs
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await store.lookup(top)
            with trio.fail_after(30):  # learnt in the background: no read asked for them
                while not all(f"/{r[:32]}.lzindex" in server.requests for r in refs):
                    await trio.sleep(0.01)
            assert await read(store, base_of(indexed, "docs"), MANUAL, 0, 3) == b"ddd"
        for ref in refs:
            assert server.requests.count(f"/{ref[:32]}.lzindex") == 1
            assert f"/{ref[:32]}.ls" not in server.requests  # the index has the tree


async def test_a_big_index_learnt_ahead_is_only_its_start_until_its_first_read(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.setattr("lazystore.store.cache.INDEX_AHEAD", 300)
    monkeypatch.setattr("lazystore.store.cache.INDEX_WHOLE", 300)
    top, docs = Path(indexed.top).name, base_of(indexed, "docs")
    name = f"/{docs[:32]}.lzindex"
    size = (indexed.root / name[1:]).stat().st_size
    assert size > 300
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await store.lookup(top)
            with trio.fail_after(30):  # the references learnt in the background
                while name not in server.requests:
                    await trio.sleep(0.01)
            assert server.range_requests.count(name) == 1  # its first 300 bytes only
            assert await read(store, docs, MANUAL, 5, 10) == real(indexed, docs, MANUAL)[5:15]
            assert (await store.file_index(docs)) is not None
        assert server.requests.count(name) == server.range_requests.count(name) == 2  # the rest


async def test_a_big_index_start_learnt_ahead_is_asked_once_for_every_view_of_it(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """A second image's view holding a path whose big index was learnt ahead
    (and never read) does not ask its start again (a delta pull's bytes)."""
    monkeypatch.setattr("lazystore.store.cache.INDEX_AHEAD", 300)
    monkeypatch.setattr("lazystore.store.cache.INDEX_WHOLE", 300)
    docs = base_of(indexed, "docs")
    name = f"/{docs[:32]}.lzindex"
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            for _ in range(3):  # as three views of it learn it ahead
                await store._hint(docs)
            assert server.range_requests.count(name) == 1
            assert await read(store, docs, MANUAL, 5, 10) == real(indexed, docs, MANUAL)[5:15]
        assert server.requests.count(name) == 2  # its start, then the rest at the read


async def test_an_index_of_at_most_index_whole_is_learnt_ahead_whole_and_its_read_asks_none(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """An index bigger than INDEX_AHEAD but not than INDEX_WHOLE: its start,
    then its rest, both in the background; its tree is known and its first
    read waits for no index request."""
    monkeypatch.setattr("lazystore.store.cache.INDEX_AHEAD", 300)
    top, docs = Path(indexed.top).name, base_of(indexed, "docs")
    name = f"/{docs[:32]}.lzindex"
    assert 300 < (indexed.root / name[1:]).stat().st_size <= INDEX_WHOLE
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await store.lookup(top)
            with trio.fail_after(30):  # the references learnt in the background
                while docs not in store.records or store.records[docs].tree is None:
                    await trio.sleep(0.01)
            assert store._indexed[docs] is not None  # the tree is that index's
            assert server.range_requests.count(name) == 2  # its start, then its rest
            assert await read(store, docs, MANUAL, 5, 10) == real(indexed, docs, MANUAL)[5:15]
        assert server.requests.count(name) == 2


async def test_an_index_start_asked_of_a_server_that_ignores_range_is_the_whole_index(
        indexed: nixcache.BinaryCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.setattr("lazystore.store.cache.INDEX_AHEAD", 300)
    top, docs = Path(indexed.top).name, base_of(indexed, "docs")
    name = f"/{docs[:32]}.lzindex"
    with served(indexed, ranges=False) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await store.lookup(top)
            with trio.fail_after(30):  # the tree is built after the index is taken
                while docs not in store.records or store.records[docs].tree is None:
                    await trio.sleep(0.01)
            assert store._indexed[docs] is not None  # the 200's whole index, taken
        assert server.requests.count(name) == 1
        assert f"/{docs[:32]}.ls" not in server.requests  # the tree is that index's


# --- complete paths: assembled from their chunks, NarHash checked ----------------


async def read_all(store: LocalStore, cache: nixcache.BinaryCache, base: str) -> None:
    for entry in index_of(cache, base).files:
        rel = tuple(p.decode() for p in entry.path)
        assert await read(store, base, rel, 0, entry.size + 1) == real(cache, base, rel)


async def test_a_complete_path_is_materialised_from_its_chunks_not_its_nar(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path) as store:
            await read_all(store, indexed, docs)
            assert not store.records[docs].materialized
            path = await store.materialize(docs)  # e.g. a read that needs the data path
            assert store.records[docs].materialized and store.records[docs].tree_verified
            assert (path / "share/doc/manual.txt").read_bytes() == real(indexed, docs, MANUAL)
            assert [e for e in store.events.since(0, 1000) if e.kind == "assembled"]
            assert store.subs.stats.nars_fetched == 0  # type: ignore[attr-defined]
        assert nar_of(indexed, docs) not in server.requests


async def test_verify_complete_assembles_a_path_as_its_last_chunk_comes(
        indexed: nixcache.BinaryCache, tmp_path: Path) -> None:
    docs = base_of(indexed, "docs")
    with served(indexed) as server:
        async with store_over(server.url, indexed.key.public_key, tmp_path,
                              verify_complete=True) as store:
            await read_all(store, indexed, docs)
            with trio.fail_after(30):
                while not store.records[docs].materialized:
                    await trio.sleep(0.01)
            assert (store.data_path(docs) / "share/doc/README").is_file()
        assert nar_of(indexed, docs) not in server.requests


@pytest.mark.allow_log(r"does not match its NarHash; reading .* as a whole NAR instead")
async def test_a_complete_path_whose_nar_is_not_its_narhash_goes_the_whole_nar_way(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture
        ) -> None:
    # An index signed by the trusted key, each chunk true to its own hash, but
    # one of them is not the NAR's bytes: only the NAR check can tell.
    cache = copy_of(indexed, tmp_path / "cache")
    docs = base_of(cache, "docs")
    index = index_of(cache, docs)
    info = NarInfo.parse(cache.narinfo_path(docs).read_text())
    data = cache.root / index.data
    genuine = data.read_bytes()
    fake = b"e" * CHUNK
    frame = encode(fake)
    data.write_bytes(genuine + frame)
    root = json.loads(index.body)["root"]
    manual = root["entries"]["share"]["entries"]["doc"]["entries"]["manual.txt"]
    manual["chunks"][0] = [len(genuine), len(frame), hashlib.sha256(fake).hexdigest()]
    secret = SecretKey.parse(cache.key.secret_file.read_text())
    cache.narinfo_path(docs).with_suffix(".lzindex").write_bytes(fileindex.write(
        info, index.chunk_size, index.data, len(genuine) + len(frame), root, secret))
    with served(cache) as server:
        async with store_over(server.url, cache.key.public_key, tmp_path / "d",
                              verify_complete=True) as store:
            for entry in index_of(cache, docs).files:  # every chunk arrives
                await read(store, docs, tuple(p.decode() for p in entry.path), 0, entry.size)
            with trio.fail_after(30):
                while docs in store._indexed and store._indexed[docs] is not None:
                    await trio.sleep(0.01)
            assert not store.records[docs].materialized  # nothing assembled
            # From now on the whole NAR: the real bytes.
            assert await read(store, docs, MANUAL, 0, 4) == b"dddd"
            assert store.records[docs].materialized
        assert nar_of(cache, docs) in server.requests
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "NarHash" in warnings[0] and docs in warnings[0] and server.url in warnings[0]


# --- hostile indexes, data and servers -------------------------------------------


async def falls_back(cache: nixcache.BinaryCache, tmp_path: Path,
                     caplog: pytest.LogCaptureFixture, match: str, base: str = "",
                     **server_options: Any) -> Any:
    """Read the manual's tail: the right bytes, from the whole NAR, after one
    warning naming the cache and the path that matches *match*."""
    docs = base or base_of(cache, "docs")
    with served(cache, **server_options) as server:
        async with store_over(server.url, cache.key.public_key, tmp_path) as store:
            for _ in range(2):
                data = await read(store, docs, MANUAL, (1 << 20) - 4, 4)
                assert data == b"dddd"
                assert store.records[docs].materialized
        assert nar_of(cache, docs) in server.requests
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert server.url in warnings[0] and docs in warnings[0]
    assert f"reading {docs} as a whole NAR instead" in warnings[0]
    assert match in warnings[0], warnings[0]
    return server


@pytest.mark.allow_log("reading [^ ]+ as a whole NAR instead")
async def test_a_server_ignoring_range_is_never_taken_for_the_chunk(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = await falls_back(indexed, tmp_path, caplog, "did not honour a Range request",
                              ranges=False)
    assert not server.range_requests


@pytest.mark.allow_log("reading [^ ]+ as a whole NAR instead")
async def test_a_range_reply_of_the_wrong_length(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    await falls_back(indexed, tmp_path, caplog, "a Range reply of", mangle=lambda b: b[:-1])


@pytest.mark.allow_log("reading [^ ]+ as a whole NAR instead")
async def test_a_chunk_damaged_in_transit(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def flip(body: bytes) -> bytes:
        return body[:-3] + bytes([body[-3] ^ 1]) + body[-2:]
    await falls_back(indexed, tmp_path, caplog, "chunk at data offset", mangle=flip)


@pytest.mark.allow_log("reading [^ ]+ as a whole NAR instead")
async def test_data_files_swapped_between_two_paths(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = copy_of(indexed, tmp_path / "cache")
    docs, busybox = base_of(cache, "docs"), base_of(cache, "busybox")
    a, b = (cache.root / index_of(cache, p).data for p in (docs, busybox))
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    await falls_back(cache, tmp_path / "d", caplog, "chunk at data offset")


@pytest.mark.allow_log("reading [^ ]+ as a whole NAR instead")
async def test_an_index_by_an_untrusted_key(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = copy_of(indexed, tmp_path / "cache")
    docs = base_of(cache, "docs")
    (cache.root / f"{docs[:32]}.lzindex").unlink()
    cacheindex.index_cache(cache.root, SecretKey.generate("untrusted-1"), CHUNK)
    await falls_back(cache, tmp_path / "d", caplog, "no valid signature by a trusted key")


@pytest.mark.allow_log("reading [^ ]+ as a whole NAR instead")
async def test_an_index_for_another_path(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = copy_of(indexed, tmp_path / "cache")
    docs, liba = base_of(cache, "docs"), base_of(cache, "liba")
    shutil.copy(cache.root / f"{liba[:32]}.lzindex", cache.root / f"{docs[:32]}.lzindex")
    await falls_back(cache, tmp_path / "d", caplog, "index is for /nix/store/" + liba)


@pytest.mark.allow_log("reading [^ ]+ as a whole NAR instead")
@pytest.mark.parametrize("damage", ["garbage", "version", "past the end"])
async def test_a_malformed_index(
        indexed: nixcache.BinaryCache, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        damage: str) -> None:
    cache = copy_of(indexed, tmp_path / "cache")
    docs = base_of(cache, "docs")
    path = cache.root / f"{docs[:32]}.lzindex"
    text = path.read_bytes()
    changes: dict[str, Callable[[bytes], bytes]] = {
        "garbage": lambda t: t[:len(t) // 2],
        "version": lambda t: t.replace(b"LazystoreFileIndex: 1", b"LazystoreFileIndex: 9", 1),
        "past the end": lambda t: t.replace(b'"dataSize":', b'"dataSize":1', 1),
    }
    path.write_bytes(changes[damage](text))
    expected = {"garbage": "malformed index", "version": "unsupported file index version",
                "past the end": "no valid signature"}[damage]
    await falls_back(cache, tmp_path / "d", caplog, expected)
