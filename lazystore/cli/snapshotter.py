"""CLI: ``lazystore snapshotter`` (the containerd proxy snapshotter)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from lazystore import defaults, deploy, sdnotify
from lazystore.errors import SnapshotterError

log = logging.getLogger(__name__)


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
    from lazystore.snapshotter.service import start_server
    from lazystore.snapshotter.snapshots import Snapshotter
    from lazystore.snapshotter.views import DaemonViews

    views = DaemonViews(args.control_socket, args.mount_point)
    try:
        sn = Snapshotter(Path(args.root), views)
    except OSError as exc:
        views.close()
        raise SnapshotterError(f"snapshotter root {args.root}: {exc.strerror or exc}") from None
    try:
        await sn.restore_views()
        server = await start_server(sn, args.address)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("serving containerd snapshots on %s (root %s)", args.address, args.root)
        sdnotify.notify(f"READY=1\nSTATUS=serving containerd snapshots on {args.address}")
        await stop.wait()
        sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        await server.stop(grace=2)
    finally:
        sn.close()
        views.close()
