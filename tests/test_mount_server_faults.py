"""Broken servers through a real mount: a read that needs a NAR from a server
that sends nothing, resets mid-NAR or answers 200 with an HTML page ends in a
bounded time with EIO and one log line naming the path and the cache, and the
daemon answers reads of cached paths meanwhile (one completes while another
waits on the stalled server). With a second cache configured, the same faults
of the first end in the right bytes from the second and one warning naming
the first. The times are printed (``-s``) and in README.rst.

The daemon runs with ``stalled-download-timeout = 2`` (Nix's setting; default
300 s): a stall ends after the substituter's attempts of 2 s each. The
low-speed limit is its default, 1024 bytes/s, over that same window (2 s):
a server trickling a byte a second is cut off after 2 s at each attempt.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon
from tests.support.faultserver import Fault, FaultServer
from tests.test_mount_daemon import _need_fuse, by_name

pytestmark = pytest.mark.root

STALL = 2  # seconds: stalled-download-timeout for these daemons
BOUND = 120.0  # seconds: far above the attempts' stall timeouts; a hang fails


def _nar_url(cache: nixcache.BinaryCache, base: str) -> str:
    text = cache.narinfo_path(base).read_text()
    return "/" + next(ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("URL: "))


def _timed_read(path: Path) -> tuple[float, int | None, bytes | None]:
    start = time.monotonic()
    try:
        data = path.read_bytes()
    except OSError as exc:
        return time.monotonic() - start, exc.errno, None
    return time.monotonic() - start, None, data


FAULTS = [
    Fault.stall(after=-1),
    Fault.stall(after=100),
    Fault.reset(after=2000),
    Fault.replace(b"<html><body>502 Bad Gateway</body></html>",
                  {"Content-Type": "text/html"}),
    Fault.trickle(per_second=1),
]
FAULT_IDS = ["nothing-sent", "stall-mid-nar", "reset-mid-nar", "html-200", "trickle"]


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_a_broken_server_is_eio_in_bounded_time_and_cached_paths_keep_working(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, fault: Fault
) -> None:
    _need_fuse()
    busybox = by_name(binary_cache.paths, "busybox")
    liba = by_name(binary_cache.paths, "liba")
    with FaultServer(binary_cache.root) as server:
        d = Daemon(tmp_path, server.url, binary_cache.key.public_key, verbose=False)
        (tmp_path / "nix.conf").write_text(f"stalled-download-timeout = {STALL}\n")
        try:
            d.start()
            cached = d.mnt / liba / "lib/data"
            assert cached.read_bytes() == b"hello from liba\n"  # fetched, now cached
            server.always(_nar_url(binary_cache, busybox), fault)
            broken = d.mnt / busybox / "bin/busybox"
            result: list[tuple[float, int | None, bytes | None]] = []
            waiting = threading.Thread(target=lambda: result.append(_timed_read(broken)))
            waiting.start()
            deadline = time.monotonic() + 30
            while server.count(_nar_url(binary_cache, busybox)) == 0:
                assert time.monotonic() < deadline, "the NAR was never asked for"
                time.sleep(0.01)
            # the daemon answers meanwhile: a cached path, read while the other waits
            assert cached.read_bytes() == b"hello from liba\n"
            assert waiting.is_alive() or result
            waiting.join(BOUND)
            assert not waiting.is_alive(), "the read of the broken path hung"
            took, err, data = result[0]
            assert err == errno.EIO and data is None
            print(f"time to EIO: {took:.2f} s")
            lines = [ln for ln in d.log.read_text().splitlines() if busybox in ln]
            print("\n".join(lines))
            # one line for the fault: the read's EIO, naming the path and the cache
            assert len(lines) == 1 and "WARNING" in lines[0], lines
            assert "fs.operations" in lines[0] and server.url in lines[0]
            assert busybox not in os.listdir(d.cache / "store")  # nothing partial
            assert list((d.cache / "tmp").iterdir()) == []
            assert cached.read_bytes() == b"hello from liba\n"
        finally:
            d.stop()


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_the_next_cache_serves_what_a_broken_first_one_cannot(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, fault: Fault
) -> None:
    _need_fuse()
    busybox = by_name(binary_cache.paths, "busybox")
    nar = _nar_url(binary_cache, busybox)
    want = (Path("/nix/store") / busybox / "bin/busybox").read_bytes()
    with FaultServer(binary_cache.root) as first, FaultServer(binary_cache.root) as second:
        first.always(nar, fault)
        # the same nix-cache-info Priority: the first named is tried first
        d = Daemon(tmp_path, [first.url, second.url], binary_cache.key.public_key,
                   verbose=False)
        (tmp_path / "nix.conf").write_text(f"stalled-download-timeout = {STALL}\n")
        try:
            d.start()
            took, err, data = _timed_read(d.mnt / busybox / "bin/busybox")
            print(f"time to the right bytes from the second cache: {took:.2f} s")
            assert err is None and data == want
            assert first.count(nar) >= 1 and second.count(nar) == 1
            lines = [ln for ln in d.log.read_text().splitlines() if "WARNING" in ln]
            print("\n".join(lines))
            # one warning: the first cache's fault, naming it, and who served instead
            assert len(lines) == 1, lines
            assert busybox in lines[0] and first.url in lines[0]
            assert f"from {second.url} after 1 other cache(s) failed" in lines[0]
            assert d.status()["paths_materialized"] == [busybox]
        finally:
            d.stop()
