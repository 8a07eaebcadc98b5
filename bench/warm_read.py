"""Warm reads, stat walks and memory of the daemon.

1. Sequential read (1 MiB reads) of a 200 MB file (the sample closure's docs
   with ``bigSize=200``) through the mount vs. the same file in the cache
   dir on the local filesystem. "first" is the first read after
   ``prefetch`` (every block crosses FUSE once), "warm" the best of the
   following reads (kernel page cache, keep_cache), interleaved with the
   native reads.
2. ``os.walk`` + ``lstat`` of a store path of 20,000 files, warm (second
   walk and later, best of --runs), through the mount vs. the cache dir.
3. Daemon RSS after a full stat walk of a store path of 100,000 files (its
   tree and 100,000 inodes known).

By default the daemon binds each fetched path read-only over its directory in
the mount (lazystore/daemon/binds.py), so warm reads and walks never reach
FUSE; ``--no-binds`` measures the FUSE path alone.

4. The same 200 MB file read (busybox ``dd``, 1 MiB blocks,
   50 reads per sample timed by busybox ``time``) in a container of the
   closure's nix image on lazystore's snapshotter (real containerd and runc),
   against the cache file bound into the same container, interleaved; best
   of --runs samples of each, warm (after one round). ``--container``: only
   this; ``--no-container``: all but this (skipped with a line where
   containerd, runc or root are missing).

All four in one run, as the warm targets are stated, as root::

    .venv/bin/python bench/warm_read.py [--runs 5] [--no-binds]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lazymount import (  # noqa: E402
    MANY_FILES_NIX,
    build_expr,
    lazystore_mount,
    load_note,
    signed_cache,
)
from lazystore.daemon.binds import bound_paths  # noqa: E402
from lazystore.testing import containerd, nixcache  # noqa: E402
from lazystore.testing.daemon import LAZYSTORE  # noqa: E402

BLOCK = 1 << 20


def read_all(path: Path) -> float:
    start = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, BLOCK):
            pass
    finally:
        os.close(fd)
    return time.monotonic() - start


def walk(root: Path) -> tuple[float, int]:
    start, n = time.monotonic(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return time.monotonic() - start, n


def served_by(m: object, base: str, binds: bool) -> str:
    """Wait (up to 10 s) for the daemon to bind *base*; what serves its reads."""
    deadline = time.monotonic() + 10
    while binds and time.monotonic() < deadline:
        if base in bound_paths(m.mnt):  # type: ignore[attr-defined]
            return "bind"
        time.sleep(0.05)
    return "FUSE"


def set_read_ahead(mnt: Path, kib: int) -> None:
    """Set the readahead of the mount's backing device info (the one runtime
    knob outside pyfuse3 that reaches the FUSE page cache)."""
    st = os.stat(mnt)
    knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    knob.write_text(str(kib))


def bench_read(tmp: Path, runs: int, read_ahead_kb: int | None, extra: list[str]) -> None:
    top = nixcache.build(bigSize="200")
    docs = next(p for p in nixcache.closure(top) if p.endswith("-docs"))
    base = os.path.basename(docs)
    with signed_cache(top, tmp / "c1") as (url, key), \
            lazystore_mount(tmp / "m1", url, key, *extra) as m:
        if read_ahead_kb is not None:
            set_read_ahead(m.mnt, read_ahead_kb)
        m.call("prefetch", paths=[docs])
        by = served_by(m, base, not extra)
        via_mount = m.mnt / base / "share/doc/manual.txt"
        native = m.cache / "store" / base / "share/doc/manual.txt"
        size = native.stat().st_size
        first = read_all(via_mount)
        read_all(native)
        pairs = [(read_all(via_mount), read_all(native)) for _ in range(runs)]  # interleaved
        warm, nat = min(p[0] for p in pairs), min(p[1] for p in pairs)
    mb = size / 1e6
    ra = f" (read_ahead_kb {read_ahead_kb})" if read_ahead_kb is not None else ""
    print(f"read {mb:.0f} MB{ra}, served by {by}: native {mb / nat:.0f} MB/s; "
          f"mount first {mb / first:.0f} MB/s "
          f"({nat / first:.2f}x); mount warm {mb / warm:.0f} MB/s ({nat / warm:.2f}x)")


def bench_walk(tmp: Path, runs: int, files: int, tag: str, extra: list[str]) -> None:
    top = build_expr(MANY_FILES_NIX, files=str(files))
    base = os.path.basename(top)
    with signed_cache(top, tmp / f"c{tag}") as (url, key), \
            lazystore_mount(tmp / f"m{tag}", url, key, *extra) as m:
        m.call("prefetch", paths=[top])
        by = served_by(m, base, not extra)
        walk(m.mnt / base)
        walk(m.cache / "store" / base)
        pairs = [(walk(m.mnt / base), walk(m.cache / "store" / base)) for _ in range(runs)]
        (t_mount, n), (t_native, _) = min(p[0] for p in pairs), min(p[1] for p in pairs)
        rss = m.rss_bytes()
    print(f"stat walk of {n} entries, served by {by}: native {t_native:.3f} s, "
          f"mount warm {t_mount:.3f} s "
          f"({t_mount / t_native:.2f}x); daemon RSS {rss / 1e6:.0f} MB")


_REAL = re.compile(r"real\s+(\d+)m\s*([0-9.]+)s")
# busybox time counts centiseconds: 50 reads make 1-2 s, so its rounding is
# below 1% (20 reads made ~0.5 s samples, rounded by up to 2%)
READS_PER_SAMPLE = 50


def timed_reads(busybox: str, paths: list[str], samples: int) -> str:
    """A shell script printing busybox ``time`` of READS_PER_SAMPLE dd reads of
    each of *paths* in turn, *samples* + 1 rounds (the first warms)."""
    def sample(path: str) -> str:
        reads = (f"i=0; while [ $i -lt {READS_PER_SAMPLE} ]; do "
                 f"{busybox} dd if={path} of=/dev/null bs=1M 2>/dev/null; i=$((i+1)); done")
        return f"{busybox} time {busybox} sh -c '{reads}'"

    return "; ".join(sample(p) for _ in range(samples + 1) for p in paths)


def real_seconds(output: str, paths: int) -> list[list[float]]:
    """The real times busybox time reported, per path, the warming round dropped."""
    times = [int(m) * 60 + float(s) for m, s in _REAL.findall(output)][paths:]
    return [times[i::paths] for i in range(paths)]


def bench_container(tmp: Path, runs: int) -> None:
    top = nixcache.build(bigSize="200")
    closure = nixcache.closure(top)
    docs = next(p for p in closure if p.endswith("-docs"))
    busybox = next(p for p in closure if p.endswith("-busybox"))
    manual = f"{docs}/share/doc/manual.txt"
    bb = f"{busybox}/bin/busybox"
    archive = tmp / "warm.tar"
    subprocess.run([LAZYSTORE, "image", "build", top, "-o", str(archive), "--name",
                    "bench/warm:1", "--entrypoint", json.dumps([f"{busybox}/bin/sh"])],
                   check=True, capture_output=True)
    with ExitStack() as stack:
        url, key = stack.enter_context(signed_cache(top, tmp / "cc"))
        m = stack.enter_context(lazystore_mount(tmp / "mc", url, key, "--allow-other"))
        sn = tmp / "sn"
        sn.mkdir()
        stack.enter_context(containerd.snapshotter_process(
            sn / "root", sn / "sn.sock", m.sock, m.mnt, log_file=sn / "log"))
        ctd = stack.enter_context(containerd.Containerd(
            tmp / "ctd", proxy_plugins={"lazystore": str(sn / "sn.sock")}))
        ctd.ctr("image", "import", "--snapshotter", "lazystore", str(archive))
        [image] = [n for n in ctd.ctr("image", "ls", "-q").stdout.split() if "bench/warm" in n]
        m.call("prefetch", paths=[docs, busybox])
        native_file = m.cache / "store" / os.path.basename(docs) / "share/doc/manual.txt"
        served = m.status()["bytes_served"]
        # the cache file bound into the same container: both read interleaved
        out = ctd.ctr("run", "--rm", "--snapshotter", "lazystore", "--mount",
                      f"type=bind,src={native_file.parent},dst=/native,options=rbind:ro",
                      image, "warm", bb, "sh", "-c",
                      timed_reads(bb, [manual, "/native/manual.txt"], runs), timeout=900)
        inside, native = real_seconds(out.stdout + out.stderr, 2)
        by = "FUSE" if m.status()["bytes_served"] - served > 100e6 else "the cache"
        mb = os.path.getsize(native_file) * READS_PER_SAMPLE / 1e6
    best_in, best_native = min(inside), min(native)
    paired = statistics.median(n / i for i, n in zip(inside, native, strict=True))
    print(f"container read {mb / READS_PER_SAMPLE:.0f} MB x {READS_PER_SAMPLE}, data from {by}: "
          f"native {mb / best_native:.0f} MB/s, "
          f"container warm {mb / best_in:.0f} MB/s ({best_native / best_in:.2f}x best of "
          f"{len(inside)}; {paired:.2f}x median of the interleaved pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--read-ahead-kb", type=int, default=None,
                        help="set the mount's bdi readahead first (kernel default 128)")
    parser.add_argument("--read-only", action="store_true", help="skip the walks")
    parser.add_argument("--no-binds", action="store_true",
                        help="the daemon serves everything through FUSE")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--container", action="store_true",
                       help="only the read in a container through the snapshotter")
    which.add_argument("--no-container", action="store_true",
                       help="not the read in a container")
    args = parser.parse_args()
    extra = ["--no-binds"] if args.no_binds else []
    print(load_note())
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        if not args.container:
            bench_read(Path(tmp), args.runs, args.read_ahead_kb, extra)
            if not args.read_only:
                bench_walk(Path(tmp), args.runs, 20_000, "20k", extra)
                bench_walk(Path(tmp), 1, 100_000, "100k", extra)
        if args.no_container or args.no_binds:
            pass  # the container's data comes from the cache, not FUSE, either way
        elif not containerd.have_containerd():
            print("container read: skipped (containerd, ctr and runc, and root, are needed)")
        else:
            bench_container(Path(tmp), args.runs)
    print(load_note())


if __name__ == "__main__":
    main()
