"""``lazystore cache index``: file indexes for a file:// binary cache.

For each ``<hash>.narinfo`` of the folder this writes ``lzdata/<hash>.lzdata``
(the NAR's regular files, cut into chunks, each an independent zstd frame) and
``<hash>.lzindex`` (lazystore.nix.fileindex, signed). Nothing Nix reads is
touched.

The NAR file is decompressed (its size checked against FileSize and NarSize),
parsed as Nix parses it, and each file's chunks compressed and written. Then
the data file is read back: every frame is decompressed (its declared and real
size checked), the chunk's sha256 that goes into the index is taken of those
bytes, and the NAR rebuilt from them and the tree as a reader walks it must
have the narinfo's NarHash and NarSize. Only then is the index written, and
its parsed tree must be the one that was read back. The NAR file itself is not
hashed on the way in: the rebuilt NAR's NarHash is the proof, and a NAR that
does not match its NarHash can only rebuild into one that does not either
(when that happens, the NAR file is hashed to tell the two causes apart).

Blocking. Paths are indexed largest first in ``jobs`` worker processes
(forked, so only from a process without other threads; else in threads), and
the chunks of a path are compressed and read back in a pool of ``jobs``
threads a few chunks ahead (zstd and hashlib release the GIL), so one large
path keeps every core busy too.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, BinaryIO

from lazystore.errors import LazystoreError, NarError, NarInfoError
from lazystore.nix import fileindex, fsio, listing, nar
from lazystore.nix.fileindex import Chunk, FileIndexError
from lazystore.nix.nar import DirEnd, DirStart, FileData, FileEnd, FileStart, Symlink
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey
from lazystore.substituter import chunks, decompress
from lazystore.substituter.errors import SubstituterError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
READ_SIZE = 1 << 20
WRITE_BUFFER = 1 << 20  # frames gathered into writes of this size (fewer syscalls)
POOLED = 64 << 10  # chunks at least this large go to the pool; smaller ones are done inline
AHEAD = 4  # chunks of one path encoded or decoded in the pool ahead of the one it waits for


class CacheIndexError(LazystoreError):
    """A path of the cache could not be indexed."""


@dataclass
class Result:
    path: str
    indexed: bool  # False: an index was already there
    data_bytes: int = 0


OnDone = Callable[["Result | CacheIndexError"], None]


def narinfos(cache: Path) -> list[Path]:
    """The narinfo files of a cache folder, sorted."""
    try:
        return sorted(p for p in cache.glob("*.narinfo") if p.is_file())
    except OSError as exc:
        raise CacheIndexError(f"cannot read {cache}: {exc.strerror}") from None


def index_cache(cache: Path, secret: SecretKey, chunk_size: int = DEFAULT_CHUNK_SIZE,
                jobs: int = 4, level: int = chunks.LEVEL, on_done: OnDone = lambda _: None,
                processes: bool | None = None) -> list[Result | CacheIndexError]:
    """Index every path of *cache* (skipping those already indexed), *jobs* at
    a time, largest first; *on_done* gets each result or error as it comes, the
    list is in :func:`narinfos` order. *processes*: index paths in forked
    worker processes (default: when there are several paths and jobs and this
    process runs no other thread, which a fork would not copy)."""
    if not 0 < chunk_size <= fileindex.MAX_CHUNK_SIZE:
        raise CacheIndexError(f"chunk size must be 1 to {fileindex.MAX_CHUNK_SIZE} bytes")
    files = narinfos(cache)
    (cache / fileindex.DATA_DIR).mkdir(exist_ok=True)
    results: dict[Path, Result | CacheIndexError] = {}

    def done(path: Path, result: Result | CacheIndexError) -> None:
        results[path] = result
        on_done(result)

    costs = {path: _cost(path) for path in files}
    order = sorted(files, key=costs.__getitem__, reverse=True)  # the costliest first
    if processes is None:
        processes = jobs > 1 and len(files) > 1 and threading.active_count() == 1
    job = _Job(cache, secret, chunk_size, level, jobs)
    if processes:
        # a path's chunk pool only pays when the path is more than a worker's share
        share = sum(costs.values()) / min(jobs, len(files))
        pooled = {path for path, cost in costs.items() if cost > share}
        _in_processes(order, min(jobs, len(files)), job, pooled, done)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as threads, \
                ThreadPoolExecutor(max_workers=jobs) as paths:
            for path, result in zip(order, paths.map(lambda p: _commit(job(p, threads)), order),
                                    strict=True):
                done(path, result)
    marker = cache / fileindex.MARKER
    if not marker.exists():
        try:
            fsio.write_atomic(marker, fileindex.MAGIC)
        except OSError as exc:
            raise CacheIndexError(f"cannot write {marker}: {exc.strerror}") from None
    return [results[path] for path in files]


def _cost(narinfo_file: Path) -> int:
    """About how much work a path is: its NAR's bytes, the compressible ones
    (what compression saved in the NAR file) three times (they are compressed,
    the others are stored)."""
    try:
        info = NarInfo.parse(narinfo_file.read_text())
    except (OSError, UnicodeDecodeError, NarInfoError):
        return 0  # its worker reports it
    saved = info.nar_size - min(info.file_size or 0, info.nar_size)
    return info.nar_size + 2 * saved


@dataclass
class _Job:
    """Index one narinfo; its errors as a value."""

    cache: Path
    secret: SecretKey
    chunk_size: int
    level: int
    threads: int  # of each worker process's chunk pool

    def __call__(self, narinfo_file: Path, threads: Executor | None
                 ) -> Result | Written | CacheIndexError:
        try:
            return write_path(self.cache, narinfo_file, self.secret, self.chunk_size, threads,
                              self.level)
        except CacheIndexError as exc:
            return exc


def _commit(result: Result | Written | CacheIndexError) -> Result | CacheIndexError:
    try:
        return result.commit() if isinstance(result, Written) else result
    except CacheIndexError as exc:
        return exc


# --- worker processes ----------------------------------------------------------


def _in_processes(order: list[Path], jobs: int, job: _Job, pooled: set[Path],
                  done: Callable[[Path, Result | CacheIndexError], None]) -> None:
    """Run *job* on each path of *order* in *jobs* forked processes, one path
    at a time each (with its chunk pool for those in *pooled*). A worker that
    dies fails its path (its temporary files removed) and is replaced; on any
    exception here (Ctrl-C) every worker is stopped, those with a path not yet
    committed terminated and their temporary files removed, before it
    propagates."""
    context = multiprocessing.get_context("fork")
    queue = deque(order)
    workers: list[_Worker] = []
    try:
        while queue or any(w.path for w in workers):
            workers = [w for w in workers if w.alive]
            while queue and len(workers) < jobs:
                workers.append(_Worker(context, job, [w.conn for w in workers]))
            for worker in workers:
                if queue and worker.path is None:
                    path = queue.popleft()
                    if not worker.send(path, path in pooled):
                        done(path, worker.died(job.cache))
            busy = {w.conn: w for w in workers if w.path is not None}
            for conn in wait(list(busy)):
                worker = busy[conn]  # type: ignore[index]
                path = worker.path
                assert path is not None
                try:
                    result = worker.conn.recv()
                except (EOFError, OSError):
                    done(path, worker.died(job.cache))
                    continue
                committed = _commit(result)  # the index's fsyncs here, while workers go on
                worker.path = None
                done(path, committed)
    finally:
        for worker in workers:
            worker.close(job.cache)


class _Worker:
    """A forked process indexing the paths it is sent, one at a time; *path*
    is the one it has (until its result is committed), None when idle."""

    def __init__(self, context: Any, job: _Job, others: list[Connection]) -> None:
        self.conn, child = context.Pipe()
        # *others*: the parent's ends of the other workers' pipes, which the
        # fork copies; closed in the child, or a worker would never see EOF
        # when the parent dies (another worker would hold its pipe open)
        self.process = context.Process(target=_serve, args=(child, job, [*others, self.conn]),
                                       daemon=True, name="lazystore-cache-index")
        self.process.start()
        child.close()
        self.path: Path | None = None
        self.alive = True

    def send(self, path: Path, pooled: bool) -> bool:
        self.path = path
        try:
            self.conn.send((path, pooled))
        except OSError:
            return False
        return True

    def died(self, cache: Path) -> CacheIndexError:
        """The error of the path this worker had when it died; cleaned up."""
        assert self.path is not None
        self.process.join()
        code = self.process.exitcode or 0
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        name = _store_path(self.path)
        self.close(cache)
        return CacheIndexError(f"{name}: the process indexing it died ({how})")

    def close(self, cache: Path) -> None:
        """Stop the process: asked to when idle, terminated when it has a path
        (whose temporary data file is then removed)."""
        if not self.alive:
            return
        self.alive = False
        if self.path is None:
            try:
                self.conn.send(None)
            except OSError:
                pass
        else:
            self.process.terminate()
        self.process.join()
        self.conn.close()
        if self.path is not None:
            hash_part = self.path.name.removesuffix(".narinfo")
            assert self.process.pid is not None
            data = cache / fileindex.DATA_DIR / f"{hash_part}.lzdata"
            _temporary(data, self.process.pid).unlink(missing_ok=True)
            self.path = None


def _serve(conn: Connection, job: _Job, parents: list[Connection]) -> None:
    """A worker's loop: paths in, results out, until None or the parent is
    gone; *parents*: the parent's pipe ends this fork copied, closed first."""
    for other in parents:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us on Ctrl-C
    with ThreadPoolExecutor(max_workers=job.threads) as threads:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message is None:
                return
            path, pooled = message
            try:
                result = job(path, threads if pooled else None)
            except Exception as exc:  # a bug: one path fails, with the traceback logged
                log.error("indexing %s failed:\n%s", path.name, traceback.format_exc())
                result = CacheIndexError(f"{_store_path(path)}: internal error: {exc!r}")
            try:
                conn.send(result)
            except OSError:  # the parent is gone: what it would have committed goes too
                if isinstance(result, Written):
                    result.tmp.unlink(missing_ok=True)
                return


def _store_path(narinfo_file: Path) -> str:
    try:
        return NarInfo.parse(narinfo_file.read_text()).store_path
    except (OSError, UnicodeDecodeError, NarInfoError):
        return narinfo_file.name


def _temporary(path: Path, pid: int) -> Path:
    """The temporary name a process writes *path* under (as fsio.write_atomic)."""
    return path.with_name(f".{path.name}.{pid}.tmp")


# --- one path --------------------------------------------------------------------


def index_path(cache: Path, narinfo_file: Path, secret: SecretKey, chunk_size: int,
               workers: Executor | None = None, level: int = chunks.LEVEL) -> Result:
    """Index one narinfo's NAR, unless a good index signed by *secret* is
    there; large chunks are compressed and read back in *workers* (default:
    in this thread)."""
    written = write_path(cache, narinfo_file, secret, chunk_size, workers, level)
    return written if isinstance(written, Result) else written.commit()


@dataclass
class Written:
    """A path's data file, on disk and read back, under its temporary name,
    and its index: what :meth:`commit` puts in place (the slow part of that
    is the index's fsyncs, which a worker leaves to the parent)."""

    store_path: str
    tmp: Path
    data_file: Path
    index_file: Path
    text: bytes
    size: int

    def commit(self) -> Result:
        """Put the data file in place, then the index, in the order Nix puts a
        NAR and then its narinfo: the data file (fsynced when it was written)
        is renamed and its directory fsynced before the index is written (file
        fsynced, renamed, directory fsynced), so after a crash an index is
        never there without its data file."""
        try:
            os.rename(self.tmp, self.data_file)
            fsio.fsync_dir(self.data_file.parent)
            fsio.write_atomic(self.index_file, self.text)
        except OSError as exc:
            raise CacheIndexError(f"{self.store_path}: cannot write the index: {exc}") from None
        finally:
            self.tmp.unlink(missing_ok=True)
        return Result(self.store_path, indexed=True, data_bytes=self.size)


def write_path(cache: Path, narinfo_file: Path, secret: SecretKey, chunk_size: int,
               workers: Executor | None = None, level: int = chunks.LEVEL) -> Result | Written:
    """:func:`index_path` up to the commit: a Result if it was indexed already."""
    info = _read_narinfo(narinfo_file)
    hash_part = narinfo_file.name.removesuffix(".narinfo")
    index_file = cache / f"{hash_part}{fileindex.SUFFIX}"
    data_name = f"{fileindex.DATA_DIR}/{hash_part}.lzdata"
    if _indexed(cache, index_file, info, secret):
        return Result(info.store_path, indexed=False)
    data_file = cache / data_name
    tmp = _temporary(data_file, os.getpid())
    try:
        with open(tmp, "w+b", buffering=WRITE_BUFFER) as out:
            writer = _ChunkWriter(out, chunk_size, workers, level)
            _read_nar(cache, info, writer)
            assert writer.root is not None
            out.flush()
            size = writer.size
            with ThreadPoolExecutor(max_workers=1) as syncer:
                # to disk while the chunks are read back (from the page cache)
                synced = syncer.submit(os.fsync, out.fileno())
                read_back(info, writer.root, chunk_size, out, workers, cache)
                synced.result()
        text, index = fileindex.write_parsed(info, chunk_size, data_name, size, writer.root,
                                             secret)
        if index.root != writer.root:
            raise CacheIndexError(f"{info.store_path}: its index does not parse into the tree "
                                  "that was read back")
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CacheIndexError(f"{info.store_path}: cannot write the index: {exc}") from None
        if isinstance(exc, FileIndexError):
            raise CacheIndexError(f"{info.store_path}: {exc}") from None
        raise
    return Written(info.store_path, tmp, data_file, index_file, text, size)


def _read_narinfo(path: Path) -> NarInfo:
    try:
        return NarInfo.parse(path.read_text())
    except (OSError, UnicodeDecodeError, NarInfoError) as exc:
        raise CacheIndexError(f"{path.name}: {exc}") from None


def _indexed(cache: Path, index_file: Path, info: NarInfo, secret: SecretKey) -> bool:
    """True if *index_file* is this key's index of exactly this NAR and its
    data file has the size it says. Its signature is checked, not its tree
    (:func:`fileindex.check_signed`): this key signed it only once it read
    back into this NarHash, so an index of another NAR, or edited since, is
    redone, and a rerun over thousands of paths does not parse them all."""
    try:
        data, size = fileindex.check_signed(index_file.read_bytes(), info,
                                            [secret.public_key])
        return (cache / data).stat().st_size == size
    except FileNotFoundError:
        return False
    except (OSError, FileIndexError) as exc:
        log.info("re-indexing %s: %s", info.store_path, exc)
        return False


def _read_nar(cache: Path, info: NarInfo, sink: _ChunkWriter | _Hasher) -> None:
    """Decompress *info*'s NAR file into *sink*, checking FileSize and NarSize."""
    size = 0

    def consume(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        if size > info.nar_size:
            raise CacheIndexError(f"{info.store_path}: its NAR is larger than its NarSize "
                                  f"{info.nar_size}")
        sink.feed(piece)

    try:
        with open(cache / info.url, "rb") as nar_file:
            file_size = os.fstat(nar_file.fileno()).st_size
            if info.file_size is not None and file_size != info.file_size:
                raise CacheIndexError(f"{info.store_path}: {info.url} has {file_size} bytes, "
                                      f"its FileSize says {info.file_size}")
            unpack = decompress.make(info.compression, consume)
            while block := nar_file.read(READ_SIZE):
                unpack.feed(block)
            unpack.finish()
        sink.finish()
    except (SubstituterError, NarError) as exc:
        raise CacheIndexError(f"{info.store_path}: {info.url}: {exc}") from None
    except OSError as exc:
        raise CacheIndexError(f"{info.store_path}: cannot read {info.url}: {exc.strerror}"
                              ) from None
    if size != info.nar_size:
        raise CacheIndexError(f"{info.store_path}: its NAR has {size} bytes, NarSize says "
                              f"{info.nar_size}")


class _ChunkWriter:
    """Parses the NAR, cuts each file's contents into chunks, writes each as a
    zstd frame to *out*, and builds the index's tree (each chunk's sha256 left
    empty: :func:`read_back` takes it from the frame). Large chunks are
    compressed in *workers*, a few ahead, and written in order."""

    def __init__(self, out: BinaryIO, chunk_size: int, workers: Executor | None,
                 level: int) -> None:
        self._out, self._chunk_size, self._workers = out, chunk_size, workers
        self._level = level
        self._parser = nar.NarParser()
        self.root: dict[str, Any] | None = None
        self._dirs: list[dict[str, Any]] = []
        self._file: dict[str, Any] | None = None
        self._buffer = bytearray()
        self.size = 0  # bytes written to out
        self._left = 0  # bytes of the current file not yet taken
        # compressed or being compressed, not yet written: (frame, the file's chunk list)
        self._pending: deque[tuple[Future[bytes] | bytes, list[list[Any]]]] = deque()

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
            self._left = event.size
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
            whole = min(self._chunk_size, self._left)
            if not self._buffer and len(view) >= whole:
                # the whole chunk is in this piece: no copy (a NarParser's
                # FileData is a view of bytes, which never change)
                self._left -= whole
                self._encode(view[:whole])
                view = view[whole:]
                continue
            room = self._chunk_size - len(self._buffer)
            self._buffer += view[:room]
            self._left -= min(room, len(view))
            view = view[room:]
            if len(self._buffer) == self._chunk_size:
                self._flush()

    def _flush(self) -> None:
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            self._encode(data)

    def _encode(self, data: bytearray | memoryview) -> None:
        assert self._file is not None
        if self._workers is None or len(data) < POOLED:
            self._pending.append((chunks.encode(data, self._level), self._file["chunks"]))
        else:
            frame = self._workers.submit(chunks.encode, data, self._level)
            self._pending.append((frame, self._file["chunks"]))
        self._write(AHEAD)

    def _write(self, keep: int) -> None:
        """Write pending chunks in order until at most *keep* are left."""
        while len(self._pending) > keep:
            encoded, into = self._pending.popleft()
            frame = encoded if isinstance(encoded, bytes) else encoded.result()
            into.append([self.size, len(frame), ""])
            self._out.write(frame)
            self.size += len(frame)

    def finish(self) -> None:
        self._parser.close()
        self._write(0)


def read_back(info: NarInfo, root: dict[str, Any], chunk_size: int, data: BinaryIO,
              workers: Executor | None = None, cache: Path | None = None) -> None:
    """Read every chunk of the tree *root* (as :class:`_ChunkWriter` makes it)
    back from *data*, decompressed and checked for its size, set its sha256
    from those bytes, and rebuild the NAR from them and the tree, walked as a
    reader walks an index; CacheIndexError unless it has *info*'s NarHash and
    NarSize (with *cache*, the NAR file is then hashed to say which is wrong).
    Files of several chunks are read in *workers*, a few chunks ahead."""
    fd = data.fileno()

    def read(item: list[Any], start: int, size: int) -> bytes:
        frame = os.pread(fd, item[1], item[0])
        piece = chunks.decode(Chunk(item[0], item[1], start, size, b""), frame, hashed=False)
        item[2] = hashlib.sha256(piece).hexdigest()
        return piece

    def contents(node: dict[str, Any], size: int) -> Iterator[bytes]:
        items: list[list[Any]] = node["chunks"]
        ranges = fileindex.chunk_ranges(size, chunk_size)
        if len(items) != len(ranges):
            raise CacheIndexError(f"{info.store_path}: a file of {size} bytes has "
                                  f"{len(items)} chunks written")
        if workers is None or len(items) < 2:
            for item, (start, length) in zip(items, ranges, strict=True):
                yield read(item, start, length)
            return
        pending: deque[Future[bytes]] = deque()
        for item, (start, length) in zip(items, ranges, strict=True):
            pending.append(workers.submit(read, item, start, length))
            if len(pending) > AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    digest, total = hashlib.sha256(), 0
    writer = nar.NarWriter()
    dirs: list[dict[str, Any]] = []
    try:
        for event in listing.events({"root": root}):
            piece = writer.write(event)
            digest.update(piece)
            total += len(piece)
            if isinstance(event, DirEnd):
                dirs.pop()
            elif isinstance(event, (DirStart, FileStart)):
                name = event.name
                node = root if name is None else dirs[-1]["entries"][listing.decode_name(name)]
                if isinstance(event, DirStart):
                    dirs.append(node)
                else:
                    for part in contents(node, event.size):
                        piece = writer.write(FileData(part))
                        digest.update(piece)
                        total += len(piece)
        writer.close()
    except (SubstituterError, NarError, listing.ListingError) as exc:
        raise CacheIndexError(f"{info.store_path}: data file does not read back: {exc}"
                              ) from None
    if total != info.nar_size or digest.digest() != info.nar_hash.digest:
        if cache is not None and not _nar_file_matches(cache, info):
            raise CacheIndexError(f"{info.store_path}: its NAR file does not match its NarHash")
        raise CacheIndexError(f"{info.store_path}: the chunks do not reproduce its NarHash")


class _Hasher:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.digest.update(data)

    def finish(self) -> None:
        pass


def _nar_file_matches(cache: Path, info: NarInfo) -> bool:
    """Whether *info*'s NAR file decompresses into its NarHash (for a message)."""
    hasher = _Hasher()
    try:
        _read_nar(cache, info, hasher)
    except CacheIndexError:
        return False
    return hasher.digest.digest() == info.nar_hash.digest
