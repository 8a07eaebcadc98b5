"""Run the registry: substituter client, blob store, HTTP listeners (trio)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import trio

from lazystore import sdnotify
from lazystore.errors import LazystoreError
from lazystore.registry import http
from lazystore.registry.app import RegistryApp
from lazystore.registry.blobs import BlobStore
from lazystore.registry.expression import Expression
from lazystore.registry.images import Images
from lazystore.substituter.client import Substituters

log = logging.getLogger(__name__)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); LazystoreError when malformed."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise LazystoreError(f"--listen {text!r}: expected HOST:PORT")
    return host, int(port)


async def run(subs: Substituters, listen: str, cache_dir: Path, max_layers: int,
              expression: Path | None = None,
              ready: Callable[[list[str]], None] = lambda urls: None,
              metrics_address: str | None = None) -> None:
    """Serve until cancelled; *ready* gets the URLs listened on once serving;
    Prometheus metrics on *metrics_address* when given."""
    host, port = parse_listen(listen)
    store = BlobStore(cache_dir)
    try:
        await trio.to_thread.run_sync(store.open)
    except OSError as exc:
        raise LazystoreError(f"cache dir {cache_dir}: {exc.strerror or exc}") from None
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise LazystoreError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    async with subs, Images(subs, store, max_layers, _expression(subs, expression)) as images:
        handler: http.Handler = RegistryApp(images)
        with ExitStack() as stack:
            if metrics_address is not None:
                handler = _metrics(stack, metrics_address, subs, handler)
            await _serve(handler, listeners, ready)


async def _serve(handler: http.Handler, listeners: list[trio.SocketListener],
                 ready: Callable[[list[str]], None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, handler, listeners)
        urls = [_url(listener) for listener in listeners]
        log.info("listening on %s", " ".join(urls))
        ready(urls)
        sdnotify.notify(f"READY=1\nSTATUS=serving {' '.join(urls)}")
        await _until_signalled()
        sdnotify.notify("STOPPING=1")
        nursery.cancel_scope.cancel()


def _metrics(stack: ExitStack, address: str, subs: Substituters,
             handler: http.Handler) -> http.Handler:
    """Prometheus: requests by route and status, and the substituter client's
    figures (read on the trio thread at each scrape); returns the counting handler."""
    from lazystore import metrics

    token = trio.lowlevel.current_trio_token()
    registry = metrics.Metrics()
    requests = registry.counter("registry_requests_total", "registry HTTP requests, by route "
                                "and status", ["route", "code"])
    registry.collect(lambda: metrics.substituter_families(
        trio.from_thread.run_sync(subs.stats.figures, trio_token=token)))
    stack.enter_context(metrics.exporter(registry, address))

    async def counted(request: http.Request) -> http.Response:
        response = await handler(request)
        requests.labels(_route(request.target), str(response.status)).inc()
        return response
    return counted


def _route(target: str) -> str:
    """The kind of distribution API request: base, manifests, blobs, tags, other."""
    if target.rstrip("/") == "/v2":
        return "base"
    for route in ("manifests", "blobs", "tags"):
        if f"/{route}/" in target:
            return route
    return "other"


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: stopping", signal.Signals(signum).name)
            return


def _expression(subs: Substituters, file: Path | None) -> Expression | None:
    """The expression, built by Nix substituting from the registry's own caches."""
    if file is None:
        return None
    if not file.is_file():
        raise LazystoreError(f"--expression {file}: no such file")
    config = subs.config
    return Expression(file, {
        "substituters": " ".join(config.urls),
        "trusted-public-keys": " ".join(config.trusted_public_keys),
        "require-sigs": "true" if config.require_sigs else "false",
    })


def _url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
