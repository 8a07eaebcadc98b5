"""Cold start through the lazy mount vs. an eager fetch with real Nix.

The closure is bench/workloads/wide.nix with ``--blobs`` (default 30) blobs of
4 MiB of random bytes: about 125 MB of NARs, of which the program reads two
small files and one byte of one blob. It is signed, written by ``nix copy``
(zstd) and served over HTTP on 127.0.0.1. Each run starts cold:

lazy   a fresh ``lazystore mount`` (empty cache dir) is started; then the
       clock runs from starting the program (inside ``unshare -m`` with the
       mount bound over /nix/store) to its first line of output.
eager  ``nix copy --from <cache> --to <fresh chroot store>`` (signatures
       checked), then the program runs from that store (bound over
       /nix/store in a private namespace) to its first line.

Run as root::

    .venv/bin/python bench/cold_start.py [--runs 3] [--blobs 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lazymount import WORKLOADS, lazystore_mount, load_note, signed_cache  # noqa: E402
from lazystore import nixtool  # noqa: E402
from lazystore.testing import nixcache  # noqa: E402


def first_line_after(store: Path, program: str) -> float:
    """Seconds from starting *program* with *store* over /nix/store to its first line."""
    script = f"mount --bind {store} /nix/store && exec {program}"
    start = time.monotonic()
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - start
    proc.wait()
    if not line or proc.returncode:
        raise RuntimeError(f"{program} failed ({proc.returncode})")
    return elapsed


def eager(url: str, key: str, top: str, program: str, root: Path) -> float:
    env = nixtool.nix_env({"trusted-public-keys": key, "require-sigs": "true"})
    start = time.monotonic()
    subprocess.run(["nix", "copy", "--from", url, "--to", str(root), top],
                   check=True, env=env, capture_output=True)
    fetched = time.monotonic() - start
    return fetched + first_line_after(root / "nix/store", program)


def lazy(url: str, key: str, program: str, root: Path) -> tuple[float, int]:
    with lazystore_mount(root, url, key) as m:
        elapsed = first_line_after(m.mnt, program)
        downloaded = int(m.call("status")["bytes_downloaded"])  # type: ignore[index]
    return elapsed, downloaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--blobs", default="30")
    args = parser.parse_args()
    top = nixcache.build(WORKLOADS / "wide.nix", blobs=args.blobs)
    paths = nixcache.closure(top)
    total = sum(int(nixcache.run_nix("nix-store", "-q", "--size", p)) for p in paths)
    program = f"{top}/bin/wide"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        with signed_cache(top, Path(tmp)) as (url, key):
            lazy_times, eager_times, got = [], [], 0
            for i in range(args.runs):
                t, got = lazy(url, key, program, Path(tmp) / f"lazy{i}")
                lazy_times.append(t)
                eager_times.append(eager(url, key, top, program, Path(tmp) / f"eager{i}"))
                shutil.rmtree(Path(tmp) / f"eager{i}", ignore_errors=True)
    lz, eg = statistics.median(lazy_times), statistics.median(eager_times)
    print(f"closure: {len(paths)} paths, {total / 1e6:.1f} MB of NARs; "
          f"lazy downloaded {got / 1e6:.1f} MB ({100 * got / total:.1f}%)")
    print(f"lazy  (first output through the mount): median {lz:.2f} s of {lazy_times}")
    print(f"eager (nix copy, then first output):    median {eg:.2f} s of {eager_times}")
    print(f"lazy / eager = {lz / eg:.2f} (target <= 0.3); {load_note()}")
    if os.geteuid() != 0:
        print("(run as root)")


if __name__ == "__main__":
    main()
