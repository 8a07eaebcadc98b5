"""CLI: ``lazystore cache index`` — signed file indexes for a file:// cache."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lazystore.cacheindex import DEFAULT_CHUNK_SIZE, CacheIndexError, Result, index_cache, narinfos
from lazystore.cli import positive_int
from lazystore.cli.keys import _read_text
from lazystore.errors import LazystoreError
from lazystore.nix.signing import SecretKey
from lazystore.progress import Progress, mib
from lazystore.substituter.chunks import LEVEL

_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}


def register(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="work on a binary cache folder")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)
    index = cache_sub.add_parser(
        "index", help="write signed per-file indexes and chunk data for lazy file fetch",
        description="For every narinfo of a file:// binary cache folder (as `nix copy "
        "--to file://DIR` writes it), write DIR/<hash>.lzindex and "
        "DIR/lzdata/<hash>.lzdata, verified to reproduce the NarHash. Paths already "
        "indexed are skipped; nothing Nix reads is changed.")
    index.add_argument("dir", type=Path, metavar="DIR", help="the binary cache folder")
    index.add_argument("--secret-key-file", required=True, type=Path, metavar="F",
                       help="the cache's signing key (as nix-store --generate-binary-cache-key)")
    index.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                       help="uncompressed bytes per chunk at most, e.g. 256KiB (default 1MiB)")
    index.add_argument("--jobs", type=positive_int, default=4, metavar="N",
                       help="paths indexed at once (default 4)")
    index.add_argument("--level", type=_level, default=LEVEL, metavar="L",
                       help=f"zstd level of the chunks, 1 to 19 (default {LEVEL}, as nix copy)")
    index.set_defaults(func=cmd_index)


def _level(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 19:
        raise argparse.ArgumentTypeError(f"not a zstd level from 1 to 19: {text!r}")
    return int(text)


def _size(text: str) -> int:
    number = text.rstrip("kKmMiIbB")
    unit = text[len(number):].lower()
    if unit not in _UNITS or not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1MiB, 512KiB)")
    return int(number) * _UNITS[unit]


def cmd_index(args: argparse.Namespace) -> int:
    secret = SecretKey.parse(_read_text(str(args.secret_key_file), "secret key file"))
    if not args.dir.is_dir():
        raise LazystoreError(f"{args.dir} is not a folder")
    bar = Progress(len(narinfos(args.dir))) if sys.stderr.isatty() else None
    done, written, failed = 0, 0, 0
    started = time.monotonic()

    def on_done(result: Result | CacheIndexError) -> None:
        nonlocal done, written, failed
        done += 1
        if isinstance(result, CacheIndexError):
            failed += 1
            sys.stderr.write(("\r\x1b[K" if bar else "") + f"lazystore: error: {result}\n")
        else:
            written += result.data_bytes
        if bar is not None:
            bar.draw(done, written)

    results = index_cache(args.dir, secret, args.chunk_size, args.jobs, args.level, on_done)
    if bar is not None:
        bar.draw(done, written, final=True)
    indexed = sum(1 for r in results if isinstance(r, Result) and r.indexed)
    print(f"indexed {indexed} paths, {done - indexed - failed} already indexed, {failed} failed; "
          f"{mib(written)} MiB of chunks in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 1 if failed else 0
