"""bench/fleet.py's model (pure arithmetic) and its report from recorded figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import fleet

NODE = {"t1": 2.0, "bytes": 100e6, "requests": 20.0}
LINK, CAPACITY, RATE = 125e6, 1e9, 10_000.0


def test_one_tier_is_bound_by_the_node_link_until_the_proxy_saturates() -> None:
    small = fleet.model(NODE, 5, 1, CAPACITY, RATE, LINK, 100)
    assert small["time_last"] == pytest.approx(2.0)  # 5 x 100 MB < 1 GB/s x 0.8 s
    big = fleet.model(NODE, 1000, 1, CAPACITY, RATE, LINK, 100)
    assert big["time_last"] == pytest.approx(2.0 - 0.8 + 100.0)  # 100 GB at 1 GB/s
    assert big["origin_egress"] == 100e6 and big["proxy_egress"] == 1000 * 100e6


def test_two_tiers_bound_each_proxy_by_its_fanout() -> None:
    got = fleet.model(NODE, 10_000, 2, CAPACITY, RATE, LINK, 100)
    # 100 edges of 100 nodes: each edge and the root serve 100 copies (10 s)
    assert got["time_last"] == pytest.approx(2.0 - 0.8 + 10.0)
    assert got["proxy_egress"] == 100 * 100e6 and got["origin_egress"] == 100e6


def test_the_request_rate_can_be_the_bound() -> None:
    tiny = {"t1": 1.0, "bytes": 1e3, "requests": 1000.0}
    got = fleet.model(tiny, 100, 1, CAPACITY, RATE, LINK, 100)
    assert got["time_last"] == pytest.approx(1.0 - 1e3 / LINK + 100 * 1000 / RATE)


def test_report_recomputes_model_and_plot_from_recorded_runs(tmp_path: Path) -> None:
    runs = [{"status": "ok", "workload": "python", "profile": "1gbit", "mode": mode,
             "time_to_first_output": t, "bytes": b, "requests": 10}
            for mode, t, b in (("lazystore-fuse", 2.0, 20e6), ("nix-eager", 4.0, 150e6),
                               ("oci-overlayfs", 8.0, 170e6))]
    harness = tmp_path / "harness.json"
    harness.write_text(json.dumps({"runs": runs}))
    args = argparse.Namespace(harness_results=harness, workload="python", profile="1gbit",
                              proxy_nic_gbit=10.0, proxy_rps=20000.0, node_link_gbit=1.0,
                              fanout=100)
    table = fleet.table(None, args)
    assert table["per_node"]["nix-eager"] == {"t1": 4.0, "bytes": 150e6, "requests": 10.0}
    assert len(table["rows"]) == 3 * 2 * 4 and table["check"] is None
    lazy = [r for r in table["rows"] if r["mode"] == "lazystore" and r["tiers"] == 1]
    eager = [r for r in table["rows"] if r["mode"] == "nix-eager" and r["tiers"] == 1]
    assert all(a["time_last"] < b["time_last"] for a, b in zip(lazy, eager, strict=True))
    pytest.importorskip("matplotlib")
    fleet.plot({"model": table}, tmp_path / "fleet.png")
    assert (tmp_path / "fleet.png").stat().st_size > 10_000
