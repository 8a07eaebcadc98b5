"""Prometheus metrics: one registry per process, served on ``--metrics-address``.

Each process makes a :class:`Metrics` (its own ``CollectorRegistry``), adds
what it measures (counters it increments, or a function that reads its
figures at scrape time), and runs :func:`exporter` around its service:

    metrics = Metrics()
    rpcs = metrics.counter("snapshotter_rpcs_total", "...", ["method", "code"])
    metrics.collect(lambda: daemon_families(status_from_the_event_loop()))
    with exporter(metrics, "127.0.0.1:9464"):
        ...serve...

The exporter is prometheus_client's HTTP server thread (text format on any
path), stopped when the block ends. Figures read at scrape time come from a
function the process provides; it must hop to the process's event loop
(``trio.from_thread.run``, ``asyncio.run_coroutine_threadsafe``) because the
scrape runs in the exporter's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lazystore.errors import LazystoreError

log = logging.getLogger(__name__)

PREFIX = "lazystore_"


class MetricsError(LazystoreError):
    pass


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; port 0: any free one) -> (host, port);
    MetricsError when malformed."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise MetricsError(f"invalid metrics address {text!r} (expected HOST:PORT, "
                           "e.g. 127.0.0.1:9464)")
    return host, int(port)


class _FunctionCollector(Collector):
    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def describe(self) -> Iterable[Metric]:
        return []  # names are not known before a scrape (nor checked for clashes)

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._fn())
        except Exception as exc:  # a scrape must never end the process
            log.warning("metrics: cannot read the figures: %s", exc)
            return []


class Metrics:
    """A process's metrics: its registry and the families in it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(PREFIX + name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: Iterable[str] = (),
                  buckets: Iterable[float] = Histogram.DEFAULT_BUCKETS) -> Histogram:
        return Histogram(PREFIX + name, doc, list(labels), registry=self.registry,
                         buckets=list(buckets))

    def collect(self, fn: Callable[[], Iterable[Metric]]) -> None:
        """Families produced by *fn* at each scrape."""
        self.registry.register(_FunctionCollector(fn))


@contextmanager
def exporter(metrics: Metrics, address: str | None) -> Iterator[tuple[str, int] | None]:
    """Serve *metrics* on *address* (None: nothing) for the duration of the block;
    yields the address listened on (the port the OS chose for port 0)."""
    if address is None:
        yield None
        return
    host, port = parse_address(address)
    try:
        server, thread = start_http_server(port, host, registry=metrics.registry)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {address}: {exc.strerror or exc}"
                           ) from None
    bound = server.server_address[:2]
    log.info("metrics on http://%s:%d/metrics", *bound)
    try:
        yield bound[0], bound[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- the daemon's figures, from its control ``status`` map -------------------


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def histogram(name: str, doc: str, timings: dict[str, Any]) -> HistogramMetricFamily:
    """A histogram from a status map's timings (``bounds``, ``counts`` per bucket
    with one more for +Inf, ``sum``)."""
    cumulative, buckets = 0, []
    for bound, n in zip([*timings["bounds"], float("inf")], timings["counts"], strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    return HistogramMetricFamily(PREFIX + name, doc, buckets=buckets, sum_value=timings["sum"])


def substituter_families(figures: dict[str, Any]) -> list[Metric]:
    """A substituter client's metrics, from ``Stats.figures()`` (or a status map
    holding them)."""
    requests = {kind: CounterMetricFamily(
        f"{PREFIX}{kind}_requests", f"{kind} requests to each substituter, by outcome",
        labels=["cache", "outcome"]) for kind in ("narinfo", "nar")}
    for kind, cache, outcome, n in figures.get("requests_by_cache", []):
        requests[kind].add_metric([cache, outcome], n)
    families: list[Metric] = [
        *requests.values(),
        counter("downloaded_bytes", "NAR bytes received from substituters (as sent)",
                figures["bytes_downloaded"]),
        counter("retries", "retried substituter requests", figures.get("retries", 0)),
    ]
    if "fetch_seconds" in figures:
        families.append(histogram("fetch_seconds", "NAR fetches (download, verification, "
                                  "unpacking) that succeeded", figures["fetch_seconds"]))
    return families


def rpc_counter(metrics: Metrics, name: str) -> Callable[[str, str], None]:
    """``count(method, code)`` for ``grpcunix.RpcCounter``: *name*_rpcs_total."""
    rpcs = metrics.counter(f"{name}_rpcs_total", "RPCs served, by method and gRPC status code",
                           ["method", "code"])
    return lambda method, code: rpcs.labels(method, code).inc()


def daemon_families(status: dict[str, Any]) -> list[Metric]:
    """The daemon's metrics, from the same map ``lazystore status`` shows."""
    families = substituter_families(status)
    families += [
        counter("served_bytes", "bytes read through the mount", status.get("bytes_served", 0)),
        counter("evictions", "store paths evicted from the local cache",
                status.get("evictions", 0)),
        gauge("cache_bytes", "bytes of store paths in the local cache", status["cache_bytes"]),
        gauge("paths_known", "store paths whose narinfo is known", status["paths_known"]),
        gauge("paths_materialised", "store paths whose data is in the local cache",
              len(status["paths_materialized"])),
        gauge("paths_in_flight", "store paths being fetched now", status["in_flight"]),
        gauge("views", "views (containers' store path sets) served", len(status["views"])),
        gauge("open_files", "files open through the mount", status.get("open_files", 0)),
    ]
    if status.get("cache_limit") is not None:
        families.append(gauge("cache_quota_bytes", "the local cache's size limit",
                              status["cache_limit"]))
    if "wait_seconds" in status:
        families.append(histogram("reader_wait_seconds", "time readers waited for a store "
                                  "path's data to arrive", status["wait_seconds"]))
    return families
