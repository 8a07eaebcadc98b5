"""Figures from run records: medians and ranges, pairwise ratios, targets;
written as JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Record = dict[str, Any]
Key = tuple[str, str, str]  # workload, profile, compression
BASELINES = ("nix-eager", "oci-overlayfs", "stargz")
MODE_ORDER = (
    "nix-eager", "lazystore-fuse", "lazystore-fuse-noindex", "lazystore-fuse-profile",
    "oci-overlayfs", "lazystore-snapshotter", "lazystore-snapshotter-profile",
    "lazystore-snapshotter-noindex", "stargz",
    "stargz-prefetch", "delta-oci-overlayfs", "delta-lazystore-snapshotter", "delta-stargz",
    "registry-lazystore-snapshotter",
)


def _key(run: Record) -> Key:
    return run["workload"], run["profile"], run["compression"]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ok(runs: Iterable[Record]) -> list[Record]:
    return [r for r in runs if r.get("status") == "ok"]


def summarize(runs: list[Record]) -> list[Record]:
    """One row per (workload, profile, compression, mode) over its successful runs."""
    groups: dict[tuple[str, str, str, str], list[Record]] = defaultdict(list)
    for run in _ok(runs):
        groups[(*_key(run), run["mode"])].append(run)
    rows = []
    for (workload, profile, compression, mode), group in groups.items():
        row: Record = {
            "workload": workload, "profile": profile, "compression": compression, "mode": mode,
            "n": len(group),
            "time_to_first_output": _spread([r["time_to_first_output"] for r in group]),
            "bytes": _spread([r["bytes"] for r in group]),
            "store_paths_fetched": _spread([r["store_paths_fetched"] for r in group]),
        }
        read = [r["daemon_chunk_bytes_read"] for r in group if r.get("daemon_chunk_bytes_read")]
        if read:
            row["chunk_bytes_read"] = _spread(read)
        rss = [r["daemon_peak_rss_kib"] for r in group if r.get("daemon_peak_rss_kib")]
        if rss:
            row["daemon_peak_rss_kib"] = _spread(rss)
        splits = defaultdict(list)
        for r in group:
            for name, value in r.get("split", {}).items():
                splits[name].append(value)
        row["split"] = {name: statistics.median(v) for name, v in splits.items()}
        for extra in ("new_nar_bytes",):
            if extra in group[0]:
                row[extra] = group[0][extra]
        rows.append(row)
    rows.sort(key=lambda r: (r["workload"], r["profile"], r["compression"], _order(r["mode"])))
    return rows


def _order(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def ratios(runs: list[Record]) -> list[Record]:
    """time (and bytes) of each mode over each baseline, pairing repetition i
    with repetition i of the baseline in the same (workload, profile, compression)."""
    by: dict[tuple[str, str, str, str], dict[int, Record]] = defaultdict(dict)
    for run in _ok(runs):
        by[(*_key(run), run["mode"])][run["rep"]] = run
    rows = []
    for (workload, profile, compression, mode), reps in by.items():
        for base in BASELINES:
            if mode == base or mode.startswith("delta-"):
                continue
            base_reps = by.get((workload, profile, compression, base), {})
            pairs = [(reps[i], base_reps[i]) for i in sorted(reps) if i in base_reps]
            if not pairs:
                continue
            rows.append({
                "workload": workload, "profile": profile, "compression": compression,
                "mode": mode, "baseline": base, "pairs": len(pairs),
                "time": _spread([a["time_to_first_output"] / b["time_to_first_output"]
                                 for a, b in pairs]),
                "bytes": _spread([a["bytes"] / b["bytes"] for a, b in pairs if b["bytes"]]
                                 or [float("nan")]),
            })
    rows.sort(key=lambda r: (r["workload"], r["profile"], _order(r["mode"]), r["baseline"]))
    return rows


def targets(summary: list[Record], ratio_rows: list[Record]) -> list[Record]:
    """The issues' targets: reached, missed, or not measurable (and why)."""

    def ratio(mode: str, base: str) -> Record | None:
        for r in ratio_rows:
            if (r["workload"], r["profile"], r["mode"], r["baseline"]) == (
                "python", "100mbit", mode, base
            ):
                return r
        return None

    out = []
    for mode, base, limit in (("lazystore-fuse", "nix-eager", 0.3),
                              ("lazystore-snapshotter", "oci-overlayfs", 0.2)):
        r = ratio(mode, base)
        name = f"{mode} <= {limit}x {base} (python, 100mbit, time to first output)"
        if r is None:
            out.append({"target": name, "reached": None, "value": None,
                        "note": "not measured in this run (see skipped)"})
        else:
            value = r["time"]["median"]
            out.append({"target": name, "reached": value <= limit, "value": value,
                        "note": f"median of {r['pairs']} paired ratios"})
    delta = [s for s in summary if s["mode"] == "delta-lazystore-snapshotter"
             and s.get("new_nar_bytes") and (s["workload"], s["profile"]) == ("python", "100mbit")]
    oci = {(s["workload"], s["profile"]): s for s in summary if s["mode"] == "delta-oci-overlayfs"}
    name = "delta: lazystore bytes <= 1.1x NAR bytes of the new paths (python, 100mbit)"
    if not delta:
        out.append({"target": name, "reached": None, "value": None,
                    "note": "not measured in this run (see skipped)"})
    for s in delta:
        value = s["bytes"]["median"] / s["new_nar_bytes"]
        other = oci.get((s["workload"], s["profile"]))
        note = f"{s['workload']}, {s['profile']}"
        if other:
            note += f"; oci-overlayfs: {other['bytes']['median'] / s['new_nar_bytes']:.2f}x"
        out.append({"target": name, "reached": value <= 1.1, "value": value, "note": note})
    return out + file_index_targets(summary, ratio(FILE_INDEX_MODE, "nix-eager")) + peer_targets(
        summary, ratio_rows)


FILE_INDEX_MODE = "lazystore-fuse"  # from bench/run's caches, which carry file indexes
FILE_INDEX_TIME_LIMIT = 0.05  # x nix-eager, python at 100mbit (issue 15)
FILE_INDEX_BYTES_LIMIT = 1.3  # bytes through the link / compressed bytes of the chunks read


def file_index_targets(summary: list[Record], ratio_row: Record | None) -> list[Record]:
    """Issue 15's targets that bench/run measures (python, 100mbit)."""
    name = (f"{FILE_INDEX_MODE} with file indexes <= {FILE_INDEX_TIME_LIMIT}x nix-eager "
            "(python, 100mbit, time to first output)")
    if ratio_row is None:
        out = [{"target": name, "reached": None, "value": None,
                "note": "not measured in this run (see skipped)"}]
    else:
        value = ratio_row["time"]["median"]
        out = [{"target": name, "reached": value <= FILE_INDEX_TIME_LIMIT, "value": value,
                "note": f"median of {ratio_row['pairs']} paired ratios"}]
    name = (f"{FILE_INDEX_MODE}: bytes through the link <= {FILE_INDEX_BYTES_LIMIT}x compressed "
            "bytes of the chunks reads used (python, 100mbit)")
    rows = [s for s in summary if (s["workload"], s["profile"], s["mode"]) == (
        "python", "100mbit", FILE_INDEX_MODE) and s.get("chunk_bytes_read")]
    if not rows:
        out.append({"target": name, "reached": None, "value": None,
                    "note": "not measured in this run (no chunks read)"})
    for row in rows:
        used = row["chunk_bytes_read"]["median"]
        value = row["bytes"]["median"] / used
        out.append({"target": name, "reached": value <= FILE_INDEX_BYTES_LIMIT, "value": value,
                    "note": f"{_mb(row['bytes']['median'])} MB / {_mb(used)} MB"})
    return out


PEER_TIME_LIMIT = 0.8  # lazystore-snapshotter / stargz, python and wide, 100mbit and 1gbit
PEER_DELTA_BYTES_LIMIT = 0.5  # delta-lazystore-snapshotter / delta-stargz bytes
PEER_WORKLOADS = ("python", "wide")  # their second images share >90% of the closure


def peer_targets(summary: list[Record], ratio_rows: list[Record]) -> list[Record]:
    """The peer's targets (issue 16), for each (workload, link) measured."""
    out = []
    for workload in PEER_WORKLOADS:
        for profile in ("100mbit", "1gbit"):
            name = (f"lazystore-snapshotter <= {PEER_TIME_LIMIT}x stargz ({workload}, {profile}, "
                    "time to first output)")
            found = [r for r in ratio_rows if (r["workload"], r["profile"], r["mode"],
                     r["baseline"]) == (workload, profile, "lazystore-snapshotter", "stargz")]
            if not found:
                out.append({"target": name, "reached": None, "value": None,
                            "note": "not measured in this run (see skipped)"})
            for r in found:
                value = r["time"]["median"]
                out.append({"target": name, "reached": value <= PEER_TIME_LIMIT, "value": value,
                            "note": f"median of {r['pairs']} paired ratios"})
    stargz = {(s["workload"], s["profile"], s["compression"]): s for s in summary
              if s["mode"] == "delta-stargz"}
    name = f"delta: lazystore bytes <= {PEER_DELTA_BYTES_LIMIT}x stargz bytes"
    pairs = [(s, stargz[key]) for s in summary if s["mode"] == "delta-lazystore-snapshotter"
             and s["workload"] in PEER_WORKLOADS  # busybox's delta is a few KB either way
             and (key := (s["workload"], s["profile"], s["compression"])) in stargz]
    if not pairs:
        out.append({"target": name, "reached": None, "value": None,
                    "note": "not measured in this run (see skipped)"})
    for ours, theirs in pairs:
        mine, peer = ours["bytes"]["median"], theirs["bytes"]["median"]
        value = mine / peer if peer else float("inf")
        out.append({"target": name, "reached": value <= PEER_DELTA_BYTES_LIMIT, "value": value,
                    "note": f"{ours['workload']}, {ours['profile']}: "
                            f"{_mb(mine)} vs {_mb(peer)} MB"})
    return out


# -- output ----------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _ratio_cell(r: Record | None) -> str:
    if r is None:
        return "–"
    t = r["time"]
    return f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f})"


def markdown(result: Record) -> str:
    lines = [
        f"Cold starts, {result['date']} on {result['host']} "
        f"({result['machine']['cpus']} CPUs); command: `{result['command']}`",
        "",
        "| workload | link | mode | n | time to first output, s: median (min–max) "
        "| × nix-eager | × oci-overlayfs | × stargz | MB transferred | paths fetched "
        "| daemon peak RSS, MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rat = {(r["workload"], r["profile"], r["compression"], r["mode"], r["baseline"]): r
           for r in result["ratios"]}
    for s in result["summary"]:
        t = s["time_to_first_output"]
        key = (s["workload"], s["profile"], s["compression"], s["mode"])
        cells = [_ratio_cell(rat.get((*key, base))) for base in BASELINES]
        rss = s.get("daemon_peak_rss_kib")
        rss_cell = "–" if not rss else f"{rss['median'] / 1024:.0f}"
        lines.append(
            f"| {s['workload']} | {s['profile']} ({s['compression']}) | {s['mode']} | {s['n']} "
            f"| {t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f}) | {' | '.join(cells)} "
            f"| {_mb(s['bytes']['median'])} | {s['store_paths_fetched']['median']:g} "
            f"| {rss_cell} |"
        )
    splits = [s for s in result["summary"] if "pull" in s["split"]]
    if splits:
        lines += ["", "Container modes, medians in seconds: pull / create / run to first output",
                  ""]
        for s in splits:
            sp = s["split"]
            lines.append(f"- {s['workload']}, {s['profile']}, {s['mode']}: {sp['pull']:.2f} / "
                         f"{sp.get('create', 0):.2f} / {sp.get('run', 0):.2f}")
    lines += ["", "Targets:", ""]
    for t in result["targets"]:
        state = {True: "reached", False: "NOT reached", None: "not measured"}[t["reached"]]
        value = "" if t["value"] is None else f" ({t['value']:.2f})"
        lines.append(f"- {t['target']}: **{state}**{value}; {t['note']}")
    if result["skipped"]:
        lines += ["", "Skipped or failed:", ""]
        seen = set()
        for s in result["skipped"]:
            item = (s["mode"], s["reason"])
            if item not in seen:
                seen.add(item)
                lines.append(f"- {s['mode']} ({s['workload']}): {s['reason']}")
    return "\n".join(lines) + "\n"


def plot(result: Record, dest: Path) -> None:
    """Bars: median time to first output per mode per workload (min–max as error
    bars), one panel per link profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = sorted({s["profile"] for s in result["summary"]}) or ["none"]
    fig, axes = plt.subplots(1, len(profiles), figsize=(6 * len(profiles), 4.5), squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        rows = [s for s in result["summary"] if s["profile"] == profile]
        workloads = sorted({s["workload"] for s in rows})
        modes = sorted({s["mode"] for s in rows}, key=_order)
        width = 0.8 / max(len(modes), 1)
        for i, mode in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for j, workload in enumerate(workloads):
                for s in rows:
                    if (s["workload"], s["mode"]) == (workload, mode):
                        t = s["time_to_first_output"]
                        xs.append(j + i * width)
                        ys.append(t["median"])
                        lo.append(t["median"] - t["min"])
                        hi.append(t["max"] - t["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=mode)
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(workloads))],
                      workloads)
        ax.set_yscale("log")  # workloads span 0.5 s to a minute
        ax.set_title(f"link: {profile}")
        ax.set_ylabel("time to first output, s (median, min–max)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(labels), 1), fontsize="small")
    fig.suptitle(f"lazystore cold starts, {result['date']}, {result['host']}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def write(result: Record, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and <stem>.png into *out_dir*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    log.info("results written to %s", ", ".join(str(p) for p in paths.values()))
    return paths


def rst_table(result: Record, profiles: tuple[str, ...] = ("100mbit",)) -> str:
    """The summary as a reStructuredText list-table (for README.rst)."""
    rat = {(r["workload"], r["profile"], r["compression"], r["mode"], r["baseline"]): r
           for r in result["ratios"]}
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - workload, link",
        "     - mode",
        "     - time to first output, s: median (min-max)",
        "     - x nix-eager",
        "     - x oci-overlayfs",
        "     - x stargz",
        "     - MB transferred",
        "     - paths fetched",
    ]
    for s in result["summary"]:
        if s["profile"] not in profiles:
            continue
        t = s["time_to_first_output"]
        key = (s["workload"], s["profile"], s["compression"], s["mode"])
        cells = [_ratio_cell(rat.get((*key, base))).replace("–", "-") for base in BASELINES]
        lines += [
            f"   * - {s['workload']}, {s['profile']}",
            f"     - {s['mode']}",
            f"     - {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})",
            *(f"     - {cell}" for cell in cells),
            f"     - {_mb(s['bytes']['median'])}",
            f"     - {s['store_paths_fetched']['median']:g}",
        ]
    return "\n".join(lines) + "\n"
