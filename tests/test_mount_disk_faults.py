"""The cache on a small file system (a tmpfs of a few MiB made by the test),
through a real mount: a NAR that does not fit ends the read with ENOSPC and
one log line naming the path, the free space and the NAR's size, leaves
nothing partial, and other paths keep working; when the disk is full of
cached paths that may go, the least recently used are evicted to make room
and the read succeeds (never an open or a viewed path); a cache file system
that vanishes while mounted gives errors, not a crash."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lazystore import cacheindex
from lazystore.daemon.binds import bound_paths
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey
from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon
from lazystore.testing.httpserver import serve_directory
from tests.test_mount_binds import wait_bound
from tests.test_mount_daemon import _need_fuse, by_name

pytestmark = pytest.mark.root

LIBA = b"hello from liba\n"


@contextmanager
def on_tmpfs(d: Daemon, size: str) -> Iterator[None]:
    """*d*'s cache directory on a tmpfs of *size* for the block, always unmounted."""
    _need_fuse()
    d.cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d.cache)],
                   check=True)
    try:
        yield
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(d.cache)], check=False, capture_output=True)


def nar_size(cache: nixcache.BinaryCache, base: str) -> int:
    return NarInfo.parse(cache.narinfo_path(base).read_text()).nar_size


def warnings(d: Daemon) -> list[str]:
    return [ln for ln in d.log.read_text().splitlines() if "WARNING" in ln or "ERROR" in ln]


def assert_no_room(d: Daemon, cache: nixcache.BinaryCache, base: str, path: Path) -> str:
    """Reading *path* (of *base*) is ENOSPC with one log line, nothing partial stays."""
    before = len(warnings(d))
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == errno.ENOSPC
    print(f"time to ENOSPC: {time.monotonic() - start:.2f} s")
    assert base not in os.listdir(d.cache / "store")  # nothing partial
    assert list((d.cache / "tmp").iterdir()) == []
    lines = warnings(d)[before:]
    assert len(lines) == 1 and base in lines[0], lines
    line = lines[0]
    print(line)
    assert f"no room for {base} in the cache {d.cache} (No space left on device): " in line
    free = int(re.search(r": (\d+) bytes free on its file system of (\d+)", line)[1])
    st = os.statvfs(d.cache)
    assert abs(free - st.f_bavail * st.f_frsize) < 64 << 10  # what the disk had for it
    assert f"the NAR is {nar_size(cache, base)} bytes" in line
    return line


def test_a_nar_that_does_not_fit_fails_alone(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key, verbose=False)
    with on_tmpfs(d, "1m"):
        d.start()
        busybox = by_name(binary_cache.paths, "busybox")  # about 2 MB unpacked
        liba = by_name(binary_cache.paths, "liba")
        line = assert_no_room(d, binary_cache, busybox, d.mnt / busybox / "bin/busybox")
        assert "larger than the whole file system" in line
        assert (d.mnt / liba / "lib/data").read_bytes() == LIBA
        assert d.status()["paths_materialized"] == [liba]
        # the cache file system vanishes under the daemon: errors, the daemon lives
        subprocess.run(["umount", "-l", str(d.cache)], check=True)
        docs = by_name(binary_cache.paths, "docs")
        readme = (Path("/nix/store") / docs / "share/doc/README").read_bytes()
        for path, want in ((d.mnt / docs / "share/doc/README", readme),
                           (d.mnt / liba / "lib/data", LIBA)):
            try:
                got = path.read_bytes()
            except OSError as exc:
                assert exc.errno in (errno.EIO, errno.ENOENT, errno.ENOSPC)
            else:
                assert got == want  # never wrong bytes
        assert "paths_materialized" in d.status()  # still serving
        assert "ERROR" not in d.log.read_text() and "Traceback" not in d.log.read_text()
        assert d.stop() == 0


def test_a_full_disk_makes_room_by_evicting_what_is_not_in_use(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    # 2.5 MiB: docs (1 MiB) and liba fit, then busybox (2 MB) only without docs.
    # --no-binds: every open goes through FUSE (an open file pins its path); a
    # bind's use is found by its unmount, which a copy of the bind in a mount
    # namespace made meanwhile on this machine would also refuse.
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key, "--no-binds")
    busybox, docs, liba = (by_name(binary_cache.paths, n) for n in ("busybox", "docs", "liba"))
    manual = d.mnt / docs / "share/doc/manual.txt"
    program = d.mnt / busybox / "bin/busybox"
    with on_tmpfs(d, "2560k"):
        d.start()
        assert manual.read_bytes() == (Path("/nix/store") / docs / "share/doc/manual.txt"
                                       ).read_bytes()
        assert (d.mnt / liba / "lib/data").read_bytes() == LIBA  # used after docs
        # no room for busybox: docs, least recently used, goes; liba stays
        assert program.read_bytes() == (Path("/nix/store") / busybox / "bin/busybox"
                                        ).read_bytes()
        assert d.status()["paths_materialized"] == sorted([busybox, liba])
        assert f"evicted 1 path to make room for {busybox}" in d.log.read_text()
        assert warnings(d) == []
        # busybox open: liba goes for docs, which still does not fit; busybox stays
        with open(program, "rb") as held:
            line = assert_no_room(d, binary_cache, docs, manual)
            assert "1 path evicted for it, the rest is in use" in line
            assert d.status()["paths_materialized"] == [busybox]
            assert held.read(4) == b"\x7fELF"
        # busybox in a view: pinned as well (nothing else left to evict)
        d.call("view_create", id="v", paths=[f"/nix/store/{busybox}"])
        line = assert_no_room(d, binary_cache, docs, manual)
        assert "nothing in it can be evicted" in line
        assert d.status()["paths_materialized"] == [busybox]
        # no longer in use: evicted, and docs fits
        d.call("view_remove", id="v")
        assert manual.read_bytes()[:4] == b"dddd"
        assert d.status()["paths_materialized"] == [docs]
        assert len(warnings(d)) == 2  # the two reads that failed, nothing more
        assert d.stop() == 0


def remount(path: Path, mode: str) -> None:
    """``mount -o remount,<mode>``; a write in flight (an index save) makes a
    read-only remount EBUSY for a moment: tried again for up to 20 s."""
    for _ in range(200):
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"cannot remount {path} {mode}: {done.stderr}")


def test_a_cache_that_turns_read_only_keeps_serving_what_it_has_and_recovers(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key, verbose=False)
    busybox, docs, liba, prog = (by_name(binary_cache.paths, n)
                                 for n in ("busybox", "docs", "liba", "prog"))
    program = d.mnt / busybox / "bin/busybox"
    with on_tmpfs(d, "64m"):
        d.start()
        assert (d.mnt / liba / "lib/data").read_bytes() == LIBA
        remount(d.cache, "ro")  # the daemon holds no file of it open for writing
        try:
            new = [(program, busybox), (d.mnt / docs / "share/doc/README", docs),
                   (d.mnt / prog / "bin/prog", prog), (program, busybox)]
            for path, base in new:
                before = warnings(d)
                start = time.monotonic()
                with pytest.raises(OSError) as info:
                    path.read_bytes()
                assert info.value.errno == errno.EIO
                print(f"time to EIO (read-only cache): {time.monotonic() - start:.2f} s")
                assert (d.mnt / liba / "lib/data").read_bytes() == LIBA  # cached: still read
                lines = [ln for ln in warnings(d)[len(before):] if base in ln]
                assert len(lines) == 1 and "Read-only file system" in lines[0], lines
            assert d.status()["paths_materialized"] == [liba]
            time.sleep(1.5)  # the index saver's delay: its failure is logged too
        finally:
            remount(d.cache, "rw")
        # one line per failed read; the index and the session journal said once each
        lines = warnings(d)
        print("\n".join(lines))
        assert len(lines) == len(new) + 2, lines
        assert sum("cannot write the cache index" in ln for ln in lines) == 1
        assert sum("cannot note store paths" in ln for ln in lines) == 1
        # writable again: fetched, verified, served; the index is written again
        assert program.read_bytes() == (Path("/nix/store") / busybox / "bin/busybox"
                                        ).read_bytes()
        assert d.status()["paths_materialized"] == sorted([busybox, liba])
        assert len(warnings(d)) == len(lines)
        assert d.stop() == 0


def test_a_full_disk_never_evicts_a_path_in_use_below_its_bind(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key)  # binds on (the default)
    busybox, docs = (by_name(binary_cache.paths, n) for n in ("busybox", "docs"))
    manual = d.mnt / docs / "share/doc/manual.txt"
    with on_tmpfs(d, "2560k"):
        d.start()
        assert (d.mnt / busybox / "bin/busybox").read_bytes()[:4] == b"\x7fELF"
        wait_bound(d, busybox)
        os.chdir(d.mnt / busybox / "bin")  # a working directory below the bind is a use
        try:
            line = assert_no_room(d, binary_cache, docs, manual)
            assert "nothing in it can be evicted" in line
            assert d.status()["paths_materialized"] == [busybox]
            assert busybox in bound_paths(d.mnt)
            assert Path("busybox").read_bytes()[:4] == b"\x7fELF"
        finally:
            os.chdir(tmp_path)
        # unused now: evicted (unbound first) to make room, and docs is read
        assert manual.read_bytes()[:4] == b"dddd"
        assert d.status()["paths_materialized"] == [docs]
        assert busybox not in bound_paths(d.mnt)
        assert d.stop() == 0


def test_chunk_reads_on_a_read_only_cache_are_served_from_memory_with_one_line_each(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair
) -> None:
    served = tmp_path / "served"
    shutil.copytree(binary_cache.root, served)
    cacheindex.index_cache(served, SecretKey.parse(test_key.secret_file.read_text()), 64 << 10)
    docs = by_name(binary_cache.paths, "docs")
    with serve_directory(served) as server:
        d = Daemon(tmp_path / "d", server.url, test_key.public_key, verbose=False)
        with on_tmpfs(d, "64m"):
            d.start()
            manual = d.mnt / docs / "share/doc/manual.txt"
            assert manual.stat().st_size == 1 << 20
            remount(d.cache, "ro")
            try:
                with open(manual, "rb") as f:
                    for offset in ((1 << 20) - 10, 0):  # two reads, apart
                        before = warnings(d)
                        assert os.pread(f.fileno(), 10, offset) == b"d" * 10
                        lines = [ln for ln in warnings(d)[len(before):] if "chunks of" in ln]
                        assert len(lines) == 1, lines
                        # the chunk read and those read ahead with it: none kept
                        assert re.search(rf"cannot keep (\d+) of \1 chunks of {docs} ", lines[0])
                        assert "Read-only file system" in lines[0]
                assert d.status()["nars_fetched"] == 0
            finally:
                remount(d.cache, "rw")
            assert d.stop() == 0
