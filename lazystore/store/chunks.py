"""The chunk cache: verified chunks of indexed store paths, on disk.

``chunks/<sha256>`` holds the uncompressed bytes of one chunk (see
lazystore.nix.fileindex), written under a temporary name and renamed into
place only after the substituter verified them against the signed index, so
whatever is there has the hash its name says. Chunks are shared by every
path and file that holds the same bytes. Their bytes count toward the
store's one quota, with the materialised paths': LocalStore evicts the least
recently used of both (:meth:`ChunkCache.victims`), never a chunk that an
open file pins. Runs on the trio thread; file writes go to worker threads
(but for one or two small chunks).

:class:`Copies` remembers where the chunks of the indexes seen sit in their
files, so that a chunk the cache no longer has (or never had: its path came
as a whole NAR) is read from a materialised path holding the same bytes,
checked against its sha256, before it is fetched.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import os
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cachetools
import trio

from lazystore.nix import listing, nar
from lazystore.nix.fileindex import Chunk, FileEntry, FileIndex
from lazystore.nix.nar import DirEnd, DirStart, Symlink
from lazystore.nix.narinfo import NarInfo
from lazystore.substituter.download import NarPipeline, NarSink

log = logging.getLogger(__name__)

# Chunks written on the trio thread when this few and small (a read's own
# chunk of a small file: well under a millisecond; the worker thread's hop
# took 1-3 ms of each small miss under load, which its reader waited for).
INLINE_FILES = 2
INLINE_BYTES = 64 << 10


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

    def preceding(self, chunk: Chunk, budget: int) -> list[Chunk]:
        """The chunks right before *chunk* in the data file (the files before
        it in NAR order), adjacent, of at most *budget* compressed bytes
        together, in data file order."""
        at = bisect.bisect_left(self.by_offset, chunk.offset, key=lambda c: c.offset)
        out: list[Chunk] = []
        start = chunk.offset
        for prev in (self.by_offset[i] for i in range(at - 1, -1, -1)):
            if prev.offset + prev.length != start or budget < prev.length:
                break
            out.append(prev)
            budget -= prev.length
            start = prev.offset
        return out[::-1]

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
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.bytes = 0
        self.evictions = 0
        # sha256 -> (size, last used as time.time(), as paths' last_used),
        # least recently used first
        self._sizes: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self._pins: Counter[bytes] = Counter()
        # Verified chunks on their way to disk (:meth:`hold`), read from here meanwhile.
        self._held: dict[bytes, bytes] = {}

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
        for used, digest, size in sorted(found):
            self._sizes[digest] = (size, used)
            self.bytes += size

    def has(self, digest: bytes) -> bool:
        return digest in self._sizes or digest in self._held

    def whole(self, digest: bytes) -> bytes:
        """Blocking (any thread): a cached chunk's bytes, held or on disk
        (FileNotFoundError when neither)."""
        held = self._held.get(digest)  # one dict lookup: safe beside the trio thread
        return held if held is not None else self.path(digest).read_bytes()

    def path(self, digest: bytes) -> Path:
        return self.directory / digest.hex()

    def read(self, digest: bytes, offset: int, size: int) -> bytes | None:
        """Bytes of a cached chunk, or None when it is not here."""
        held = self._held.get(digest)
        if held is not None:
            return held[offset:offset + size]
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
        if digest in self._sizes:  # not dropped meanwhile
            self._sizes[digest] = (self._sizes[digest][0], time.time())
            self._sizes.move_to_end(digest)
        return data

    def hold(self, chunks: dict[bytes, bytes]) -> None:
        """Serve verified *chunks* (sha256 -> bytes) from memory until
        :meth:`put` has written them (a read need not wait for the writing
        of the chunks read ahead with its own)."""
        self._held.update((d, data) for d, data in chunks.items() if d not in self._sizes)

    def release(self, chunks: dict[bytes, bytes]) -> None:
        """Stop holding *chunks* (they are not going to be written)."""
        for digest in chunks:
            self._held.pop(digest, None)

    async def put(self, chunks: dict[bytes, bytes]) -> list[OSError]:
        """Keep verified chunks (sha256 -> bytes), all written by one worker
        thread (a read-ahead brings a hundred small files: a thread hop each
        cost the reader more than a round trip), or on the trio thread when
        few and small (INLINE_FILES, INLINE_BYTES); the errors of those the
        directory could not take (no longer held either: fetched again when
        read). The store enforces the quota after."""
        todo = {d: data for d, data in chunks.items() if d not in self._sizes}
        if not todo:
            return []
        try:
            if len(todo) <= INLINE_FILES and sum(map(len, todo.values())) <= INLINE_BYTES:
                written, failed = self._write_all(todo)  # a thread hop costs more
            else:
                written, failed = await trio.to_thread.run_sync(self._write_all, todo)
        finally:
            self.release(todo)
        now = time.time()
        for digest in written:
            if digest not in self._sizes:
                self._sizes[digest] = (len(todo[digest]), now)
                self.bytes += len(todo[digest])
        return failed

    def _write_all(self, chunks: dict[bytes, bytes]) -> tuple[list[bytes], list[OSError]]:
        written, failed = [], []
        for digest, data in chunks.items():
            try:
                self._write(digest, data)
            except OSError as exc:  # served from memory all the same
                failed.append(exc)
            else:
                written.append(digest)
        return written, failed

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

    def victims(self, excess: int, before: float | None = None) -> list[bytes]:
        """Least recently used chunks no open file pins, of at least *excess*
        bytes together (fewer if there are not so many), each last used
        before *before* when given (the oldest path that could go instead)."""
        found, total = [], 0
        for digest, (size, used) in self._sizes.items():
            if total >= excess or (before is not None and used >= before):
                break
            if self._pins[digest] <= 0:
                found.append(digest)
                total += size
        return found

    async def drop(self, digests: list[bytes]) -> None:
        """Evict *digests* (from :meth:`victims`)."""
        gone = [d for d in digests if d in self._sizes]
        for digest in gone:
            self._forget(digest)
        self.evictions += len(gone)
        await trio.to_thread.run_sync(_remove, [self.path(d) for d in gone])

    def _forget(self, digest: bytes) -> None:
        self.bytes -= self._sizes.pop(digest, (0, 0.0))[0]


@dataclass(frozen=True, slots=True)
class Copy:
    """A chunk's place in a file of an indexed store path."""

    base: str
    rel: tuple[str, ...]
    start: int  # of the chunk's bytes in that file


class Copies:
    """sha256 -> the first place (:class:`Copy`) where an index loaded had a
    chunk with that hash, for the most recent *limit* chunks, and whether
    the bytes there were read once and had that hash (then only the spans
    asked for are read: a materialised path never changes)."""

    def __init__(self, limit: int) -> None:
        self._where: cachetools.LRUCache[bytes, tuple[Copy, bool]] = cachetools.LRUCache(limit)

    def learn(self, base: str, indexed: IndexedPath) -> None:
        for rel, entry in indexed.files.items():
            for chunk in entry.chunks:
                if chunk.sha256 not in self._where:
                    self._where[chunk.sha256] = (Copy(base, rel, chunk.start), False)

    def find(self, digest: bytes) -> tuple[Copy, bool] | None:
        """The place of a chunk, and whether its bytes were checked there."""
        return self._where.get(digest)

    def checked(self, digest: bytes, good: bool) -> None:
        """The bytes at the chunk's place had its hash (*good*), or were not there."""
        where = self._where.pop(digest, None)
        if good and where is not None:
            self._where[digest] = (where[0], True)


def read_copy(path: Path, start: int, chunk: Chunk, at: int, length: int,
              check: bool) -> bytes | None:
    """Blocking: bytes [at, at+length) of *chunk*, held in the file *path* from
    offset *start*; with *check* the whole chunk is read and must have its
    sha256. None: the file is not there, or holds other bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not check:
            data = os.pread(fd, length, start + at)
            return data if len(data) == length else None
        whole = os.pread(fd, chunk.size, start)
    finally:
        os.close(fd)
    if len(whole) != chunk.size or hashlib.sha256(whole).digest() != chunk.sha256:
        log.warning("%s does not hold the chunk its index names there (sha256 %s); "
                    "fetching the chunk instead", path, chunk.sha256.hex())
        return None
    return whole[at:at + length]


class Incomplete(Exception):
    """A chunk :func:`assemble` needs is no longer in the chunk cache."""


def assemble(indexed: IndexedPath, cache: ChunkCache, sink: NarSink) -> None:
    """Blocking: the NAR of *indexed* rebuilt from its index and the chunk
    cache's chunks, fed to *sink* through the substituter's verifying
    pipeline, so *sink* is finished only if it has the narinfo's NarHash and
    NarSize (VerificationError otherwise; Incomplete if a chunk went)."""
    info = dataclasses.replace(indexed.info, compression="none", file_size=None,
                               file_hash=None)
    origin = getattr(indexed.info, "substituter", "") or "its cache"
    pipeline = NarPipeline(info, sink, f"the file index and chunks of {origin}")

    def contents(entry: FileEntry) -> Iterator[bytes]:
        for chunk in entry.chunks:
            try:
                data = cache.whole(chunk.sha256)
            except FileNotFoundError:
                raise Incomplete(chunk.sha256.hex()) from None
            yield data  # checked when written; the NarHash covers it again

    try:
        for piece in nar.serialize(indexed.index.nar_events(contents)):
            pipeline.feed(bytes(piece))
        pipeline.finish()
    except BaseException:
        pipeline.abort()
        raise


def _digest(name: str) -> bytes | None:
    try:
        digest = bytes.fromhex(name)
    except ValueError:
        return None
    return digest if len(digest) == 32 and digest.hex() == name else None


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
