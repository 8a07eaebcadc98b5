"""The cache index: what the daemon knows about each store path, on disk.

One msgpack document, lz4-compressed when that makes it smaller, written
atomically (temporary file, fsync, rename, fsync of the directory) so a crash
leaves either the old or the new index, never a mix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.frame
import msgpack

from lazystore.errors import StoreError
from lazystore.nix import fsio
from lazystore.store import tree
from lazystore.store.tree import Node

log = logging.getLogger(__name__)

VERSION = 1
_RAW, _LZ4 = b"M", b"L"  # one leading byte says how the body is stored


@dataclass(slots=True)
class Record:
    """One known store path: its tree (once known), whether its data is on disk."""

    nar_size: int = 0
    references: tuple[str, ...] = ()
    tree: Node | None = None
    tree_verified: bool = False  # from the unpacked NAR, not from a listing hint
    materialized: bool = False
    disk_bytes: int = 0
    last_used: float = 0.0

    def to_msgpack(self) -> list[Any]:
        return [
            self.nar_size, list(self.references),
            tree.encode(self.tree) if self.tree is not None else None,
            self.tree_verified, self.materialized, self.disk_bytes, self.last_used,
        ]

    @classmethod
    def from_msgpack(cls, data: Any) -> Record:
        try:
            size, refs, enc, verified, mat, disk, used = data
            return cls(
                int(size), tuple(refs), tree.decode(enc) if enc is not None else None,
                bool(verified), bool(mat), int(disk), float(used),
            )
        except (TypeError, ValueError) as exc:
            raise StoreError(f"corrupt record in the cache index: {exc}") from None


def dumps(records: dict[str, Record]) -> bytes:
    body = msgpack.packb(
        {"version": VERSION, "paths": {b: r.to_msgpack() for b, r in records.items()}},
        use_bin_type=True,
    )
    packed = lz4.frame.compress(body)
    return _LZ4 + packed if len(packed) < len(body) else _RAW + body


def loads(data: bytes) -> dict[str, Record]:
    try:
        kind, body = data[:1], data[1:]
        if kind == _LZ4:
            body = lz4.frame.decompress(body)
        elif kind != _RAW:
            raise ValueError("unknown index encoding")
        doc = msgpack.unpackb(body, raw=False)
    except (ValueError, RuntimeError, msgpack.UnpackException) as exc:
        raise StoreError(f"corrupt cache index: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise StoreError("cache index has an unknown version")
    return {str(b): Record.from_msgpack(r) for b, r in doc.get("paths", {}).items()}


def load(path: Path) -> dict[str, Record]:
    """The index at *path*; an absent or unreadable index is an empty one.
    Temporary files of saves a kill interrupted are removed."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        return loads(data)
    except StoreError as exc:
        log.warning("%s: %s; starting with an empty index", path, exc)
        return {}


def save(path: Path, records: dict[str, Record]) -> None:
    """Write the index atomically (blocking: run it in a thread)."""
    fsio.write_atomic(path, dumps(records))
