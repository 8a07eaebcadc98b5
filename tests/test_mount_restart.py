"""The daemon restarts under a live mount: it hands /dev/fuse to the service
manager's descriptor store and the next daemon serves the same mount.

The supervisor is lazystore.testing.supervisor, doing what systemd does
(notify socket, FDSTORE=1, LISTEN_FDS); the daemon has no test-only path.
A reader thread opens and reads files of every store path of the sample
closure, fetched and evicted again between restarts, and keeps a file and a
directory open across all of them, while the daemon is stopped (SIGTERM) and
killed (SIGKILL) and started again.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from lazystore.daemon.session import mount_device
from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon, is_mounted
from lazystore.testing.supervisor import Supervisor
from tests.test_mount_daemon import _need_fuse, by_name

pytestmark = pytest.mark.root

RESTARTS = 20
# The longest a read may wait: one restart of the daemon (python start-up,
# index load, takeover) on a loaded 2-core machine, with margin.
READ_BOUND = 30.0


def _store_files(paths: list[str]) -> dict[str, bytes]:
    """Every regular file of *paths* as real Nix built them, by path below the store."""
    out = {}
    for p in paths:
        base = os.path.basename(p)
        root = Path("/nix/store") / base
        for dirpath, _, names in os.walk(root):
            for name in names:
                full = Path(dirpath) / name
                if full.is_file() and not full.is_symlink() and full.stat().st_size < (8 << 20):
                    out[str(full.relative_to("/nix/store"))] = full.read_bytes()
    return out


class Reader(threading.Thread):
    """Reads every file again and again; keeps one file and one directory open."""

    def __init__(self, mnt: Path, files: dict[str, bytes], held: str, held_dir: str) -> None:
        super().__init__(daemon=True)
        self.mnt, self.files = mnt, files
        self.held_path, self.held_dir_path = held, held_dir
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []
        self.slowest = 0.0

    def run(self) -> None:
        held = os.open(self.mnt / self.held_path, os.O_RDONLY)
        held_dir = os.open(self.mnt / self.held_dir_path, os.O_RDONLY | os.O_DIRECTORY)
        names = sorted(os.listdir(held_dir))
        try:
            while not self.stop.is_set():
                for rel, want in self.files.items():
                    self._timed(rel, lambda r=rel: (self.mnt / r).read_bytes(), want)
                    self._timed(
                        "held " + self.held_path,
                        lambda: os.pread(held, 1 << 20, 0), self.files[self.held_path],
                    )
                    self._timed("held dir", lambda: sorted(os.listdir(held_dir)), names)
                    self._timed("fstat", lambda: os.fstat(held).st_size,
                                len(self.files[self.held_path]))
        finally:
            os.close(held)
            os.close(held_dir)

    def _timed(self, what: str, fn: object, want: object) -> None:
        start = time.monotonic()
        try:
            got = fn()  # type: ignore[operator]
        except OSError as exc:
            self.errors.append(f"{what}: {errno.errorcode.get(exc.errno or 0)} {exc}")
            got = None
        took = time.monotonic() - start
        self.slowest = max(self.slowest, took)
        if got is not None and got != want:
            self.errors.append(f"{what}: wrong bytes")
        self.reads += 1


def _wait_reads(reader: Reader, n: int) -> None:
    target = reader.reads + n
    deadline = time.monotonic() + 120
    while reader.reads < target and reader.is_alive():
        assert time.monotonic() < deadline, "the reader made no progress"
        time.sleep(0.01)


def test_twenty_restarts_and_kills_under_a_reader_lose_no_read(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    _need_fuse()
    files = _store_files(binary_cache.paths)
    liba = by_name(binary_cache.paths, "liba")
    held = f"{liba}/lib/data"
    assert held in files
    supervisor = Supervisor(tmp_path)
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key, supervisor=supervisor)
    reader = None
    try:
        d.start()
        assert set(supervisor.stored) == {"fuse"}
        device = mount_device(str(d.mnt))
        reader = Reader(d.mnt, files, held, f"{liba}/lib")
        reader.start()
        _wait_reads(reader, len(files))
        evictable = [b for b in map(os.path.basename, binary_cache.paths) if b != liba]
        for i in range(RESTARTS):
            d.restart(kill=i % 2 == 1)
            assert mount_device(str(d.mnt)) == device  # the same mount all along
            _wait_reads(reader, 2 * len(files))
            d.call("evict", paths=evictable)  # read again: fetched again
        _wait_reads(reader, len(files))
        reader.stop.set()
        reader.join(READ_BOUND)
        assert not reader.is_alive()
        assert reader.errors == []
        assert reader.slowest < READ_BOUND
        log = d.log.read_text()
        assert log.count("taking over the FUSE session") == RESTARTS
        assert "Traceback" not in log and "ERROR" not in log
        assert d.stop() == 0
        assert not is_mounted(d.mnt)
    finally:
        if reader is not None:
            reader.stop.set()
        d.stop()
        supervisor.close()
