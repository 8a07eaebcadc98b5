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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lazystore import __version__
from lazystore.errors import LazystoreError

if TYPE_CHECKING:
    from lazystore.substituter.config import SubstituterConfig

COMMAND_MODULES = (
    "nar",
    "keys",
    "fetch",
    "daemon",
    "snapshotter",
    "imageservice",
    "image",
    "deploy",
    "registry",
    "cache",
)

# Command words registered by a module of another name (see build_parser).
COMMAND_MODULE_OF = {"key": "keys", "narinfo": "keys", "image-service": "imageservice",
                     "mount": "daemon", "status": "daemon", "prefetch": "daemon",
                     "profile": "daemon", "evict": "daemon", "install-systemd": "deploy"}


class Stdout:
    """``sys.stdout.buffer`` whose write errors (a full disk...) are one-line
    errors for the commands; a closed pipe (BrokenPipeError) is left to ``main``."""

    def __init__(self) -> None:
        self._out = sys.stdout.buffer

    def write(self, data: bytes | memoryview) -> None:
        self._guard(self._out.write, data)

    def line(self, text: str) -> None:
        """*text* and a newline, flushed (names keep their bytes: surrogateescape)."""
        self.write(text.encode("utf-8", "surrogateescape") + b"\n")
        self.flush()

    def flush(self) -> None:
        self._guard(self._out.flush)

    @staticmethod
    def _guard(step: Callable[..., object], *args: object) -> None:
        try:
            step(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise LazystoreError(f"cannot write to stdout: {exc.strerror or exc}") from exc


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_substituter_arguments(parser: argparse.ArgumentParser) -> None:
    """Options choosing and trusting binary caches (defaults: nix.conf, then
    cache.nixos.org), for the commands that fetch (fetch, mount, registry)."""
    from lazystore.substituter.config import NIX_CONF

    group = parser.add_argument_group("substituters")
    group.add_argument("--substituter", dest="substituters", action="append", metavar="URL",
                       help="binary cache URL (http, https, file); repeatable")
    group.add_argument("--trusted-public-key", dest="trusted_public_keys", action="append",
                       metavar="KEY", help="name:base64 key whose signatures are trusted; "
                       "repeatable")
    group.add_argument("--no-require-sigs", dest="require_sigs", action="store_false",
                       default=None, help="accept unsigned narinfos (local testing only)")
    group.add_argument("--nix-conf", type=Path, default=NIX_CONF, metavar="FILE",
                       help=f"nix.conf to take defaults from (default {NIX_CONF})")
    group.add_argument("--netrc-file", type=Path, metavar="FILE",
                       help="credentials for HTTP caches (default: nix.conf's netrc-file)")
    group.add_argument("--ssl-cert-file", type=Path, metavar="FILE",
                       help="CA certificates for https caches (default: nix.conf's "
                       "ssl-cert-file, else the system's)")
    group.add_argument("--max-connections", type=positive_int, metavar="N",
                       help="HTTP connections at most (default 25)")
    group.add_argument("--attempts", type=positive_int, metavar="N",
                       help="tries per download (default 5)")
    group.add_argument("--connect-timeout", type=_positive_float, metavar="SECONDS")
    group.add_argument("--stall-timeout", type=_positive_float, metavar="SECONDS",
                       help="give up a download after this long without data (default 300)")
    group.add_argument("--low-speed-limit", type=_non_negative_float, metavar="BYTES",
                       help="give up a download slower than this many bytes/s over "
                       "--low-speed-time (default 1024; 0: no limit)")
    group.add_argument("--low-speed-time", type=_positive_float, metavar="SECONDS",
                       help="the window of --low-speed-limit (default: the stall timeout)")


def config_from_args(args: argparse.Namespace) -> SubstituterConfig:
    """The SubstituterConfig for options added by ``add_substituter_arguments``."""
    from lazystore.substituter.config import SubstituterConfig

    return SubstituterConfig.from_nix_conf(
        args.nix_conf,
        urls=args.substituters,
        trusted_public_keys=args.trusted_public_keys,
        require_sigs=args.require_sigs,
        netrc_file=args.netrc_file,
        ssl_cert_file=args.ssl_cert_file,
        max_connections=args.max_connections,
        attempts=args.attempts,
        connect_timeout=args.connect_timeout,
        stall_timeout=args.stall_timeout,
        low_speed_limit=args.low_speed_limit,
        low_speed_time=args.low_speed_time,
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with *only* (a command word), of the module
    that registers it alone when that module is known (its own name, or
    COMMAND_MODULE_OF): a command's start-up then does not pay for importing the
    others' dependencies. An unknown word falls back to the full parser."""
    parser = argparse.ArgumentParser(
        prog="lazystore", description="A lazily fetched Nix store for machines and containers."
    )
    parser.add_argument("--version", action="version", version=f"lazystore {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    module_name = COMMAND_MODULE_OF.get(only, only) if only is not None else None
    for name in (module_name,) if module_name in COMMAND_MODULES else COMMAND_MODULES:
        module = importlib.import_module(f"lazystore.cli.{name}")
        module.register(sub)
    if only is not None and only not in sub.choices:
        return build_parser()
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    """The first word that is not an option (the top-level options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_command_word(sys.argv[1:] if argv is None else argv))
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
