"""The snapshotter killed with SIGKILL at random moments of its work, N times.

lazystore.testing.snapcrash: three workers drive a real ``lazystore
snapshotter`` over gRPC as containerd does (Prepare, the layer written into
its upperdir, Commit; View, Update, Remove); the process is killed at a random
moment (up to 1.5 s after it served), its files checked (``PRAGMA
integrity_check``, parents, directories, no partial committed layer), started
again, and every snapshot mounted and its chain's files compared. Prints the
kills, problems found (0 expected), the calls the workers were in at the
kills, how many kills left directories without a row (removed by the next
start) and the time from each kill to the new process answering a List.

Run as root::

    .venv/bin/python bench/snapshotter_faults.py [--kills 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lazymount import load_note  # noqa: E402
from lazystore.testing.containerd import unmount_below  # noqa: E402
from lazystore.testing.snapcrash import LoopResult, crash_loop  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(load_note())
    base = Path(tempfile.mkdtemp(prefix="lzsc-", dir="/tmp"))  # short unix socket paths
    start = time.monotonic()

    def progress(i: int, r: LoopResult) -> None:
        if i % 10 == 0:
            print(f"  {i} kills, {len(r.problems)} problems", flush=True)

    try:
        result = crash_loop(base, args.kills, seed=args.seed, progress=progress)
    finally:
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
    again = sorted(result.serve_again)
    during = ", ".join(f"{k} {v}" for k, v in result.in_flight.most_common())
    print(f"kill -9 loop: {result.kills} kills in {time.monotonic() - start:.0f} s, "
          f"{result.calls} calls, up to {result.snapshots_max} snapshots; "
          f"problems {len(result.problems)}")
    print(f"workers were in: {during}")
    print(f"kills leaving directories without a row: {result.kills_leaving_orphans} "
          f"({result.orphans_left} directories, all removed by the next start: "
          f"{'yes' if not result.problems else 'see problems'})")
    if again:
        print(f"kill to serving again: median {statistics.median(again):.2f} s, "
              f"max {again[-1]:.2f} s")
    for line in result.problems[:20]:
        print("  " + line)
    print(load_note())
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
