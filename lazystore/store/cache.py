"""The local cache of store paths: index, single-flight materialisation, quota.

Layout of the cache directory::

    store/<hash>-<name>   materialised (verified, unpacked) store paths
    tmp/                  the substituter's unpack directories; evictions in
                          progress. Cleared at every start.
    index                 the cache index (see lazystore.store.index)

A path is in ``store/`` only once its NAR verified (the substituter renames it
there), so after a crash anything in ``store/`` is whole: the start adopts
such paths and clears ``tmp/``. Concurrency protocol (one trio thread):
every fetch and every narinfo query runs at most once at a time per path (a
*flight* owned by the store's nursery, so a waiter that goes away never
cancels the fetch for the others); waiters get the flight's result or a fresh
StoreError with its message. Paths pinned (open files, views) are never
evicted.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import trio

from lazystore.errors import FormatError, LazystoreError, StoreError
from lazystore.nix import fsio
from lazystore.nix.storepath import StorePath
from lazystore.store import index, tree
from lazystore.store.index import Record
from lazystore.store.tree import Node

log = logging.getLogger(__name__)

NEGATIVE_TTL = 30.0
SAVE_DELAY = 1.0
QUERY_PARALLEL = 25  # as many narinfo queries as the substituter has connections
PREFETCH_PARALLEL = 8


class PathNotFound(StoreError):
    """No configured substituter has this store path."""


class SubstituterAPI(Protocol):
    """What the store needs from lazystore.substituter.client.Substituters."""

    stats: Any

    async def query(self, path: StorePath) -> Any: ...
    async def listing(self, path: StorePath) -> dict[str, Any] | None: ...
    async def fetch(self, path: StorePath, dest: Path, tmp_dir: Path) -> Any: ...
    async def closure(self, paths: list[StorePath]) -> list[Any]: ...


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: str | None = None
        self.not_found = False


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
        negative_ttl: float = NEGATIVE_TTL,
    ) -> None:
        self.subs = substituters
        self.cache_dir = Path(cache_dir)
        self.cache_limit = cache_limit
        self.store_dir = store_dir
        self.negative_ttl = negative_ttl
        self.data_dir = self.cache_dir / "store"
        self.tmp_dir = self.cache_dir / "tmp"
        self.index_file = self.cache_dir / "index"
        self.records: dict[str, Record] = {}
        self.cache_bytes = 0
        self.hits = 0
        self.misses = 0
        self._pins: Counter[str] = Counter()
        self._negative: dict[str, float] = {}
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._dirty = trio.Event()
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
        self._stack.push_async_callback(self._final_save)
        self._nursery.start_soon(self._saver)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._stack.aclose()

    def _prepare(self) -> None:
        for d in (self.data_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for child in self.tmp_dir.iterdir():
            _remove(child)
        self.records = index.load(self.index_file)
        self._reconcile()

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
            _remove(self.data_dir / base)
            return
        try:
            scanned = _scan(self.data_dir / base)
        except StoreError as exc:
            log.info("removing %s from the cache: %s", base, exc)
            _remove(self.data_dir / base)
            self.records.pop(base, None)
            return
        rec = rec or self.records.setdefault(base, Record())
        self._fill_from_disk(rec, *scanned)

    def _fill_from_disk(self, rec: Record, node: Node, usage: int) -> None:
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
            log.warning("cannot write the cache index %s: %s", self.index_file,
                        exc.strerror or exc)

    async def _final_save(self) -> None:
        with trio.CancelScope(shield=True):
            await self._save()

    def _changed(self) -> None:
        self._dirty.set()

    # -- single flight ----------------------------------------------------

    async def _single(self, kind: str, key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        flight = self._flights.get((kind, key))
        if flight is None:
            flight = self._flights[(kind, key)] = _Flight()
            assert self._nursery is not None, "LocalStore used outside its context"
            self._nursery.start_soon(self._fly, kind, key, fn, flight)
        await flight.done.wait()
        if flight.not_found:
            raise PathNotFound(flight.error or key)
        if flight.error is not None:
            raise StoreError(flight.error)
        return flight.result

    async def _fly(
        self, kind: str, key: str, fn: Callable[[], Awaitable[Any]], flight: _Flight
    ) -> None:
        flight.error = f"{kind} of {key} was cancelled"  # unless it ends otherwise
        try:
            flight.result = await fn()
            flight.error = None
        except PathNotFound as exc:
            flight.error, flight.not_found = str(exc), True
        except LazystoreError as exc:  # reported by whoever waits on it (EIO, control)
            log.info("%s of %s failed: %s", kind, key, exc)
            flight.error = str(exc)
        except OSError as exc:
            log.warning("%s of %s failed: %s", kind, key, exc)
            flight.error = f"{key}: {exc.strerror or exc}"
        except Exception as exc:  # a bug below must not end the daemon
            log.exception("%s of %s failed unexpectedly", kind, key)
            flight.error = f"{kind} of {key} failed: {exc!r}"
        finally:
            del self._flights[(kind, key)]
            flight.done.set()

    @property
    def in_flight(self) -> int:
        return sum(1 for kind, _ in self._flights if kind == "fetch")

    # -- lookups ----------------------------------------------------------

    async def lookup(self, base: str) -> Record | None:
        """The record of store path *base*, asking the substituters once."""
        rec = self.records.get(base)
        if rec is not None:
            return rec
        expiry = self._negative.get(base)
        if expiry is not None and expiry > time.monotonic():
            return None
        try:
            sp = StorePath.from_basename(base)
        except FormatError:
            return None
        try:
            return await self._single("query", base, lambda: self._query(sp))
        except PathNotFound:
            return None

    async def _query(self, sp: StorePath) -> Record:
        try:
            info = await self.subs.query(sp)
        except LazystoreError as exc:  # its message names the path already
            raise StoreError(str(exc)) from None
        if info is None:
            self._negative[sp.basename] = time.monotonic() + self.negative_ttl
            raise PathNotFound(f"{sp.basename} is in none of the substituters")
        rec = self.records.setdefault(sp.basename, Record())
        rec.nar_size = int(info.nar_size)
        rec.references = tuple(info.references)
        self._changed()
        return rec

    async def require(self, base: str) -> Record:
        rec = await self.lookup(base)
        if rec is None:
            raise PathNotFound(f"{base} is in none of the substituters")
        return rec

    async def tree(self, base: str) -> Node:
        """The metadata tree of *base*: the listing's hint, else fetched."""
        rec = await self.require(base)
        if rec.tree is None:
            await self._single("listing", base, lambda: self._load_listing(base))
        if rec.tree is None:
            await self.materialize(base)
        assert rec.tree is not None
        return rec.tree

    async def _load_listing(self, base: str) -> None:
        sp = StorePath.from_basename(base)
        try:
            doc = await self.subs.listing(sp)
        except LazystoreError as exc:
            log.info("no listing for %s (%s); fetching it instead", base, exc)
            return
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

    # -- data -------------------------------------------------------------

    def data_path(self, base: str) -> Path:
        return self.data_dir / base

    async def materialize(self, base: str) -> Path:
        """Make *base*'s verified data present in ``store/``; return its path."""
        rec = await self.require(base)
        if rec.materialized and not os.path.lexists(self.data_path(base)):
            log.warning("%s vanished from the cache directory; fetching it again", base)
            rec.materialized = False
            self.cache_bytes -= rec.disk_bytes
            rec.disk_bytes = 0
        if rec.materialized:
            self.hits += 1
            rec.last_used = time.time()
            return self.data_path(base)
        self.misses += 1
        await self._single("fetch", base, lambda: self._fetch(base, rec))
        return self.data_path(base)

    async def _fetch(self, base: str, rec: Record) -> None:
        dest = self.data_path(base)
        if not os.path.lexists(dest):  # a symlink root is there even when dangling
            try:
                await self.subs.fetch(StorePath.from_basename(base), dest, self.tmp_dir)
            except LazystoreError as exc:  # its message names the path already
                raise StoreError(str(exc)) from None
        hint = rec.tree if not rec.tree_verified else None
        try:
            scanned = await trio.to_thread.run_sync(_scan, dest)
        except StoreError:
            await trio.to_thread.run_sync(_remove, dest)
            raise
        self._fill_from_disk(rec, *scanned)
        if hint is not None and hint != rec.tree:
            log.warning("the listing of %s disagrees with its verified NAR; using the NAR", base)
        self.cache_bytes += rec.disk_bytes
        log.info("materialised %s (%d bytes on disk)", base, rec.disk_bytes)
        self._changed()
        await self._enforce_quota(keep=base)

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
            and ("fetch", b) not in self._flights
        ]
        return [b for _, b in sorted(cands)]

    async def _enforce_quota(self, keep: str | None = None) -> None:
        if self.cache_limit is None or self.cache_bytes <= self.cache_limit:
            return
        for base in self._evictable(keep):
            await self._evict_one(base)
            if self.cache_bytes <= self.cache_limit:
                return
        log.info(
            "cache holds %d bytes over its limit of %d: the rest is in use",
            self.cache_bytes, self.cache_limit,
        )

    async def _evict_one(self, base: str) -> None:
        rec = self.records[base]
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
        log.info("evicted %s", base)
        if grave is not None:
            await trio.to_thread.run_sync(_remove, grave)

    async def evict(self, paths: list[str]) -> list[str]:
        """Evict the data of *paths* (all evictable when empty); pinned ones stay."""
        bases = [self.parse(p).basename for p in paths] if paths else self._evictable()
        evicted = []
        for base in bases:
            rec = self.records.get(base)
            if rec is None or not rec.materialized or self.pinned(base):
                continue
            if ("fetch", base) in self._flights:
                continue
            await self._evict_one(base)
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
            "nars_fetched": int(getattr(stats, "nars_fetched", 0)),
            "hits": self.hits,
            "misses": self.misses,
            "pinned": sorted(self._pins),
        }


def _scan(path: Path) -> tuple[Node, int]:
    return tree.from_disk(path), tree.disk_usage(path)


def _remove(path: Path) -> None:
    """Remove *path* whatever it is: read-only store trees of any depth included."""
    fsio.remove_tree(path)


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
    if errors:
        raise StoreError(errors[0] + (f" (and {len(errors) - 1} more)" if errors[1:] else ""))
