"""CLI: ``lazystore image-service`` (the CRI ImageService for ``nix:0`` references)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from contextlib import ExitStack
from typing import Any

from lazystore import defaults, sdnotify
from lazystore.cli.daemon import metrics_arg

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "image-service",
        help="serve the CRI ImageService: nix:0/<store path> images through the daemon",
        description="CRI image service for the kubelet (--image-service-endpoint): "
        "nix:0/<store path> references are image archives read through the lazystore "
        "mount and imported into containerd; every other reference and call goes to "
        "the CRI at --runtime-endpoint unchanged.",
    )
    p.add_argument("--address", default=defaults.IMAGE_SERVICE_SOCKET,
                   help="gRPC unix socket (mode 0600)")
    p.add_argument("--runtime-endpoint", default=defaults.CONTAINERD_SOCKET,
                   help="containerd's socket (its CRI plugin), or another CRI image proxy's")
    p.add_argument("--containerd-address", default=None,
                   help="containerd's socket for imports (default: --runtime-endpoint)")
    p.add_argument("--control-socket", default=defaults.CONTROL_SOCKET,
                   help="the daemon's control socket")
    p.add_argument("--mount-point", default=defaults.MOUNT_POINT, help="the daemon's mount point")
    p.add_argument("--namespace", default="k8s.io", help="containerd namespace of the CRI plugin")
    p.add_argument("--snapshotter", default="lazystore",
                   help="snapshotter nix images are unpacked on (the CRI plugin's)")
    p.add_argument("--nix-only", action="store_true",
                   help="refuse nix:0 archives with layers that are not nix layers")
    metrics_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args))
    return 0


def _unix(address: str) -> str:
    return address if address.startswith("unix:") else f"unix:{address}"


async def _serve(args: argparse.Namespace) -> None:
    # Imported here so that `lazystore --help` does not load grpc.
    import grpc

    from lazystore.cri.containerd import Ctr
    from lazystore.cri.service import Daemon, ImageService, Upstream, start_server

    containerd = (args.containerd_address or args.runtime_endpoint).removeprefix("unix:")
    async with grpc.aio.insecure_channel(_unix(args.runtime_endpoint)) as channel:
        service = ImageService(
            Upstream(channel), Ctr(containerd, args.namespace, args.snapshotter),
            Daemon(args.control_socket, args.mount_point), nix_only=args.nix_only,
        )
        with ExitStack() as stack:
            interceptors = []
            if args.metrics_address is not None:
                interceptors = _metrics(stack, args.metrics_address)
            server = await start_server(service, args.address, interceptors)
            await service.restore_pins()
            await _until_stopped(server, args)


def _metrics(stack: ExitStack, address: str) -> list[Any]:
    """Prometheus: the image service's RPCs by method and code."""
    from lazystore import grpcunix, metrics

    registry = metrics.Metrics()
    counter = grpcunix.RpcCounter(metrics.rpc_counter(registry, "image_service"))
    stack.enter_context(metrics.exporter(registry, address))
    return [counter]


async def _until_stopped(server: Any, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving the CRI image service on %s (runtime %s)", args.address,
             args.runtime_endpoint)
    sdnotify.notify(f"READY=1\nSTATUS=serving the CRI image service on {args.address}")
    await stop.wait()
    sdnotify.notify("STOPPING=1\nSTATUS=stopping")
    await server.stop(grace=2)
