"""CLI: `mount`, `status`, `prefetch`, `evict`, `profile save` (the FUSE daemon and its
control socket)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from lazystore import defaults, profile
from lazystore.cli import add_substituter_arguments, config_from_args
from lazystore.control.client import ControlClient
from lazystore.errors import LazystoreError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T``, ``4096`` -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 20G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control-socket", default=defaults.CONTROL_SOCKET, metavar="PATH",
        help=f"the daemon's control socket (default {defaults.CONTROL_SOCKET})",
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid interval {text!r} (seconds, above 0)")
    return value


def metrics_address(text: str) -> str:
    from lazystore.metrics import MetricsError, parse_address

    try:
        parse_address(text)
    except MetricsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def metrics_arg(p: argparse.ArgumentParser) -> None:
    """``--metrics-address``, for every long-running command."""
    p.add_argument(
        "--metrics-address", type=metrics_address, default=None, metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP there (default: off)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to *sub*."""
    p = sub.add_parser("mount", help="mount the lazy store (foreground)")
    p.add_argument("mountpoint", nargs="?", default=defaults.MOUNT_POINT)
    add_substituter_arguments(p)
    p.add_argument("--cache-dir", type=Path, default=Path(defaults.CACHE_DIR))
    p.add_argument("--cache-size", type=parse_size, default=None, metavar="SIZE",
                   help="evict least recently used paths above this (e.g. 20G)")
    p.add_argument("--store-dir", default=None, metavar="DIR",
                   help="the store directory the caches serve (default: nix.conf's, /nix/store)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users (containers) read the mount")
    p.add_argument("--background-fetch", action="store_true",
                   help="after a view's profile, fetch the rest of its paths at low priority")
    p.add_argument("--verify-complete", action="store_true",
                   help="assemble a path from indexed chunks as soon as all have come, "
                        "its NAR checked against NarHash (by default only when it is "
                        "materialised)")
    p.add_argument("--no-binds", dest="bind_finished", action="store_false",
                   help="serve fetched paths through FUSE too (by default each is bound "
                        "read-only over its directory in the mount)")
    metrics_arg(p)
    _socket_arg(p)
    p.set_defaults(func=cmd_mount)

    from lazystore.cli import status

    p = sub.add_parser("status", help="what the daemon has fetched and serves")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true",
                   help="refresh until Ctrl-C, as top does (with rates)")
    p.add_argument("--interval", type=_positive, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes with --watch (default 2)")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="with --watch: stop after N refreshes")
    _socket_arg(p)
    p.set_defaults(func=status.cmd_status)

    p = sub.add_parser("prefetch", help="fetch store paths ahead of use")
    p.add_argument("paths", nargs="*", metavar="STOREPATH")
    p.add_argument("--closure", action="store_true", help="their whole closures")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="the store paths of an access profile, in its order")
    _socket_arg(p)
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser("profile", help="access profiles (which files were read first)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    q = verbs.add_parser("save", help="write the daemon's profile of a view or the root")
    q.add_argument("file", type=Path, metavar="FILE")
    q.add_argument("--view", metavar="ID", help="the view's (default: the whole mount's)")
    _socket_arg(q)
    q.set_defaults(func=cmd_profile_save)

    p = sub.add_parser("evict", help="drop the local data of store paths (all when none)")
    p.add_argument("paths", nargs="*", metavar="STOREPATH")
    _socket_arg(p)
    p.set_defaults(func=cmd_evict)


def cmd_mount(args: argparse.Namespace) -> int:
    import trio

    from lazystore.daemon import process
    from lazystore.nurseries import first_error
    from lazystore.substituter.client import Substituters

    config = config_from_args(args)
    if args.store_dir:
        config = dataclasses.replace(config, store_dir=args.store_dir)
    try:
        trio.run(lambda: process.run(
            Substituters(config),
            mountpoint=args.mountpoint,
            cache_dir=args.cache_dir,
            cache_size=args.cache_size,
            control_socket=args.control_socket,
            store_dir=config.store_dir,
            allow_other=args.allow_other,
            substituter_urls=list(config.urls),
            metrics_address=args.metrics_address,
            bind_finished=args.bind_finished,
            background_fetch=args.background_fetch,
            verify_complete=args.verify_complete,
        ))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    # One request: the daemon fetches the paths (or their closures) in parallel.
    if args.profile is not None:
        if args.paths or args.closure:
            raise LazystoreError("prefetch: --profile takes no store paths and no --closure")
        text = read_profile(args.profile).decode("utf-8", "surrogateescape")
        with ControlClient(args.control_socket) as client:
            fetched = client.call("prefetch_profile", profile=text)
    elif not args.paths:
        raise LazystoreError("prefetch: give store paths or --profile FILE")
    else:
        with ControlClient(args.control_socket) as client:
            fetched = client.call("prefetch", paths=list(args.paths), closure=args.closure)
    print(f"{len(fetched['fetched'])} store paths present")
    return 0


def read_profile(path: Path) -> bytes:
    """Profile file *path*, checked (profile.ProfileError: one line), at most
    profile.MAX_BYTES read."""
    try:
        with path.open("rb") as f:
            data = f.read(profile.MAX_BYTES + 1)
    except OSError as exc:
        raise LazystoreError(f"cannot read the profile {path}: {exc.strerror or exc}") from None
    profile.parse(data)  # its errors here, before the daemon is asked
    return data


def cmd_profile_save(args: argparse.Namespace) -> int:
    call: dict[str, str] = {} if args.view is None else {"view": args.view}
    with ControlClient(args.control_socket) as client:
        doc = client.call("profile", **call)["profile"]
    try:
        args.file.write_bytes(profile.dumps(doc))
    except OSError as exc:
        raise LazystoreError(f"cannot write {args.file}: {exc.strerror or exc}") from None
    paths = len({r["path"] for r in doc["reads"]})
    print(f"{len(doc['reads'])} files of {paths} store paths")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    with ControlClient(args.control_socket) as client:
        evicted = client.call("evict", paths=args.paths)["evicted"]
    for base in evicted:
        print(base)
    return 0
