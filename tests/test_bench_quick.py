"""The cold-start harness keeps working: `bench/run --quick` once, for real
(real Nix, real HTTP cache behind the shaping proxy, the modes that have
landed), and its outputs are complete and plausible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.harness import report
from bench.harness.cli import MODES
from bench.proxy import PROFILES, shaping_proxy
from lazystore.testing import nixcache
from lazystore.testing.httpserver import serve_directory

REPO = Path(__file__).resolve().parents[1]
EXPECT = {"busybox": "hello from busybox", "wide": "wide ready", "python": "ready"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    if os.geteuid() != 0:
        pytest.skip("bench/run needs root")
    if not nixcache.have_nix() or shutil.which("unshare") is None:
        pytest.skip("real Nix and unshare are needed")
    out = tmp_path_factory.mktemp("bench-results")
    proc = subprocess.run(
        [str(REPO / "bench" / "run"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = out.glob("*-quick.json")
    return json.loads(result_file.read_text()), out


def test_quick_run_writes_json_markdown_and_png(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, out = quick_run
    stem = next(out.glob("*-quick.json")).stem
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / f"{stem}.md").read_text()
    assert "| workload | link | mode |" in table
    for row in result["summary"]:
        assert f"| {row['workload']} | {row['profile']} ({row['compression']}) | {row['mode']} |" \
            in table
    assert result["quick"] is True and result["command"].startswith("bench/run --quick")


def test_every_mode_ran_or_says_why_not(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    ran = {r["mode"] for r in result["runs"] if r["status"] == "ok"}
    reasons = {s["mode"]: s["reason"] for s in result["skipped"]}
    for mode in MODES:
        assert mode in ran or reasons.get(mode, "").strip(), mode
    assert "nix-eager" in ran  # needs nothing but Nix: must always run


def test_runs_report_plausible_values(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    ok = [r for r in result["runs"] if r["status"] == "ok"]
    assert ok
    for run in ok:
        closure = result["workloads"][run["workload"]]["first"]
        assert run["output"].startswith(EXPECT[run["workload"]]), run
        assert run["time_to_first_output"] > 0
        assert 0 < run["store_paths_fetched"] <= closure["store_paths"] + 1
        assert run["bytes"] > 0
        if run["mode"] == "nix-eager":
            # eager substitution fetches the whole closure, compressed
            assert run["store_paths_fetched"] == closure["store_paths"]
            assert run["bytes"] >= result["workloads"][run["workload"]]["cache_bytes"]["zstd"] / 3
        if run["mode"] == "lazystore-fuse":
            # the program leaves referenced paths unread, so they stay unfetched
            assert run["store_paths_fetched"] < closure["store_paths"]
        if run["mode"] in ("lazystore-fuse", "lazystore-snapshotter"):
            # the caches carry file indexes: files come by chunks (issue 15)
            assert run["chunk_requests"] > 0 and run["daemon_chunk_bytes"] > 0, run
        if run["mode"].startswith("lazystore-snapshotter"):
            # only an image with a profile label has the daemon fetch paths ahead (ctr
            # image pull passes no labels; the profile mode pulls with ctr-remote)
            assert (run["paths_fetched_ahead"] > 0) == run["mode"].endswith("-profile"), run
        if run["mode"].startswith("delta-"):
            # the second image is counted once the link is quiet after the first
            assert run["settled"] and run["settle_seconds"] >= 1.0, run
        if run["mode"].endswith("-noindex"):
            # the same cache without them: whole NARs, never a chunk
            assert run["chunk_requests"] == 0 and run["nar_requests"] > 0, run
        if "stargz" in run["mode"]:
            # the peer mounted its layers lazily (a failed remote mount unpacks instead)
            assert run["remote_layers_mounted"] > 0, run
            assert run["peer_settings"]["optimized_image"] == (run["mode"] == "stargz-prefetch")
    assert result["workloads"]["wide"]["first"]["store_paths"] >= 40


def test_ratios_pair_repetitions() -> None:
    def run(mode: str, rep: int, t: float) -> dict[str, Any]:
        return {"workload": "w", "profile": "p", "compression": "zstd", "mode": mode,
                "rep": rep, "status": "ok", "time_to_first_output": t, "bytes": 10,
                "store_paths_fetched": 1}

    runs = [run("nix-eager", 0, 10.0), run("nix-eager", 1, 2.0),
            run("lazystore-fuse", 0, 1.0), run("lazystore-fuse", 1, 1.0)]
    [row] = report.ratios(runs)
    assert (row["mode"], row["baseline"], row["pairs"]) == ("lazystore-fuse", "nix-eager", 2)
    assert row["time"] == {"median": 0.3, "min": 0.1, "max": 0.5}


def test_peer_targets_compare_with_stargz_in_the_same_run() -> None:
    def run(mode: str, profile: str, rep: int, t: float, nbytes: int) -> dict[str, Any]:
        return {"workload": "wide", "profile": profile, "compression": "zstd", "mode": mode,
                "rep": rep, "status": "ok", "time_to_first_output": t, "bytes": nbytes,
                "store_paths_fetched": 1}

    runs = [run("stargz", "100mbit", 0, 10.0, 100), run("lazystore-snapshotter", "100mbit", 0,
                                                         7.0, 50),
            run("stargz", "1gbit", 0, 2.0, 100), run("lazystore-snapshotter", "1gbit", 0, 2.0, 50),
            run("delta-stargz", "1gbit", 0, 1.0, 100),
            run("delta-lazystore-snapshotter", "1gbit", 0, 1.0, 60)]
    summary, ratios = report.summarize(runs), report.ratios(runs)
    got = {(t["target"], t["reached"], t["value"]) for t in report.peer_targets(summary, ratios)}
    assert ("lazystore-snapshotter <= 0.8x stargz (wide, 100mbit, time to first output)",
            True, 0.7) in got
    assert ("lazystore-snapshotter <= 0.8x stargz (wide, 1gbit, time to first output)",
            False, 1.0) in got
    assert ("delta: lazystore bytes <= 0.5x stargz bytes", False, 0.6) in got
    assert ("lazystore-snapshotter <= 0.8x stargz (python, 100mbit, time to first output)",
            None, None) in got


def test_proxy_counts_what_crosses_it(tmp_path: Path) -> None:
    (tmp_path / "nar").mkdir()
    payload = os.urandom(300_000)
    (tmp_path / "nar" / "x.nar.zst").write_bytes(payload)
    with serve_directory(tmp_path) as server:
        with shaping_proxy(server.url, PROFILES["100mbit"]) as proxy:  # type: ignore[attr-defined]
            with urllib.request.urlopen(f"{proxy.url}/nar/x.nar.zst") as resp:
                assert resp.read() == payload
            stats = proxy.reset()
    assert stats.targets("/nar/") == ["/nar/x.nar.zst"]
    assert len(payload) < stats.bytes_down < len(payload) + 1000  # body + headers
    assert stats.connections == 1 and stats.bytes_up > 0


def test_timeline_requests_interleave_the_link_log_with_the_events() -> None:
    from bench import timeline

    run = {"timeline": [{"time": 0.2, "kind": "read", "path": "abc-python3", "file": "bin/py"}],
           "link_log": [[0.1, "GET /abc.narinfo"], [0.25, "GET /lzdata/abc.lzdata bytes=0-9"],
                        [0.05, "GET /nix-cache-info"]]}
    lines = timeline.requests(run)
    assert [line.split()[0] for line in lines[:-1]] == ["0.050", "0.100", "0.200", "0.250"]
    assert "-> GET /lzdata/abc.lzdata bytes=0-9" in lines[3]
    assert lines[-1] == "requests: lzdata 1, narinfo 1, nix-cache-info 1"


def test_file_index_targets_from_the_runs_chunk_bytes() -> None:
    def run(mode: str, t: float, nbytes: int, read: int | None) -> dict[str, Any]:
        return {"workload": "python", "profile": "100mbit", "compression": "zstd", "mode": mode,
                "rep": 0, "status": "ok", "time_to_first_output": t, "bytes": nbytes,
                "store_paths_fetched": 1, "daemon_chunk_bytes_read": read}

    runs = [run("nix-eager", 10.0, 1000, None), run("lazystore-fuse", 0.4, 120, 100)]
    summary, ratios = report.summarize(runs), report.ratios(runs)
    got = {t["target"]: (t["reached"], round(t["value"], 3)) for t in
           report.targets(summary, ratios) if t["target"].startswith("lazystore-fuse")}
    assert got["lazystore-fuse with file indexes <= 0.05x nix-eager (python, 100mbit, time to "
               "first output)"] == (True, 0.04)
    assert got["lazystore-fuse: bytes through the link <= 1.3x compressed bytes of the chunks "
               "reads used (python, 100mbit)"] == (True, 1.2)


def test_wait_quiet_returns_once_nothing_crossed_the_proxy_for_the_quiet_time(
        tmp_path: Path) -> None:
    """What a delta mode waits for after its first image (the node's
    background work settled), before counting the second pull."""
    import threading
    import time

    from bench.harness.measure import wait_quiet

    (tmp_path / "x").write_bytes(b"x" * 1000)
    with serve_directory(tmp_path) as server:
        with shaping_proxy(server.url, PROFILES["unshaped"]) as proxy:  # type: ignore[attr-defined]
            busy_until = time.monotonic() + 0.8

            def background() -> None:  # a request every 0.1 s for 0.8 s
                while time.monotonic() < busy_until:
                    with urllib.request.urlopen(f"{proxy.url}/x") as resp:
                        resp.read()
                    time.sleep(0.1)

            worker = threading.Thread(target=background)
            worker.start()
            time.sleep(0.05)
            started = time.monotonic()
            waited, quiet = wait_quiet([proxy], quiet=0.3, timeout=10)
            last = proxy.stats.log[-1][0]
            worker.join()
            assert quiet and time.monotonic() - last >= 0.3  # quiet since the last request
            assert waited >= busy_until - started  # not before the background work ended
            busy_until = time.monotonic() + 5
            worker = threading.Thread(target=background)
            worker.start()
            waited, quiet = wait_quiet([proxy], quiet=0.3, timeout=0.6)
            assert not quiet and 0.6 <= waited < 1.0  # never quiet: the timeout, said so
            busy_until = 0.0
            worker.join()
