"""The time line of one cold start from the daemon's event log, as bench/run
records it for lazystore-fuse (``timeline`` of a run): when each narinfo,
listing and NAR was asked and arrived and when each file was first read, as
a plot (one row per store path) and a summary of where the time went.

    .venv/bin/python -m bench.timeline RESULTS.json [--profile 100mbit] [--out PNG]

``--requests`` prints instead, one line each in time order, the requests
that crossed the shaping proxy (``link_log``: arrival time, target and Range)
among the daemon's events (first reads of files, narinfos, NARs), and a count
of the requests by kind: where a cold start with file indexes waits on round
trips.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPANS = {"narinfo": "tab:blue", "listing": "tab:orange", "nar": "tab:green"}  # colours
ENDS = {"narinfo-done": "narinfo", "listing-done": "listing", "nar-done": "nar",
        "nar-failed": "nar"}


def spans(events: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """path -> kind -> (asked, arrived), seconds from the program's start."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    asked: dict[tuple[str, str], float] = {}
    for e in events:
        if e["kind"] in SPANS:
            asked[(e["path"], e["kind"])] = e["time"]
        elif e["kind"] in ENDS and (e["path"], ENDS[e["kind"]]) in asked:
            kind = ENDS[e["kind"]]
            out.setdefault(e["path"], {})[kind] = (asked.pop((e["path"], kind)), e["time"])
    return out


def summary(events: list[dict[str, Any]], first_output: float) -> dict[str, float]:
    """Seconds of the run during which the program waited on each kind of
    request (at least one in flight and no other kind), and with none in flight."""
    sp = spans(events)
    step, t = 0.001, 0.0
    waited = {"narinfo": 0.0, "listing": 0.0, "nar": 0.0, "overlap": 0.0, "none": 0.0}
    while t < first_output:
        busy = {k for s in sp.values() for k, (a, b) in s.items() if a <= t < b}
        key = "none" if not busy else busy.pop() if len(busy) == 1 else "overlap"
        waited[key] += step
        t += step
    return {k: round(v, 3) for k, v in waited.items()}


def requests(run: dict[str, Any]) -> list[str]:
    """The run's proxy requests among its events, one line each, in time order,
    then the count of requests by kind (narinfo, lzindex, lzdata, nar, ...)."""
    rows = [(e["time"], f"{e['kind']:<12} {e['path'][:32]} {e['file']}".rstrip())
            for e in run.get("timeline", [])]
    kinds: dict[str, int] = {}
    for at, line in run.get("link_log", []):
        target = line.split()[1]
        kind = "lzdata" if target.startswith("/lzdata/") else "nar" if target.startswith(
            "/nar/") else target.rsplit(".", 1)[-1] if "." in target else target.strip("/")
        kinds[kind] = kinds.get(kind, 0) + 1
        rows.append((at, f"  -> {line}"))
    out = [f"{at:8.3f}  {text}" for at, text in sorted(rows)]
    return out + ["requests: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))]


def plot(events: list[dict[str, Any]], first_output: float, title: str, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = spans(events)
    reads = [e for e in events if e["kind"] == "read"]
    first_use = {p: min([s[0] for s in sp[p].values()]) for p in sp}
    order = sorted(sp, key=lambda p: first_use[p])
    row = {p: i for i, p in enumerate(order)}
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.3 * len(order) + 1.5)))
    for p in order:
        for kind, (a, b) in sp[p].items():
            ax.barh(row[p], b - a, left=a, height=0.6, color=SPANS[kind], label=kind)
    ax.scatter([e["time"] for e in reads if e["path"] in row],
               [row[e["path"]] for e in reads if e["path"] in row],
               marker="|", s=80, color="black", label="first read of a file", zorder=3)
    ax.axvline(first_output, color="red", linestyle="--", label="first output")
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([p.split("-", 1)[1][:40] for p in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the program's start")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.timeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--profile", default="100mbit", help="link profile of the run to show")
    p.add_argument("--workload", default=None)
    p.add_argument("--mode", default="lazystore-fuse", help="lazystore-fuse or -fuse-profile")
    p.add_argument("--out", type=Path, help="PNG to write (default: RESULTS-timeline-PROFILE.png)")
    p.add_argument("--requests", action="store_true",
                   help="print the proxy's requests among the events instead of plotting")
    p.add_argument("--rep", type=int, default=0, help="which repetition (default the first)")
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    runs = [r for r in result["runs"] if r.get("mode") == args.mode
            and r.get("profile") == args.profile and r.get("timeline")
            and (args.workload is None or r.get("workload") == args.workload)]
    if not runs:
        raise SystemExit(f"bench.timeline: no {args.mode} run with a time line there")
    run = next((r for r in runs if r.get("rep") == args.rep), runs[0])
    first = run["time_to_first_output"]
    if args.requests:
        print("\n".join([f"{run['workload']}, {args.profile}, {args.mode}, rep {run.get('rep')}:"
                         f" first output {first:.3f} s", *requests(run)]))
        return 0
    dest = args.out or args.results.with_name(
        f"{args.results.stem}-timeline-{args.mode}-{args.profile}.png")
    title = (f"{run['workload']}, {args.profile}: {args.mode} cold start "
             f"(first output {first:.2f} s)")
    plot(run["timeline"], first, title, dest)
    print(json.dumps({"first_output": first, "waiting": summary(run["timeline"], first),
                      "plot": str(dest)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
