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

import os
from pathlib import Path

import pytest

from lazystore.daemon.session import mount_device
from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon, is_mounted
from lazystore.testing.restarts import Reader, crash_loop, store_files
from lazystore.testing.supervisor import Supervisor
from tests.test_mount_daemon import _need_fuse, by_name

pytestmark = pytest.mark.root

RESTARTS = 20
CRASHES = 100
# The longest a read may wait: one restart of the daemon (python start-up,
# index load, takeover) on a loaded 2-core machine, with margin.
READ_BOUND = 30.0


def test_twenty_restarts_and_kills_under_a_reader_lose_no_read(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    _need_fuse()
    files = store_files(binary_cache.paths)
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
        reader = Reader(d.mnt, files, held)
        reader.start()
        reader.wait_reads(len(files))
        evictable = [b for b in map(os.path.basename, binary_cache.paths) if b != liba]
        for i in range(RESTARTS):
            d.restart(kill=i % 2 == 1)
            assert mount_device(str(d.mnt)) == device  # the same mount all along
            reader.wait_reads(2 * len(files))
            d.call("evict", paths=evictable)  # read again: fetched again
        reader.wait_reads(len(files))
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


@pytest.mark.slow
def test_a_hundred_kills_mid_fetch_unpack_evict_and_index_save_corrupt_nothing(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    """kill -9 at random moments while paths are evicted, fetched, unpacked and
    the index saved, then a supervised restart, 100 times: no read fails or
    returns a wrong byte; after each kill store/ holds only whole paths as Nix
    built them and the index's verified trees are Nix's; no tmp/ entry
    survives the next start; what the daemon lists as materialised is there."""
    _need_fuse()
    files = store_files(binary_cache.paths)
    liba = by_name(binary_cache.paths, "liba")
    supervisor = Supervisor(tmp_path)
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key, supervisor=supervisor,
               verbose=False)
    reader = Reader(d.mnt, files, f"{liba}/lib/data")
    try:
        d.start()
        reader.start()
        reader.wait_reads(len(files))
        evictable = [b for b in map(os.path.basename, binary_cache.paths) if b != liba]
        result = crash_loop(d, reader, evictable, CRASHES)
        reader.wait_reads(len(files))
        reader.stop.set()
        reader.join(READ_BOUND)
        assert result.iterations == CRASHES
        assert result.problems == [] and result.survivors == []
        assert reader.errors == [] and reader.slowest < READ_BOUND
        assert sum(result.phases.values()) == CRASHES
        assert result.phases.get("fetch/unpack", 0) > 0  # the kills did land mid-work
    finally:
        reader.stop.set()
        d.stop()
        supervisor.close()
