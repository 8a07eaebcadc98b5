"""The snapshotter killed with SIGKILL (and stopped with SIGTERM) N times.

1. --kills N (lazystore.testing.snapcrash): three workers drive a real
   ``lazystore snapshotter`` over gRPC as containerd does (Prepare, the layer
   written into its upperdir, Commit; View, Update, Remove); the process is
   killed at a random moment (up to 1.5 s after it served), its files checked
   (``PRAGMA integrity_check``, parents, directories, no partial committed
   layer), started again, and every snapshot mounted and its chain's files
   compared. Prints the problems found (0 expected), the calls the workers
   were in at the kills, how many kills left directories without a row
   (removed by the next start) and the time from each kill to the new process
   answering a List.
2. --containers N (lazystore.testing.snapstack: real containerd 1.6, runc,
   docker-registry, the daemon over a real-Nix cache of the sample closure, a
   six-layer image): the snapshotter stopped N times (odd ones SIGKILL, even
   ones SIGTERM) under a running container that md5-checks every file of the
   image in a loop; the time from each start to containerd listing its
   snapshots again; at the end every snapshot of the image is mounted and
   checked and a new container checks every file.
3. --pulls N (the same stack): a pull of the image, the snapshotter killed at
   a random moment of it (uniform over a clean pull's duration); nothing
   half committed, then the pull again, every snapshot mounted and checked, a
   container checks every file, the image removed (the snapshotter is then
   empty).

Run as root::

    .venv/bin/python bench/snapshotter_faults.py [--kills 100] [--containers 10] [--pulls 20]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lazymount import load_note, signed_cache  # noqa: E402
from lazystore.testing import nixcache  # noqa: E402
from lazystore.testing.containerd import unmount_below  # noqa: E402
from lazystore.testing.snapcrash import LoopResult, crash_loop  # noqa: E402
from lazystore.testing.snapstack import (  # noqa: E402
    SN,
    Stack,
    check_image_snapshots,
    errors_logged,
    half_committed,
    pull,
    reader,
    reads,
    remove_image,
    run_check,
    running,
    wait_reads,
)


def _times(label: str, values: list[float]) -> str:
    if not values:
        return f"{label}: none"
    return (f"{label}: median {statistics.median(values):.2f} s, "
            f"max {max(values):.2f} s")


def kill_loop(kills: int, seed: int) -> list[str]:
    base = Path(tempfile.mkdtemp(prefix="lzsc-", dir="/tmp"))  # short unix socket paths
    start = time.monotonic()

    def progress(i: int, r: LoopResult) -> None:
        if i % 10 == 0:
            print(f"  {i} kills, {len(r.problems)} problems", flush=True)

    try:
        result = crash_loop(base, kills, seed=seed, progress=progress)
    finally:
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
    during = ", ".join(f"{k} {v}" for k, v in result.in_flight.most_common())
    print(f"kill -9 loop: {result.kills} kills in {time.monotonic() - start:.0f} s, "
          f"{result.calls} calls, up to {result.snapshots_max} snapshots; "
          f"problems {len(result.problems)}")
    print(f"  workers were in: {during}")
    print(f"  kills leaving directories without a row: {result.kills_leaving_orphans} "
          f"({result.orphans_left} directories; any left after the next start is a problem)")
    print("  " + _times("kill to serving again", result.serve_again))
    return result.problems


def container_restarts(st: Stack, n: int) -> list[str]:
    pull(st)
    problems = [] if "all-sums-ok" in run_check(st) else ["the first container's check failed"]
    starts: list[float] = []
    with reader(st, "reader") as log:
        wait_reads(log, 0)
        for i in range(n):
            sig = signal.SIGKILL if i % 2 else signal.SIGTERM
            seen = len(reads(log))
            st.stop_snapshotter(sig)
            wait_reads(log, seen + 3)  # it reads on while the snapshotter is down
            start = time.monotonic()
            st.start_snapshotter()
            st.wait_served()
            starts.append(time.monotonic() - start)
        problems += check_image_snapshots(st)
        if "all-sums-ok" not in run_check(st):
            problems.append("a new container's check failed")
        seen = len(reads(log))
        wait_reads(log, seen + 3)
    got = reads(log)
    bad = got.count("bad")
    print(f"restarts under a running container: {n} (half SIGTERM, half SIGKILL); "
          f"container checks of every file: {len(got)}, bad {bad}")
    print("  " + _times("start to containerd listing again", starts))
    problems += [f"{bad} bad checks in the running container"] if bad else []
    remove_image(st)
    return problems


def pull_kills(st: Stack, n: int, rng: random.Random) -> list[str]:
    began = time.monotonic()
    pull(st)
    clean = time.monotonic() - began
    problems: list[str] = []
    failed = 0
    serve: list[float] = []
    for i in range(n):
        remove_image(st)
        argv = ["ctr", "--address", str(st.ctd.address), "--namespace", st.ctd.namespace,
                "image", "pull", "--snapshotter", SN, "--plain-http", st.image.ref]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, clean))
        assert st.sn_proc is not None
        st.sn_proc.send_signal(signal.SIGKILL)
        st.sn_proc.wait(30)
        failed += proc.wait(300) != 0
        problems += [f"pull {i + 1}: {p}" for p in half_committed(st)]
        st.sn_cm.__exit__(None, None, None)
        st.sn_cm = None
        start = time.monotonic()
        st.start_snapshotter()
        st.wait_served()
        serve.append(time.monotonic() - start)
        pull(st)
        problems += [f"pull {i + 1}: {p}" for p in check_image_snapshots(st)]
        if "all-sums-ok" not in run_check(st):
            problems.append(f"pull {i + 1}: the container's check failed")
    remove_image(st)
    print(f"kill -9 during a pull: {n} (a clean pull {clean:.2f} s; {failed} pulls failed "
          f"by the kill, all pulled again); problems {len(problems)}")
    print("  " + _times("start to containerd listing again", serve))
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--containers", type=int, default=10)
    parser.add_argument("--pulls", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(load_note())
    problems = kill_loop(args.kills, args.seed) if args.kills else []
    if args.containers or args.pulls:
        top = nixcache.build()
        base = Path(tempfile.mkdtemp(prefix="lzsb-", dir="/tmp"))
        os.chmod(base, 0o755)
        for sub in ("c", "s"):
            (base / sub).mkdir()
        try:
            with signed_cache(top, base / "c") as (url, key), \
                    running(base / "s", url, key, top) as st:
                if args.containers:
                    problems += container_restarts(st, args.containers)
                if args.pulls:
                    problems += pull_kills(st, args.pulls, random.Random(args.seed))
                problems += [f"logged: {line}" for line in errors_logged(st)]
        finally:
            unmount_below(base)
            shutil.rmtree(base, ignore_errors=True)
    for line in problems[:20]:
        print("  " + line)
    print(f"problems: {len(problems)}; {load_note()}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
