"""CLI: ``lazystore snapshotter`` (the containerd proxy snapshotter)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from lazystore import defaults, deploy, sdnotify
from lazystore.cli.daemon import metrics_arg
from lazystore.errors import SnapshotterError

log = logging.getLogger(__name__)

# At most this long, after the stop's grace period, for cut-short calls to undo
# what they began.
STOP_SETTLE = 10.0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to *sub*."""
    p = sub.add_parser(
        "snapshotter",
        help="serve containerd's Snapshots API (proxy plugin) over daemon views",
        description="containerd proxy snapshotter: overlayfs snapshots; nix layers are "
        "shown through views of the lazystore daemon.",
    )
    p.add_argument("--address", default=defaults.SNAPSHOTTER_SOCKET,
                   help="gRPC unix socket (mode 0600)")
    p.add_argument("--root", default=defaults.SNAPSHOTTER_ROOT,
                   help="metadata and overlay directories")
    p.add_argument("--control-socket", default=defaults.CONTROL_SOCKET,
                   help="the daemon's control socket")
    p.add_argument("--mount-point", default=defaults.MOUNT_POINT, help="the daemon's mount point")
    metrics_arg(p)
    p.add_argument(
        "--print-containerd-config", action="store_true",
        help="print the [proxy_plugins.lazystore] stanza for containerd's config.toml and exit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.print_containerd_config:
        print(deploy.proxy_plugin_stanza(args.address), end="")
        return 0
    asyncio.run(_serve(args))
    return 0


async def _serve(args: argparse.Namespace) -> None:
    # Imported here so that `lazystore --help` does not load grpc.
    from lazystore.snapshotter.snapshots import Snapshotter
    from lazystore.snapshotter.views import DaemonViews

    views = DaemonViews(args.control_socket, args.mount_point)
    try:
        sn = Snapshotter(Path(args.root), views)
    except OSError as exc:
        views.close()
        raise SnapshotterError(f"snapshotter root {args.root}: {exc.strerror or exc}") from None
    # The views come back while it serves: a daemon that is slow, hung or
    # restarting holds up no answer to containerd (a mount asks for its own
    # view anyway, and its calls wait for a restarting daemon as these do).
    restore = asyncio.create_task(sn.restore_views())
    try:
        if args.metrics_address is None:
            await _run(sn, args, [])
        else:
            from lazystore import metrics

            registry, interceptors = _metrics(sn)
            with metrics.exporter(registry, args.metrics_address):
                await _run(sn, args, interceptors)
    finally:
        restore.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await restore
        sn.close()
        views.close()


async def _run(sn: Any, args: argparse.Namespace, interceptors: list[Any]) -> None:
    from lazystore.snapshotter.service import start_server

    server = await start_server(sn, args.address, interceptors)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving containerd snapshots on %s (root %s)", args.address, args.root)
    sdnotify.notify(f"READY=1\nSTATUS=serving containerd snapshots on {args.address}")
    await stop.wait()
    sdnotify.notify("STOPPING=1\nSTATUS=stopping")
    await server.stop(grace=2)
    # The calls cut short by the stop undo what they began (a remote snapshot
    # whose view was still being made is taken back) before the database closes.
    await sn.settle(STOP_SETTLE)


def _metrics(sn: Any) -> tuple[Any, list[Any]]:
    """The snapshotter's registry: RPCs by method and code (counted by an
    interceptor), snapshots by kind (read on the event loop at each scrape)."""
    from lazystore import grpcunix, metrics
    from lazystore.snapshotter.metadata import Kind

    registry = metrics.Metrics()
    count = metrics.rpc_counter(registry, "snapshotter")
    loop = asyncio.get_running_loop()

    async def kinds() -> list[Any]:
        counts = {kind.name.lower(): 0 for kind in (Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED)}
        for snap in sn.list([]):
            name = Kind(snap.kind).name.lower()
            counts[name] = counts.get(name, 0) + 1
        family = metrics.GaugeMetricFamily(
            "lazystore_snapshotter_snapshots", "snapshots by kind (active: containers' "
            "root filesystems being served)", labels=["kind"])
        for name, n in sorted(counts.items()):
            family.add_metric([name], n)
        return [family]

    registry.collect(lambda: asyncio.run_coroutine_threadsafe(kinds(), loop).result(30))
    return registry, [grpcunix.RpcCounter(count)]
