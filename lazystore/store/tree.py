"""Metadata trees of store paths: names, types, sizes, modes, symlink targets.

A tree comes from a cache's ``.ls`` listing (a hint), from the events of the
NAR parser as a fetch unpacks it (authoritative, once the NAR verified) or,
for a path found in the cache directory at start, from the disk. It is kept
apart from the data so the data can be evicted while lookups keep working.
Nodes are small slotted objects: 100,000 files must fit in well under 200 MB.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lazystore.errors import StoreError
from lazystore.nix import listing
from lazystore.nix.listing import ListingError
from lazystore.nix.nar import DirEnd, DirStart, Event, FileData, FileEnd, FileStart

DIRECTORY, REGULAR, SYMLINK = "d", "r", "l"
# Deepest directory nesting the store keeps. Real store paths stay far below it;
# the index is msgpack (nesting limit 511, two levels per directory) and tree
# comparison recurses, so a deeper verified NAR is refused rather than kept.
MAX_DEPTH = 200


class Node:
    """One file system object below a store path."""

    __slots__ = ("kind", "size", "executable", "target", "entries", "_keys")

    def __init__(
        self,
        kind: str,
        size: int = 0,
        executable: bool = False,
        target: str = "",
        entries: dict[str, Node] | None = None,
    ) -> None:
        self.kind = kind
        self.size = size
        self.executable = executable
        self.target = target
        self.entries = entries
        self._keys: list[tuple[int, str]] | None = None

    def child(self, name: str) -> Node | None:
        return self.entries.get(name) if self.entries is not None else None

    def sorted_keys(self) -> list[tuple[int, str]]:
        """(stable readdir key, name) pairs in key order; computed once."""
        if self._keys is None:
            self._keys = sorted((name_key(n), n) for n in (self.entries or {}))
        return self._keys

    def count(self) -> int:
        """Number of nodes in this tree, this one included."""
        return 1 + sum(c.count() for c in (self.entries or {}).values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return (self.kind, self.size, self.executable, self.target, self.entries) == (
            other.kind, other.size, other.executable, other.target, other.entries
        )

    def __repr__(self) -> str:
        return f"Node({self.kind!r}, size={self.size}, entries={len(self.entries or {})})"


def name_key(name: str) -> int:
    """A stable, positive 63-bit readdir offset for *name* (never a position)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


def from_listing(document: Any) -> Node:
    """The tree of a ``.ls`` document; StoreError if it is malformed."""
    try:
        return _from_events(listing.events(document, MAX_DEPTH))
    except ListingError as exc:
        raise StoreError(str(exc)) from None


def _from_events(events: Iterable[Event]) -> Node:
    builder = TreeBuilder("a listing")
    builder.add(events)
    return builder.tree()


def from_disk(path: Path, max_depth: int = MAX_DEPTH) -> Node:
    """The authoritative tree of an unpacked store path (never follows symlinks).

    The root is whatever a NAR's root can be: a directory, a regular file
    (executable or not) or a symlink. Iterative, so no NAR depth can exhaust
    the stack; deeper than *max_depth* is a StoreError (the index and the FUSE
    layer keep trees of bounded depth).
    """
    root = _disk_node(path)
    stack = [(path, root, 0)] if root.kind == DIRECTORY else []
    while stack:
        dir_path, node, depth = stack.pop()
        if depth >= max_depth:
            raise StoreError(f"{path.name} nests directories deeper than {max_depth} levels")
        with os.scandir(dir_path) as it:
            names = [e.name for e in it]
        for name in names:
            child = _disk_node(dir_path / name)
            node.entries[name] = child  # type: ignore[index]
            if child.kind == DIRECTORY:
                stack.append((dir_path / name, child, depth + 1))
    return root


def _disk_node(path: Path) -> Node:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return Node(SYMLINK, target=os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        return Node(REGULAR, size=st.st_size, executable=bool(st.st_mode & 0o100))
    if stat.S_ISDIR(st.st_mode):
        return Node(DIRECTORY, entries={})
    raise StoreError(f"{path}: unexpected file type in a store path")


class TreeBuilder:
    """The authoritative tree of a store path from its NAR parser's events, as
    they stream: the store keeps it once the NAR verified, with no scan of the
    unpacked copy. Deeper than *max_depth* is a StoreError, as in from_disk."""

    def __init__(self, name: str, max_depth: int = MAX_DEPTH) -> None:
        self.name = name
        self.root: Node | None = None
        self._dirs: list[Node] = []
        self._max_depth = max_depth

    def add(self, events: Iterable[Event]) -> None:
        for event in events:
            kind = type(event)
            if kind is FileData or kind is FileEnd:
                continue
            if kind is DirEnd:
                self._dirs.pop()
            elif kind is DirStart:
                if len(self._dirs) >= self._max_depth:
                    raise StoreError(f"{self.name} nests directories deeper than "
                                     f"{self._max_depth} levels")
                node = Node(DIRECTORY, entries={})
                self._place(event.name, node)  # type: ignore[union-attr]
                self._dirs.append(node)
            elif kind is FileStart:
                self._place(event.name, Node(  # type: ignore[union-attr]
                    REGULAR, size=event.size, executable=event.executable))  # type: ignore[union-attr]
            else:
                self._place(event.name, Node(  # type: ignore[union-attr]
                    SYMLINK, target=os.fsdecode(event.target)))  # type: ignore[union-attr]

    def _place(self, name: bytes | None, node: Node) -> None:
        if name is None:
            self.root = node
        else:
            self._dirs[-1].entries[os.fsdecode(name)] = node  # type: ignore[index]

    def tree(self) -> Node:
        """The whole tree (call once the parser saw the end of the NAR)."""
        assert self.root is not None and not self._dirs, "the NAR is not complete"
        return self.root


BLOCK = 4096
FAST_SYMLINK = 60  # ext4 keeps shorter symlink targets in the inode


def footprint(root: Node) -> int:
    """The bytes a tree takes on disk, as the quota counts them: each file's
    data in whole 4 KiB blocks, a block per directory and per long symlink
    (as ext4 allocates). Computed from the tree, so the count of a fetched
    path and of one adopted at start agree and need no walk of the disk."""
    total, stack = 0, [root]
    while stack:
        node = stack.pop()
        if node.kind == REGULAR:
            total += -(-node.size // BLOCK) * BLOCK
        elif node.kind == SYMLINK:
            total += BLOCK if len(os.fsencode(node.target)) >= FAST_SYMLINK else 0
        else:
            total += BLOCK
            stack.extend((node.entries or {}).values())
    return total


def encode(node: Node) -> list[Any]:
    """A compact msgpack-able form of *node*."""
    if node.kind == DIRECTORY:
        return [DIRECTORY, {_pack_text(n): encode(c) for n, c in (node.entries or {}).items()}]
    if node.kind == REGULAR:
        return [REGULAR, node.size, node.executable]
    return [SYMLINK, _pack_text(node.target)]


def _pack_text(text: str) -> str | bytes:
    """Names and targets are bytes in a NAR, kept as surrogate-escaped str; one
    that is not ASCII is stored as its bytes (msgpack strings must be UTF-8)."""
    return text if text.isascii() else text.encode("utf-8", "surrogateescape")


def _unpack_text(data: str | bytes) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "surrogateescape")
    if not isinstance(data, str):
        raise TypeError("not a name")
    return data


def decode(data: Any) -> Node:
    try:
        kind = data[0]
        if kind == DIRECTORY:
            return Node(DIRECTORY, entries={
                _unpack_text(n): decode(c) for n, c in data[1].items()})
        if kind == REGULAR:
            return Node(REGULAR, size=int(data[1]), executable=bool(data[2]))
        if kind == SYMLINK:
            return Node(SYMLINK, target=_unpack_text(data[1]))
    except (TypeError, IndexError, KeyError, AttributeError, ValueError):
        pass
    raise StoreError("corrupt tree in the cache index")


def resolve(root: Node, parts: tuple[str, ...]) -> Node | None:
    """The node at *parts* below *root* (symlinks are not followed)."""
    node: Node | None = root
    for part in parts:
        if node is None or node.kind != DIRECTORY:
            return None
        node = node.child(part)
    return node
