"""Chunk-granular reads through a real mount (``lazystore mount`` as a
subprocess) from caches indexed by ``lazystore cache index``: a read fetches
the chunks it needs and no NAR, and for random trees any sequence of reads
returns exactly the bytes of the real files."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazystore import cacheindex
from lazystore.nix import base32, fileindex
from lazystore.nix.hashes import Hash
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey, sign_narinfo
from lazystore.testing import nartree, nixcache
from lazystore.testing.daemon import Daemon, fuse_missing, lazystore_mount
from lazystore.testing.httpserver import serve_directory
from lazystore.testing.nartree import Tree, TreeDir, TreeFile, TreeSymlink

pytestmark = pytest.mark.root
CHUNK = 4096


@pytest.fixture(autouse=True)
def _fuse() -> None:
    if reason := fuse_missing():
        pytest.skip(reason)


def test_a_read_through_the_mount_fetches_its_chunk_not_the_nar(
        tmp_path: Path, binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(binary_cache.root, cache)
    secret = SecretKey.parse(test_key.secret_file.read_text())
    cacheindex.index_cache(cache, secret, 64 << 10)
    docs = next(Path(p).name for p in binary_cache.paths if p.endswith("-docs"))
    index = fileindex.parse((cache / f"{docs[:32]}.lzindex").read_bytes())
    with serve_directory(cache) as server:
        with lazystore_mount(tmp_path / "d", server.url, test_key.public_key) as daemon:
            manual = daemon.mnt / docs / "share" / "doc" / "manual.txt"
            assert sorted(os.listdir(daemon.mnt / docs / "share" / "doc")) == [
                "README", "manual.txt"]
            assert manual.stat().st_size == 1 << 20
            with open(manual, "rb") as f:
                assert os.pread(f.fileno(), 10, (1 << 20) - 10) == b"d" * 10
            # its chunk, and read behind it the file before it in NAR order (the
            # manual's other chunks are the same bytes as its last: that one)
            readme, manual_entry = index.files
            assert readme.path == (b"share", b"doc", b"README")
            status = daemon.status_when("chunk_bytes", manual_entry.chunks[-1].length
                                        + readme.chunks[0].length)
            assert status["nars_fetched"] == 0
            assert status["bytes_downloaded"] == status["chunk_bytes"]
        assert not [r for r in server.requests if r.startswith("/nar/") or r.endswith(".ls")]


# --- property: random trees, random reads ------------------------------------------

names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
files = st.builds(TreeFile, st.binary(max_size=3 * CHUNK + 100) | st.sampled_from(
    [b"", bytes(CHUNK), os.urandom(CHUNK * 5 + 7)]), st.booleans())
trees = st.recursive(
    files | st.builds(TreeSymlink, st.sampled_from([b"a", b"../x", b"/nix/store"])),
    lambda children: st.builds(TreeDir, st.dictionaries(names.map(str.encode), children,
                                                        max_size=4)),
    max_leaves=8)


class HandMadeCache:
    """A signed, indexed binary cache folder of in-memory trees."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secret = SecretKey.generate("hand-made-1")
        (root / "nar").mkdir(parents=True)
        (root / "nix-cache-info").write_text("StoreDir: /nix/store\n")
        # indexed from the start (the daemon asks for the marker as it starts)
        (root / fileindex.MARKER).write_bytes(fileindex.MAGIC)

    def add(self, tree: Tree) -> str:
        """Publish *tree* as a new store path; its basename."""
        data = nartree.pack(tree)
        hash_part = base32.encode(secrets.token_bytes(20))
        base = f"{hash_part}-t"
        nar_name = f"nar/{hash_part}.nar"
        (self.root / nar_name).write_bytes(data)
        info = NarInfo(f"/nix/store/{base}", nar_name, Hash.compute(data), len(data),
                       compression="none")
        sign_narinfo(info, self.secret)
        (self.root / f"{hash_part}.narinfo").write_text(info.to_text())
        results = cacheindex.index_cache(self.root, self.secret, CHUNK)
        assert all(isinstance(r, cacheindex.Result) for r in results), results
        return base


def nodes(tree: Tree, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Tree]]:
    yield prefix, tree
    if isinstance(tree, TreeDir):
        for name, child in tree.entries.items():
            yield from nodes(child, (*prefix, name.decode()))


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HandMadeCache, Daemon]]:
    if reason := fuse_missing():
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("handmade")
    cache = HandMadeCache(root / "cache")
    with serve_directory(cache.root) as server:
        with lazystore_mount(root / "d", server.url, str(cache.secret.public_key),
                             "--cache-size", "64K") as daemon:
            yield cache, daemon


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=trees, reads=st.lists(st.tuples(st.integers(0, 10), st.integers(0, 6 * CHUNK),
                                            st.integers(1, 3 * CHUNK)), max_size=12))
def test_any_reads_return_the_real_bytes(
        mounted: tuple[HandMadeCache, Daemon], tree: Tree,
        reads: list[tuple[int, int, int]]) -> None:
    cache, daemon = mounted
    nars_before = daemon.status()["nars_fetched"]
    base = cache.add(tree)
    top = daemon.mnt / base
    found = [(rel, n.contents) for rel, n in nodes(tree) if isinstance(n, TreeFile)]
    for rel, node in nodes(tree):
        if isinstance(node, TreeSymlink):
            assert os.readlink(top.joinpath(*rel)) == node.target.decode()
        elif isinstance(node, TreeDir):
            assert sorted(os.listdir(top.joinpath(*rel))) == sorted(
                n.decode() for n in node.entries)
    handles = {rel: os.open(top.joinpath(*rel), os.O_RDONLY) for rel, _ in found}
    try:
        for which, offset, size in reads if found else []:
            rel, contents = found[which % len(found)]
            assert os.pread(handles[rel], size, offset) == contents[offset:offset + size]
        for rel, contents in found:
            assert top.joinpath(*rel).read_bytes() == contents
            assert top.joinpath(*rel).stat().st_size == len(contents)
    finally:
        for fd in handles.values():
            os.close(fd)
    assert daemon.status()["nars_fetched"] == nars_before, daemon.log.read_text()[-3000:]


# --- content-addressed chunks: shared across store paths -----------------------------


def two_versions(root: Path) -> tuple[HandMadeCache, bytes, str, str]:
    """v1 and v2 of a path (two store paths, as an image update makes): the
    same interpreter, a changed model; (cache, interpreter, v1, v2)."""
    interpreter = os.urandom(5 * CHUNK + 100)
    cache = HandMadeCache(root)
    v1, v2 = (cache.add(TreeDir({b"bin": TreeDir({b"python": TreeFile(interpreter, True)}),
                                 b"model": TreeFile(os.urandom(2 * CHUNK))}))
              for _ in range(2))
    return cache, interpreter, v1, v2


def data_file(base: str) -> str:
    return f"/{fileindex.DATA_DIR}/{base[:32]}.lzdata"


def test_a_second_path_reads_the_chunks_it_shares_with_a_first_from_the_cache(
        tmp_path: Path) -> None:
    """Reading v1's interpreter and then v2's requests none of v2's data for
    it (its chunks are the ones held, looked up by sha256 before any fetch);
    v2's changed file is fetched."""
    cache, interpreter, v1, v2 = two_versions(tmp_path / "cache")
    with serve_directory(cache.root) as server:
        with lazystore_mount(tmp_path / "d", server.url, str(cache.secret.public_key)) as daemon:
            assert (daemon.mnt / v1 / "bin" / "python").read_bytes() == interpreter
            assert data_file(v1) in server.range_requests
            fetched = daemon.status()["chunk_bytes"]
            assert (daemon.mnt / v2 / "bin" / "python").read_bytes() == interpreter
            assert data_file(v2) not in server.range_requests, server.range_requests
            assert daemon.status()["chunk_bytes"] == fetched
            (daemon.mnt / v2 / "model").read_bytes()
            assert data_file(v2) in server.range_requests  # v2's own data is asked for
            assert daemon.status()["nars_fetched"] == 0
    assert not [r for r in server.requests if r.startswith("/nar/")]


@pytest.mark.parametrize("damaged", [False, True])
def test_chunks_held_only_in_a_materialised_path_are_read_there_and_checked(
        tmp_path: Path, damaged: bool) -> None:
    """v1 read chunk by chunk, then materialised (a prefetch: from its chunks),
    and its chunk files gone (as an eviction leaves it): v2's interpreter is
    read from v1's materialised file, each chunk checked against its sha256,
    and nothing of v2's data is requested for it. A materialised file whose
    bytes were changed on disk is not served from: those chunks are fetched."""
    cache, interpreter, v1, v2 = two_versions(tmp_path / "cache")
    with serve_directory(cache.root) as server:
        with lazystore_mount(tmp_path / "d", server.url, str(cache.secret.public_key)) as daemon:
            assert (daemon.mnt / v1 / "bin" / "python").read_bytes() == interpreter
            daemon.call("prefetch", paths=[f"/nix/store/{v1}"])
            # every chunk of v1 is here: assembled from them, not its NAR
            assert v1 in daemon.status()["paths_materialized"]
            assert f"/nar/{v1[:32]}.nar" not in server.requests
            for chunk in (daemon.cache / "chunks").iterdir():
                chunk.unlink()
            copy = daemon.cache / "store" / v1 / "bin" / "python"
            if damaged:
                with open(copy, "r+b") as f:
                    os.pwrite(f.fileno(), b"X", 2 * CHUNK + 1)
            assert (daemon.mnt / v2 / "bin" / "python").read_bytes() == interpreter
            status = daemon.status()
            if damaged:
                assert server.range_requests.count(data_file(v2)) >= 1
                assert status["chunks_from_copies"] == 5
                assert daemon.log.read_text().count("does not hold the chunk") == 1
            else:
                assert data_file(v2) not in server.range_requests, server.range_requests
                assert status["chunks_from_copies"] == 6
