"""Finished paths bound read-only over the mount (lazystore/daemon/binds.py),
for real: `lazystore mount` as a subprocess, a real FUSE mount, real bind
mounts, a real HTTP binary cache written by Nix."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from lazystore.daemon.binds import Binds, bind_read_only, bound_paths, unmount
from lazystore.store.index import Record
from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon, fuse_missing
from lazystore.testing.daemon import lazystore_mount as support_mount

pytestmark = pytest.mark.root


@contextmanager
def mounted(root: Path, url: str, key: str, *extra: str) -> Iterator[Daemon]:
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    with support_mount(root, url, key, *extra) as daemon:
        yield daemon
    assert not mounts_under(root), "a mount was left behind"


def mounts_under(root: Path) -> list[str]:
    prefix = os.path.realpath(root) + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for line in f if (p := line.split()[4]).startswith(prefix)]


def wait_bound(d: Daemon, base: str, bound: bool = True, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (base in bound_paths(d.mnt)) != bound:
        assert time.monotonic() < deadline, f"{base} {'never' if bound else 'still'} bound"
        time.sleep(0.05)


def evicted(d: Daemon, base: str) -> bool:
    """Evict *base*: True if it went (an unused copy of its bind in a mount
    namespace someone else made meanwhile on the machine does not keep it)."""
    return d.call("evict", paths=[f"/nix/store/{base}"])["evicted"] == [base]


def read_uncached(path: Path) -> bytes:
    """The file's bytes after dropping its pages (the next read asks its file system)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.read(fd, 1 << 22)
    finally:
        os.close(fd)


def base_of(cache: nixcache.BinaryCache, name: str) -> str:
    return next(os.path.basename(p) for p in cache.paths if p.endswith(f"-{name}"))


def test_a_fetched_path_is_bound_read_only_and_reads_the_verified_bytes(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    with mounted(tmp_path, http_cache, binary_cache.key.public_key) as d:
        docs = base_of(binary_cache, "docs")
        assert docs not in bound_paths(d.mnt)  # nothing before it is fetched
        manual = d.mnt / docs / "share/doc/manual.txt"
        first = manual.read_bytes()  # through FUSE: fetches, verifies, then binds
        wait_bound(d, docs)
        served = d.status()["bytes_served"]
        assert read_uncached(manual) == first == (d.cache / "store" / docs /
                                                   "share/doc/manual.txt").read_bytes()
        assert d.status()["bytes_served"] == served  # the kernel did not ask the daemon
        with pytest.raises(OSError) as exc:
            os.open(manual, os.O_WRONLY)
        assert exc.value.errno == errno.EROFS
        [line] = [ln for ln in open("/proc/self/mountinfo")
                  if ln.split()[4] == os.path.realpath(d.mnt / docs)]
        assert {"ro", "nosuid", "nodev"} <= set(line.split()[5].split(","))
        liba = base_of(binary_cache, "liba")
        assert liba not in bound_paths(d.mnt)  # only what was fetched


def test_eviction_waits_for_a_reader_below_the_bind(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    with mounted(tmp_path, http_cache, binary_cache.key.public_key) as d:
        liba = base_of(binary_cache, "liba")
        data = d.mnt / liba / "lib/data"
        assert data.read_bytes() == b"hello from liba\n"
        wait_bound(d, liba)
        fd = os.open(data, os.O_RDONLY)  # below the bind: no pin in the daemon
        try:
            assert d.call("evict", paths=[f"/nix/store/{liba}"])["evicted"] == []
            assert liba in bound_paths(d.mnt)
            assert (d.cache / "store" / liba).is_dir()
            assert os.pread(fd, 100, 0) == b"hello from liba\n"
        finally:
            os.close(fd)
        assert evicted(d, liba)
        assert liba not in bound_paths(d.mnt)
        assert not (d.cache / "store" / liba).exists()
        assert liba not in d.status()["paths_materialized"]
        # through FUSE again: fetched, verified and bound once more
        assert data.read_bytes() == b"hello from liba\n"
        wait_bound(d, liba)


def test_the_quota_never_evicts_a_path_in_use_below_its_bind(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    # a quota holding about one path: every fetch evicts what it can
    with mounted(tmp_path, http_cache, binary_cache.key.public_key,
                 "--cache-size", "64K") as d:
        liba = base_of(binary_cache, "liba")
        (d.mnt / liba / "lib/data").read_bytes()
        wait_bound(d, liba)
        os.chdir(d.mnt / liba / "lib")  # a working directory below the bind is a use
        try:
            busybox = base_of(binary_cache, "busybox")
            (d.mnt / busybox / "bin/busybox").read_bytes()  # over the quota
            assert liba in d.status()["paths_materialized"]
            assert Path("data").read_bytes() == b"hello from liba\n"
            assert "is in use below its bind: not evicted" in d.log.read_text()
        finally:
            os.chdir(tmp_path)
        d.call("prefetch", paths=[f"/nix/store/{base_of(binary_cache, 'prog')}"])
        assert liba not in d.status()["paths_materialized"]  # unused: evicted and unbound
        assert liba not in bound_paths(d.mnt)  # unbound before its data went


def test_stopping_the_daemon_detaches_every_bind(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    with mounted(tmp_path, http_cache, binary_cache.key.public_key) as d:
        d.call("prefetch", paths=[binary_cache.top], closure=True)
        dirs = [os.path.basename(p) for p in binary_cache.paths if os.path.isdir(p)]
        for base in dirs:
            wait_bound(d, base)
        bound = len(dirs)
        fd = os.open(d.mnt / base_of(binary_cache, "liba") / "lib/data", os.O_RDONLY)
        try:
            assert d.stop() == 0
            assert not mounts_under(tmp_path)
            assert os.pread(fd, 100, 0) == b"hello from liba\n"  # a reader keeps its file
        finally:
            os.close(fd)
        assert f"detached {bound} binds" in d.log.read_text()


def test_no_binds_serves_everything_through_fuse(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    with mounted(tmp_path, http_cache, binary_cache.key.public_key, "--no-binds") as d:
        data = d.mnt / base_of(binary_cache, "liba") / "lib/data"
        assert data.read_bytes() == b"hello from liba\n"
        served = d.status()["bytes_served"]
        assert read_uncached(data) == b"hello from liba\n"
        assert d.status()["bytes_served"] == served + len(b"hello from liba\n")
        assert bound_paths(d.mnt) == []


@contextmanager
def namespace_reader(script: str, propagation: str = "private",
                     ) -> Iterator[subprocess.Popen[bytes]]:
    """`sh -c script` in a mount namespace of its own, once it is up: a copy of
    every mount, ours included, that our unmounts do not reach if private."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    reader = subprocess.Popen(["unshare", "-m", "--propagation", propagation, "--",
                               "sh", "-c", script],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        own = os.stat("/proc/self/ns/mnt").st_ino
        while _mount_ns(reader.pid) in (own, None):
            assert time.monotonic() < deadline, "the namespace never came up"
            time.sleep(0.05)
        yield reader
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait()


def copies_in(pid: int, point: Path) -> list[str]:
    """Mountinfo lines of process *pid*'s namespace with a mount at *point*."""
    text = Path(f"/proc/{pid}/mountinfo").read_text()
    return [ln for ln in text.splitlines() if ln.split()[4] == os.path.realpath(point)]


def test_an_unused_copy_of_a_bind_in_another_mount_namespace_does_not_keep_the_path(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    """The copy is unmounted in its own namespace, the path evicted, and that
    namespace then reads it through its copy of the FUSE mount."""
    with mounted(tmp_path, http_cache, binary_cache.key.public_key) as d:
        liba = base_of(binary_cache, "liba")
        data = d.mnt / liba / "lib/data"
        data.read_bytes()
        wait_bound(d, liba)
        fetched = d.status()["nars_fetched"]
        with namespace_reader(f'read line; cat "{data}"') as reader:
            assert len(copies_in(reader.pid, d.mnt / liba)) == 1
            assert d.call("evict", paths=[f"/nix/store/{liba}"])["evicted"] == [liba]
            assert copies_in(reader.pid, d.mnt / liba) == []
            assert liba not in bound_paths(d.mnt)
            assert not (d.cache / "store" / liba).exists()
            out, _ = reader.communicate(b"go\n", timeout=30)
            assert out == b"hello from liba\n"
        assert d.status()["nars_fetched"] == fetched + 1  # fetched again, through FUSE


def test_a_copy_of_a_bind_in_use_in_another_mount_namespace_keeps_the_path(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    with mounted(tmp_path, http_cache, binary_cache.key.public_key) as d:
        liba = base_of(binary_cache, "liba")
        data = d.mnt / liba / "lib/data"
        data.read_bytes()
        wait_bound(d, liba)
        # its working directory is below the copy there: a use
        with namespace_reader(f'cd "{data.parent}" && read line && cat data') as reader:
            assert d.call("evict", paths=[f"/nix/store/{liba}"])["evicted"] == []
            assert "is in use below a copy of its bind" in d.log.read_text()
            assert len(copies_in(reader.pid, d.mnt / liba)) == 1
            assert liba in bound_paths(d.mnt)
            out, _ = reader.communicate(b"go\n", timeout=30)
            assert out == b"hello from liba\n"
        assert d.call("evict", paths=[f"/nix/store/{liba}"])["evicted"] == [liba]
        assert liba not in bound_paths(d.mnt)


def test_a_bind_someone_made_of_a_bound_path_keeps_it(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    """Unmounting a bind of the path made elsewhere would show what is below
    it there: the path stays while it exists."""
    with mounted(tmp_path, http_cache, binary_cache.key.public_key) as d:
        liba = base_of(binary_cache, "liba")
        (d.mnt / liba / "lib/data").read_bytes()
        wait_bound(d, liba)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        subprocess.run(["mount", "--bind", str(d.mnt / liba), str(elsewhere)], check=True)
        try:
            assert d.call("evict", paths=[f"/nix/store/{liba}"])["evicted"] == []
            assert "mounted elsewhere too (at " in d.log.read_text()
            assert (elsewhere / "lib/data").read_bytes() == b"hello from liba\n"
        finally:
            unmount(str(elsewhere), lazily=False)
        assert d.call("evict", paths=[f"/nix/store/{liba}"])["evicted"] == [liba]


def _mount_ns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def test_a_copy_that_receives_our_unmount_does_not_keep_the_path(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    """With the mount shared (systemd makes / shared), a namespace made later
    holds a slave copy of each bind: the unmount propagates to it, so eviction
    goes ahead, and the copy there goes with it."""
    with mounted(tmp_path, http_cache, binary_cache.key.public_key) as d:
        subprocess.run(["mount", "--make-shared", str(d.mnt)], check=True)
        liba = base_of(binary_cache, "liba")
        (d.mnt / liba / "lib/data").read_bytes()
        wait_bound(d, liba)
        with namespace_reader("sleep 60", propagation="slave") as reader:
            [copy] = copies_in(reader.pid, d.mnt / liba)
            assert "master:" in copy
            assert evicted(d, liba)
            assert copies_in(reader.pid, d.mnt / liba) == []


class _Records:
    """The part of a LocalStore that adopting binds reads: its records."""

    def __init__(self, materialized: list[str]) -> None:
        self.records = {b: Record(materialized=True) for b in materialized}


async def test_a_release_asked_before_the_adoption_unmounts_the_last_daemons_bind(
    tmp_path: Path,
) -> None:
    """A restarted daemon may be asked to evict before it has adopted the binds
    the last one left: the release waits for the adoption and unmounts the bind,
    never leaving it over a directory that the eviction then deletes."""
    base = "0" * 32 + "-docs"
    data, mnt = tmp_path / "store" / base, tmp_path / "mnt"
    (data / "share").mkdir(parents=True)
    (mnt / base).mkdir(parents=True)
    bind_read_only(str(data), str(mnt / base))  # left by the last daemon
    try:
        binds = Binds(_Records([base]), str(mnt))  # type: ignore[arg-type]
        released: list[bool] = []

        async def release_until_free() -> None:
            # False only while someone's new mount namespace holds a copy of it
            while not await binds.release(base):
                await trio.sleep(0.5)
            released.append(True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_until_free)
            await trio.testing.wait_all_tasks_blocked()
            assert released == []  # not before the binds are known
            await nursery.start(binds.run)
            with trio.fail_after(60):
                while not released:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert bound_paths(mnt) == []
    finally:
        if bound_paths(mnt):
            unmount(str(mnt / base), lazily=True)
