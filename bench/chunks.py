"""File-granular fetch from indexed caches (issue 15), side by side in one run.

* index cost: ``nix copy --to file://DIR`` of the python workload's closure
  (zstd, signatures made beforehand, untimed) against ``lazystore cache index
  DIR`` of such a folder (the CLI, ``--jobs 2``), wall and CPU seconds of
  each command, both warmed once untimed and then interleaved
  ``--index-runs`` times (a fresh folder each; see :func:`index_costs`): the
  ratio of the medians;
* the python workload (bench/harness) over the shaping proxy (100 Mbit, 20 ms):
  nix-eager, lazystore-fuse and lazystore-fuse-profile (the access profile of
  an earlier run sent as the program starts) from the indexed folder and
  lazystore-fuse-noindex from a copy of it without indexes, in turn; for
  lazystore-fuse, bytes through the proxy / compressed bytes of the chunks
  reads used (``chunk_bytes_read``; the read-ahead fetches more), and the
  time the link needs for those bytes alone (a floor for any fetch order);
* first byte of a large random file's last chunk through a fresh mount over
  the same link (stat, open and one 1-byte pread at its last byte).

Root (FUSE, mount namespaces). ``--quick``: the python workload's small
variant and a 64 MiB file. Prints a JSON summary and writes it to
bench/results/chunks-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import modes, workloads  # noqa: E402
from bench.proxy import PROFILES, shaping_proxy  # noqa: E402
from lazystore import nixtool  # noqa: E402
from lazystore.testing import nixcache  # noqa: E402
from lazystore.testing.daemon import LAZYSTORE, lazystore_mount  # noqa: E402
from lazystore.testing.httpserver import serve_directory  # noqa: E402

log = logging.getLogger("bench.chunks")
BIG_NIX = """
{ mib }: derivation {
  name = "big-random-${mib}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "mkdir $out && head -c ${mib}M /dev/urandom > $out/big" ];
  PATH = "/usr/bin:/bin";
}
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of running *argv*."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, env=env)
    elapsed = time.monotonic() - start
    if proc.returncode:
        raise RuntimeError(f"{argv[:3]} failed: {proc.stderr.decode(errors='replace')[-800:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu


def nix_copy(top: str, dest: Path) -> tuple[float, float]:
    """``nix copy`` of *top*'s closure into a new folder *dest*: wall and CPU seconds."""
    return timed(["nix", "copy", "--to", f"file://{dest}?compression=zstd", top],
                 nixtool.nix_env())


def cache_index(dest: Path, key: nixcache.KeyPair, chunk_size: str = "1MiB",
                code: str | None = None) -> tuple[float, float]:
    """``lazystore cache index`` of *dest* (the CLI, ``--jobs 2``): wall and CPU
    seconds; with *code*, the lazystore package of that checkout (PYTHONPATH)."""
    env = None if code is None else dict(os.environ, PYTHONPATH=code)
    return timed([LAZYSTORE, "cache", "index", str(dest), "--secret-key-file",
                  str(key.secret_file), "--jobs", "2", "--chunk-size", chunk_size], env)


def write_cache(top: str, dest: Path, key: nixcache.KeyPair, chunk_size: str = "1MiB"
                ) -> dict[str, Any]:
    """``nix copy`` of *top*'s closure into *dest* (timed), a hard-linked copy
    of that at *dest*-plain (never indexed), then ``lazystore cache index`` of
    *dest* (timed)."""
    nixcache.run_nix("nix", "store", "sign", "--key-file", key.secret_file, "-r", top)
    copy, copy_cpu = nix_copy(top, dest)
    subprocess.run(["cp", "-al", str(dest), f"{dest}-plain"], check=True)
    index, index_cpu = cache_index(dest, key, chunk_size)
    return {"nix_copy_seconds": copy, "cache_index_seconds": index,
            "index_over_copy": index / copy, "nix_copy_cpu_seconds": copy_cpu,
            "cache_index_cpu_seconds": index_cpu, "index_over_copy_cpu": index_cpu / copy_cpu,
            "load_average": os.getloadavg()[0]}


def index_costs(top: str, key: nixcache.KeyPair, work: Path, runs: int, chunk_size: str,
                also: Sequence[str] = ()) -> dict[str, Any]:
    """Wall and CPU seconds of ``nix copy`` and of ``lazystore cache index``,
    warmed the same way and interleaved. First, untimed, :func:`write_cache`
    into work/python-cache (kept for the python runs): a nix copy, which reads
    the closure from the store, and a cache index, which reads that folder, so
    both commands' inputs and programs are in the page cache. Then *runs*
    times, the two in turn (nix copy first in even runs, cache index first in
    odd ones): a nix copy into a new folder, and a cache index of a new
    hard-linked copy of work/python-cache without its indexes; and the same
    cache index with the code of each checkout in *also* (an A/B against
    another version, e.g. main), after them in each run (``also_*``)."""
    source = work / "python-cache"
    write_cache(top, source, key, chunk_size)  # warm-up, untimed
    costs = []
    for rep in range(runs):
        copied, indexed = work / f"copy-{rep}", work / f"index-{rep}"
        subprocess.run(["cp", "-al", f"{source}-plain", str(indexed)], check=True)
        if rep % 2:
            index, index_cpu = cache_index(indexed, key, chunk_size)
            copy, copy_cpu = nix_copy(top, copied)
        else:
            copy, copy_cpu = nix_copy(top, copied)
            index, index_cpu = cache_index(indexed, key, chunk_size)
        others = {}
        for code in also:
            other = work / f"index-{rep}-other"
            subprocess.run(["cp", "-al", f"{source}-plain", str(other)], check=True)
            others[code] = cache_index(other, key, chunk_size, code)
            shutil.rmtree(other)
        costs.append({"nix_copy_seconds": copy, "cache_index_seconds": index,
                      "index_over_copy": index / copy, "nix_copy_cpu_seconds": copy_cpu,
                      "cache_index_cpu_seconds": index_cpu,
                      "index_over_copy_cpu": index_cpu / copy_cpu,
                      "load_average": os.getloadavg()[0],
                      "also": {code: {"cache_index_seconds": wall, "cache_index_cpu_seconds": cpu}
                               for code, (wall, cpu) in others.items()}})
        log.info("index cost: %s", {k: round(v, 2) for k, v in costs[-1].items() if k != "also"})
        for code, (wall, cpu) in others.items():
            log.info("  with %s: %.2f s, CPU %.2f s", code, wall, cpu)
        shutil.rmtree(copied)
        shutil.rmtree(indexed)
    copy = median(c["nix_copy_seconds"] for c in costs)
    index = median(c["cache_index_seconds"] for c in costs)
    copy_cpu = median(c["nix_copy_cpu_seconds"] for c in costs)
    index_cpu = median(c["cache_index_cpu_seconds"] for c in costs)
    wall = [c["index_over_copy"] for c in costs]
    return {"runs": costs, "nix_copy_median": copy, "cache_index_median": index,
            "index_over_copy_median": index / copy,
            "index_over_copy_range": [min(wall), max(wall)],
            "nix_copy_cpu_median": copy_cpu, "cache_index_cpu_median": index_cpu,
            "index_over_copy_cpu_median": index_cpu / copy_cpu,
            "also": {code: _also_medians([c["also"][code] for c in costs], copy, copy_cpu)
                     for code in also}}


def _also_medians(runs: list[dict[str, float]], copy: float, copy_cpu: float
                  ) -> dict[str, float]:
    wall = median(r["cache_index_seconds"] for r in runs)
    cpu = median(r["cache_index_cpu_seconds"] for r in runs)
    return {"cache_index_median": wall, "index_over_copy_median": wall / copy,
            "cache_index_cpu_median": cpu, "index_over_copy_cpu_median": cpu / copy_cpu}


def python_runs(wl: workloads.Workload, cache: Path, key: nixcache.KeyPair, work: Path,
                runs: int) -> dict[str, Any]:
    names = ["nix-eager", "lazystore-fuse", "lazystore-fuse-noindex", "lazystore-fuse-profile"]
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with serve_directory(cache) as server, serve_directory(Path(f"{cache}-plain")) as plain, \
            shaping_proxy(server.url, "100mbit") as proxy, \
            shaping_proxy(plain.url, "100mbit") as plain_proxy:  # type: ignore[attr-defined]
        ctx = modes.Context(wl, PROFILES["100mbit"], "zstd", proxy, key.public_key, work,
                            unindexed_proxy=plain_proxy)
        for rep in range(runs):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for mode in order:
                record = modes.HOST_MODES[mode](ctx)
                log.info("%s: %.2f s, %.1f MB", mode, record["time_to_first_output"],
                         record["bytes"] / 1e6)
                records[mode].append(record)
    eager = [r["time_to_first_output"] for r in records["nix-eager"]]
    lazy = [r["time_to_first_output"] for r in records["lazystore-fuse"]]
    whole = [r["time_to_first_output"] for r in records["lazystore-fuse-noindex"]]
    ahead = [r["time_to_first_output"] for r in records["lazystore-fuse-profile"]]
    fuse = records["lazystore-fuse"]
    rate = PROFILES["100mbit"].rate or 1.0
    return {
        "nix_eager_seconds": eager, "lazystore_fuse_seconds": lazy,
        "lazystore_fuse_noindex_seconds": whole,
        "ratio_median": median(lazy) / median(eager),
        "noindex_ratio_median": median(whole) / median(eager),
        "noindex_bytes": [r["bytes"] for r in records["lazystore-fuse-noindex"]],
        "lazystore_fuse_profile_seconds": ahead,
        "profile_ratio_median": median(ahead) / median(eager),
        "profile_bytes": [r["bytes"] for r in records["lazystore-fuse-profile"]],
        # the link time of the compressed bytes reads used, as a fraction of nix-eager
        "link_floor_ratio": median(r["daemon_chunk_bytes_read"] * 8 / rate for r in fuse
                                   if r.get("daemon_chunk_bytes_read")) / median(eager),
        "link_logs": [r["link_log"] for r in fuse],
        "timelines": [r["timeline"] for r in fuse],
        "nix_eager_bytes": [r["bytes"] for r in records["nix-eager"]],
        "lazystore_bytes": [r["bytes"] for r in fuse],
        "lazystore_chunk_bytes": [r.get("daemon_chunk_bytes") for r in fuse],
        "lazystore_nar_requests": [r.get("nar_requests") for r in fuse],
        "lazystore_requests": [r["requests"] for r in fuse],
        "lazystore_chunk_bytes_read": [r.get("daemon_chunk_bytes_read") for r in fuse],
        "bytes_over_chunk_bytes_read": [r["bytes"] / r["daemon_chunk_bytes_read"] for r in fuse
                                        if r.get("daemon_chunk_bytes_read")],
    }


def last_chunk_first_byte(mib: int, key: nixcache.KeyPair, work: Path, runs: int,
                          chunk_size: str = "1MiB") -> dict[str, Any]:
    expr = work / "big.nix"
    expr.write_text(BIG_NIX)
    top = nixcache.build(expr, mib=str(mib))
    cache = work / "big-cache"
    costs = write_cache(top, cache, key, chunk_size)
    shutil.rmtree(f"{cache}-plain")
    base = Path(top).name
    size = mib << 20
    seconds = []
    with serve_directory(cache) as server:
        with shaping_proxy(server.url, "100mbit") as proxy:  # type: ignore[attr-defined]
            for rep in range(runs):
                root = work / f"big-mount-{rep}"
                with lazystore_mount(root, proxy.url, key.public_key, verbose=False) as daemon:
                    start = time.monotonic()
                    path = daemon.mnt / base / "big"
                    assert path.stat().st_size == size
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        byte = os.pread(fd, 1, size - 1)
                    finally:
                        os.close(fd)
                    seconds.append(time.monotonic() - start)
                    with open(Path(top, "big"), "rb") as real:
                        assert byte == os.pread(real.fileno(), 1, size - 1)
                    status = daemon.status()
                    assert status["nars_fetched"] == 0
                shutil.rmtree(root, ignore_errors=True)
    return {"file_mib": mib, "chunk_size": chunk_size, "seconds": seconds,
            "median": median(seconds),
            "chunk_bytes_last_run": status["chunk_bytes"], **costs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--skip-python", action="store_true")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--index-also", action="append", default=[], metavar="DIR",
                        help="also time cache index with the lazystore package of checkout "
                        "DIR (put on PYTHONPATH), interleaved: an A/B; may be repeated")
    parser.add_argument("--index-only", action="store_true",
                        help="only the python closure's index cost (implies --skip-big)")
    parser.add_argument("--index-runs", type=int, default=5,
                        help="nix copy + cache index pairs of the python closure (default 5)")
    parser.add_argument("--chunk-size", default="1MiB", help="of the python cache's index")
    parser.add_argument("--big-chunk-size", default="1MiB", help="of the large file's index")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    key = workloads.bench_key()
    result: dict[str, Any] = {"command": " ".join(sys.argv), "uptime_before": _uptime()}
    with tempfile.TemporaryDirectory(prefix="bench-chunks-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if not args.skip_python:
            wl = workloads.build("python", quick=args.quick)
            result["python_index_cost"] = index_costs(wl.top, key, work, args.index_runs,
                                                      args.chunk_size, args.index_also)
            if not args.index_only:
                result["python_100mbit"] = python_runs(wl, work / "python-cache", key, work,
                                                       args.runs)
        if not args.skip_big and not args.index_only:
            mib = 64 if args.quick else args.big_mib
            result["last_chunk_first_byte_100mbit"] = last_chunk_first_byte(
                mib, key, work, args.runs, args.big_chunk_size)
    result["uptime_after"] = _uptime()
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(__file__).parent / "results" / f"chunks-{time.strftime('%Y-%m-%d-%H%M')}.json"
    out.write_text(text + "\n")
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
