"""Command-line interface: argument parsing and output only.

Each submodule in ``COMMAND_MODULES`` defines ``register(subparsers)``, which
adds its sub-commands and sets ``func`` (``func(args) -> int``) as the parser
default. Expected failures are :class:`LazystoreError`: one line on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lazystore import __version__
from lazystore.errors import LazystoreError

COMMAND_MODULES = (
    "nar",
    "keys",
    "fetch",
    "daemon",
    "snapshotter",
    "image",
    "deploy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazystore", description="A lazily fetched Nix store for machines and containers."
    )
    parser.add_argument("--version", action="version", version=f"lazystore {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"lazystore.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="lazystore: %(levelname)s: %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except LazystoreError as exc:
        print(f"lazystore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); not an error worth a traceback.
        sys.stderr.close()
        return 141
