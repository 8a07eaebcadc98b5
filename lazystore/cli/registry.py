"""CLI: ``registry`` (an on-the-fly OCI registry of Nix closures)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lazystore import defaults
from lazystore.cli import add_substituter_arguments, config_from_args, positive_int
from lazystore.cli.daemon import metrics_arg

DEFAULT_LISTEN = "127.0.0.1:5000"


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to *sub*."""
    p = sub.add_parser(
        "registry", help="serve images of store paths' closures (OCI distribution, read-only)",
        description="Serve OCI images made on request: NAME is a store path's hash (or its "
        "basename); tag 'latest' is its closure's nix image, 'layered' a classic image.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve on (default {DEFAULT_LISTEN}; port 0: any)")
    add_substituter_arguments(p)
    p.add_argument("--expression", type=Path, metavar="FILE",
                   help="a Nix file evaluating to an attribute set: NAME a/b/c is the image "
                   "of its attributes a, b and c (built with Nix)")
    p.add_argument("--max-layers", type=positive_int, default=100, metavar="N",
                   help="layers of a 'layered' image at most (default 100)")
    p.add_argument("--cache-dir", type=Path, default=Path(defaults.REGISTRY_CACHE_DIR),
                   metavar="DIR",
                   help=f"blobs and built layers (default {defaults.REGISTRY_CACHE_DIR})")
    metrics_arg(p)
    p.set_defaults(func=cmd_registry)


def cmd_registry(args: argparse.Namespace) -> int:
    import trio

    from lazystore.cli import Stdout
    from lazystore.nurseries import first_error
    from lazystore.registry import server
    from lazystore.substituter.client import Substituters

    config = config_from_args(args)
    out = Stdout()

    def ready(urls: list[str]) -> None:
        out.line(f"serving on {' '.join(urls)}")

    try:
        trio.run(lambda: server.run(Substituters(config), args.listen, args.cache_dir,
                                    args.max_layers, args.expression, ready,
                                    args.metrics_address))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return 0
