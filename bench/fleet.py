"""A fleet model: N nodes start one image at once behind caching proxies.

    .venv/bin/python -m bench.fleet --nodes 8 --name 2026-12-01-vm   (root; measures)
    .venv/bin/python -m bench.fleet --report bench/results/fleet-X.json  (model only)

Measured here (one VM, 127.0.0.1): nginx with deploy/nginx/lazystore-cache.conf
in front of an origin binary cache of a bench workload; its throughput with
wrk (one cached NAR, then a narinfo: bytes/s and requests/s); one lazystore
daemon's cold start through it (time to the program's first output, bytes,
requests, CPU); then N daemons (own cache dirs and mounts) starting the
program at the same moment, with the origin's request log.

Per-node figures of each mode (time to first output at 1 Gbit/s, bytes and
requests per cold start) come from the cold-start harness's results
(bench/results/*.json, ``bench/run``), so lazystore, nix-eager and
oci-overlayfs are compared from one run of one harness.

The model (a fluid one: bandwidth and request rate, no queueing detail), for
a mode with per-node time T1, bytes B and requests R on a node link L, and
proxies of capacity C bytes/s and Q requests/s (C = min(wrk's, the NIC's)):

- one tier, N nodes behind one proxy: the transfer phase of a node, B/L
  alone, stretches to max(B/L, N*B/C, N*R/Q); time until the last node's
  first output = T1 - B/L + that. Origin egress B (one copy of each file,
  as the tests and the measured run show), proxy egress N*B.
- two tiers, edges of ``--fanout`` nodes under one root proxy: E = N/fanout
  edges, each served once by the root: max(B/L, fanout*B/C, fanout*R/Q,
  E*B/C, E*R/Q); origin egress B, root egress E*B, each edge fanout*B.

The check: the N-node run here against T1_here + (N-1) * max(B/C, cpu/cores),
each further node adding its use of the most contended resource this one
machine shares (its cores, one nginx); a fleet's nodes share only the proxy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.harness import workloads
from bench.harness.measure import check, drop_caches, in_store_namespace, run_until_exit
from lazystore.testing import proxies
from lazystore.testing.daemon import Daemon
from lazystore.testing.httpserver import serve_directory

log = logging.getLogger("bench.fleet")

RESULTS = Path(__file__).resolve().parent / "results"
HARNESS_RESULTS = RESULTS / "2026-11-28-vm.json"
MODES = {"lazystore": "lazystore-fuse", "nix-eager": "nix-eager", "oci-overlayfs": "oci-overlayfs"}
FLEET_SIZES = (10, 100, 1000, 10000)
GBIT = 1e9 / 8


# -- measuring -------------------------------------------------------------------


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    """``wrk`` against *url*: requests/s and bytes/s."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench.fleet: wrk is not installed (scripts/setup installs it)")
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out)[1])  # type: ignore[index]
    rate = re.search(r"Transfer/sec:\s*([\d.]+)([KMG]?B)", out)
    assert rate is not None, out
    scale = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[rate[2]]
    return {"requests_per_s": rps, "bytes_per_s": float(rate[1]) * scale}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_starts(work: Path, origin: Any, key: str, w: workloads.Workload,
                nodes: int) -> dict[str, Any]:
    """*nodes* daemons behind a fresh nginx run the program at the same moment."""
    with ExitStack() as stack:
        proxy = stack.enter_context(proxies.nginx(
            work / f"nginx-{nodes}", origin.url.removeprefix("http://"), workers=2))
        origin.requests.clear()
        daemons = []
        for i in range(nodes):
            d = Daemon(work / f"n{nodes}-{i}", proxy.url, key, verbose=False)
            stack.callback(d.stop)
            d.start(timeout=60)
            daemons.append(d)
        drop_caches()
        barrier, results = threading.Barrier(nodes + 1), [None] * nodes
        children_before = os.times()

        def run(i: int, d: Daemon) -> None:
            barrier.wait()
            results[i] = run_until_exit(in_store_namespace(d.mnt, w.argv), start, 600)

        threads = [threading.Thread(target=run, args=(i, d)) for i, d in enumerate(daemons)]
        for t in threads:
            t.start()
        start = time.monotonic()
        barrier.wait()
        for t in threads:
            t.join()
        children = os.times()
        for out in results:
            check(out, w.expect, "fleet program")  # type: ignore[arg-type]
        statuses = [d.status() for d in daemons]
        daemon_cpu = sum(_cpu_seconds(d.proc.pid) for d in daemons)  # type: ignore[union-attr]
        sent = sum(int(line.split()[3]) for line in proxy.access_log())
    nar_requests = [r for r in origin.requests if r.startswith("/nar/")]
    return {
        "nodes": nodes,
        "time_to_first_output": [out.first_output for out in results],  # type: ignore[union-attr]
        "daemon_bytes_downloaded": [s["bytes_downloaded"] for s in statuses],
        "requests_per_node": len(proxy.access_log()) / nodes if nodes else 0,
        "proxy_bytes_sent": sent,
        "origin_requests": len(origin.requests),
        "origin_nar_requests": len(nar_requests),
        "origin_distinct_nars": len(set(nar_requests)),
        "cpu_seconds_per_start": (daemon_cpu + (children.children_user + children.children_system
                                                - children_before.children_user
                                                - children_before.children_system)) / nodes,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    w = workloads.build(args.workload)
    cache = workloads.write_caches([w], ["zstd"])["zstd"]
    key = workloads.bench_key().public_key
    work = Path(tempfile.mkdtemp(prefix="lazystore-fleet-"))
    try:
        with serve_directory(cache) as origin:
            with proxies.nginx(work / "nginx-wrk", origin.url.removeprefix("http://"),
                               workers=2) as proxy:
                nars = sorted((cache / "nar").iterdir(), key=lambda p: p.stat().st_size)
                nar = f"/nar/{nars[len(nars) // 2].name}"  # the median NAR
                narinfo = f"/{Path(w.top).name[:32]}.narinfo"
                for path in (nar, narinfo):
                    subprocess.run(["curl", "-sf", "-o", "/dev/null", proxy.url + path],
                                   check=True)
                nar_rate = wrk(proxy.url + nar, args.wrk_seconds, 16)
                narinfo_rate = wrk(proxy.url + narinfo, args.wrk_seconds, 16)
            single = cold_starts(work, origin, key, w, 1)
            fleet = cold_starts(work, origin, key, w, args.nodes)
    finally:
        subprocess.run(["umount", "-l", *map(str, work.glob("n*/mnt"))], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "workload": w.summary(),
        "median_nar_bytes": nars[len(nars) // 2].stat().st_size,
        "wrk_nar": nar_rate, "wrk_narinfo": narinfo_rate,
        "single": single, "fleet": fleet,
        "cores": os.cpu_count(), "load_average": os.getloadavg(),
    }


# -- the model -------------------------------------------------------------------


def per_node_figures(path: Path, workload: str, profile: str) -> dict[str, dict[str, float]]:
    """Median time to first output, bytes and requests per cold start of each mode."""
    runs = json.loads(path.read_text())["runs"]
    out = {}
    for name, mode in MODES.items():
        ok = [r for r in runs if r["status"] == "ok" and r["workload"] == workload
              and r["mode"] == mode and r["profile"] == profile]
        if not ok:
            raise SystemExit(f"bench.fleet: no {mode} runs of {workload} at {profile} in {path}")
        out[name] = {k: _median([float(r[src]) for r in ok]) for k, src in
                     (("t1", "time_to_first_output"), ("bytes", "bytes"),
                      ("requests", "requests"))}
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def model(node: dict[str, float], nodes: int, tiers: int, capacity: float, rate: float,
          link: float, fanout: int) -> dict[str, float]:
    """Origin egress, busiest proxy's egress and time until the last node's
    first output (see the module docstring)."""
    t1, b, r = node["t1"], node["bytes"], node["requests"]
    alone = b / link
    if tiers == 1:
        stretched = max(alone, nodes * b / capacity, nodes * r / rate)
        proxy_egress = nodes * b
    else:
        edges, per_edge = math.ceil(nodes / fanout), min(nodes, fanout)
        stretched = max(alone, per_edge * b / capacity, per_edge * r / rate,
                        edges * b / capacity, edges * r / rate)
        proxy_egress = max(edges * b, per_edge * b)
    return {"origin_egress": b, "proxy_egress": proxy_egress,
            "time_last": t1 - alone + stretched}


def check_model(measured: dict[str, Any]) -> dict[str, float]:
    single, fleet = measured["single"], measured["fleet"]
    n = fleet["nodes"]
    b = single["daemon_bytes_downloaded"][0]
    per_node = max(b / measured["wrk_nar"]["bytes_per_s"],
                   single["cpu_seconds_per_start"] / measured["cores"])
    predicted = single["time_to_first_output"][0] + (n - 1) * per_node
    last = max(fleet["time_to_first_output"])
    cpu = n * fleet["cpu_seconds_per_start"]
    return {"nodes": n, "predicted_time_last": predicted, "measured_time_last": last,
            "measured_over_predicted": last / predicted,
            # how much of the machine the N starts got: CPU-seconds over the run's length
            "cpu_seconds": cpu, "cores_used": cpu / last,
            "proxy_seconds": n * b / measured["wrk_nar"]["bytes_per_s"]}


def table(measured: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    nodes = per_node_figures(args.harness_results, args.workload, args.profile)
    nic = args.proxy_nic_gbit * GBIT
    capacity = min(nic, measured["wrk_nar"]["bytes_per_s"]) if measured else nic
    rate = measured["wrk_narinfo"]["requests_per_s"] if measured else args.proxy_rps
    rows = [{"mode": m, "nodes": n, "tiers": tiers,
             **model(nodes[m], n, tiers, capacity, rate, args.node_link_gbit * GBIT,
                     args.fanout)}
            for m in MODES for tiers in (1, 2) for n in FLEET_SIZES]
    return {"per_node": nodes, "proxy_bytes_per_s": capacity, "proxy_requests_per_s": rate,
            "node_link_bytes_per_s": args.node_link_gbit * GBIT, "fanout": args.fanout,
            "rows": rows, "check": check_model(measured) if measured else None}


def plot(result: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("origin_egress", "origin egress, GB", 1e-9),
              ("proxy_egress", "busiest proxy's egress, GB", 1e-9),
              ("time_last", "last node's first output, s", 1.0))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for i, mode in enumerate(MODES):
            for tiers, style in ((1, "-"), (2, "--")):
                rows = [r for r in result["model"]["rows"]
                        if r["mode"] == mode and r["tiers"] == tiers]
                ax.plot([r["nodes"] for r in rows], [r[key] * scale for r in rows], style,
                        color=f"C{i}", marker="o", label=f"{mode}, {tiers} tier{'s' * (tiers > 1)}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes starting at once")
        ax.set_title(label)
    check = result["model"].get("check")
    if check:
        axes[2].plot([check["nodes"]], [check["measured_time_last"]], "k*", markersize=12,
                     label=f"measured here, {check['nodes']} daemons (one VM)")
    handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(dest, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=8, help="daemons in the measured run")
    p.add_argument("--workload", default="python", choices=sorted(workloads.SPECS))
    p.add_argument("--profile", default="1gbit", help="harness profile of the per-node figures")
    p.add_argument("--harness-results", type=Path, default=HARNESS_RESULTS)
    p.add_argument("--proxy-nic-gbit", type=float, default=10.0)
    p.add_argument("--node-link-gbit", type=float, default=1.0)
    p.add_argument("--fanout", type=int, default=100, help="nodes per edge proxy (2 tiers)")
    p.add_argument("--proxy-rps", type=float, default=20000.0,
                   help="proxy requests/s when nothing is measured (--report without a run)")
    p.add_argument("--wrk-seconds", type=int, default=5)
    p.add_argument("--name", default=time.strftime("fleet-%Y-%m-%d"))
    p.add_argument("--report", type=Path, help="recompute the model and plot of a result")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.report:
        result = json.loads(args.report.read_text())
        result["model"] = table(result.get("measured"), args)
        dest = args.report
    else:
        measured = measure(args)
        result = {"command": "python -m bench.fleet " + " ".join(sys.argv[1:]),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "measured": measured, "model": table(measured, args)}
        dest = RESULTS / f"{args.name}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, dest.with_suffix(".png"))
    print(json.dumps({"check": result["model"]["check"],
                      "measured": {k: v for k, v in (result.get("measured") or {}).items()
                                   if k in ("wrk_nar", "wrk_narinfo", "load_average")}},
                     indent=1))
    log.info("wrote %s and %s", dest, dest.with_suffix(".png"))


if __name__ == "__main__":
    main()
