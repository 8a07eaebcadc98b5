"""CLI: ``nar pack|unpack|ls|cat|hash``, as ``nix-store --dump/--restore`` and
``nix nar ls/cat`` do. Like those, ``unpack``, ``ls`` and ``cat`` stop at the end
of the NAR and ignore what follows; ``hash`` refuses trailing bytes (its answer
would be ambiguous: the NAR's hash or the file's)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lazystore.cli import Stdout
from lazystore.errors import LazystoreError
from lazystore.nix import fsio, listing, nar
from lazystore.nix.hashes import Hash

CHUNK = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``nar`` with its sub-commands to *sub*."""
    parser = sub.add_parser("nar", help="create, unpack and inspect NAR files")
    nar_sub = parser.add_subparsers(dest="nar_command", metavar="COMMAND", required=True)

    pack = nar_sub.add_parser("pack", help="write the NAR of PATH to stdout (nix-store --dump)")
    pack.add_argument("path", type=Path, metavar="PATH")
    pack.set_defaults(func=cmd_pack)

    unpack = nar_sub.add_parser("unpack", help="unpack a NAR into DEST (nix-store --restore)")
    unpack.add_argument("file", metavar="FILE", help="NAR file, or - for stdin")
    unpack.add_argument("dest", type=Path, metavar="DEST", help="must not exist")
    unpack.set_defaults(func=cmd_unpack)

    ls = nar_sub.add_parser("ls", help="list PATH inside a NAR (nix nar ls)")
    ls.add_argument("file", metavar="FILE", help="NAR file, or - for stdin")
    ls.add_argument("path", nargs="?", default="/", metavar="PATH", help="(default: the root)")
    ls.add_argument("--json", action="store_true", help="JSON; with -R the .ls document")
    ls.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    ls.add_argument("-l", "--long", action="store_true", help="type, size and symlink targets")
    ls.add_argument("-d", "--directory", action="store_true", help="list a directory itself")
    ls.set_defaults(func=cmd_ls)

    cat = nar_sub.add_parser("cat", help="print the regular file PATH inside a NAR")
    cat.add_argument("file", metavar="FILE", help="NAR file, or - for stdin")
    cat.add_argument("path", metavar="PATH")
    cat.set_defaults(func=cmd_cat)

    hash_ = nar_sub.add_parser("hash", help="print sha256:<nix32> of a (validated) NAR file")
    hash_.add_argument("file", metavar="FILE", help="NAR file, or - for stdin")
    hash_.set_defaults(func=cmd_hash)


@contextlib.contextmanager
def _open(name: str) -> Iterator[BinaryIO]:
    if name == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(name, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise LazystoreError(f"cannot open {name}: {exc.strerror}") from exc
    with f:
        yield f


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    try:
        while chunk := f.read(CHUNK):
            yield chunk
    except OSError as exc:
        raise LazystoreError(f"cannot read the NAR: {exc.strerror}") from exc


def cmd_pack(args: argparse.Namespace) -> int:
    out = Stdout()
    for piece in fsio.dump(args.path):
        out.write(piece)
    out.flush()
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    with _open(args.file) as f:
        fsio.unpack(f, args.dest, allow_trailing=True)
    return 0


def cmd_hash(args: argparse.Namespace) -> int:
    with _open(args.file) as f:
        digest, _ = nar.nar_hash(_chunks(f))
    out = Stdout()
    out.write(f"{Hash('sha256', digest)}\n".encode())
    out.flush()
    return 0


def _components(path: str) -> list[str]:
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return parts


def _find(root: dict, path: str) -> dict:
    node = root
    for part in _components(path):
        child = node.get("entries", {}).get(part) if node["type"] == "directory" else None
        if child is None:
            raise LazystoreError(f"path {path!r} does not exist in the NAR")
        node = child
    return node


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args.file) as f:
        root = listing.from_nar(_chunks(f), allow_trailing=True)["root"]
    node = _find(root, args.path)
    out = Stdout()
    if args.json:
        if args.recursive:
            out.write(listing.to_json({"version": 1, "root": node}))
        else:
            out.write(listing.to_json(_shallow(node)))  # no newline, as Nix
        out.flush()
        return 0
    parts = _components(args.path)
    rel = "." if node["type"] == "directory" else (parts[-1] if parts else "")
    for line in _text_lines(node, rel, args.long, args.recursive, args.directory):
        out.write(line.encode("utf-8", "surrogateescape") + b"\n")
    out.flush()
    return 0


def _shallow(node: dict) -> dict:
    """A directory's own listing with empty objects for its entries, as Nix prints."""
    if node["type"] != "directory":
        return node
    return {"type": "directory", "entries": {name: {} for name in node["entries"]}}


def _text_lines(node: dict, rel: str, long: bool, recursive: bool, itself: bool) -> Iterator[str]:
    """The lines of ``nix nar ls``: a directory's entries (unless *itself*), each
    followed by its own entries when *recursive*; walked without recursion."""
    if node["type"] != "directory" or itself:
        yield _line(node, rel, long)
        if not (recursive and node["type"] == "directory"):
            return
    stack = [iter(node["entries"].items())]
    prefixes = [rel]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            prefixes.pop()
            continue
        name, child = item
        child_rel = f"{prefixes[-1]}/{name}"
        yield _line(child, child_rel, long)
        if recursive and child["type"] == "directory":
            stack.append(iter(child["entries"].items()))
            prefixes.append(child_rel)


def _line(node: dict, rel: str, long: bool) -> str:
    if not long:
        return rel
    kind = node["type"]
    if kind == "regular":
        mode = "-r-xr-xr-x" if node.get("executable") else "-r--r--r--"
        return f"{mode} {node['size']:20d} {rel}"
    if kind == "symlink":
        return f"lrwxrwxrwx {0:20d} {rel} -> {node['target']}"
    return f"dr-xr-xr-x {0:20d} {rel}"


def cmd_cat(args: argparse.Namespace) -> int:
    target = [p.encode("utf-8", "surrogateescape") for p in _components(args.path)]
    out = Stdout()
    stack: list[bytes] = []
    found: str | None = None  # the type found at the path
    writing = False
    with _open(args.file) as f:
        for event in nar.parse(_chunks(f), allow_trailing=True):
            if isinstance(event, nar.FileData):
                if writing:
                    out.write(event.data)
                continue
            if isinstance(event, (nar.DirEnd, nar.FileEnd)):
                writing = False
                if isinstance(event, nar.DirEnd) and stack:
                    stack.pop()
                continue
            here = stack + [event.name] if event.name is not None else []
            if here == target:
                found = type(event).__name__
                writing = isinstance(event, nar.FileStart)
            if isinstance(event, nar.DirStart):
                stack = here
    out.flush()
    if found is None:
        raise LazystoreError(f"path {args.path!r} does not exist in the NAR")
    if found != "FileStart":
        raise LazystoreError(f"path {args.path!r} is not a regular file")
    return 0
