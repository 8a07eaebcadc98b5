"""``bench/run``: build the workloads, serve them through the shaping proxy,
run every mode from a cold state, write the results."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import report
from bench.harness.containers import CONTAINER_MODES
from bench.harness.measure import RunFailed, Skip
from bench.harness.modes import HOST_MODES, Context
from bench.harness.peer import PEER_MODES
from bench.harness.workloads import (
    BENCH,
    Workload,
    bench_key,
    build,
    indexed_copy,
    write_caches,
)
from bench.proxy import PROFILES, shaping_proxy
from lazystore.cacheindex import DEFAULT_CHUNK_SIZE
from lazystore.cli.daemon import parse_size
from lazystore.testing.httpserver import serve_directory

log = logging.getLogger(__name__)

MODES = {**HOST_MODES, **CONTAINER_MODES, **PEER_MODES}
ALL_WORKLOADS = ("python", "busybox", "wide")
QUICK_WORKLOADS = ("busybox", "wide")


@dataclass
class Plan:
    quick: bool
    reps: int
    workloads: list[str]
    modes: list[str]
    profiles: list[str]
    compressions: list[str]
    timeout: float
    workdir: Path | None
    chunk_size: int = DEFAULT_CHUNK_SIZE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="one repetition, small workloads (busybox, wide), 100mbit, zstd")
    p.add_argument("--reps", type=int, help="repetitions per mode (default 5; 1 with --quick)")
    p.add_argument("--workloads", help=f"comma-separated, from {','.join(ALL_WORKLOADS)}")
    p.add_argument("--modes", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--profiles", help=f"comma-separated link profiles, from {','.join(PROFILES)}")
    p.add_argument("--compression", default="zstd", help="comma-separated: zstd, xz")
    p.add_argument("--timeout", type=float, default=600, help="per program run, seconds")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE,
                   metavar="SIZE", help="chunk size of the caches' file indexes (default 1MiB)")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory")
    p.add_argument("--workdir", type=Path, help="scratch parent directory (default: $TMPDIR)")
    p.add_argument("--name", help="file name stem of the results (default: DATE-HOST[-quick])")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only rewrite the Markdown table and plot of an earlier result")
    p.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                   help="with --report: add these results' workloads and runs to it first")
    return p.parse_args(argv)


def _list(text: str | None, default: tuple[str, ...], allowed: object) -> list[str]:
    items = list(default) if not text else [t.strip() for t in text.split(",") if t.strip()]
    bad = [i for i in items if i not in allowed]  # type: ignore[operator]
    if bad:
        raise SystemExit(f"bench/run: unknown {', '.join(bad)}")
    return items


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(
        quick=quick,
        reps=args.reps or (1 if quick else 5),
        workloads=_list(args.workloads, QUICK_WORKLOADS if quick else ALL_WORKLOADS,
                        ALL_WORKLOADS),
        modes=_list(args.modes, tuple(MODES), MODES),
        profiles=_list(args.profiles, ("100mbit",) if quick else ("100mbit", "1gbit", "unshaped"),
                       PROFILES),
        compressions=_list(args.compression, ("zstd",), ("zstd", "xz")),
        timeout=args.timeout,
        workdir=args.workdir,
        chunk_size=args.chunk_size,
    )


def source_state() -> dict[str, Any]:
    """The commit measured, and whether lazystore/ had uncommitted edits (the
    working tree is shared: results can only name what was checked out)."""
    repo = BENCH.parent

    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True)
        return proc.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "lazystore_dirty": bool(git("status", "--porcelain", "--", "lazystore"))}


def machine() -> dict[str, Any]:
    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    return {
        "cpus": os.cpu_count(),
        "mem_kib": int(mem),
        "kernel": os.uname().release,
        "loadavg_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s")
    if args.report:
        return rewrite_report(args.report, args.merge)
    if os.geteuid() != 0:
        sys.stderr.write("bench/run: needs root (mount namespaces, FUSE, containerd)\n")
        return 1
    plan = make_plan(args)
    now = datetime.datetime.now(datetime.UTC)
    host = socket.gethostname()
    result: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "host": host,
        "command": shlex.join(["bench/run", *(sys.argv[1:] if argv is None else argv)]),
        "quick": plan.quick,
        "machine": machine(),
        "source": source_state(),
        "profiles": {n: {"latency_s": PROFILES[n].latency, "rate_bit_s": PROFILES[n].rate}
                     for n in plan.profiles},
    }
    stem = args.name or (now.strftime("%Y-%m-%d") + f"-{host}" + ("-quick" if plan.quick else ""))

    def save() -> None:  # after every (workload, link, compression): partial runs survive
        result["summary"] = report.summarize(result["runs"])
        result["ratios"] = report.ratios(result["runs"])
        result["targets"] = report.targets(result["summary"], result["ratios"])
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        report.write(result, args.out, stem)

    started = time.monotonic()
    result.update({"workloads": {}, "runs": [], "skipped": []})
    with tempfile.TemporaryDirectory(prefix="lazystore-bench-", dir=plan.workdir) as tmp:
        run_plan(plan, Path(tmp), result, save)
    save()
    sys.stdout.write(report.markdown(result))
    return 0


def rewrite_report(path: Path, merge: list[Path]) -> int:
    """Recompute figures from the runs of *path* (plus those of *merge*: runs of
    other workloads, by other commands) and rewrite its .json/.md/.png."""
    result = json.loads(path.read_text())
    for other_path in merge:
        other = json.loads(other_path.read_text())
        result["command"] += f"; {other['command']}"
        for key in ("workloads", "profiles"):
            result[key].update(other[key])
        for key in ("runs", "skipped"):
            result[key] += other[key]
        result["wall_seconds"] = result.get("wall_seconds", 0) + other.get("wall_seconds", 0)
    result["summary"] = report.summarize(result["runs"])
    result["ratios"] = report.ratios(result["runs"])
    result["targets"] = report.targets(result["summary"], result["ratios"])
    report.write(result, path.parent, path.stem)
    sys.stdout.write(report.markdown(result))
    return 0


def run_plan(plan: Plan, workdir: Path, result: dict[str, Any], save: Callable[[], None]) -> None:
    """Run every (workload, compression, link, repetition, mode) into *result*."""
    key = bench_key()
    for name in plan.workloads:
        first = build(name, quick=plan.quick)
        second = build(name, variant="v2", quick=plan.quick)
        caches = write_caches([first, second], plan.compressions)
        indexed = {c: indexed_copy(p, plan.chunk_size) for c, p in caches.items()}
        new = set(second.paths) - set(first.paths)
        new_bytes = sum(second.nar_sizes[p] for p in new)
        result["workloads"][name] = {
            "first": first.summary(), "delta": second.summary(), "new_paths": sorted(new),
            "delta_shared_bytes_fraction": 1 - new_bytes / second.nar_bytes,
            "delta_shared_paths_fraction": 1 - len(new) / len(second.paths),
            "cache_bytes": {c: _tree_size(p) for c, p in caches.items()},
            "index_bytes": {c: _tree_size(p) - _tree_size(caches[c]) for c, p in indexed.items()},
            "chunk_size": plan.chunk_size,
        }
        for compression in plan.compressions:
            with ExitStack() as servers:
                url = servers.enter_context(serve_directory(indexed[compression])).url
                plain_url = servers.enter_context(serve_directory(caches[compression])).url
                for profile in plan.profiles:
                    with shaping_proxy(url, profile) as proxy, \
                            shaping_proxy(plain_url, profile) as plain:
                        ctx = Context(first, PROFILES[profile], compression, proxy,
                                      key.public_key, workdir, plan.timeout,
                                      {"delta": second}, plain)
                        _run_modes(plan, ctx, result["runs"], result["skipped"])
                    save()


def _run_modes(plan: Plan, ctx: Context, runs: list[dict[str, Any]],
               skipped: list[dict[str, str]]) -> None:
    wl: Workload = ctx.workload
    where = {"workload": wl.name, "profile": ctx.profile.name, "compression": ctx.compression}
    dead: set[str] = set()
    with ExitStack() as stack:
        ctx.extra["stack"] = stack  # container modes keep shared services here
        for rep in range(plan.reps):
            order = plan.modes[rep % len(plan.modes):] + plan.modes[:rep % len(plan.modes)]
            for mode in order:
                if mode in dead:
                    continue
                log.info("%s %s %s rep %d: %s", wl.name, ctx.profile.name, ctx.compression,
                         rep + 1, mode)
                try:
                    record = MODES[mode](ctx)
                except Skip as exc:
                    log.info("  skipped: %s", exc)
                    skipped.append({**where, "mode": mode, "reason": str(exc)})
                    dead.add(mode)
                    continue
                except Exception as exc:  # one failing run must not end the others
                    reason = str(exc)
                    if not isinstance(exc, RunFailed):
                        reason = f"{type(exc).__name__}: {reason}"
                    log.info("  FAILED: %s", reason)
                    runs.append({**where, "mode": mode, "rep": rep, "status": "failed",
                                 "reason": reason})
                    skipped.append({**where, "mode": mode, "reason": f"failed: {reason}"})
                    continue
                log.info("  first output after %.2f s, %.1f MB, %s paths",
                         record["time_to_first_output"], record["bytes"] / 1e6,
                         record["store_paths_fetched"])
                runs.append({**where, "mode": mode, "rep": rep, "status": "ok", **record})


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


