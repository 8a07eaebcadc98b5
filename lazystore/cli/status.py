"""``lazystore status``: the daemon's figures once, or refreshed like top(1).

The figures are the control ``status`` map, the same the daemon exports as
Prometheus metrics. Rendering is pure (a map in, lines out) so it is tested
without a terminal; ``--watch`` only adds the loop, the screen clearing and
the rates between two refreshes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from typing import Any, TextIO

from lazystore.control.client import ControlClient

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "> 300 s"
    return f"<= {value:g} s"


def _timings(st: dict[str, Any], key: str) -> str:
    from lazystore.substituter.timings import quantile

    t = st.get(key)
    if not t or not t["count"]:
        return "none yet"
    return (f"{t['count']}, mean {t['sum'] / t['count']:.3f} s, p50 {_seconds(quantile(t, 0.5))}"
            f", p90 {_seconds(quantile(t, 0.9))}, max {_seconds(quantile(t, 1.0))}")


def _requests(st: dict[str, Any]) -> list[str]:
    """One line per substituter and kind: outcome=count, ..."""
    table: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for kind, cache, outcome, n in st.get("requests_by_cache", []):
        table[cache, kind][outcome] = n
    lines = []
    for (cache, kind), outcomes in sorted(table.items()):
        counts = ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items()))
        lines.append(f"  {cache} {kind}: {counts}")
    return lines or ["  -"]


def _rate(st: dict[str, Any], before: dict[str, Any] | None, key: str, dt: float) -> str:
    if before is None or dt <= 0:
        return ""
    return f" ({human(max(0, st.get(key, 0) - before.get(key, 0)) / dt)}/s)"


def lines(st: dict[str, Any], before: dict[str, Any] | None = None, dt: float = 0.0,
          paths: bool = True) -> list[str]:
    """The status map *st* as text; with *before* (the map *dt* seconds
    earlier) transfer rates too; *paths*: list the materialised store paths."""
    limit = st.get("cache_limit")
    out = [
        f"mount:           {st.get('mount_point')}",
        f"substituters:    {' '.join(st.get('substituters', [])) or '-'}",
        f"cache:           {st.get('cache_dir')}: {human(st['cache_bytes'])}"
        f"{f' + {human(chunks)} of chunks' if (chunks := st.get('chunk_cache_bytes')) else ''}"
        f" {f'of {human(limit)}' if limit is not None else '(no limit)'}"
        f", {st.get('evictions', 0)} evicted",
        f"paths known:     {st.get('paths_known')}",
        f"materialised:    {len(st['paths_materialized'])}",
    ]
    if paths:
        out += [f"  {base}" for base in st["paths_materialized"]]
    out += [
        f"in flight:       {st['in_flight']}",
        f"downloaded:      {human(st['bytes_downloaded'])} in {st.get('nars_fetched', 0)} NARs"
        + _rate(st, before, "bytes_downloaded", dt),
        f"served:          {human(st.get('bytes_served', 0))}"
        + _rate(st, before, "bytes_served", dt),
        f"hits / misses:   {st.get('hits', 0)} / {st.get('misses', 0)}",
        f"fetches:         {_timings(st, 'fetch_seconds')}",
        f"reader waits:    {_timings(st, 'wait_seconds')}",
        f"retries:         {st.get('retries', 0)}",
        "requests:",
        *_requests(st),
        f"views:           {' '.join(st.get('views', [])) or '-'}",
        f"open files:      {st.get('open_files', 0)}",
    ]
    return out


def watch(client: ControlClient, interval: float, iterations: int | None,
          out: TextIO, clear: bool) -> None:
    """Redraw every *interval* seconds (*iterations* times, or until Ctrl-C)."""
    before, then, n = None, 0.0, 0
    while iterations is None or n < iterations:
        if n:
            time.sleep(interval)
        st, now = client.call("status"), time.monotonic()
        frame = lines(st, before, now - then, paths=False)
        stamp = time.strftime("%H:%M:%S")
        text = "\n".join([f"lazystore status, every {interval:g} s, {stamp}", "", *frame])
        out.write((CLEAR if clear else ("\n" if n else "")) + text + "\n")
        out.flush()
        before, then, n = st, now, n + 1


def cmd_status(args: argparse.Namespace) -> int:
    with ControlClient(args.control_socket) as client:
        if args.watch:
            try:
                watch(client, args.interval, args.iterations, sys.stdout, sys.stdout.isatty())
            except KeyboardInterrupt:
                pass
            return 0
        st: dict[str, Any] = client.call("status")
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print("\n".join(lines(st)))
    return 0
