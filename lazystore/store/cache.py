"""The local cache of store paths: index, single-flight materialisation, quota.

Layout of the cache directory::

    store/<hash>-<name>   materialised (verified, unpacked) store paths
    tmp/                  unpacks in progress (one per fetch attempt, see
                          lazystore.store.sink); evictions in progress.
                          Cleared at every start.
    index                 the cache index (see lazystore.store.index)

A path is in ``store/`` only once its NAR verified (the store's sink renames
it there when the substituter finishes it), so after a crash anything in
``store/`` is whole: the start adopts such paths and clears ``tmp/``. The
concurrency protocol (flights, pins, eviction, the index saver) is written
down in developer-notes/store.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import cachetools
import trio

from lazystore.errors import FormatError, LazystoreError, StoreError
from lazystore.flight import Flights
from lazystore.nix import fsio
from lazystore.nix.fileindex import Chunk, FileEntry, FileIndex
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.storepath import StorePath
from lazystore.store import index, tree
from lazystore.store.chunks import (
    ChunkCache,
    Copies,
    Incomplete,
    IndexedPath,
    assemble,
    read_copy,
)
from lazystore.store.events import EventLog
from lazystore.store.index import Record
from lazystore.store.sink import CacheFullError, StoreSink
from lazystore.store.tree import Node
from lazystore.substituter.config import NEGATIVE_TTL
from lazystore.substituter.download import NarSink, OpenSink
from lazystore.substituter.errors import VerificationError
from lazystore.substituter.timings import Timings

log = logging.getLogger(__name__)

SAVE_DELAY = 1.0
WRITE_AT_EXIT = 10.0  # seconds the chunks still held may take to be written at exit
NEGATIVE_CACHE_SIZE = 100_000
NARINFOS_HELD = 10_000  # narinfos of paths known but not fetched, for their fetch
COPIES_HELD = 200_000  # places of chunks in indexed paths' files (chunks.Copies)
QUERY_PARALLEL = 25  # as many narinfo queries as the substituter has connections
PREFETCH_PARALLEL = 8
# A profile's paths at once: few, so that the ones read first are not slowed by
# the later ones sharing the link equally (they are started in first-read order).
PROFILE_PARALLEL = 3
# A profile's files of an indexed path come in groups of adjacent chunks of at
# most this many compressed bytes, this many groups of a path at once.
PROFILE_GROUP = 1 << 20
PROFILE_GROUPS_PARALLEL = 4
# Narinfos and listings learnt ahead of use (a view's paths, the references of
# a path looked up) at once: fewer than the substituter's connections, so a
# reader's own requests always find one.
BACKGROUND_PARALLEL = 16
# Compressed bytes of the chunks after a read's last one (the next files in NAR
# order: a start-up reads neighbours) asked for in the same range request.
READ_AHEAD = 256 << 10
# Compressed bytes of the chunks before a read's first one asked for with the
# read-ahead: a program also reads the files just before (python a module's
# source, checked against its hash, after its __pycache__ entry).
READ_BEHIND = 16 << 10
# A read that goes on to a second chunk of a file of at most this many
# compressed bytes (a program mapping a binary or a library faults its pages
# in all over it, one dependent miss after another) fetches the rest of the
# file ahead. A bigger file (a database read here and there) does not: each
# such read would bring megabytes it may never read.
FILE_AHEAD = 8 << 20
LAST_CHUNKS_HELD = 10_000  # files whose last read chunk is remembered
# Chunks read ahead are held in memory and written once no chunk has been
# fetched for this long (or WRITE_HELD bytes of them wait): creating a
# read-ahead's hundred small files takes 15-40 ms of CPU, which a start-up's
# program on two shared cores waited for (python's start, same bytes: 8-16%).
WRITE_QUIET = 0.5
WRITE_HELD = 32 << 20
BACKGROUND_FETCH_PARALLEL = 2  # a view's other paths after its profile (--background-fetch)
# A path with more references than this is an aggregate (a closure of hundreds
# of paths of which a program reads a few): its references are not learnt ahead.
REFERENCES_AHEAD = 32
# Bytes of a file index learnt ahead of use (references, views): a bigger one
# (a path of thousands of files, maybe never read) is finished at its first use,
# unless it is at most INDEX_WHOLE (20 ms at 100 Mbit/s): that one's rest is
# learnt ahead too, so that its first use waits neither for the rest nor for
# parsing it (for python's 169 KB stdlib index, a round trip and 30-70 ms of
# CPU at the first import).
INDEX_AHEAD = 64 << 10
INDEX_WHOLE = 256 << 10


class PathNotFound(StoreError):
    """No configured substituter has this store path."""


class SubstituterAPI(Protocol):
    """What the store needs from lazystore.substituter.client.Substituters
    (see developer-notes/interfaces.md): the narinfo *query* returns is what
    the store passes back to *listing* and *fetch*, so neither looks it up."""

    stats: Any

    async def query(self, path: StorePath) -> NarInfo | None: ...
    def expect_index(self, path: StorePath) -> None: ...
    async def index_ahead(self, info: NarInfo, limit: int, whole: int = 0) -> bool: ...
    async def listing(self, what: NarInfo) -> dict[str, Any] | None: ...
    async def fetch(self, what: NarInfo, open_sink: OpenSink) -> NarInfo: ...
    async def closure(self, paths: list[StorePath]) -> list[NarInfo]: ...
    async def file_index(self, info: NarInfo) -> FileIndex | None: ...
    async def read_chunks(self, info: NarInfo, index: FileIndex,
                          wanted: list[Chunk]) -> dict[Chunk, bytes]: ...


class DirectReaders(Protocol):
    """Who reads finished paths' data without the Vfs (the daemon's binds)."""

    def materialized(self, base: str) -> None:
        """*base*'s verified data is in ``store/``."""
        ...

    async def release(self, base: str) -> bool:
        """Stop serving *base* before its data goes; False if still in use."""
        ...


def _basename(path: str) -> str:
    """The basename of a store path given in full or as a basename."""
    return os.path.basename(path.rstrip("/")) if "/" in path else path


class LocalStore:
    """The store API the FUSE layer and the control server use."""

    def __init__(
        self,
        substituters: SubstituterAPI,
        cache_dir: Path,
        cache_limit: int | None = None,
        store_dir: str = "/nix/store",
        negative_ttl: float = NEGATIVE_TTL,  # narinfo-cache-negative-ttl
        resolve_references: bool = True,
        verify_complete: bool = False,
    ) -> None:
        self.subs = substituters
        self.cache_dir = Path(cache_dir)
        self.cache_limit = cache_limit
        self.store_dir = store_dir
        self.negative_ttl = negative_ttl
        # A path looked up is likely followed by its references: their narinfos
        # and listings are asked in the background as soon as its narinfo came.
        self.resolve_references = resolve_references
        # A path all of whose chunks came is assembled into store/ (its NAR
        # checked against NarHash) at once, not only when it is materialised.
        self.verify_complete = verify_complete
        self._background = trio.CapacityLimiter(BACKGROUND_PARALLEL)
        self.data_dir = self.cache_dir / "store"
        self.tmp_dir = self.cache_dir / "tmp"
        self.index_file = self.cache_dir / "index"
        self.records: dict[str, Record] = {}
        self.cache_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.wait_seconds = Timings()  # readers waiting for a path's data to arrive
        self._pins: Counter[str] = Counter()
        self.direct: DirectReaders | None = None  # set by the daemon
        # The one negative cache of lazystore: which names no substituter has.
        self._negative: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            NEGATIVE_CACHE_SIZE, negative_ttl, timer=trio.current_time)
        self._flights: Flights | None = None
        # The narinfo a lookup got, passed down to the listing and the fetch so
        # neither asks again; dropped once the path is fetched (a refetch after
        # an eviction or a restart asks once more).
        self._narinfos: cachetools.LRUCache[str, NarInfo] = cachetools.LRUCache(NARINFOS_HELD)
        # Paths whose cache offers a trusted file index (None: it offers none,
        # or it failed once; read as whole NARs), and the chunks read through them.
        self._ahead: dict[bytes, trio.Event] = {}  # chunk sha256 -> set when a prefetch has it
        self._indexed: cachetools.LRUCache[str, IndexedPath | None] = cachetools.LRUCache(
            NARINFOS_HELD)
        self.chunks = ChunkCache(self.cache_dir / "chunks")  # within cache_limit too
        self.copies = Copies(COPIES_HELD)
        self.chunks_from_copies = 0  # chunks read from materialised paths, not fetched
        self.events = EventLog()  # when narinfos, listings and NARs came (and first reads)
        self.read_ahead = READ_AHEAD  # 0: no read-ahead at all (nor behind)
        self.read_behind = READ_BEHIND
        # (path, file) -> the chunk its last read ended in
        self._last_chunk: cachetools.LRUCache[tuple[str, tuple[bytes, ...]], int] = \
            cachetools.LRUCache(LAST_CHUNKS_HELD)
        self.chunk_bytes_read = 0  # compressed bytes of the distinct chunks reads used
        self._chunks_read: set[bytes] = set()
        # Chunks read ahead, held (ChunkCache.hold) until the writer keeps them.
        self._unwritten: dict[str, dict[bytes, bytes]] = {}
        self._unwritten_bytes = 0
        self._write_wanted = trio.Event()  # set: some are held
        self._write_now = trio.Event()  # set: WRITE_HELD bytes are
        self._fetches = 0  # chunk fetches under way
        self._last_fetch = -math.inf  # trio.current_time() the last one ended
        self._dirty = trio.Event()
        self._save_failed = False
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None

    # -- lifetime ---------------------------------------------------------

    async def __aenter__(self) -> LocalStore:
        try:
            await trio.to_thread.run_sync(self._prepare)
        except OSError as exc:
            raise StoreError(f"cannot use the cache directory {self.cache_dir}: "
                             f"{exc.strerror or exc}") from None
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._flights = Flights(self._nursery, _flight_cancelled)
        self._stack.push_async_callback(self._final_save)
        self._nursery.start_soon(self._saver)
        self._nursery.start_soon(self._writer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._nursery is not None
        with trio.CancelScope(shield=True), trio.move_on_after(WRITE_AT_EXIT):
            await self._write_held()  # what a restart finds on disk is not fetched again
        self._nursery.cancel_scope.cancel()
        await self._stack.aclose()

    def _prepare(self) -> None:
        for d in (self.data_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for child in self.tmp_dir.iterdir():
            fsio.remove_tree(child)
        self.records = index.load(self.index_file)
        self._reconcile()
        self.chunks.prepare()

    def _reconcile(self) -> None:
        """Make the index agree with ``store/`` after whatever happened before."""
        on_disk = {p.name for p in self.data_dir.iterdir()}
        for base, rec in self.records.items():
            if rec.materialized and base not in on_disk:
                rec.materialized, rec.disk_bytes = False, 0
        for base in on_disk:
            rec = self.records.get(base)
            if rec is None or not rec.materialized:
                self._adopt(base, rec)
        self.cache_bytes = sum(r.disk_bytes for r in self.records.values() if r.materialized)
        log.info(
            "cache %s: %d paths known, %d materialised, %d bytes",
            self.cache_dir, len(self.records),
            sum(r.materialized for r in self.records.values()), self.cache_bytes,
        )

    def _adopt(self, base: str, rec: Record | None) -> None:
        try:
            StorePath.from_basename(base)
        except FormatError:
            log.info("removing %s from the cache: not a store path", base)
            fsio.remove_tree(self.data_dir / base)
            return
        try:
            scanned = _scan(self.data_dir / base)
        except StoreError as exc:
            log.info("removing %s from the cache: %s", base, exc)
            fsio.remove_tree(self.data_dir / base)
            self.records.pop(base, None)
            return
        rec = rec or self.records.setdefault(base, Record())
        self._fill(rec, *scanned)

    def _fill(self, rec: Record, node: Node, usage: int) -> None:
        rec.tree, rec.tree_verified = node, True
        rec.materialized, rec.disk_bytes = True, usage
        rec.last_used = time.time()

    async def _saver(self) -> None:
        while True:
            await self._dirty.wait()
            await trio.sleep(SAVE_DELAY)
            self._dirty = trio.Event()
            await self._save()

    async def _save(self) -> None:
        snapshot = dict(self.records)
        try:
            await trio.to_thread.run_sync(index.save, self.index_file, snapshot)
        except OSError as exc:  # the index can be rebuilt from store/: keep serving
            if not self._save_failed:  # one line for the fault, not one per save
                log.warning("cannot write the cache index %s: %s (said once until it "
                            "can)", self.index_file, exc.strerror or exc)
            self._save_failed = True
            return
        except Exception:  # a bug in encoding a record must not end the daemon either
            log.exception("cannot write the cache index %s (unexpected error; "
                          "it is rebuilt from store/ at the next start)", self.index_file)
        else:
            if self._save_failed:
                log.info("wrote the cache index %s again", self.index_file)
            self._save_failed = False

    async def _final_save(self) -> None:
        with trio.CancelScope(shield=True):
            await self._save()

    def _changed(self) -> None:
        self._dirty.set()

    # -- single flight ----------------------------------------------------

    async def _single(self, kind: str, key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        assert self._flights is not None, "LocalStore used outside its context"
        return await self._flights.run((kind, key), lambda: _store_errors(kind, key, fn))

    def _fetching(self, base: str) -> bool:
        return self._flights is not None and ("fetch", base) in self._flights

    @property
    def in_flight(self) -> int:
        keys = self._flights.keys() if self._flights is not None else []
        return sum(1 for kind, _ in keys if kind == "fetch")  # type: ignore[misc]

    # -- lookups ----------------------------------------------------------

    async def lookup(self, base: str, index: bool = True) -> Record | None:
        """The record of store path *base*, asking the substituters once (and,
        with *index*, its file index at the same time: its tree and reads
        follow a lookup; a fetch of the whole NAR does not need it)."""
        rec = self.records.get(base)
        if rec is not None:
            return rec
        if base in self._negative:
            return None
        try:
            sp = StorePath.from_basename(base)
        except FormatError:
            return None
        try:
            await self._single("query", base, lambda: self._query(sp, index))
        except PathNotFound:
            return None
        return self.records[base]

    async def _query(self, sp: StorePath, index: bool) -> NarInfo:
        self.events.record("narinfo", sp.basename)
        if index:
            self.subs.expect_index(sp)
        info = await self.subs.query(sp)  # its errors: mapped by _store_errors
        self.events.record("narinfo-done", sp.basename, size=-1 if info is None else info.nar_size)
        if info is None:
            self._negative[sp.basename] = True
            raise PathNotFound(f"{sp.basename} is in none of the substituters")
        self._narinfos[sp.basename] = info
        rec = self.records.setdefault(sp.basename, Record())
        rec.nar_size = int(info.nar_size)
        rec.references = tuple(info.references)
        self._changed()
        if self.resolve_references and len(info.references) <= REFERENCES_AHEAD:
            ahead = [r for r in info.references if r not in self.records
                     and r not in self._negative and ("query", r) not in self._flights]
            if ahead:
                self.resolve_soon(ahead)
        return info

    async def _narinfo(self, base: str, index: bool = False) -> NarInfo:
        """The narinfo of known path *base*: the one its lookup got, if still held."""
        info = self._narinfos.get(base)
        if info is None:
            info = await self._single(
                "query", base, lambda: self._query(StorePath.from_basename(base), index))
        return info

    async def require(self, base: str, index: bool = True) -> Record:
        rec = await self.lookup(base, index)
        if rec is None:
            raise PathNotFound(f"{base} is in none of the substituters")
        return rec

    async def tree(self, base: str) -> Node:
        """The metadata tree of *base*: its file index's or the listing's, else fetched."""
        rec = await self.require(base)
        if rec.tree is None:
            await self._learn_tree(base, rec)
        if rec.tree is None:
            await self.materialize(base)
        assert rec.tree is not None
        return rec.tree

    async def _learn_tree(self, base: str, rec: Record, index: bool = True) -> None:
        """*base*'s tree from its signed file index (with *index*), else its
        listing (no NAR)."""
        indexed = await self.file_index(base) if index else None
        if indexed is not None and rec.tree is None:
            # thousands of files take milliseconds: not on the trio thread (FUSE waits)
            node = await trio.to_thread.run_sync(_index_tree, base, indexed.index)
            if rec.tree is None:
                rec.tree = node
                self._changed()
        if rec.tree is None:
            await self._single("listing", base, lambda: self._load_listing(base))

    async def _load_listing(self, base: str) -> None:
        info = await self._narinfo(base)
        self.events.record("listing", base)
        try:
            doc = await self.subs.listing(info)
        except LazystoreError as exc:
            log.info("no listing for %s (%s); fetching it instead", base, exc)
            return
        finally:
            self.events.record("listing-done", base)
        if doc is None:
            return
        try:
            node = tree.from_listing(doc)
        except StoreError as exc:
            log.warning("ignoring the listing of %s: %s", base, exc)
            return
        rec = self.records[base]
        if rec.tree is None:
            rec.tree = node
            self._changed()

    # -- file indexes: chunk-granular reads (lazystore cache index) ---------

    async def file_index(self, base: str) -> IndexedPath | None:
        """The trusted file index of *base* while its data is not here, when
        its cache offers one (asked once per path)."""
        rec = await self.require(base)
        if rec.materialized:
            return None
        if base in self._indexed:
            return self._indexed[base]
        found: IndexedPath | None = await self._single(
            "index", base, lambda: self._load_index(base))
        return found

    async def _load_index(self, base: str) -> IndexedPath | None:
        info = await self._narinfo(base, index=True)
        try:
            index = await self.subs.file_index(info)
        except VerificationError as exc:
            self._index_failed(base, exc)
            return None
        except LazystoreError as exc:  # cannot ask now: not remembered
            log.info("no file index for %s this time: %s", base, exc)
            return None
        found = None if index is None else await trio.to_thread.run_sync(
            IndexedPath.of, index, info)
        if found is not None:
            self.copies.learn(base, found)
        self._indexed[base] = found
        return found

    def _index_failed(self, base: str, exc: Exception) -> None:
        """From now on *base* is read as a whole NAR; said once."""
        if self._indexed.get(base, False) is not None:
            log.warning("%s; reading %s as a whole NAR instead", exc, base)
        self._indexed[base] = None

    async def open_indexed(self, base: str, rel: tuple[str, ...]) -> FileEntry | None:
        """File *rel* of *base* when it can be read chunk by chunk (its chunks
        pinned until :meth:`close_indexed`); None: read the materialised path."""
        indexed = await self.file_index(base)
        entry = None if indexed is None else indexed.files.get(rel)
        if entry is not None:
            self.chunks.pin(c.sha256 for c in entry.chunks)
        return entry

    async def indexed_target(self, base: str, rel: tuple[str, ...]) -> str | None:
        """The target of symlink *rel* of *base* from its signed file index, if it has one."""
        indexed = await self.file_index(base)
        return None if indexed is None else indexed.targets.get(rel)

    def close_indexed(self, entry: FileEntry) -> None:
        self.chunks.unpin(c.sha256 for c in entry.chunks)

    async def read_indexed(self, base: str, entry: FileEntry, offset: int, size: int
                           ) -> bytes | None:
        """Bytes [offset, offset+size) of *entry* (from :meth:`open_indexed`),
        each from a chunk verified against the signed index; None when the
        index failed (bad chunk, a server without Range): read the whole NAR."""
        indexed = self._indexed.get(base)
        if indexed is None:
            return None
        end = min(entry.size, offset + size)
        if offset >= end:
            return b""
        wanted = indexed.chunks_for(entry, offset, end)
        for chunk in wanted:
            if chunk.sha256 not in self._chunks_read:
                self._chunks_read.add(chunk.sha256)
                self.chunk_bytes_read += chunk.length
        pieces = [self.chunks.read(c.sha256, *_span(c, offset, end)) for c in wanted]
        if None in pieces:
            pieces = [p if p is not None else await self._read_copy(c, offset, end)
                      for c, p in zip(wanted, pieces, strict=True)]
        missing = [c for c, piece in zip(wanted, pieces, strict=True) if piece is None]
        ahead_of_us = {self._ahead[c.sha256] for c in missing if c.sha256 in self._ahead}
        if ahead_of_us:  # another read or a prefetch is fetching them: wait, not fetch twice
            for arrived in ahead_of_us:
                await arrived.wait()
            pieces = [p if p is not None else self.chunks.read(c.sha256, *_span(c, offset, end))
                      for c, p in zip(wanted, pieces, strict=True)]
            missing = [c for c, piece in zip(wanted, pieces, strict=True) if piece is None]
        moved = self._moved(base, indexed, entry, wanted)
        if missing:
            self._read_ahead(base, indexed, self._ahead_of(indexed, entry, missing, moved))
            fetched = await self._fetch_once(base, indexed, missing)
            if fetched is None:
                return None
            pieces = [p if p is not None else _cut(fetched[c], c, offset, end)
                      for c, p in zip(wanted, pieces, strict=True)]
        return b"".join(pieces)  # type: ignore[arg-type]

    def _moved(self, base: str, indexed: IndexedPath, entry: FileEntry,
               wanted: tuple[Chunk, ...]) -> bool:
        """Whether this read of *entry* starts in another chunk than the one
        its last read ended in: the program goes on to a second chunk of the
        file, and will likely read the rest (a program mapping a binary or a
        library faults its pages in all over it; a sequential reader goes on)."""
        key = (base, entry.path)
        last = self._last_chunk.get(key)
        first = wanted[0].start // indexed.index.chunk_size
        self._last_chunk[key] = first + len(wanted) - 1
        return last is not None and first != last

    def _ahead_of(self, indexed: IndexedPath, entry: FileEntry, missing: list[Chunk],
                  moved: bool) -> list[Chunk]:
        """What a read that misses *missing* of *entry* fetches ahead of use:
        when it *moved* to another chunk of a file of at most FILE_AHEAD
        compressed bytes, the rest of the file (from the chunk after the
        read's, then those before it), else the chunks after its last one (the
        next files in NAR order: a start-up reads neighbours; at most
        ``read_ahead`` bytes) and those before its first (``read_behind``)."""
        if moved and sum(c.length for c in entry.chunks) <= FILE_AHEAD:
            at = entry.chunks.index(missing[-1]) + 1
            candidates = [*entry.chunks[at:], *entry.chunks[:at]]
        else:
            behind = indexed.preceding(missing[0], self.read_behind) if self.read_ahead else []
            candidates = indexed.following(missing[-1], self.read_ahead) + behind
        mine = {c.sha256 for c in missing}
        return [c for c in candidates if c.sha256 not in mine and not self.chunks.has(c.sha256)
                and c.sha256 not in self._ahead and self._copy_path(c) is None]

    def _read_ahead(self, base: str, indexed: IndexedPath, ahead: list[Chunk]) -> None:
        """Fetch *ahead* in the background, in requests of their own (a
        reader waits only for its own chunks), each marked as under way in
        ``_ahead`` until it is held, so a read of one meanwhile waits for it."""
        if not ahead:
            return
        arrived = trio.Event()
        self._ahead.update((c.sha256, arrived) for c in ahead)

        async def fetch() -> None:
            try:
                await self._single(
                    "chunks", f"{base}@{','.join(str(c.offset) for c in ahead)} (ahead)",
                    lambda: self._fetch_chunks(base, indexed, [], ahead))
            except StoreError:
                pass  # logged once; a reader of one of them fetches it itself
            finally:
                self._arrived(ahead, arrived)

        assert self._nursery is not None, "LocalStore used outside its context"
        self._nursery.start_soon(fetch)

    def _arrived(self, chunks: list[Chunk], arrived: trio.Event) -> None:
        for chunk in chunks:
            if self._ahead.get(chunk.sha256) is arrived:
                del self._ahead[chunk.sha256]
        arrived.set()

    async def _fetch_once(self, base: str, indexed: IndexedPath, missing: list[Chunk]
                          ) -> dict[Chunk, bytes] | None:
        """Fetch *missing* (a read's), each marked as under way in ``_ahead``
        until then, so that concurrent reads (the kernel reads a file in
        several requests at once) wait for it instead of fetching it again."""
        arrived = trio.Event()
        mine = [c for c in missing if c.sha256 not in self._ahead]
        self._ahead.update((c.sha256, arrived) for c in mine)
        try:
            fetched: dict[Chunk, bytes] | None = await self._single(
                "chunks", f"{base}@{','.join(str(c.offset) for c in missing)}",
                lambda: self._fetch_chunks(base, indexed, missing))
        finally:
            self._arrived(mine, arrived)
        return fetched

    def _copy_path(self, chunk: Chunk) -> tuple[Path, int, bool] | None:
        """(file, offset of *chunk* in it, checked) in a materialised path
        whose index had the same chunk, if one does."""
        found = self.copies.find(chunk.sha256)
        if found is None:
            return None
        copy, checked = found
        rec = self.records.get(copy.base)
        if rec is None or not rec.materialized:
            return None
        return self.data_path(copy.base).joinpath(*copy.rel), copy.start, checked

    async def _read_copy(self, chunk: Chunk, offset: int, end: int) -> bytes | None:
        """Bytes [offset, end) of *chunk* from a materialised path holding the
        same chunk (an earlier version's: content addressed), read and checked
        against its sha256 the first time; None: no such copy, fetch it."""
        where = self._copy_path(chunk)
        if where is None:
            return None
        path, start, checked = where
        at, length = _span(chunk, offset, end)
        if checked:
            data = read_copy(path, start, chunk, at, length, check=False)
        else:
            data = await trio.to_thread.run_sync(read_copy, path, start, chunk, at, length, True)
        if not checked or data is None:
            self.copies.checked(chunk.sha256, data is not None)
        if data is not None and not checked:
            self.chunks_from_copies += 1
        return data

    async def _fetch_chunks(self, base: str, indexed: IndexedPath, missing: list[Chunk],
                            ahead: list[Chunk] | None = None) -> dict[Chunk, bytes] | None:
        """Fetch *missing* and *ahead* (read ahead of use), all kept in the
        chunk cache; *missing* are written before this returns, *ahead* are
        held in memory and written once the fetches pause (WRITE_QUIET)."""
        self._fetches += 1
        try:
            fetched = await self.subs.read_chunks(indexed.info, indexed.index,
                                                  missing + (ahead or []))
        except VerificationError as exc:
            self._index_failed(base, exc)
            return None
        finally:
            self._fetches -= 1
            self._last_fetch = trio.current_time()
        now = {c.sha256: fetched[c] for c in missing}  # equal chunks: one file
        later = {c.sha256: fetched[c] for c in ahead or [] if c.sha256 not in now}
        self.chunks.hold(later)
        failed = await self.chunks.put(now)
        if failed:  # the disk refuses: the rest is not tried, one line for the read
            self.chunks.release(later)
            self._not_kept(base, len(failed) + len(later), len(now) + len(later), failed[0])
        elif later:
            self._unwritten.setdefault(base, {}).update(later)
            self._unwritten_bytes += sum(len(data) for data in later.values())
            self._write_wanted.set()
            if self._unwritten_bytes >= WRITE_HELD:
                self._write_now.set()
        await self._chunks_kept(base)
        return fetched

    async def _writer(self) -> None:
        """Write the chunks read ahead once no chunk has been fetched for
        WRITE_QUIET seconds (or WRITE_HELD bytes of them wait)."""
        while True:
            await self._write_wanted.wait()
            while not self._write_now.is_set() and (wait := self._quiet_in()) > 0:
                with trio.move_on_after(wait):
                    await self._write_now.wait()
            await self._write_held()

    def _quiet_in(self) -> float:
        """Seconds until no chunk will have been fetched for WRITE_QUIET."""
        if self._fetches:
            return WRITE_QUIET
        return self._last_fetch + WRITE_QUIET - trio.current_time()

    async def _write_held(self) -> None:
        while self._unwritten:
            held, self._unwritten, self._unwritten_bytes = self._unwritten, {}, 0
            self._write_wanted, self._write_now = trio.Event(), trio.Event()
            for base, chunks in held.items():
                await self._keep(base, chunks)

    async def _keep(self, base: str, chunks: dict[bytes, bytes]) -> None:
        """Write chunks of *base* read ahead (held until then)."""
        failed = await self.chunks.put(chunks)
        if failed:  # a reader's own chunks say it as a warning (one line per read)
            self._not_kept(base, len(failed), len(chunks), failed[0], logging.INFO)
        await self._chunks_kept(base)

    def _not_kept(self, base: str, failed: int, count: int, exc: OSError,
                  level: int = logging.WARNING) -> None:
        log.log(level, "cannot keep %d of %d chunks of %s in %s: %s", failed, count, base,
                self.chunks.directory, exc.strerror or exc)

    async def _chunks_kept(self, base: str) -> None:
        if self.verify_complete and self._complete(base) is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self._verify_complete, base)
        await self._enforce_quota()

    async def _verify_complete(self, base: str) -> None:
        rec = self.records.get(base)
        if rec is None or rec.materialized or self._fetching(base):
            return
        try:  # from the chunks only, never a NAR
            await self._single("fetch", base, lambda: self._fetch(base, rec, whole=False))
            if rec.materialized and self.direct is not None:
                self.direct.materialized(base)
        except StoreError as exc:
            log.info("%s is complete, but not materialised: %s", base, exc)

    # -- data -------------------------------------------------------------

    def data_path(self, base: str) -> Path:
        return self.data_dir / base

    async def materialize(self, base: str) -> Path:
        """Make *base*'s verified data present in ``store/``; return its path."""
        rec = await self.require(base, index=False)
        if rec.materialized and not os.path.lexists(self.data_path(base)):
            log.warning("%s vanished from the cache directory; fetching it again", base)
            rec.materialized = False
            self.cache_bytes -= rec.disk_bytes
            rec.disk_bytes = 0
        if rec.materialized:
            self.hits += 1
            rec.last_used = time.time()
        else:
            self.misses += 1
            started = trio.current_time()
            try:
                await self._single("fetch", base, lambda: self._fetch(base, rec))
                if not rec.materialized:  # joined an assembly that could not finish
                    await self._single("fetch", base, lambda: self._fetch(base, rec))
            finally:
                self.wait_seconds.observe(trio.current_time() - started)
        if self.direct is not None:
            self.direct.materialized(base)
        return self.data_path(base)

    async def _fetch(self, base: str, rec: Record, whole: bool = True) -> None:
        """Materialise *base*: adopted from ``store/``, assembled from its
        chunks when all are here, else (with *whole*) from its NAR."""
        dest = self.data_path(base)
        if os.path.lexists(dest):  # put there behind the index: adopt it as at start
            try:
                node, usage = await trio.to_thread.run_sync(_scan, dest)
            except StoreError:
                await trio.to_thread.run_sync(fsio.remove_tree, dest)
                raise
        else:
            found = await self._assembled(base)
            if found is None and not whole:
                return
            node, usage = found or await self._substitute(base)
        hint = rec.tree if not rec.tree_verified else None
        self._fill(rec, node, usage)
        self._narinfos.pop(base, None)
        if hint is not None and hint != rec.tree:
            log.warning("the listing of %s disagrees with its verified NAR; using the NAR", base)
        self.cache_bytes += rec.disk_bytes
        log.info("materialised %s (%d bytes on disk)", base, rec.disk_bytes)
        self._changed()
        await self._enforce_quota(keep=base)

    def _complete(self, base: str) -> IndexedPath | None:
        """*base*'s index when every chunk of it is in the chunk cache."""
        indexed = self._indexed.get(base)
        if indexed is None or not all(self.chunks.has(c.sha256) for c in indexed.by_offset):
            return None
        return indexed

    async def _assembled(self, base: str) -> tuple[Node, int] | None:
        """*base* put into ``store/`` from its chunks when every one is here
        (no NAR fetched), its NAR checked against NarHash on the way; None
        when it is not complete. A NAR that does not match: one warning, and
        the path goes the whole-NAR way from then on."""
        indexed = self._complete(base)
        if indexed is None:
            return None
        sink = StoreSink(base, self.tmp_dir, self.data_dir)
        try:
            await trio.to_thread.run_sync(assemble, indexed, self.chunks, sink)
        except (Incomplete, CacheFullError):  # the whole NAR then (it makes room)
            return None
        except VerificationError as exc:
            self._index_failed(base, exc)
            return None
        assert sink.tree is not None
        self.events.record("assembled", base, size=indexed.info.nar_size)
        log.info("assembled %s from its chunks (NarHash verified)", base)
        return sink.tree, sink.disk_bytes

    async def _substitute(self, base: str) -> tuple[Node, int]:
        """Fetch *base* into ``store/`` through StoreSinks; its tree and footprint.
        When the cache's file system is full, least recently used paths are
        evicted to make room and the fetch tried again, until nothing more can go."""
        info = await self._narinfo(base)
        evicted = 0
        while True:
            try:
                return await self._substitute_once(base, info)
            except CacheFullError as exc:
                made = await self._make_room(base, self._room_for(base, info))
                if not made:
                    raise await self._no_room(base, info, evicted, exc.reason) from None
                evicted += made

    def _room_for(self, base: str, info: NarInfo) -> int:
        """Bytes *base* takes unpacked, as well as is known before it is."""
        hint = self.records[base].tree
        return max(info.nar_size, tree.footprint(hint) if hint is not None else 0)

    async def _make_room(self, base: str, need: int) -> int:
        """Evict least recently used paths (never *base*, a pinned one or one
        in use below its bind) until the cache's file system has *need* bytes
        free; at least one, since *need* did not fit. How many went (0: none
        could, or *need* is more than the file system holds)."""
        total, free = await trio.to_thread.run_sync(_space, self.data_dir)
        if need > total:
            return 0
        evicted = 0
        for victim in self._evictable(keep=base):
            if evicted and free >= need:
                break
            if await self._evict_one(victim):
                evicted += 1
                free = (await trio.to_thread.run_sync(_space, self.data_dir))[1]
        if evicted:
            log.info("evicted %s to make room for %s (%d bytes, %d free now)",
                     _paths(evicted), base, need, free)
        return evicted

    async def _no_room(self, base: str, info: NarInfo, evicted: int,
                       reason: str) -> CacheFullError:
        """The one error of a path that does not fit (its reader's log line)."""
        total, free = await trio.to_thread.run_sync(_space, self.data_dir)
        why = ("the NAR is larger than the whole file system" if self._room_for(base, info) > total
               else f"{_paths(evicted)} evicted for it, the rest is in use" if evicted
               else "nothing in it can be evicted (in use, or nothing else there)")
        return CacheFullError(
            f"no room for {base} in the cache {self.cache_dir} ({reason}): {free} bytes "
            f"free on its file system of {total}, the NAR is {info.nar_size} bytes; {why}",
            reason)

    async def _substitute_once(self, base: str, info: NarInfo) -> tuple[Node, int]:
        sinks: list[StoreSink] = []

        def open_sink(_: NarInfo) -> NarSink:
            sinks.append(StoreSink(base, self.tmp_dir, self.data_dir))
            return sinks[-1]

        # A substituter's error is mapped by _store_errors; a StoreSink's is
        # a StoreError already (the cache directory's trouble).
        self.events.record("nar", base, size=info.nar_size)
        try:
            await self.subs.fetch(info, open_sink)
        except BaseException:
            self.events.record("nar-failed", base)
            raise
        self.events.record("nar-done", base, size=info.nar_size)
        done = sinks[-1]  # only the attempt that verified was finished
        assert done.tree is not None, "fetch returned without finishing a sink"
        return done.tree, done.disk_bytes

    def pin(self, base: str) -> None:
        self._pins[base] += 1

    def unpin(self, base: str) -> None:
        self._pins[base] -= 1
        if self._pins[base] <= 0:
            del self._pins[base]

    def pinned(self, base: str) -> bool:
        return self._pins[base] > 0

    def touch(self, base: str) -> None:
        rec = self.records.get(base)
        if rec is not None:
            rec.last_used = time.time()

    # -- quota and eviction -----------------------------------------------

    def _evictable(self, keep: str | None = None) -> list[str]:
        """Materialised, unpinned paths, least recently used first."""
        cands = [
            (r.last_used, b) for b, r in self.records.items()
            if r.materialized and b != keep and not self.pinned(b)
            and not self._fetching(b)
        ]
        return [b for _, b in sorted(cands)]

    @property
    def used_bytes(self) -> int:
        """What counts toward the quota: materialised paths and cached chunks."""
        return self.cache_bytes + self.chunks.bytes

    async def _enforce_quota(self, keep: str | None = None) -> None:
        """Evict until paths and chunks together fit the quota, least recently
        used first across both; never *keep*, a path in use or a chunk of an
        open file."""
        limit = self.cache_limit
        if limit is None or self.used_bytes <= limit:
            return
        paths = iter(self._evictable(keep))
        path = next(paths, None)
        while self.used_bytes > limit:
            older = None if path is None else self.records[path].last_used
            victims = self.chunks.victims(self.used_bytes - limit, older)
            if victims:
                await self.chunks.drop(victims)
            elif path is None:
                log.info("cache holds %d bytes (%d of chunks) over its limit of %d: the "
                         "rest is in use", self.used_bytes, self.chunks.bytes, limit)
                return
            else:
                await self._evict_one(path)
                path = next(paths, None)

    async def _evict_one(self, base: str) -> bool:
        """Evict *base* (materialised, unpinned, not being fetched); False if it
        is in use outside the Vfs after all (a reader below its bind) or became
        used while that was asked."""
        rec = self.records[base]
        if self.direct is not None and not await self.direct.release(base):
            return False
        if not rec.materialized or self.pinned(base) or self._fetching(base):
            return False  # used (or gone) since the candidates were chosen
        grave: Path | None = self.tmp_dir / f"evict-{uuid.uuid4().hex}"
        try:
            os.rename(self.data_path(base), grave)  # atomic: never half a path in store/
        except FileNotFoundError:
            log.warning("%s vanished from the cache directory", base)
            grave = None
        rec.materialized = False
        self.cache_bytes -= rec.disk_bytes
        rec.disk_bytes = 0
        self._changed()
        self.evictions += 1
        log.info("evicted %s", base)
        if grave is not None:
            await trio.to_thread.run_sync(fsio.remove_tree, grave)
        return True

    async def evict(self, paths: list[str]) -> list[str]:
        """Evict the data of *paths* (all evictable when empty); pinned ones stay."""
        bases = [self.parse(p).basename for p in paths] if paths else self._evictable()
        evicted = []
        for base in bases:
            rec = self.records.get(base)
            if rec is None or not rec.materialized or self.pinned(base):
                continue
            if self._fetching(base):
                continue
            if await self._evict_one(base):
                evicted.append(base)
        return evicted

    # -- prefetch, closures, status --------------------------------------

    async def closure(self, paths: list[str]) -> list[str]:
        """Basenames of the closure of *paths* (store paths or basenames)."""
        sps = [self.parse(p) for p in paths]
        try:
            infos = await self.subs.closure(sps)
        except LazystoreError as exc:
            raise StoreError(str(exc)) from None
        return [_basename(str(i.store_path)) for i in infos]

    def parse(self, path: str) -> StorePath:
        try:
            if "/" in path:
                return StorePath.parse(path, store_dir=self.store_dir)
            return StorePath.from_basename(path)
        except FormatError as exc:
            raise StoreError(str(exc)) from None

    async def prefetch(self, paths: list[str], closure: bool = False) -> list[str]:
        bases = await self.closure(paths) if closure else [self.parse(p).basename for p in paths]
        await _each(bases, self.materialize, PREFETCH_PARALLEL)
        return bases

    async def require_all(self, bases: list[str]) -> None:
        """:meth:`require` every one of *bases*, their narinfo queries in parallel."""
        await _each(bases, self.require, QUERY_PARALLEL)

    def resolve_soon(self, bases: list[str]) -> None:
        """Learn the narinfos and trees of *bases* in the background (a task of
        the store's nursery, *BACKGROUND_PARALLEL* at once for all of the
        store's background learning): each file index is asked with its
        narinfo, a listing as soon as the narinfo arrives (caches without
        indexes); no NAR is fetched. A reader of
        one of them meanwhile waits only for that one (the same flights);
        failures are the reader's to see, here they are only logged."""
        assert self._nursery is not None, "LocalStore used outside its context"
        self._nursery.start_soon(self._resolve, bases)

    async def _resolve(self, bases: list[str]) -> None:
        async def hint(base: str) -> None:
            async with self._background:
                await self._hint(base)

        try:
            await _each(bases, hint, max(len(bases), 1))
        except StoreError as exc:
            log.info("resolving %d store paths: %s", len(bases), exc)

    def prefetch_soon(self, bases: list[str], why: str = "", then: list[str] | None = None,
                      files: dict[str, list[str]] | None = None) -> None:
        """:meth:`prefetch_in_order` (with *files*) in the background (a task of
        the store's nursery), and after it *then* at low priority
        (``--background-fetch``: BACKGROUND_FETCH_PARALLEL at once); failures
        are only logged (a reader sees its own)."""
        assert self._nursery is not None, "LocalStore used outside its context"
        self._nursery.start_soon(self._prefetch_soon, bases, why, then or [], files)

    async def _prefetch_soon(self, bases: list[str], why: str, then: list[str],
                             files: dict[str, list[str]] | None) -> None:
        for paths, parallel, only in ((bases, PROFILE_PARALLEL, files),
                                      (then, BACKGROUND_FETCH_PARALLEL, None)):
            try:
                await self.prefetch_in_order(paths, why, parallel, files=only)
            except StoreError as exc:
                log.info("prefetching %d store paths ahead of use: %s", len(paths), exc)

    async def prefetch_in_order(self, bases: list[str], why: str = "",
                                parallel: int = PROFILE_PARALLEL,
                                files: dict[str, list[str]] | None = None) -> None:
        """Materialise *bases* (an access profile's), started in their order,
        *parallel* at once; with *files* (base -> the profile's files of it),
        a path with a file index gets only those files' chunks instead. A
        reader of any path meanwhile does not queue behind them (its fetch is
        a flight of its own, or joins theirs). *why* names the view (or "" for
        the root) in the event log."""
        async def one(base: str) -> None:
            self.events.record("profile", base, view=why)
            if files is None or base not in files or not await self.prefetch_files(
                    base, files[base]):
                await self.materialize(base)

        await _in_order(bases, one, parallel)

    async def prefetch_files(self, base: str, rels: list[str]) -> bool:
        """Fetch the chunks of files *rels* of *base* (a profile's reads, in
        order) when it has a file index, in groups of adjacent chunks, a few at
        once; readers of them meanwhile wait for their group instead of asking
        again. False: no index, materialise the path instead."""
        indexed = await self.file_index(base)
        if indexed is None:
            return False
        wanted: list[Chunk] = []
        for rel in rels:
            entry = indexed.files.get(tuple(rel.split("/")) if rel else ())
            wanted += [] if entry is None else [
                c for c in entry.chunks if not self.chunks.has(c.sha256)
                and c.sha256 not in self._ahead and self._copy_path(c) is None]
        first = {c: at for at, c in reversed(list(enumerate(wanted)))}  # profile order
        groups: list[list[Chunk]] = []
        for chunk in sorted(first, key=lambda c: c.offset):
            group = groups[-1] if groups else None
            if (group is None or group[-1].offset + group[-1].length != chunk.offset
                    or sum(c.length for c in group) + chunk.length > PROFILE_GROUP):
                groups.append([chunk])
            else:
                group.append(chunk)
        groups.sort(key=lambda g: min(first[c] for c in g))
        events = [trio.Event() for _ in groups]
        for group, arrived in zip(groups, events, strict=True):
            self._ahead.update((c.sha256, arrived) for c in group)

        def done(at: int) -> None:
            for c in groups[at]:
                if self._ahead.get(c.sha256) is events[at]:
                    del self._ahead[c.sha256]
            events[at].set()

        async def fetch(at: int, limiter: trio.CapacityLimiter) -> None:
            try:
                await self._fetch_chunks(base, indexed, groups[at])
            finally:
                done(at)
                limiter.release_on_behalf_of(at)

        try:
            limiter = trio.CapacityLimiter(PROFILE_GROUPS_PARALLEL)
            async with trio.open_nursery() as nursery:
                for at in range(len(groups)):  # started in the profile's order
                    await limiter.acquire_on_behalf_of(at)
                    nursery.start_soon(fetch, at, limiter)
        finally:
            for at in range(len(groups)):
                done(at)
        return True

    async def _hint(self, base: str) -> None:
        """Learn *base*'s narinfo, then its file index (if small: see
        INDEX_AHEAD; the tree from it) or listing, so that a first read
        waits for neither."""
        rec = await self.require(base, index=False)
        whole = False
        if not rec.materialized and base not in self._indexed:
            try:
                whole = await self.subs.index_ahead(await self._narinfo(base), INDEX_AHEAD,
                                                    INDEX_WHOLE)
            except LazystoreError as exc:  # the reader asks again, and sees it
                log.info("learning the file index of %s ahead: %s", base, exc)
        if rec.tree is None:
            await self._learn_tree(base, rec, index=whole)
        elif whole:
            await self.file_index(base)  # no request: its bytes are here

    async def read_small_file(self, base: str, rel: str, limit: int = 64 << 20) -> bytes:
        """Contents of file *rel* inside store path *base* (fetched if needed)."""
        self.pin(base)
        try:
            root = await self.materialize(base)
            path = root / rel
            if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
                raise StoreError(f"{base}/{rel} is not a regular file")
            return await trio.to_thread.run_sync(path.read_bytes)
        finally:
            self.unpin(base)

    def status(self) -> dict[str, Any]:
        stats = getattr(self.subs, "stats", None)
        materialized = sorted(b for b, r in self.records.items() if r.materialized)
        return {
            "cache_dir": str(self.cache_dir),
            "cache_bytes": self.cache_bytes,
            "cache_limit": self.cache_limit,
            "paths_known": len(self.records),
            "paths_materialized": materialized,
            "in_flight": self.in_flight,
            "bytes_downloaded": int(getattr(stats, "bytes_downloaded", 0)),
            "chunk_bytes": int(getattr(stats, "chunk_bytes", 0)),
            "chunk_cache_bytes": self.chunks.bytes,
            "chunk_bytes_read": self.chunk_bytes_read,
            "chunks_from_copies": self.chunks_from_copies,
            "nars_fetched": int(getattr(stats, "nars_fetched", 0)),
            **(stats.figures() if hasattr(stats, "figures") else {}),
            "wait_seconds": self.wait_seconds.to_dict(),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "pinned": sorted(self._pins),
        }


def _span(chunk: Chunk, offset: int, end: int) -> tuple[int, int]:
    """(offset in the chunk, length) of the bytes of [offset, end) it holds."""
    start = max(offset, chunk.start)
    return start - chunk.start, min(end, chunk.start + chunk.size) - start


def _cut(data: bytes, chunk: Chunk, offset: int, end: int) -> bytes:
    at, length = _span(chunk, offset, end)
    return data[at:at + length]


def _flight_cancelled(key: Any) -> StoreError:
    kind, name = key
    return StoreError(f"{kind} of {name} was cancelled (the store is closing)")


async def _store_errors(kind: str, key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a flight's work, its failure mapped once to a StoreError (whoever
    waits reports it: EIO, a control error) and logged once. The messages of
    the substituter's errors name the path already."""
    try:
        return await fn()
    except PathNotFound:
        raise
    except StoreError as exc:
        log.info("%s of %s failed: %s", kind, key, exc)
        raise
    except LazystoreError as exc:
        log.info("%s of %s failed: %s", kind, key, exc)
        raise StoreError(str(exc)) from None
    except OSError as exc:
        log.warning("%s of %s failed: %s", kind, key, exc)
        raise StoreError(f"{key}: {exc.strerror or exc}") from None
    except Exception as exc:  # a bug below must not end the daemon
        log.exception("%s of %s failed unexpectedly", kind, key)
        raise StoreError(f"{kind} of {key} failed: {exc!r}") from None


def _paths(n: int) -> str:
    return f"{n} path" if n == 1 else f"{n} paths"


def _space(path: Path) -> tuple[int, int]:
    """(size, bytes free to us) of the file system holding *path*."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _index_tree(base: str, index: FileIndex) -> Node:
    builder = tree.TreeBuilder(f"the file index of {base}")
    builder.add(index.events())
    return builder.tree()


def _scan(path: Path) -> tuple[Node, int]:
    """Tree and footprint of a path found in ``store/`` (at start, or put
    there behind the index); fetched paths get theirs from the NAR."""
    node = tree.from_disk(path)
    return node, tree.footprint(node)


async def _in_order(bases: list[str], fn: Callable[[str], Awaitable[Any]],
                    parallel: int) -> None:
    """As :func:`_each`, the bases started strictly in their order (workers
    taking the next one), not as the scheduler happens to run tasks."""
    todo = iter(bases)
    errors: list[str] = []

    async def worker() -> None:
        for base in todo:
            try:
                await fn(base)
            except StoreError as exc:
                errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(min(parallel, len(bases))):
            nursery.start_soon(worker)
    _raise_first(errors)


async def _each(bases: list[str], fn: Callable[[str], Awaitable[Any]], parallel: int) -> None:
    """Run *fn* on every base, at most *parallel* at once; report every failure."""
    limiter = trio.CapacityLimiter(parallel)
    errors: list[str] = []

    async def one(base: str) -> None:
        async with limiter:
            try:
                await fn(base)
            except StoreError as exc:
                errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for base in bases:
            nursery.start_soon(one, base)
    _raise_first(errors)


def _raise_first(errors: list[str]) -> None:
    if errors:
        raise StoreError(errors[0] + (f" (and {len(errors) - 1} more)" if errors[1:] else ""))
