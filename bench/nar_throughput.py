"""NAR unpack throughput: lazystore's NarUnpacker against ``nix-store --restore``.

Two NARs are generated with lazystore's writer: one big file (``--big-mb``,
default 200 MB) and many small files (``--files``, default 20,000, in
directories of 200). Each is unpacked ``--runs`` times by both, into a fresh
directory on the same filesystem, from a NAR file in the page cache; the best
time of each is reported with the throughput and lazystore's speed as a
fraction of Nix's ("ratio"; above 1 means faster than Nix), and the same for
CPU time (user + system), which a shared machine disturbs less. Run as::

    .venv/bin/python bench/nar_throughput.py [--dir DIR] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lazystore import nixtool
from lazystore.nix import fsio, nar

BLOCK = 1 << 20


def big_events(size: int) -> Iterator[nar.Event]:
    yield nar.FileStart(None, False, size)
    block = bytes(range(256)) * (BLOCK // 256)
    for start in range(0, size, BLOCK):
        yield nar.FileData(block[: min(BLOCK, size - start)])
    yield nar.FileEnd()


def small_events(count: int, per_dir: int = 200) -> Iterator[nar.Event]:
    yield nar.DirStart(None)
    for d in range((count + per_dir - 1) // per_dir):
        yield nar.DirStart(b"dir-%04d" % d)
        for f in range(min(per_dir, count - d * per_dir)):
            size = 64 + (f * 97) % 4000  # 64 B .. 4 KB, 2 KB on average
            yield nar.FileStart(b"file-%05d" % f, f % 10 == 0, size)
            yield nar.FileData(bytes([f % 251]) * size)
            yield nar.FileEnd()
        yield nar.DirEnd()
    yield nar.DirEnd()


def write_nar(path: Path, events: Iterator[nar.Event]) -> int:
    with path.open("wb") as f:
        for piece in nar.serialize(events):
            f.write(piece)
    return path.stat().st_size


def unpack_lazystore(nar_file: Path, dest: Path) -> None:
    with nar_file.open("rb", buffering=0) as f:
        fsio.unpack(f, dest)


def unpack_nix(nar_file: Path, dest: Path) -> None:
    with nar_file.open("rb") as f:
        subprocess.run(["nix-store", "--restore", str(dest)], stdin=f, check=True,
                       env=nixtool.nix_env())


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(unpack: Callable[[Path, Path], None], nar_file: Path, dest: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one unpack."""
    os.sync()  # start each run without the previous one's dirty pages
    cpu, start = cpu_seconds(), time.perf_counter()
    unpack(nar_file, dest)
    elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
    fsio.remove_tree(dest)
    return elapsed, used


def best_times(nar_file: Path, work: Path, runs: int) -> tuple[tuple[float, float], ...]:
    """Best (wall, CPU) of *runs* for Nix and for lazystore, alternating so both
    see the same load."""
    nix, ours = [], []
    for i in range(runs):
        nix.append(timed(unpack_nix, nar_file, work / f"nix-{i}"))
        ours.append(timed(unpack_lazystore, nar_file, work / f"ours-{i}"))
    return tuple((min(t[0] for t in r), min(t[1] for t in r)) for r in (nix, ours))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: /var/tmp)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=20_000)
    args = parser.parse_args()
    if shutil.which("nix-store") is None:
        print("nix-store is not installed", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="nar-bench-", dir=args.dir or "/var/tmp"))
    try:
        cases = [
            (f"one {args.big_mb} MB file", big_events(args.big_mb * BLOCK), 0.8),
            (f"{args.files} small files", small_events(args.files), 0.3),
        ]
        tiny = work / "tiny.nar"
        write_nar(tiny, big_events(1))
        (s_nix, s_cpu), _ = best_times(tiny, work, args.runs)
        print(f"nix-store start-up (1-byte NAR): {s_nix:.3f} s wall, {s_cpu:.3f} s CPU; "
              "subtracted from Nix's times below (lazystore runs in this process)")
        print(f"{'case':<22} {'NAR MB':>7} {'nix s':>7} {'ours s':>7} {'nix MB/s':>9} "
              f"{'ours MB/s':>10} {'ratio':>6} {'target':>7} {'nix CPU s':>10} "
              f"{'ours CPU s':>11} {'CPU ratio':>10}")
        for label, events, target in cases:
            nar_file = work / "case.nar"
            size = write_nar(nar_file, events)
            (t_nix, c_nix), (t_ours, c_ours) = best_times(nar_file, work, args.runs)
            t_nix, c_nix = t_nix - s_nix, c_nix - s_cpu
            mb = size / 1e6
            print(f"{label:<22} {mb:7.1f} {t_nix:7.3f} {t_ours:7.3f} {mb / t_nix:9.0f} "
                  f"{mb / t_ours:10.0f} {t_nix / t_ours:6.2f} {target:7.1f} {c_nix:10.3f} "
                  f"{c_ours:11.3f} {c_nix / c_ours:10.2f}", flush=True)
            nar_file.unlink()
    finally:
        fsio.remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
