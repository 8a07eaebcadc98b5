"""The chunk cache: verified chunks of indexed store paths, on disk.

``chunks/<sha256>`` holds the uncompressed bytes of one chunk (see
lazystore.nix.fileindex), written under a temporary name and renamed into
place only after the substituter verified them against the signed index, so
whatever is there has the hash its name says. Chunks are shared by every
path and file that holds the same bytes. The cache has a byte quota; the
least recently used chunks that no open file pins are evicted first. Runs
on the trio thread; file writes go to worker threads.
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from lazystore.nix import listing
from lazystore.nix.fileindex import Chunk, FileEntry, FileIndex
from lazystore.nix.nar import DirEnd, DirStart, Symlink
from lazystore.nix.narinfo import NarInfo

log = logging.getLogger(__name__)


@dataclass
class IndexedPath:
    """A store path whose cache offers a trusted file index: the index, the
    narinfo it was checked against, its files by path below the store path."""

    index: FileIndex
    info: NarInfo
    files: dict[tuple[str, ...], FileEntry] = field(default_factory=dict)
    targets: dict[tuple[str, ...], str] = field(default_factory=dict)  # symlinks
    by_offset: list[Chunk] = field(default_factory=list)  # every chunk, in data file order

    @classmethod
    def of(cls, index: FileIndex, info: NarInfo) -> IndexedPath:
        files = {tuple(listing.decode_name(n) for n in f.path): f for f in index.files}
        chunks = sorted((c for f in index.files for c in f.chunks), key=lambda c: c.offset)
        return cls(index, info, files, _targets(index), chunks)

    def following(self, chunk: Chunk, budget: int) -> list[Chunk]:
        """The chunks right after *chunk* in the data file (the next files in
        NAR order), adjacent, of at most *budget* compressed bytes together."""
        at = bisect.bisect_right(self.by_offset, chunk.offset, key=lambda c: c.offset)
        out: list[Chunk] = []
        end = chunk.offset + chunk.length
        for nxt in self.by_offset[at:]:
            if nxt.offset != end or budget < nxt.length:
                break
            out.append(nxt)
            budget -= nxt.length
            end = nxt.offset + nxt.length
        return out

    def chunks_for(self, entry: FileEntry, offset: int, end: int) -> tuple[Chunk, ...]:
        """The chunks holding bytes [offset, end) of *entry* (0 <= offset < end <= size)."""
        size = self.index.chunk_size
        return entry.chunks[offset // size:(end - 1) // size + 1]


def _targets(index: FileIndex) -> dict[tuple[str, ...], str]:
    """The symlinks of an index's tree by path, with their targets."""
    found, path = {}, []
    for event in index.events():
        if isinstance(event, DirStart):
            if event.name is not None:
                path.append(listing.decode_name(event.name))
        elif isinstance(event, DirEnd):
            if path:
                path.pop()
        elif isinstance(event, Symlink):
            where = () if event.name is None else (*path, listing.decode_name(event.name))
            found[where] = listing.decode_name(event.target)
    return found


class ChunkCache:
    def __init__(self, directory: Path, limit: int | None = None) -> None:
        self.directory = directory
        self.limit = limit
        self.bytes = 0
        self.evictions = 0
        self._sizes: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._pins: Counter[bytes] = Counter()

    def prepare(self) -> None:
        """Blocking, at start: adopt the chunks there, remove anything else."""
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.directory):
            digest = _digest(entry.name)
            if digest is None or not entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)  # a temporary left by a crash, or a stranger
                continue
            stat = entry.stat(follow_symlinks=False)
            found.append((stat.st_mtime, digest, stat.st_size))
        for _, digest, size in sorted(found):
            self._sizes[digest] = size
            self.bytes += size

    def has(self, digest: bytes) -> bool:
        return digest in self._sizes

    def path(self, digest: bytes) -> Path:
        return self.directory / digest.hex()

    def read(self, digest: bytes, offset: int, size: int) -> bytes | None:
        """Bytes of a cached chunk, or None when it is not here."""
        if digest not in self._sizes:
            return None
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(digest)
            return None
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        self._sizes.move_to_end(digest)
        return data

    async def put(self, digest: bytes, data: bytes) -> None:
        """Keep verified chunk *data* (OSError if the directory cannot take it)."""
        if digest in self._sizes:
            return
        await trio.to_thread.run_sync(self._write, digest, data)
        if digest not in self._sizes:
            self._sizes[digest] = len(data)
            self.bytes += len(data)
        await self._enforce()

    def _write(self, digest: bytes, data: bytes) -> None:
        tmp = self.directory / f".{digest.hex()}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
            os.rename(tmp, self.path(digest))
        finally:
            tmp.unlink(missing_ok=True)

    def pin(self, digests: Iterable[bytes]) -> None:
        self._pins.update(digests)

    def unpin(self, digests: Iterable[bytes]) -> None:
        self._pins.subtract(digests)
        self._pins += Counter()  # drops the counts that reached zero

    async def _enforce(self) -> None:
        if self.limit is None or self.bytes <= self.limit:
            return
        victims = []
        for digest, size in self._sizes.items():
            if self.bytes <= self.limit:
                break
            if self._pins[digest] <= 0:
                victims.append(digest)
                self.bytes -= size
        for digest in victims:
            del self._sizes[digest]
        self.evictions += len(victims)
        await trio.to_thread.run_sync(_remove, [self.path(d) for d in victims])
        if self.bytes > self.limit:
            log.info("chunk cache holds %d bytes over its limit of %d: the rest is in use",
                     self.bytes, self.limit)

    def _forget(self, digest: bytes) -> None:
        self.bytes -= self._sizes.pop(digest, 0)


def _digest(name: str) -> bytes | None:
    try:
        digest = bytes.fromhex(name)
    except ValueError:
        return None
    return digest if len(digest) == 32 and digest.hex() == name else None


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
