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
3. --containers N: the daemon under a running container (private containerd
   + runc through ``lazystore snapshotter``, both running throughout) whose
   busybox shell reads files of the "wide" closure in a loop (md5sum, each
   read timed), each round adding 8 store paths and a 4 MiB one not fetched
   yet, while the reader reads the sample closure on the root mount; stopped
   or killed N times (at most 20: one blob a round) while a round's paths
   are fetched (lazystore.testing.restarts.restart_rounds, as
   tests/test_e2e_restarts.py): the container's reads, failed or wrong, the
   slowest, and whether the container, containerd and the snapshotter are
   the same processes at the end. With it, 1 and 2 run only when asked.

Run as root::

    .venv/bin/python bench/restarts.py [--restarts 20] [--crashes 100]
    .venv/bin/python bench/restarts.py --containers 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lazymount import load_note, signed_cache  # noqa: E402
from lazystore.testing import nixcache  # noqa: E402
from lazystore.testing.containerd import Containerd, snapshotter_process  # noqa: E402
from lazystore.testing.daemon import LAZYSTORE, Daemon  # noqa: E402
from lazystore.testing.httpserver import serve_directory  # noqa: E402
from lazystore.testing.restarts import (  # noqa: E402
    ContainerLoop,
    Reader,
    crash_loop,
    restart_rounds,
    store_files,
)
from lazystore.testing.supervisor import Supervisor  # noqa: E402

WIDE_NIX = Path(__file__).resolve().parent / "workloads/wide.nix"
PARTS_PER_ROUND = 8
SN = "lazystore"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--crashes", type=int, default=100)
    parser.add_argument("--containers", type=int, default=0)
    args = parser.parse_args()
    if args.containers:
        return containers(args.containers)
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


def containers(restarts: int) -> int:
    """Part 3 of the module docstring."""
    wide, top = nixcache.build(WIDE_NIX), nixcache.build()
    bases = sorted(os.path.basename(p) for p in nixcache.closure(wide))
    parts = [b for b in bases if b[33:].startswith("wide-part-")]
    blobs = [b for b in bases if b[33:].startswith("wide-blob-")]
    restarts = min(restarts, len(blobs))
    rounds = [parts[PARTS_PER_ROUND * i:PARTS_PER_ROUND * (i + 1)] + blobs[i - 1:i]
              for i in range(restarts + 1)]
    busybox = f"/nix/store/{next(b for b in bases if b.endswith('-bench-busybox'))}/bin/busybox"
    paths = nixcache.closure(top)
    sample = store_files(paths)
    liba = next(os.path.basename(p) for p in paths if p.endswith("-liba"))
    evictable = [os.path.basename(p) for p in paths if not p.endswith("-liba")]
    print(f"{restarts} restarts under a container; {load_note()}")
    with tempfile.TemporaryDirectory(prefix="lzb-", dir="/tmp") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)  # the container's files are read as root, the mount allow_other
        key = nixcache.KeyPair.generate(base / "keys")
        for closure_top in (wide, top):  # one cache of both closures
            cache = nixcache.make_cache(closure_top, base / "cache", key)
        subprocess.run([LAZYSTORE, "image", "build", wide, "-o", str(base / "wide.tar"),
                        "--name", "lazy/wide-loop:1"], check=True, capture_output=True)
        supervisor = Supervisor(base)
        with serve_directory(cache.root) as server:
            d = Daemon(base / "run", server.url, key.public_key,  # type: ignore[attr-defined]
                       "--allow-other", supervisor=supervisor, verbose=False)
            d.start()
            try:
                return _container_rounds(base, d, rounds, busybox, sample, liba, evictable)
            finally:
                d.stop()
                supervisor.close()


def _container_rounds(base: Path, d: Daemon, rounds: list[list[str]], busybox: str,
                      sample: dict[str, bytes], liba: str, evictable: list[str]) -> int:
    reader = Reader(d.mnt, sample, f"{liba}/lib/data")
    ctd = Containerd(base / "ctd", {SN: str(base / "sn.sock")})
    with snapshotter_process(base / "sn", base / "sn.sock", d.sock, d.mnt) as sn, ctd:
        assert ctd.proc is not None
        processes = (ctd.proc.pid, sn.pid)
        ctd.ctr("image", "import", "--snapshotter", SN, str(base / "wide.tar"))
        loop = ContainerLoop(ctd, SN, "docker.io/lazy/wide-loop:1", base / "loop", busybox)
        start = time.monotonic()
        try:
            reader.start()
            done = restart_rounds(d, loop, reader, rounds, [busybox], evictable)
            same = (loop.running() and loop.task_pid() == done.task_pid
                    and ctd.proc.poll() is None and sn.poll() is None
                    and (ctd.proc.pid, sn.pid) == processes)
        finally:
            reader.stop.set()
            loop.stop()
            got = loop.results()
            loop.remove()
        elapsed = time.monotonic() - start
        reader.join(60)
    times = done.restart_times
    print(f"restarts: {len(times)} ({len(times) - len(times) // 2} SIGTERM, {len(times) // 2} "
          f"SIGKILL) in {elapsed:.0f} s; signal to serving again median "
          f"{statistics.median(times):.2f} s, max {max(times):.2f} s")
    print(f"container, containerd, snapshotter the same processes at the end: {same}")
    print(f"container reads: {got.reads}, failed or wrong {len(got.errors)}, "
          f"slowest {got.slowest:.2f} s; paths fetched before their round "
          f"{len(done.fetched_early)}")
    print(f"root mount reads: {reader.reads}, failed or wrong {len(reader.errors)}, "
          f"slowest {reader.slowest:.2f} s")
    for line in (got.errors + reader.errors)[:20]:
        print("  " + line)
    print(load_note())
    return 0 if same and got.exited and not (got.errors or reader.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
