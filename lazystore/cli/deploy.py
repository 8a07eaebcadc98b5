"""CLI: `install-systemd`, the units and containerd wiring for non-NixOS hosts."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from lazystore import defaults, deploy
from lazystore.cli.daemon import parse_size
from lazystore.errors import LazystoreError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to *sub*."""
    p = sub.add_parser(
        "install-systemd",
        help="write systemd units (and containerd's proxy plugin stanza) for lazystore",
        description="Write lazystore.service and lazystore-snapshotter.service, make "
        "containerd start after them and merge the [proxy_plugins.lazystore] stanza into "
        "containerd's config (existing settings kept, previous versions backed up). "
        "Files whose content is already right are left alone.",
    )
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="write below this directory instead of / (for staging); "
                   "nothing is written outside it")
    p.add_argument("--unit-dir", default="/etc/systemd/system",
                   help="below ROOT (default: %(default)s)")
    p.add_argument("--containerd-config", default=defaults.CONTAINERD_CONFIG,
                   help="below ROOT (default: %(default)s)")
    p.add_argument("--exec", dest="executable",
                   help="the lazystore program the units run (default: this one)")
    p.add_argument("--mount-point", default=defaults.MOUNT_POINT)
    p.add_argument("--substituter", action="append", default=[], metavar="URL",
                   help="binary cache (repeatable; default: the daemon reads nix.conf)")
    p.add_argument("--trusted-public-key", action="append", default=[], metavar="KEY",
                   help="name:base64 (repeatable; default: the daemon reads nix.conf)")
    p.add_argument("--cache-dir", default=defaults.CACHE_DIR)
    p.add_argument("--cache-size", type=_size, help="e.g. 20G (default: no limit)")
    p.add_argument("--control-socket", default=defaults.CONTROL_SOCKET)
    p.add_argument("--no-allow-other", dest="allow_other", action="store_false",
                   help="only root may read the mount")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="the daemon serves Prometheus metrics there (default: off)")
    p.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                   help="a further argument for `lazystore mount` (repeatable)")
    p.add_argument("--no-snapshotter", dest="snapshotter", action="store_false",
                   help="only the FUSE daemon (implies --no-containerd)")
    p.add_argument("--snapshotter-address", default=defaults.SNAPSHOTTER_SOCKET)
    p.add_argument("--snapshotter-root", default=defaults.SNAPSHOTTER_ROOT)
    p.add_argument("--snapshotter-metrics-address", metavar="HOST:PORT",
                   help="the snapshotter serves Prometheus metrics there (default: off)")
    p.add_argument("--no-containerd", dest="containerd", action="store_false",
                   help="leave containerd's config and unit alone")
    p.add_argument("--cri-default-snapshotter", action="store_true",
                   help="also make lazystore the snapshotter of containerd's CRI plugin")
    p.add_argument("--registry", action="store_true",
                   help="also lazystore-registry.service (`lazystore registry`)")
    p.add_argument("--registry-listen", default="127.0.0.1:5000", metavar="HOST:PORT")
    p.add_argument("--registry-expression", metavar="FILE",
                   help="the registry's --expression (absolute path)")
    p.add_argument("--registry-cache-dir", default=defaults.REGISTRY_CACHE_DIR)
    p.add_argument("--registry-metrics-address", metavar="HOST:PORT",
                   help="the registry serves Prometheus metrics there (default: off)")
    p.add_argument("--image-service", action="store_true",
                   help="also lazystore-image-service.service (`lazystore image-service`, "
                   "the kubelet's --image-service-endpoint); needs --cri-default-snapshotter")
    p.add_argument("--image-service-address", default=defaults.IMAGE_SERVICE_SOCKET)
    p.add_argument("--runtime-endpoint", default=defaults.CONTAINERD_SOCKET,
                   help="the CRI the image service forwards to (default: %(default)s)")
    p.add_argument("--image-service-metrics-address", metavar="HOST:PORT",
                   help="the image service serves Prometheus metrics there (default: off)")
    p.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    p.set_defaults(func=_install)


def _size(text: str) -> str:
    """*text* as given, once `lazystore mount --cache-size` would accept it."""
    parse_size(text)
    return text


def _default_executable() -> str:
    # The entry point running now (.venv/bin/lazystore, /usr/local/bin/lazystore...).
    here = Path(sys.argv[0])
    if here.name == "lazystore" and here.is_file():
        return str(here.absolute())
    found = shutil.which("lazystore")
    if found is None:
        raise LazystoreError("cannot find the lazystore program; give it with --exec PATH")
    return str(Path(found).absolute())


def _install(args: argparse.Namespace) -> int:
    executable = args.executable or _default_executable()
    # Below a staging root the program may be installed later; on this host it must be here.
    if args.root.resolve() == Path("/") and not (
            os.path.isfile(executable) and os.access(executable, os.X_OK)):
        raise LazystoreError(f"--exec {executable}: not an executable file")
    cfg = deploy.DeployConfig(
        executable=executable,
        mount_point=args.mount_point,
        substituters=args.substituter,
        trusted_public_keys=args.trusted_public_key,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size,
        control_socket=args.control_socket,
        allow_other=args.allow_other,
        metrics_address=args.metrics_address,
        extra_args=args.daemon_arg,
        snapshotter=args.snapshotter,
        snapshotter_address=args.snapshotter_address,
        snapshotter_root=args.snapshotter_root,
        snapshotter_metrics_address=args.snapshotter_metrics_address,
        containerd=args.containerd and args.snapshotter,
        cri_default_snapshotter=args.cri_default_snapshotter,
        registry=args.registry,
        registry_listen=args.registry_listen,
        registry_expression=args.registry_expression,
        registry_cache_dir=args.registry_cache_dir,
        registry_metrics_address=args.registry_metrics_address,
        image_service=args.image_service,
        image_service_address=args.image_service_address,
        runtime_endpoint=args.runtime_endpoint,
        image_service_metrics_address=args.image_service_metrics_address,
    )
    targets = deploy.Targets.under(args.root, args.unit_dir, args.containerd_config)
    changes = deploy.install(cfg, targets, dry_run=args.dry_run)
    for change in changes:
        print(change)
    changed = any(c.action != "unchanged" for c in changes)
    if changed and not args.dry_run and args.root == Path("/"):
        units = deploy.DAEMON_UNIT
        if cfg.snapshotter:
            units += " " + deploy.SNAPSHOTTER_UNIT
        if cfg.registry:
            units += " " + deploy.REGISTRY_UNIT
        if cfg.image_service:
            units += " " + deploy.IMAGE_SERVICE_UNIT
        print(f"next: systemctl daemon-reload && systemctl enable --now {units}"
              + (" && systemctl restart containerd.service" if cfg.containerd else ""))
    return 0
