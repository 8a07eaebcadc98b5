"""The store over the real substituter and a real HTTP server on 127.0.0.1,
counted with the fault server's request log: what one cold read costs, the
single flight and the negative cache (both the store's), a full cache disk,
and store paths whose root is a file or a symlink."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from lazystore.errors import StoreError
from lazystore.nix.narinfo import NarInfo
from lazystore.store import tree
from lazystore.store.cache import LocalStore
from lazystore.store.sink import CacheWriteError
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig
from lazystore.testing import nixcache
from tests.support.faultserver import Fault, FaultServer


@pytest.fixture
def server(binary_cache: nixcache.BinaryCache) -> Iterator[FaultServer]:
    with FaultServer(binary_cache.root) as srv:
        yield srv


def config(url: str, key: str, **overrides: Any) -> SubstituterConfig:
    values: dict[str, Any] = dict(urls=[url], trusted_public_keys=[key], netrc_file=None,
                                  attempts=2, backoff_base=0.01, backoff_max=0.05)
    values.update(overrides)
    return SubstituterConfig(**values)


@asynccontextmanager
async def store_over(url: str, key: str, cache_dir: Path, positive_ttl: float = 3600.0,
                     **store_args: Any) -> AsyncIterator[LocalStore]:
    async with Substituters(config(url, key, positive_ttl=positive_ttl)) as subs:
        async with LocalStore(subs, cache_dir, **store_args) as store:
            yield store


def basename(cache: nixcache.BinaryCache, name: str) -> str:
    return next(Path(p).name for p in cache.paths if p.endswith(f"-{name}"))


def nar_url(cache: nixcache.BinaryCache, base: str) -> str:
    return "/" + NarInfo.parse(cache.narinfo_path(base).read_text()).url


# positive_ttl ~0: the substituter remembers no narinfo, so every narinfo the
# read needs after its lookup must be the one the store passed down.
@pytest.mark.parametrize("positive_ttl", [3600.0, 1e-9])
async def test_a_cold_read_is_one_narinfo_one_listing_one_nar_request(
        binary_cache: nixcache.BinaryCache, server: FaultServer, tmp_path: Path,
        positive_ttl: float) -> None:
    liba = basename(binary_cache, "liba")
    async with store_over(server.url, binary_cache.key.public_key, tmp_path,
                          positive_ttl) as store:
        assert await store.lookup(liba) is not None  # the mount's lookup of the name
        hint = await store.tree(liba)  # stat and readdir below it: the listing
        data = await store.materialize(liba) / "lib" / "data"  # the first read
        assert data.read_bytes() == b"hello from liba\n"
        assert store.records[liba].tree_verified and store.records[liba].tree == hint
    # an indexed cache's marker is asked with the first narinfo (either first)
    assert server.requests[0] == "/nix-cache-info"
    assert set(server.requests[1:3]) == {f"/{liba[:32]}.narinfo", "/lzindex-info"}
    assert server.requests[3:] == [f"/{liba[:32]}.ls", nar_url(binary_cache, liba)]


async def test_a_cold_read_without_listings_is_one_narinfo_one_nar_request(
        tmp_path_factory: pytest.TempPathFactory, sample_closure: str,
        test_key: nixcache.KeyPair, tmp_path: Path) -> None:
    cache = nixcache.make_cache(sample_closure, tmp_path_factory.mktemp("nols"), test_key,
                                listing=False)
    liba = basename(cache, "liba")
    with FaultServer(cache.root) as server:
        async with store_over(server.url, test_key.public_key, tmp_path) as store:
            await store.lookup(liba)
            node = await store.tree(liba)  # no listing: the tree comes from the fetch
            assert tree.resolve(node, ("lib", "data")).size == 16  # type: ignore[union-attr]
            await store.materialize(liba)
        # an indexed cache's marker is asked with the first narinfo (either first)
        assert server.requests[0] == "/nix-cache-info"
        assert set(server.requests[1:3]) == {f"/{liba[:32]}.narinfo", "/lzindex-info"}
        assert server.requests[3:] == [f"/{liba[:32]}.ls", nar_url(cache, liba)]


async def test_the_tree_comes_from_the_nar_not_from_a_scan_of_the_disk(
        binary_cache: nixcache.BinaryCache, server: FaultServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan(path: Path, max_depth: int = 0) -> tree.Node:
        raise AssertionError(f"{path} was scanned after its fetch")

    docs = basename(binary_cache, "docs")
    async with store_over(server.url, binary_cache.key.public_key, tmp_path) as store:
        monkeypatch.setattr(tree, "from_disk", no_scan)
        await store.materialize(docs)
        monkeypatch.undo()
        rec = store.records[docs]
        assert rec.tree == tree.from_disk(tmp_path / "store" / docs)
        assert rec.disk_bytes == tree.footprint(rec.tree) == store.cache_bytes > 1 << 20


async def test_fifty_concurrent_reads_fetch_once(
        binary_cache: nixcache.BinaryCache, server: FaultServer, tmp_path: Path) -> None:
    busybox = basename(binary_cache, "busybox")
    async with store_over(server.url, binary_cache.key.public_key, tmp_path) as store:
        results: list[Path] = []

        async def one() -> None:
            results.append(await store.materialize(busybox))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        assert store.subs.stats.nars_fetched == 1
    assert results == [tmp_path / "store" / busybox] * 50
    assert server.count(nar_url(binary_cache, busybox)) == 1
    assert server.count(f"/{busybox[:32]}.narinfo") == 1
    assert nixcache.nar_hash(str(results[0])) == nixcache.nar_hash(
        str(Path(binary_cache.top).parent / busybox))


async def test_fifty_concurrent_lookups_ask_once(
        binary_cache: nixcache.BinaryCache, server: FaultServer, tmp_path: Path) -> None:
    liba = basename(binary_cache, "liba")
    async with store_over(server.url, binary_cache.key.public_key, tmp_path) as store:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(store.lookup, liba)
        assert store.subs.stats.narinfo_hits == 1
    assert server.count(f"/{liba[:32]}.narinfo") == 1
    assert server.count("/nix-cache-info") == 1


async def test_a_reader_that_goes_away_does_not_cancel_the_fetch(
        binary_cache: nixcache.BinaryCache, server: FaultServer, tmp_path: Path) -> None:
    busybox = basename(binary_cache, "busybox")
    server.program(nar_url(binary_cache, busybox), Fault.delay(0.5))
    async with store_over(server.url, binary_cache.key.public_key, tmp_path) as store:
        reader = trio.CancelScope()

        async def read() -> None:
            with reader:
                await store.materialize(busybox)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while not store.in_flight:  # the NAR is on its way (not a fixed time:
                await trio.sleep(0.01)  # the narinfo may take longer under load)
            reader.cancel()  # an interrupted read
        assert reader.cancelled_caught
        assert store.in_flight == 1  # the fetch goes on
        path = await store.materialize(busybox)  # a second reader joins it
        assert (path / "bin" / "busybox").is_file()
    assert server.count(nar_url(binary_cache, busybox)) == 1


async def test_absent_paths_are_asked_once_within_the_negative_lifetime(
        binary_cache: nixcache.BinaryCache, tmp_path: Path,
        autojump_clock: trio.testing.MockClock) -> None:
    root = tmp_path / "cache"
    shutil.copytree(binary_cache.root, root)
    liba = basename(binary_cache, "liba")
    narinfo = root / f"{liba[:32]}.narinfo"
    text = narinfo.read_text()
    narinfo.unlink()
    async with Substituters(config(f"file://{root}", binary_cache.key.public_key)) as subs:
        async with LocalStore(subs, tmp_path / "c", negative_ttl=10.0) as store:
            assert await store.lookup(liba) is None
            narinfo.write_text(text)
            assert await store.lookup(liba) is None  # the negative answer is kept
            assert subs.stats.narinfo_requests == 1
            await trio.sleep(11)
            assert await store.lookup(liba) is not None
            assert subs.stats.narinfo_requests == 2


def test_the_negative_lifetime_is_nix_confs(tmp_path: Path) -> None:
    conf = tmp_path / "nix.conf"
    conf.write_text("narinfo-cache-negative-ttl = 5\n")
    assert SubstituterConfig.from_nix_conf(conf).negative_ttl == 5.0
    assert SubstituterConfig().negative_ttl == 3600.0  # Nix's default


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 512 KiB (tmpfs): smaller than the docs path."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


async def test_a_full_cache_disk_is_a_store_error_and_leaves_nothing(
        binary_cache: nixcache.BinaryCache, server: FaultServer, small_disk: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    docs = basename(binary_cache, "docs")
    async with store_over(server.url, binary_cache.key.public_key, small_disk) as store:
        with pytest.raises(StoreError, match="No space left on device") as caught:
            await store.materialize(docs)
        assert issubclass(caught.type, CacheWriteError)  # the store's, not a substituter's
        assert "bytes free on its file system" in str(caught.value)
        assert store.subs.stats.failures == 0  # not a substituter's: no other cache tried
        assert list((small_disk / "store").iterdir()) == []
        assert list((small_disk / "tmp").iterdir()) == []
        assert (await store.materialize(basename(binary_cache, "liba"))).is_dir()
    assert server.count(nar_url(binary_cache, docs)) == 1  # and not retried
    assert any("No space left on device" in r.getMessage() and docs in r.getMessage()
               for r in caplog.records)


@pytest.fixture(scope="module")
def root_cache(tmp_path_factory: pytest.TempPathFactory, test_key: nixcache.KeyPair,
               nix: None) -> tuple[nixcache.BinaryCache, dict[str, str]]:
    """A cache of store paths whose NAR root is a file, an executable or a symlink."""
    src = tmp_path_factory.mktemp("roots-src")
    (src / "text").write_bytes(b"some text\n")
    (src / "script").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "script").chmod(0o755)
    (src / "link").symlink_to("/nix/store/somewhere-else")
    added = {n: nixcache.run_nix("nix-store", "--add", src / n).decode().strip()
             for n in ("text", "script", "link")}
    cache = tmp_path_factory.mktemp("roots")
    made = [nixcache.make_cache(p, cache, test_key) for p in added.values()][-1]
    return made, added


async def test_file_and_symlink_roots_over_the_real_substituter(
        root_cache: tuple[nixcache.BinaryCache, dict[str, str]], tmp_path: Path) -> None:
    cache, added = root_cache
    bases = {n: Path(p).name for n, p in added.items()}
    with FaultServer(cache.root) as server:
        async with store_over(server.url, cache.key.public_key, tmp_path) as store:
            for name, base in bases.items():
                hint = await store.tree(base)
                path = await store.materialize(base)
                assert store.records[base].tree == hint
                assert nixcache.nar_hash(str(path)) == nixcache.nar_hash(added[name])
            assert store.records[bases["script"]].tree == tree.Node(
                tree.REGULAR, size=18, executable=True)
            assert store.records[bases["link"]].tree == tree.Node(
                tree.SYMLINK, target="/nix/store/somewhere-else")
            assert (tmp_path / "store" / bases["text"]).read_bytes() == b"some text\n"
        for base in bases.values():
            assert server.count(f"/{base[:32]}.narinfo") == 1
            assert server.count(nar_url(cache, base)) == 1


async def test_a_refetch_after_an_eviction_is_one_nar_request(
        binary_cache: nixcache.BinaryCache, server: FaultServer, tmp_path: Path) -> None:
    liba = basename(binary_cache, "liba")
    async with store_over(server.url, binary_cache.key.public_key, tmp_path) as store:
        await store.materialize(liba)
        assert await store.evict([liba]) == [liba]
        await store.materialize(liba)  # narinfo: the substituter's positive cache
    async with store_over(server.url, binary_cache.key.public_key, tmp_path) as store:
        assert store.records[liba].materialized
        await store.materialize(liba)  # a hit after restart: nothing asked
    assert server.count(f"/{liba[:32]}.narinfo") == 1
    assert server.count(nar_url(binary_cache, liba)) == 2
