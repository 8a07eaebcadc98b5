"""NAR trees held in memory, for tests and benchmarks (small NARs only):
:func:`pack` writes one as NAR bytes, :func:`read_tree` reads one back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lazystore.nix.nar import (
    DirEnd,
    DirStart,
    Event,
    FileData,
    FileEnd,
    FileStart,
    Symlink,
    parse,
    serialize,
    walk,
)


@dataclass
class TreeFile:
    contents: bytes = b""
    executable: bool = False


@dataclass
class TreeSymlink:
    target: bytes


@dataclass
class TreeDir:
    entries: dict[bytes, Tree] = field(default_factory=dict)


Tree = TreeFile | TreeSymlink | TreeDir


def tree_events(tree: Tree) -> Iterator[Event]:
    """Events for an in-memory tree, entries in NAR (byte) order; no recursion."""
    return walk(tree, _visit)


def _visit(name: bytes | None, node: Tree, depth: int) -> tuple[list[Event], Any]:
    if isinstance(node, TreeDir):
        return [DirStart(name)], sorted(node.entries.items())
    if isinstance(node, TreeFile):
        data: list[Event] = [FileData(node.contents)] if node.contents else []
        return [FileStart(name, node.executable, len(node.contents)), *data, FileEnd()], None
    return [Symlink(name, node.target)], None


def pack(tree: Tree) -> bytes:
    """The NAR of an in-memory tree."""
    return b"".join(serialize(tree_events(tree)))


def read_tree(chunks: Iterable[bytes]) -> Tree:
    """Parse a whole NAR into memory (for small NARs only)."""
    top = TreeDir()  # holds the root under the name b""
    dirs: list[TreeDir] = [top]
    parts: list[bytes] = []
    current = TreeFile()
    for event in parse(chunks):
        if isinstance(event, FileData):
            parts.append(bytes(event.data))
        elif isinstance(event, FileEnd):
            current.contents, parts = b"".join(parts), []
        elif isinstance(event, DirEnd):
            dirs.pop()
        else:
            node: Tree
            if isinstance(event, FileStart):
                node = current = TreeFile(b"", event.executable)
            elif isinstance(event, Symlink):
                node = TreeSymlink(event.target)
            else:
                node = TreeDir()
            dirs[-1].entries[event.name or b""] = node
            if isinstance(node, TreeDir):
                dirs.append(node)
    return top.entries[b""]
