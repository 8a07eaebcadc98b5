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

from lazystore import __version__
from lazystore.errors import LazystoreError

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
                     "profile": "daemon"}


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
