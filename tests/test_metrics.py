"""Prometheus metrics: the exporter, the families made from the daemon's status,
and a real daemon scraped over HTTP while it fetches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lazystore import metrics
from lazystore.substituter.timings import Timings, quantile
from lazystore.testing import nixcache, proxies
from lazystore.testing.daemon import LAZYSTORE, Daemon, fuse_missing
from tests.support.faultserver import Fault, FaultServer


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at *url*: (name, sorted labels) -> value, parsed by prometheus_client."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9100", ("::1", 9100)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_metrics_address_parses(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", ":9464", "host:port", "h:70000", ""])
def test_bad_metrics_address_is_one_clear_error(text: str) -> None:
    with pytest.raises(metrics.MetricsError, match="expected HOST:PORT"):
        metrics.parse_address(text)


def test_timings_buckets_and_quantiles() -> None:
    t = Timings()
    for seconds in (0.001, 0.2, 0.2, 7.0):
        t.observe(seconds)
    d = t.to_dict()
    assert d["count"] == 4 and d["sum"] == pytest.approx(7.401)
    assert d["counts"][0] == 1 and sum(d["counts"]) == 4
    assert quantile(d, 0.5) == 0.25 and quantile(d, 1.0) == 10.0
    t.observe(1000)
    assert quantile(t.to_dict(), 1.0) == float("inf")
    assert quantile(Timings().to_dict(), 0.5) is None


def _status(**over: Any) -> dict[str, Any]:
    t = Timings()
    t.observe(0.3)
    base = {
        "cache_bytes": 10, "cache_limit": 100, "paths_known": 3, "paths_materialized": ["a"],
        "in_flight": 1, "bytes_downloaded": 5, "bytes_served": 7, "evictions": 2,
        "retries": 0, "views": ["v1", "v2"], "open_files": 0,
        "requests_by_cache": [["nar", "http://c", "ok", 1],
                              ["narinfo", "http://c", "found", 3]],
        "fetch_seconds": t.to_dict(), "wait_seconds": Timings().to_dict(),
    }
    return {**base, **over}


def test_exporter_serves_the_daemon_families_in_text_format() -> None:
    registry = metrics.Metrics()
    status = _status()
    registry.collect(lambda: metrics.daemon_families(status))
    with metrics.exporter(registry, "127.0.0.1:0") as bound:
        assert bound is not None
        got = scrape(f"http://127.0.0.1:{bound[1]}/metrics")
        status["bytes_served"] = 70  # read again at the next scrape
        again = scrape(f"http://127.0.0.1:{bound[1]}/metrics")
    assert value(got, "lazystore_nar_requests_total", cache="http://c", outcome="ok") == 1
    assert value(got, "lazystore_narinfo_requests_total", cache="http://c",
                 outcome="found") == 3
    assert value(got, "lazystore_cache_quota_bytes") == 100
    assert value(got, "lazystore_views") == 2 and value(got, "lazystore_evictions_total") == 2
    assert value(got, "lazystore_fetch_seconds_bucket", le="0.25") == 0
    assert value(got, "lazystore_fetch_seconds_bucket", le="0.5") == 1
    assert value(got, "lazystore_fetch_seconds_count") == 1
    assert value(got, "lazystore_served_bytes_total") == 7
    assert value(again, "lazystore_served_bytes_total") == 70


def test_no_quota_exports_no_quota_gauge() -> None:
    names = {f.name for f in metrics.daemon_families(_status(cache_limit=None))}
    assert "lazystore_cache_quota_bytes" not in names and "lazystore_cache_bytes" in names


def test_exporter_port_taken_is_one_clear_error() -> None:
    registry = metrics.Metrics()
    with metrics.exporter(registry, "127.0.0.1:0") as bound:
        assert bound is not None
        with pytest.raises(metrics.MetricsError, match="cannot serve metrics on"), \
                metrics.exporter(registry, f"127.0.0.1:{bound[1]}"):
            pass


@pytest.mark.root
def test_daemon_metrics_move_as_a_fetch_happens(
    tmp_path: Path, binary_cache: nixcache.BinaryCache
) -> None:
    if reason := fuse_missing():
        pytest.skip(reason)
    shutil.copytree(binary_cache.root, tmp_path / "www")
    docs = next(p for p in binary_cache.paths if p.endswith("-docs"))
    nar = next(line.split(": ", 1)[1] for line in
               binary_cache.narinfo_path(docs).read_text().splitlines()
               if line.startswith("URL: "))
    port = proxies.free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with FaultServer(tmp_path / "www") as origin:
        origin.program(f"/{nar}", Fault.delay(3))  # long enough to scrape mid-fetch
        d = Daemon(tmp_path / "node", origin.url, binary_cache.key.public_key,
                   "--metrics-address", f"127.0.0.1:{port}", "--cache-size", "64M")
        try:
            d.start()
            before = scrape(url)
            manual = d.mnt / os.path.basename(docs) / "share/doc/manual.txt"
            reader = threading.Thread(target=manual.read_bytes)
            reader.start()
            deadline = time.monotonic() + 30
            during = scrape(url)
            while value(during, "lazystore_paths_in_flight") == 0 and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
                during = scrape(url)
            reader.join(timeout=60)
            after = scrape(url)
            status = json.loads(_cli("status", "--json", "--control-socket", str(d.sock)))
            watched = _cli("status", "--watch", "--iterations", "2", "--interval", "0.2",
                           "--control-socket", str(d.sock))
            d.call("evict", paths=[])
            evicted = scrape(url)
        finally:
            d.stop()
    cache = origin.url
    assert value(before, "lazystore_nar_requests_total", cache=cache, outcome="ok") == 0
    assert value(before, "lazystore_downloaded_bytes_total") == 0
    assert value(during, "lazystore_paths_in_flight") == 1
    assert value(after, "lazystore_paths_in_flight") == 0
    assert value(after, "lazystore_nar_requests_total", cache=cache, outcome="ok") == 1
    assert value(after, "lazystore_narinfo_requests_total", cache=cache, outcome="found") >= 1
    assert value(after, "lazystore_downloaded_bytes_total") == status["bytes_downloaded"] > 0
    assert value(after, "lazystore_served_bytes_total") >= 1 << 20  # manual.txt, 1 MiB
    assert value(after, "lazystore_paths_materialised") == 1
    assert value(after, "lazystore_fetch_seconds_count") == 1
    assert value(after, "lazystore_fetch_seconds_sum") >= 3  # the origin's delay
    assert value(after, "lazystore_reader_wait_seconds_count") >= 1
    assert value(after, "lazystore_reader_wait_seconds_bucket", le="2.5") == 0
    assert value(after, "lazystore_cache_bytes") == status["cache_bytes"] > 0
    assert "WARNING: lazystore.metrics" not in d.log.read_text()  # every scrape read it
    assert value(after, "lazystore_cache_quota_bytes") == 64 << 20
    assert value(after, "lazystore_evictions_total") == 0
    assert value(evicted, "lazystore_evictions_total") == 1
    assert value(evicted, "lazystore_paths_materialised") == 0
    assert value(evicted, "lazystore_cache_bytes") == 0
    # `lazystore status` shows the same figures
    for kind, cache_url, outcome, n in status["requests_by_cache"]:
        assert value(after, f"lazystore_{kind}_requests_total", cache=cache_url,
                     outcome=outcome) == n
    assert value(after, "lazystore_served_bytes_total") == status["bytes_served"]
    assert value(after, "lazystore_paths_known") == status["paths_known"]
    assert value(after, "lazystore_fetch_seconds_sum") == status["fetch_seconds"]["sum"]
    assert watched.count("lazystore status, every 0.2 s") == 2 and "\x1b" not in watched
    assert f"{origin.url} nar: ok 1" in watched


def _cli(*args: str) -> str:
    return subprocess.run([LAZYSTORE, *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_snapshotter_metrics_count_rpcs_by_method_and_code(tmp_path: Path) -> None:
    import grpc

    from lazystore.snapshotter.proto import snapshots_pb2 as pb
    from lazystore.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
    from lazystore.testing.containerd import snapshotter_process

    base = Path(tempfile.mkdtemp(prefix="lzmt-", dir="/tmp"))  # short unix socket paths
    port = proxies.free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with snapshotter_process(base / "root", base / "sn.sock", base / "no-daemon.sock",
                                 base / "mnt", extra_args=["--metrics-address",
                                                           f"127.0.0.1:{port}"],
                                 log_file=base / "sn.log"):
            before = scrape(url)
            with grpc.insecure_channel(f"unix:{base / 'sn.sock'}") as channel:
                stub = pb_grpc.SnapshotsStub(channel)
                stub.Prepare(pb.PrepareSnapshotRequest(key="a", parent=""))
                with pytest.raises(grpc.RpcError) as info:
                    stub.Stat(pb.StatSnapshotRequest(key="missing"))
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                assert len(list(stub.List(pb.ListSnapshotsRequest()))) == 1
            after = scrape(url)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rpcs = "lazystore_snapshotter_rpcs_total"
    assert value(before, rpcs, method="Prepare", code="OK") == 0
    assert value(before, "lazystore_snapshotter_snapshots", kind="active") == 0
    assert value(after, rpcs, method="Prepare", code="OK") == 1
    assert value(after, rpcs, method="Stat", code="NOT_FOUND") == 1
    assert value(after, rpcs, method="List", code="OK") == 1
    assert value(after, "lazystore_snapshotter_snapshots", kind="active") == 1
    assert value(after, "lazystore_snapshotter_snapshots", kind="committed") == 0


def test_image_service_metrics_count_rpcs_by_method_and_code() -> None:
    import grpc

    from lazystore.testing.containerd import lazystore_process

    base = Path(tempfile.mkdtemp(prefix="lzmi-", dir="/tmp"))  # short unix socket paths
    port = proxies.free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    args = ["image-service", "--address", str(base / "img.sock"),
            "--runtime-endpoint", str(base / "no-cri.sock"),
            "--control-socket", str(base / "no-daemon.sock"), "--mount-point", str(base),
            "--metrics-address", f"127.0.0.1:{port}"]
    try:
        with lazystore_process(args, base, base / "image-service.log"):
            with grpc.insecure_channel(f"unix:{base / 'img.sock'}") as channel:
                for method, raw in (("PullImage", b"\xff"), ("ListImages", b"")):
                    with pytest.raises(grpc.RpcError) as info:
                        channel.unary_unary(f"/runtime.v1.ImageService/{method}")(
                            raw, timeout=30)
                    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                 grpc.StatusCode.UNAVAILABLE)
            got = scrape(url)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rpcs = "lazystore_image_service_rpcs_total"
    assert value(got, rpcs, method="PullImage", code="INVALID_ARGUMENT") == 1
    assert value(got, rpcs, method="ListImages", code="UNAVAILABLE") == 1


def test_registry_metrics_count_requests_and_substituter_figures(
    tmp_path: Path, binary_cache: nixcache.BinaryCache
) -> None:
    from lazystore.testing import lazyregistry

    port = proxies.free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    name = Path(binary_cache.top).name[:32]
    with lazyregistry.running(tmp_path / "reg", [binary_cache.url],
                              binary_cache.key.public_key,
                              "--metrics-address", f"127.0.0.1:{port}") as reg:
        before = scrape(url)
        codes = [httpx.get(f"http://{reg.host}{path}", timeout=60).status_code
                 for path in ("/v2/", f"/v2/{name}/manifests/latest",
                              f"/v2/{'e' * 32}/manifests/latest")]
        after = scrape(url)
    assert codes == [200, 200, 404]
    requests = "lazystore_registry_requests_total"
    assert value(before, requests, route="manifests", code="200") == 0
    assert value(after, requests, route="base", code="200") == 1
    assert value(after, requests, route="manifests", code="200") == 1
    assert value(after, requests, route="manifests", code="404") == 1
    found = value(after, "lazystore_narinfo_requests_total", cache=binary_cache.url,
                  outcome="found")
    assert found >= len(binary_cache.paths)  # the image's closure, looked up
    assert value(before, "lazystore_narinfo_requests_total", cache=binary_cache.url,
                 outcome="found") == 0
