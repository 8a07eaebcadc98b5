"""Chunk-granular reads through a real mount from a real nginx serving an
indexed binary cache folder as static files (nginx honours Range itself):
its access log proves that only the chunks a read needs leave the server,
each as a 206, and no NAR; with ``gzip on`` the index comes compressed while
chunks stay exact ranges."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from lazystore import cacheindex
from lazystore.nix import fileindex
from lazystore.nix.signing import SecretKey
from lazystore.testing import nixcache, proxies
from lazystore.testing.daemon import fuse_missing, lazystore_mount

pytestmark = pytest.mark.root
CHUNK = 64 << 10
GZIP = "gzip on; gzip_types application/octet-stream text/plain; gzip_min_length 1;"


@pytest.fixture(autouse=True)
def _needs() -> None:
    if reason := fuse_missing() or proxies.missing("nginx"):
        pytest.skip(reason)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, binary_cache: nixcache.BinaryCache
            ) -> nixcache.BinaryCache:
    root = tmp_path_factory.mktemp("nginx-indexed") / "cache"
    shutil.copytree(binary_cache.root, root)
    cacheindex.index_cache(root, SecretKey.parse(binary_cache.key.secret_file.read_text()),
                           CHUNK)
    return nixcache.BinaryCache(root, binary_cache.key, binary_cache.top, binary_cache.paths)


def log_rows(proxy: proxies.Proxy) -> list[tuple[str, int, int, str, str]]:
    """(uri, status, body bytes, Range asked, Content-Encoding) per request."""
    rows = []
    for line in proxy.access_log():
        uri, status, sent, rng, enc = line.split(" ")
        rows.append((uri, int(status), int(sent), rng.removeprefix("range="),
                     enc.removeprefix("enc=")))
    return rows


@pytest.mark.parametrize("gzip", [False, True])
def test_reads_through_the_mount_fetch_only_their_chunks_from_nginx(
        tmp_path: Path, indexed: nixcache.BinaryCache, gzip: bool) -> None:
    docs = next(Path(p).name for p in indexed.paths if p.endswith("-docs"))
    busybox = next(Path(p).name for p in indexed.paths if p.endswith("-busybox"))
    docs_index = fileindex.parse((indexed.root / f"{docs[:32]}.lzindex").read_bytes())
    manual = docs_index.files[-1]
    binary = fileindex.parse((indexed.root / f"{busybox[:32]}.lzindex").read_bytes()).files[0]
    assert manual.path == (b"share", b"doc", b"manual.txt")
    with proxies.nginx_static(tmp_path / "nginx", indexed.root, GZIP if gzip else "") as nginx:
        with lazystore_mount(tmp_path / "d", nginx.url, indexed.key.public_key) as daemon:
            with open(daemon.mnt / docs / "share" / "doc" / "manual.txt", "rb") as f:
                assert os.pread(f.fileno(), 10, (1 << 20) - 10) == b"d" * 10
            got = (daemon.mnt / busybox / "bin" / "busybox").read_bytes()
            assert got == Path("/nix/store", busybox, "bin", "busybox").read_bytes()
            readme = docs_index.files[0].chunks[0]  # read behind the manual (below)
            status = daemon.status_when("chunk_bytes", manual.chunks[-1].length + readme.length
                                        + sum(c.length for c in binary.chunks))
    rows = log_rows(nginx)
    assert status["nars_fetched"] == 0
    assert not [r for r in rows if r[0].startswith("/nar/")]
    data = [r for r in rows if r[0].startswith(f"/{fileindex.DATA_DIR}/")]
    assert data and all(r[1] == 206 and r[3].startswith("bytes=") and r[4] == "-"
                        for r in data)
    # The manual's last chunk from its data file (the read wanted only it), and
    # read behind it the file before it in NAR order (its other chunks are the
    # same bytes as the last: that one).
    docs_data = [r for r in data if docs[:32] in r[0]]
    last = manual.chunks[-1]
    assert docs_index.files[0].path == (b"share", b"doc", b"README")
    assert sorted((r[3], r[2]) for r in docs_data) == sorted([
        (f"bytes={c.offset}-{c.offset + c.length - 1}", c.length) for c in (last, readme)])
    # busybox read whole: every chunk of it exactly once, nothing else
    assert sum(r[2] for r in data if busybox[:32] in r[0]) == sum(c.length
                                                                  for c in binary.chunks)
    assert status["chunk_bytes"] == sum(r[2] for r in data)
    indexes = [r for r in rows if r[0].endswith(fileindex.SUFFIX)]
    assert {r[0] for r in indexes} == {f"/{docs[:32]}.lzindex", f"/{busybox[:32]}.lzindex"}
    if gzip:  # documents may come compressed; ranges never are
        sizes = {r[0]: r[2] for r in indexes}
        for uri, sent in sizes.items():
            assert sent < (indexed.root / uri[1:]).stat().st_size
        assert all(r[4] == "gzip" for r in indexes)


def test_verify_complete_assembles_a_path_read_whole_without_its_nar(
        tmp_path: Path, indexed: nixcache.BinaryCache) -> None:
    docs = next(Path(p).name for p in indexed.paths if p.endswith("-docs"))
    files = fileindex.parse((indexed.root / f"{docs[:32]}.lzindex").read_bytes()).files
    with proxies.nginx_static(tmp_path / "nginx", indexed.root) as nginx:
        with lazystore_mount(tmp_path / "d", nginx.url, indexed.key.public_key,
                             "--verify-complete") as daemon:
            for entry in files:
                rel = Path(*(p.decode() for p in entry.path))
                assert (daemon.mnt / docs / rel).read_bytes() == Path(
                    "/nix/store", docs, rel).read_bytes()
            deadline = time.monotonic() + 30
            while docs not in daemon.status()["paths_materialized"]:
                assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
                time.sleep(0.05)
            assert (daemon.cache / "store" / docs / "share" / "doc" / "README").is_file()
            assert "assembled" in daemon.log.read_text()
    assert not [r for r in log_rows(nginx) if r[0].startswith("/nar/")]
