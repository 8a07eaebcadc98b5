"""Daemon restarts and kill -9 loops under a live reader.

A supervisor doing what systemd does (lazystore.testing.supervisor: notify
socket, descriptor store, LISTEN_FDS) runs ``lazystore mount`` on the sample
closure. A reader thread loops over every file of the closure through the
mount (compared with what Nix built), one file and one directory held open
throughout; the paths it reads are evicted and so fetched again between
restarts.

1. --restarts N: stop (SIGTERM, odd ones SIGKILL) and start again N times;
   reads, failed or wrong reads, the slowest read, and each restart's time
   from the signal to the new daemon answering on its control socket.
2. --crashes N: SIGKILL N times at random moments, a quarter each at any
   moment, once a fetch/unpack, an eviction, an index save is under way (if
   one begins within a second); after each kill the cache is checked (store/
   as Nix built it, the index's verified trees Nix's), after each start that
   no tmp/ entry survived and what the daemon lists as materialised is there.

Run as root::

    .venv/bin/python bench/restarts.py [--restarts 20] [--crashes 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lazymount import load_note, signed_cache  # noqa: E402
from lazystore.testing import nixcache  # noqa: E402
from lazystore.testing.daemon import Daemon  # noqa: E402
from lazystore.testing.restarts import Reader, crash_loop, store_files  # noqa: E402
from lazystore.testing.supervisor import Supervisor  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--crashes", type=int, default=100)
    args = parser.parse_args()
    top = nixcache.build()
    paths = nixcache.closure(top)
    files = store_files(paths)
    liba = next(os.path.basename(p) for p in paths if p.endswith("-liba"))
    evictable = [os.path.basename(p) for p in paths if not p.endswith("-liba")]
    print(f"{len(paths)} store paths, {len(files)} files; {load_note()}")
    with tempfile.TemporaryDirectory() as tmp, signed_cache(top, Path(tmp)) as (url, key):
        root = Path(tmp) / "run"
        supervisor = Supervisor(Path(tmp))
        d = Daemon(root, url, key, supervisor=supervisor, verbose=False)
        reader = Reader(d.mnt, files, f"{liba}/lib/data")
        try:
            d.start()
            reader.start()
            reader.wait_reads(len(files))
            times = []
            for i in range(args.restarts):
                start = time.monotonic()
                d.restart(kill=i % 2 == 1)
                times.append(time.monotonic() - start)
                reader.wait_reads(2 * len(files))
                d.call("evict", paths=evictable)
            if times:
                print(f"restarts: {len(times)} (half SIGTERM, half SIGKILL), each "
                      f"median {statistics.median(times):.2f} s, max {max(times):.2f} s")
            result = crash_loop(d, reader, evictable, args.crashes)
            reader.wait_reads(len(files))
            reader.stop.set()
            reader.join(60)  # before the stop: that ends the mount under it
        finally:
            reader.stop.set()
            d.stop()
            supervisor.close()
    phases = ", ".join(f"{k} {v}" for k, v in sorted(result.phases.items()))
    print(f"kill -9 loop: {result.iterations} iterations (kills during: {phases}); "
          f"cache problems {len(result.problems)}, tmp/ survivors {len(result.survivors)}")
    print(f"reads: {reader.reads}, failed or wrong {len(reader.errors)}, "
          f"slowest {reader.slowest:.2f} s")
    for line in (result.problems + result.survivors + reader.errors)[:20]:
        print("  " + line)
    print(load_note())
    return 0 if not (result.problems or result.survivors or reader.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
