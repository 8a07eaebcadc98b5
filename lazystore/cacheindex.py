"""``lazystore cache index``: file indexes for a file:// binary cache.

For each ``<hash>.narinfo`` of the folder this writes ``lzdata/<hash>.lzdata``
(the NAR's regular files, cut into chunks, each an independent zstd frame) and
``<hash>.lzindex`` (lazystore.nix.fileindex, signed). The NAR is read through
the substituter's verifying pipeline (decompression, NarSize, NarHash, FileSize,
FileHash); the data file is read back and the NAR rebuilt from the index and
the chunks must have the NarHash again before the index is renamed into place,
so an index is only ever there for data that reproduces the NAR. Nothing Nix
reads is touched. Blocking; paths are indexed in parallel threads, and the
chunks of a path are compressed, hashed and read back in a pool of as many
threads as paths (zstd, lzma and hashlib release the GIL), so one large path
keeps every core busy too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lazystore.errors import LazystoreError, NarError, NarInfoError
from lazystore.nix import fileindex, fsio, listing, nar
from lazystore.nix.fileindex import FileEntry, FileIndex, FileIndexError
from lazystore.nix.nar import DirEnd, DirStart, FileData, FileEnd, FileStart, Symlink
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey
from lazystore.substituter import chunks
from lazystore.substituter.download import NarPipeline
from lazystore.substituter.errors import SubstituterError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
READ_SIZE = 1 << 20
POOLED = 64 << 10  # chunks at least this large go to the pool; smaller ones are done inline
AHEAD = 4  # chunks of one path encoded or decoded in the pool ahead of the one it waits for


class CacheIndexError(LazystoreError):
    """A path of the cache could not be indexed."""


@dataclass
class Result:
    path: str
    indexed: bool  # False: an index was already there
    data_bytes: int = 0


def narinfos(cache: Path) -> list[Path]:
    """The narinfo files of a cache folder, sorted."""
    try:
        return sorted(p for p in cache.glob("*.narinfo") if p.is_file())
    except OSError as exc:
        raise CacheIndexError(f"cannot read {cache}: {exc.strerror}") from None


def index_cache(cache: Path, secret: SecretKey, chunk_size: int = DEFAULT_CHUNK_SIZE,
                jobs: int = 4, level: int = chunks.LEVEL,
                on_done: Callable[[Result | CacheIndexError], None] = lambda _: None
                ) -> list[Result | CacheIndexError]:
    """Index every path of *cache* (skipping those already indexed), *jobs* at
    a time; *on_done* gets each result or error as it comes."""
    if not 0 < chunk_size <= fileindex.MAX_CHUNK_SIZE:
        raise CacheIndexError(f"chunk size must be 1 to {fileindex.MAX_CHUNK_SIZE} bytes")
    files = narinfos(cache)
    (cache / fileindex.DATA_DIR).mkdir(exist_ok=True)
    results: list[Result | CacheIndexError] = []

    with ThreadPoolExecutor(max_workers=jobs) as workers:

        def one(path: Path) -> Result | CacheIndexError:
            try:
                return index_path(cache, path, secret, chunk_size, workers, level)
            except CacheIndexError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for result in pool.map(one, files):
                results.append(result)
                on_done(result)
    marker = cache / fileindex.MARKER
    if not marker.exists():
        try:
            fsio.write_atomic(marker, fileindex.MAGIC)
        except OSError as exc:
            raise CacheIndexError(f"cannot write {marker}: {exc.strerror}") from None
    return results


def index_path(cache: Path, narinfo_file: Path, secret: SecretKey, chunk_size: int,
               workers: Executor | None = None, level: int = chunks.LEVEL) -> Result:
    """Index one narinfo's NAR, unless a good index signed by *secret* is
    there; large chunks are compressed and read back in *workers* (default:
    in this thread)."""
    info = _read_narinfo(narinfo_file)
    hash_part = narinfo_file.name.removesuffix(".narinfo")
    index_file = cache / f"{hash_part}{fileindex.SUFFIX}"
    data_name = f"{fileindex.DATA_DIR}/{hash_part}.lzdata"
    if _indexed(cache, index_file, info, secret):
        return Result(info.store_path, indexed=False)
    data_file = cache / data_name
    tmp = data_file.with_name(f".{data_file.name}.{secrets.token_hex(6)}")
    try:
        with open(tmp, "w+b") as out:
            root = _write_data(cache, info, _ChunkWriter(out, chunk_size, workers, level))
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
            text = fileindex.write(info, chunk_size, data_name, size, root, secret)
            verify_data(fileindex.parse(text), info, out, workers)
        os.rename(tmp, data_file)
        fsio.write_atomic(index_file, text)
    except OSError as exc:
        raise CacheIndexError(f"{info.store_path}: cannot write the index: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Result(info.store_path, indexed=True, data_bytes=size)


def _read_narinfo(path: Path) -> NarInfo:
    try:
        return NarInfo.parse(path.read_text())
    except (OSError, UnicodeDecodeError, NarInfoError) as exc:
        raise CacheIndexError(f"{path.name}: {exc}") from None


def _indexed(cache: Path, index_file: Path, info: NarInfo, secret: SecretKey) -> bool:
    """True if *index_file* is this key's index of exactly this NAR and its
    data file has the size it says."""
    try:
        index = fileindex.parse(index_file.read_bytes())
        fileindex.check(index, info, [secret.public_key])
        return (cache / index.data).stat().st_size == index.data_size
    except FileNotFoundError:
        return False
    except (OSError, FileIndexError) as exc:
        log.info("re-indexing %s: %s", info.store_path, exc)
        return False


def _write_data(cache: Path, info: NarInfo, writer: _ChunkWriter) -> dict[str, Any]:
    """Stream the NAR through the verifying pipeline into *writer*; the tree."""
    pipeline = NarPipeline(info, writer, f"file://{cache}")
    try:
        with open(cache / info.url, "rb") as nar_file:
            while block := nar_file.read(READ_SIZE):
                pipeline.feed(block)
        pipeline.finish()
    except (SubstituterError, NarError) as exc:
        raise CacheIndexError(f"{info.store_path}: {exc}") from None
    except OSError as exc:
        raise CacheIndexError(f"{info.store_path}: cannot read {info.url}: {exc.strerror}"
                              ) from None
    assert writer.root is not None
    return writer.root


Encoded = tuple[bytes, str]  # a chunk's zstd frame and the sha256 (hex) of its bytes


def _encode(data: bytearray, level: int) -> Encoded:
    return chunks.encode(data, level), hashlib.sha256(data).hexdigest()


class _Done:
    """A finished result where a Future may be."""

    def __init__(self, value: Encoded) -> None:
        self._value = value

    def result(self) -> Encoded:
        return self._value


class _ChunkWriter:
    """A NarSink: parses the NAR, cuts each file's contents into chunks,
    writes each as a zstd frame to *out*, and builds the index's tree. Large
    chunks are encoded in *workers*, a few ahead, and written in order."""

    def __init__(self, out: BinaryIO, chunk_size: int, workers: Executor | None,
                 level: int) -> None:
        self._out, self._chunk_size, self._workers = out, chunk_size, workers
        self._level = level
        self._parser = nar.NarParser()
        self.root: dict[str, Any] | None = None
        self._dirs: list[dict[str, Any]] = []
        self._file: dict[str, Any] | None = None
        self._buffer = bytearray()
        # encoded or being encoded, not yet written: (frame + digest, the file's chunk list)
        self._pending: deque[tuple[Future[Encoded] | _Done, list[list[Any]]]] = deque()

    def feed(self, data: bytes) -> None:
        for event in self._parser.feed(data):
            if isinstance(event, FileData):
                self._take(event.data)
            elif isinstance(event, FileEnd):
                self._flush()
                self._file = None
            elif isinstance(event, DirEnd):
                self._dirs.pop()
            else:
                self._node(event)

    def _node(self, event: DirStart | FileStart | Symlink) -> None:
        node: dict[str, Any]
        if isinstance(event, FileStart):
            node = self._file = fileindex.regular_node(event.size, event.executable, [])
        elif isinstance(event, Symlink):
            node = {"type": "symlink", "target": listing.decode_name(event.target)}
        else:
            node = {"type": "directory", "entries": {}}
        if event.name is None:
            self.root = node
        else:
            self._dirs[-1]["entries"][listing.decode_name(event.name)] = node
        if isinstance(event, DirStart):
            self._dirs.append(node)

    def _take(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            room = self._chunk_size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self._chunk_size:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        assert self._file is not None
        data, self._buffer = self._buffer, bytearray()
        if self._workers is None or len(data) < POOLED:
            self._pending.append((_Done(_encode(data, self._level)), self._file["chunks"]))
        else:
            encoded = self._workers.submit(_encode, data, self._level)
            self._pending.append((encoded, self._file["chunks"]))
        self._write(AHEAD)

    def _write(self, keep: int) -> None:
        """Write pending chunks in order until at most *keep* are left."""
        while len(self._pending) > keep:
            encoded, into = self._pending.popleft()
            frame, digest = encoded.result()
            into.append([self._out.tell(), len(frame), digest])
            self._out.write(frame)

    def finish(self) -> None:
        self._parser.close()
        self._write(0)

    def abort(self) -> None:
        for encoded, _ in self._pending:
            if isinstance(encoded, Future):
                encoded.cancel()
        self._pending.clear()  # the caller removes the temporary data file


def verify_data(index: FileIndex, info: NarInfo, data: BinaryIO,
                workers: Executor | None = None) -> None:
    """Rebuild the NAR from *index* and the chunks in *data* (read back from
    the file, each frame decompressed and checked for its size; the NarHash
    over all of them stands for the chunks' own hashes); CacheIndexError
    unless it has *info*'s NarHash and NarSize. Files of several chunks are
    decompressed in *workers*, a few chunks ahead."""
    digest, size = hashlib.sha256(), 0

    def read(chunk: fileindex.Chunk) -> bytes:
        frame = os.pread(data.fileno(), chunk.length, chunk.offset)
        return chunks.decode(chunk, frame, hashed=False)

    def contents(entry: FileEntry) -> Iterator[bytes]:
        if workers is None or len(entry.chunks) < 2:
            yield from map(read, entry.chunks)
            return
        pending: deque[Future[bytes]] = deque()
        for chunk in entry.chunks:
            pending.append(workers.submit(read, chunk))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        for piece in nar.serialize(index.nar_events(contents)):
            digest.update(piece)
            size += len(piece)
    except SubstituterError as exc:
        raise CacheIndexError(f"{info.store_path}: data file does not read back: {exc}"
                              ) from None
    if size != info.nar_size or digest.digest() != info.nar_hash.digest:
        raise CacheIndexError(f"{info.store_path}: the chunks do not reproduce its NarHash")


