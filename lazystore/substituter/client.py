"""``Substituters``: the binary-cache client the daemon and the CLI use.

Safe for many concurrent trio tasks. Concurrent requests for one narinfo of
one cache share one HTTP request (lazystore.flight, the one single-flight
implementation, in this client's nursery) and trusted narinfos are cached for
``positive_ttl``; fetches are not collapsed (the store fetches a path once at
a time) and absent paths are not remembered (the store keeps the negative
answers). One httpx client caps connections globally and one
CapacityLimiter bounds the worker threads that decompress and hash.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any, TypeVar

import cachetools
import httpx
import trio

from lazystore.errors import LazystoreError
from lazystore.flight import Flights
from lazystore.nix import fileindex, listing
from lazystore.nix.cacheinfo import CacheInfo
from lazystore.nix.fileindex import Chunk, FileIndex, FileIndexError
from lazystore.nix.listing import ListingError
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import PublicKey, verify_narinfo
from lazystore.nix.storepath import StorePath
from lazystore.nurseries import first_error
from lazystore.substituter import chunks, retry
from lazystore.substituter.config import SubstituterConfig
from lazystore.substituter.download import OpenSink, download
from lazystore.substituter.errors import (
    CacheInfoError,
    NotAvailableError,
    NotFoundError,
    SubstituterError,
    TransportError,
    VerificationError,
)
from lazystore.substituter.timings import Timings
from lazystore.substituter.transport import Transport, make_client, make_transport

log = logging.getLogger(__name__)

T = TypeVar("T")

INDEXES_AHEAD_BYTES = 16 << 20  # file indexes asked ahead and not taken yet, per cache
# An index asked ahead: the file, None (absent), or its start and whole size.
IndexAhead = bytes | None | tuple[bytes, int]


def _ahead_size(ahead: IndexAhead) -> int:
    return 1 + (len(ahead[0]) if isinstance(ahead, tuple) else len(ahead or b""))


@dataclass
class Stats:
    """Counters for status displays (monotonic over the client's life)."""

    bytes_downloaded: int = 0  # bytes received for NARs, as sent (compressed)
    nars_fetched: int = 0
    nar_bytes: int = 0  # uncompressed NAR bytes of the paths fetched
    narinfo_hits: int = 0  # query() answers: found
    narinfo_misses: int = 0  # query() answers: not found
    narinfo_requests: int = 0  # narinfo files asked of a substituter
    retries: int = 0
    chunk_bytes: int = 0  # bytes received for chunks of indexed caches (part of the above)
    failures: int = 0  # NAR downloads that failed at one substituter
    # (kind "narinfo"/"nar", substituter URL, outcome) -> requests
    requests: collections.Counter[tuple[str, str, str]] = field(
        default_factory=collections.Counter)
    fetch_seconds: Timings = field(default_factory=Timings)  # NAR fetches that succeeded

    def count(self, kind: str, url: str, outcome: str) -> None:
        self.requests[kind, url, outcome] += 1

    def figures(self) -> dict[str, Any]:
        """The counters as status maps carry them (the daemon's, the registry's metrics)."""
        return {
            "bytes_downloaded": self.bytes_downloaded,
            "nars_fetched": self.nars_fetched,
            "retries": self.retries,
            "requests_by_cache": [[*key, n] for key, n in sorted(self.requests.items())],
            "fetch_seconds": self.fetch_seconds.to_dict(),
        }


@dataclass(eq=False)
class ServedNarInfo(NarInfo):
    """A trusted narinfo as one substituter serves it: passed back to
    :meth:`Substituters.fetch` or :meth:`Substituters.listing`, it is not
    looked up again."""

    substituter: str = ""  # the URL of the substituter that served it

    @classmethod
    def of(cls, info: NarInfo, substituter: str) -> ServedNarInfo:
        return cls(**{f.name: getattr(info, f.name) for f in fields(NarInfo)},
                   substituter=substituter)


def _request_cancelled(key: Any) -> SubstituterError:
    url, name = key  # a hash part (its narinfo) or a file name
    name = name if "." in name or "-" in name else f"{name}.narinfo"
    return SubstituterError(f"{url}/{name}: cancelled (closing)")


def _path_of(what: StorePath | NarInfo) -> StorePath:
    return what.path if isinstance(what, NarInfo) else what


class _Cache:
    """One substituter: its transport, its nix-cache-info, its narinfo caches."""

    def __init__(self, index: int, transport: Transport, config: SubstituterConfig) -> None:
        self.index = index
        self.transport = transport
        self.url = transport.url
        self.info = CacheInfo()
        self.error: SubstituterError | None = None
        self.loaded = False
        self.retry_at: float | None = None  # when to read nix-cache-info again
        self.file_indexes: bool | None = None  # offers file indexes (None: not asked yet)
        # File indexes asked ahead of Substituters.file_index (expect_index,
        # index_ahead), by name, until it takes them (None: the cache had none).
        self.indexes_ahead: cachetools.LRUCache[str, IndexAhead] = cachetools.LRUCache(
            INDEXES_AHEAD_BYTES, getsizeof=_ahead_size)
        size = config.narinfo_cache_size
        self.positive: cachetools.TTLCache[str, NarInfo] = cachetools.TTLCache(
            size, config.positive_ttl, timer=trio_time)


def trio_time() -> float:
    """trio's clock when inside trio (so tests can jump it), else monotonic."""
    try:
        return trio.current_time()
    except RuntimeError:
        import time

        return time.monotonic()


class Substituters:
    """``async with Substituters(config) as subs:`` — see developer-notes/interfaces.md."""

    def __init__(self, config: SubstituterConfig) -> None:
        self.config = config
        self.stats = Stats()
        self._keys = _parse_keys(config.trusted_public_keys)
        self._policy = retry.RetryPolicy(config.attempts, config.backoff_base,
                                         config.backoff_max, config.retry_after_max)
        self._limiter = trio.CapacityLimiter(config.worker_threads)
        self._client: httpx.AsyncClient | None = None
        self._caches: list[_Cache] = []
        self._ordered: list[_Cache] | None = None
        self._init_lock = trio.Lock()
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._requests: Flights | None = None

    async def __aenter__(self) -> Substituters:
        c = self.config
        self._client = make_client(c.max_connections, c.connect_timeout, c.stall_timeout,
                                   c.netrc_file, c.ssl_cert_file)
        try:
            self._caches = [
                _Cache(i, make_transport(url, self._client, c.stall_timeout, c.speed_limit()), c)
                for i, url in enumerate(dict.fromkeys(c.urls))]
        except BaseException:
            await self._client.aclose()
            raise
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._requests = Flights(self._nursery, _request_cancelled)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await self._stack.aclose()
        if self._client is not None:
            with trio.CancelScope(shield=True):
                await self._client.aclose()

    # -- substituters and their nix-cache-info ---------------------------------

    async def substituters(self) -> list[_Cache]:
        """Usable substituters by priority (stable). nix-cache-info is read once
        per substituter; one that could not be reached is tried again after
        ``cache_info_retry`` seconds, one that is wrong (StoreDir) never.

        WantMassQuery is kept in ``info`` but, as in Nix, only a mass "which of
        these paths exist" query would skip caches without it (Nix's
        querySubstitutablePaths); lookups for substitution and closure walks
        (Nix's querySubstitutablePathInfos) ask every cache, as here."""
        if self._ordered is None or any(self._due(c) for c in self._caches):
            async with self._init_lock:
                pending = [c for c in self._caches if self._due(c)]
                if pending:
                    async with trio.open_nursery() as nursery:
                        for cache in pending:
                            nursery.start_soon(self._load_cache_info, cache)
                    usable = [c for c in self._caches if c.error is None]
                    self._ordered = sorted(usable, key=lambda c: (c.info.priority, c.index))
        assert self._ordered is not None
        return self._ordered

    @staticmethod
    def _due(cache: _Cache) -> bool:
        return not cache.loaded or (cache.retry_at is not None
                                    and trio.current_time() >= cache.retry_at)

    async def _load_cache_info(self, cache: _Cache) -> None:
        # The cache's state changes only at the end: callers arriving meanwhile
        # wait on the lock instead of seeing a half-known substituter.
        info, error, retry_at = cache.info, None, None
        try:
            text = await self._retry(lambda: cache.transport.get("nix-cache-info"),
                                     f"{cache.url}/nix-cache-info")
            if text is not None:
                info = CacheInfo.parse(text.decode("utf-8", "replace"))
        except TransportError as exc:
            error = CacheInfoError(f"substituter {cache.url} is unreachable: {exc}")
            retry_at = trio.current_time() + self.config.cache_info_retry
        except LazystoreError as exc:
            error = CacheInfoError(f"substituter {cache.url} is unusable: {exc}")
        else:
            if info.store_dir != self.config.store_dir:
                error = CacheInfoError(
                    f"substituter {cache.url} is a binary cache for store "
                    f"{info.store_dir}, not {self.config.store_dir}")
        if error is not None:
            log.warning("%s", error)
        elif cache.file_indexes is None:  # now, not a round trip after the first narinfo
            assert self._nursery is not None, "Substituters used outside its context"
            self._nursery.start_soon(self._marker_ahead, cache)
        cache.info, cache.error, cache.retry_at, cache.loaded = info, error, retry_at, True

    async def _disabled_reasons(self) -> list[str]:
        """Why substituters are not in use (after reading their nix-cache-info)."""
        await self.substituters()
        return [str(c.error) for c in self._caches if c.error is not None]

    # -- narinfo -----------------------------------------------------------------

    async def query(self, path: StorePath) -> NarInfo | None:
        """The trusted narinfo of *path* from the first substituter that has one.

        None when no substituter has it; SubstituterError when one could not
        be asked (so "absent" is never confused with "unreachable")."""
        found = await self._find_or_raise(path)
        if found is None:
            self.stats.narinfo_misses += 1
            return None
        self.stats.narinfo_hits += 1
        return found[1]

    async def query_hash(self, hash_part: str) -> NarInfo | None:
        """As :meth:`query` for the store path of hash part *hash_part*, whatever its name."""
        found = await self._find_or_raise(hash_part)
        return None if found is None else found[1]

    async def _find_or_raise(self, path: StorePath | str) -> tuple[_Cache, NarInfo] | None:
        errors = await self._disabled_reasons()
        found = await self._find(path, errors)
        if found is None and errors:
            what = path if isinstance(path, str) else path.path(self.config.store_dir)
            raise NotAvailableError(f"cannot look up {what}: " + "; ".join(errors))
        return found

    async def _find(self, path: StorePath | str, errors: list[str],
                    tried: Collection[_Cache] = (),
                    asking: _Asking | None = None) -> tuple[_Cache, NarInfo] | None:
        """The first substituter (by priority) not in *tried* with a trusted
        narinfo of *path*. Every substituter that may matter is asked at once
        (not one after another); the answer of the best priority that has it
        wins, without waiting for those below it. Substituters that could not
        be asked are skipped, their errors appended to *errors*. The one loop
        over substituters: lookups and fetches both go through it; a fetch
        passes the same *asking* each time, so no substituter is asked twice."""
        asking = asking or _Asking(self, path, await self.substituters())
        return await asking.best(errors, tried)

    async def _query_one(self, cache: _Cache, path: StorePath | str) -> NarInfo | None:
        """*path* is a store path, or a hash part alone (any name matches)."""
        key = path if isinstance(path, str) else path.hash_part
        info = cache.positive.get(key)
        if info is None:  # one request at a time per narinfo (closure walks overlap)
            assert self._requests is not None, "Substituters used outside its context"
            info = await self._requests.run(
                (cache.url, key), lambda: self._fetch_narinfo(cache, key))
        if info is None or (isinstance(path, StorePath) and info.path != path):
            return None  # as Nix: a narinfo for another name is not this path
        return info

    async def _fetch_narinfo(self, cache: _Cache, hash_part: str) -> NarInfo | None:
        """The narinfo *cache* has for *hash_part*, if trusted; caches the answer."""
        self.stats.narinfo_requests += 1
        name = f"{hash_part}.narinfo"
        try:
            text = await self._retry(lambda: cache.transport.get(name), f"{cache.url}/{name}")
            info = None if text is None else self._trusted(cache, hash_part, text)
        except SubstituterError:
            self.stats.count("narinfo", cache.url, "error")
            raise
        outcome = "missing" if text is None else "found" if info is not None else "untrusted"
        self.stats.count("narinfo", cache.url, outcome)
        if info is not None:
            cache.positive[hash_part] = info
        return info

    def _trusted(self, cache: _Cache, hash_part: str, text: bytes) -> NarInfo | None:
        store_dir = self.config.store_dir
        try:
            info = NarInfo.parse(text.decode("utf-8"), store_dir)
        except (LazystoreError, UnicodeDecodeError) as exc:
            raise VerificationError(f"bad narinfo {hash_part}.narinfo from {cache.url}: {exc}"
                                    ) from None
        if info.path.hash_part != hash_part:
            log.warning("ignoring %s/%s.narinfo: it describes %s", cache.url, hash_part,
                        info.store_path)
            return None
        if self.config.require_sigs and not self._signed(info):
            # As Nix: not an error, the path is as missing from this cache (the
            # next one is asked); untrusted data never leaves this method.
            log.warning("ignoring the narinfo of %s from %s: no valid signature by a "
                        "trusted key", info.store_path, cache.url)
            return None
        return ServedNarInfo.of(info, cache.url)

    def _signed(self, info: NarInfo) -> bool:
        try:
            return verify_narinfo(info, self._keys, self.config.store_dir) is not None
        except LazystoreError:
            return False

    async def listing(self, what: StorePath | NarInfo) -> dict[str, Any] | None:
        """The ``.ls`` document of the substituter serving *what*, if it has one
        (a narinfo this client returned names it: nothing is looked up again)."""
        found = self._offered(what) or await self._find_or_raise(_path_of(what))
        if found is None:
            return None
        cache = found[0]
        name = f"{found[1].path.hash_part}.ls"
        data = await self._retry(lambda: cache.transport.get(name), f"{cache.url}/{name}")
        if data is None:
            return None
        try:
            return listing.parse(data)
        except ListingError as exc:
            raise VerificationError(f"bad listing {cache.url}/{name}: {exc}") from None

    def _offered(self, what: StorePath | NarInfo) -> tuple[_Cache, NarInfo] | None:
        """The substituter that served narinfo *what*, if this client returned it
        and that substituter is still in use."""
        if not isinstance(what, ServedNarInfo) or self._ordered is None:
            return None
        cache = next((c for c in self._ordered if c.url == what.substituter), None)
        return None if cache is None else (cache, what)

    # -- NARs --------------------------------------------------------------------

    async def fetch(self, what: StorePath | NarInfo, open_sink: OpenSink) -> NarInfo:
        """Download and verify the NAR of *what* into sinks from *open_sink*.

        A narinfo this client returned is used as it is (its substituter
        first); a StorePath is looked up. Each attempt, retry or next
        substituter gets a fresh sink (``open_sink(narinfo)``); the sink of the
        attempt that verified is finished, every other one aborted. Returns the
        narinfo used. SubstituterError if no substituter could serve it; a
        sink's own errors propagate unchanged. Not collapsed: callers fetch a
        path once at a time (the store's single flight)."""
        path = _path_of(what)
        full = path.path(self.config.store_dir)
        errors = await self._disabled_reasons()
        tried: list[_Cache] = []
        failed: list[str] = []  # why each cache tried failed, naming it
        asking = _Asking(self, path, await self.substituters())
        found = self._offered(what) or await self._find(path, errors, tried, asking)
        while found is not None:
            cache, info = found
            tried.append(cache)
            started = trio.current_time()
            try:
                await self._download(cache, info, open_sink)
            except SubstituterError as exc:
                self.stats.failures += 1
                self.stats.count("nar", cache.url, "failed")
                # Said once: in the error raised below when no cache serves it,
                # else in the warning of the cache that did.
                log.info("cannot substitute %s from %s: %s", full, cache.url, exc)
                why = str(exc) if cache.url in str(exc) else f"{cache.url}: {exc}"
                errors.append(why)
                failed.append(why)
                found = await self._find(path, errors, tried, asking)
                continue
            self.stats.nars_fetched += 1
            self.stats.nar_bytes += info.nar_size
            self.stats.count("nar", cache.url, "ok")
            self.stats.fetch_seconds.observe(trio.current_time() - started)
            if failed:  # the fault, said once (a cache that failed every time is news)
                log.warning("substituted %s from %s after %d other cache(s) failed: %s",
                            full, cache.url, len(failed), "; ".join(failed))
            return info
        why = "; ".join(errors) if errors else "no substituter has it"
        raise NotAvailableError(f"cannot substitute {full}: {why}")

    async def _download(self, cache: _Cache, info: NarInfo, open_sink: OpenSink) -> None:
        await self._retry(
            lambda: download(cache.transport, info, open_sink, self._limiter,
                             self._count_bytes),
            f"NAR of {info.store_path} from {cache.url}")

    def _count_bytes(self, n: int) -> None:
        self.stats.bytes_downloaded += n

    # -- file indexes (lazystore cache index) -------------------------------------

    async def file_index(self, info: NarInfo) -> FileIndex | None:
        """The file index the substituter that served *info* (a narinfo this
        client returned) offers for exactly its store path and NarHash, signed
        by a trusted key; None when it offers none. VerificationError for one
        that is malformed, for another NAR or not trusted."""
        found = self._offered(info)
        if found is None:
            return None
        cache = found[0]
        if not await self._offers_indexes(cache):
            return None
        name = f"{info.path.hash_part}{fileindex.SUFFIX}"
        data = await self._index_file(cache, name)
        if data is None:
            return None
        try:  # a large index takes a while to check: not on the trio thread
            index = await trio.to_thread.run_sync(self._checked_index, data, info,
                                                  limiter=self._limiter)
        except FileIndexError as exc:
            raise VerificationError(f"{cache.url}/{name}: {exc}") from None
        return index

    def expect_index(self, path: StorePath) -> None:
        """The caller will want :meth:`file_index` of *path*: its index is
        asked now of the best cache that offers indexes, at the same time as
        the narinfo instead of a round trip after it, and kept (bounded) until
        :meth:`file_index` takes it. Only then is it checked, against the
        narinfo that came (an index asked of another cache than the one that
        served the narinfo is not used)."""
        assert self._nursery is not None, "Substituters used outside its context"
        self._nursery.start_soon(self._index_ahead, f"{path.hash_part}{fileindex.SUFFIX}")

    async def index_ahead(self, info: NarInfo, limit: int, whole: int = 0) -> bool:
        """Learn the file index of *info* (a narinfo this client returned)
        ahead of use, at most its first *limit* bytes (a big index of a path
        that may never be read costs the link little), and the rest of one
        of at most *whole* bytes (it is cheap, and its first use then waits
        for no request); :meth:`file_index` asks for the rest of a bigger
        one. Whether it needs no request now (the whole index is here, or
        there is none)."""
        found = self._offered(info)
        if found is None or not await self._offers_indexes(found[0]):
            return True
        cache, name = found[0], f"{info.path.hash_part}{fileindex.SUFFIX}"
        if name in cache.indexes_ahead:  # asked ahead before (another view of the path)
            ahead = cache.indexes_ahead[name]
        else:
            ahead = await self._index_bytes(cache, name, limit)
        if isinstance(ahead, tuple) and ahead[1] <= whole:
            data = await self._index_rest(cache, name, *ahead)
            if isinstance(cache.indexes_ahead.get(name), tuple):  # not taken meanwhile
                cache.indexes_ahead[name] = data
            return True
        return not isinstance(ahead, tuple)

    async def _index_file(self, cache: _Cache, name: str) -> bytes | None:
        """*cache*'s index *name*: as asked ahead (only its start: the rest
        now), else asked now or joining the request asked ahead."""
        if name in cache.indexes_ahead:
            ahead = cache.indexes_ahead.pop(name)
        else:
            ahead = await self._index_bytes(cache, name)
            cache.indexes_ahead.pop(name, None)
        if not isinstance(ahead, tuple):
            return ahead
        return await self._index_rest(cache, name, *ahead)

    async def _index_rest(self, cache: _Cache, name: str, start: bytes, size: int) -> bytes:
        """The whole of *cache*'s index *name* whose *start* is here (one
        request for the rest for concurrent askers)."""
        async def get() -> bytes:
            rest = await self._retry(
                lambda: cache.transport.get_range(name, len(start), size - len(start)),
                f"{cache.url}/{name}")
            return start + rest

        assert self._requests is not None, "Substituters used outside its context"
        data: bytes = await self._requests.run((cache.url, f"{name} (rest)"), get)
        return data

    async def _index_ahead(self, name: str) -> None:
        try:
            for cache in await self.substituters():
                if await self._offers_indexes(cache):
                    await self._index_bytes(cache, name)
                    return
        except SubstituterError as exc:  # file_index asks again, and reports it
            log.debug("%s asked ahead: %s", name, exc)

    async def _index_bytes(self, cache: _Cache, name: str, limit: int | None = None
                           ) -> IndexAhead:
        """*cache*'s file *name* (only its first *limit* bytes and its size if
        larger; one request for concurrent askers, whoever asked first says
        which), also kept in ``indexes_ahead`` for an asker that comes after."""
        async def get() -> IndexAhead:
            what = f"{cache.url}/{name}"
            data: IndexAhead
            if limit is None:
                data = await self._retry(lambda: cache.transport.get(name), what)
            else:
                got = await self._retry(lambda: cache.transport.get_prefix(name, limit), what)
                data = got if got is None or got[1] > len(got[0]) else got[0]
            cache.indexes_ahead[name] = data
            return data

        assert self._requests is not None, "Substituters used outside its context"
        data: IndexAhead = await self._requests.run((cache.url, name), get)
        return data

    def _checked_index(self, data: bytes, info: NarInfo) -> FileIndex:
        index = fileindex.parse(data)
        fileindex.check(index, info, self._keys)
        return index

    async def _marker_ahead(self, cache: _Cache) -> None:
        try:
            await self._offers_indexes(cache)
        except SubstituterError as exc:  # asked again when an index is wanted
            log.debug("%s/%s: %s", cache.url, fileindex.MARKER, exc)

    async def _offers_indexes(self, cache: _Cache) -> bool:
        """Whether *cache* has the marker of an indexed cache (asked once)."""
        async def ask() -> None:  # the answer is kept before the flight ends
            name = fileindex.MARKER
            text = await self._retry(lambda: cache.transport.get(name), f"{cache.url}/{name}")
            cache.file_indexes = text is not None and fileindex.offered(text)
            if text is not None and not cache.file_indexes:
                log.info("%s/%s: not a file index version this lazystore reads", cache.url, name)

        if cache.file_indexes is None:
            assert self._requests is not None, "Substituters used outside its context"
            await self._requests.run((cache.url, fileindex.MARKER), ask)
        return bool(cache.file_indexes)

    async def read_chunks(self, info: NarInfo, index: FileIndex,
                          wanted: list[Chunk]) -> dict[Chunk, bytes]:
        """The verified uncompressed bytes of chunks *wanted* of *index* (the
        file index of *info*, from :meth:`file_index`): adjacent chunks come in
        one range request, runs of them in parallel; VerificationError (and
        RangeError) for anything not exactly as the index says."""
        found = self._offered(info)
        if found is None:
            raise VerificationError(f"{info.store_path}: its substituter is not in use")
        cache, out = found[0], {}

        async def one(run: list[Chunk]) -> None:
            start, length = run[0].offset, run[-1].offset + run[-1].length - run[0].offset
            try:
                data = await self._retry(
                    lambda: cache.transport.get_range(index.data, start, length),
                    f"chunks of {info.store_path} from {cache.url}")
            except NotFoundError as exc:  # the index names a data file that is not there
                raise VerificationError(str(exc)) from None
            self._count_bytes(len(data))
            self.stats.chunk_bytes += len(data)
            try:
                if sum(c.size for c in run) <= chunks.INLINE_DECODE:  # a thread hop costs more
                    pieces = chunks.decode_run(run, data)
                else:
                    pieces = await trio.to_thread.run_sync(
                        chunks.decode_run, run, data, limiter=self._limiter)
            except VerificationError as exc:
                raise VerificationError(f"{cache.url}/{index.data}: {exc}") from None
            out.update(zip(run, pieces, strict=True))

        try:
            async with trio.open_nursery() as nursery:
                for run in chunks.coalesce(wanted):
                    nursery.start_soon(one, run)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return out

    # -- closures ----------------------------------------------------------------

    async def closure(self, paths: Iterable[StorePath]) -> list[NarInfo]:
        """Narinfos of *paths* and everything they reference, breadth-first
        (each level queried in parallel, bounded). NotAvailableError if a
        path of the closure is missing."""
        limiter = trio.CapacityLimiter(self.config.max_parallel_queries)
        level = list(dict.fromkeys(paths))
        needed_by: dict[StorePath, StorePath | None] = dict.fromkeys(level)
        result: list[NarInfo] = []
        while level:
            answers = await self._query_all(level, limiter)
            following: list[StorePath] = []
            for path in level:
                info = answers[path]
                if info is None:
                    raise NotAvailableError(self._missing(path, needed_by))
                result.append(info)
                for ref in info.references:
                    ref_path = StorePath.from_basename(ref)
                    if ref_path not in needed_by:
                        needed_by[ref_path] = path
                        following.append(ref_path)
            level = following
        return result

    async def _query_all(self, paths: list[StorePath],
                         limiter: trio.CapacityLimiter) -> dict[StorePath, NarInfo | None]:
        answers: dict[StorePath, NarInfo | None] = {}

        async def one(path: StorePath) -> None:
            async with limiter:
                answers[path] = await self.query(path)

        try:
            async with trio.open_nursery() as nursery:
                for path in paths:
                    nursery.start_soon(one, path)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return answers

    def _missing(self, path: StorePath, needed_by: dict[StorePath, StorePath | None]) -> str:
        store_dir = self.config.store_dir
        parent = needed_by.get(path)
        message = f"no substituter has {path.path(store_dir)}"
        if parent is not None:
            message += f" (referenced by {parent.path(store_dir)})"
        return message

    # -- retries -----------------------------------------------------------------

    async def _retry(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        def count() -> None:
            self.stats.retries += 1

        return await retry.call(operation, self._policy, what, on_retry=count)


class _Asking:
    """One path asked of several substituters at once, for one query or fetch.

    Each substituter's answer is asked by a task of the client's nursery and
    kept here, so that a caller who took the best answer and later needs the
    next one (a fetch falling back) does not ask again. Substituters ranked
    below one that already holds a trusted narinfo of the path are not asked."""

    def __init__(self, subs: Substituters, path: StorePath | str,
                 ordered: list[_Cache]) -> None:
        self._subs = subs
        self._path = path
        self._ordered = ordered
        self._answers: dict[_Cache, NarInfo | None | Exception] = {}
        self._done: dict[_Cache, trio.Event] = {}

    def _start(self, caches: list[_Cache]) -> None:
        nursery = self._subs._nursery
        assert nursery is not None, "Substituters used outside its context"
        for cache in caches:
            if cache not in self._done:
                self._done[cache] = trio.Event()
                nursery.start_soon(self._ask, cache)

    async def _ask(self, cache: _Cache) -> None:
        key = self._path if isinstance(self._path, str) else self._path.hash_part
        self._answers[cache] = _request_cancelled((cache.url, key))  # unless answered
        try:
            self._answers[cache] = await self._subs._query_one(cache, self._path)
        except Exception as exc:  # the waiter raises it (a SubstituterError, or a bug)
            self._answers[cache] = exc
        finally:
            self._done[cache].set()

    async def best(self, errors: list[str],
                   tried: Collection[_Cache]) -> tuple[_Cache, NarInfo] | None:
        wanted = [c for c in self._ordered if c not in tried]
        key = self._path if isinstance(self._path, str) else self._path.hash_part
        held = next((i for i, c in enumerate(wanted) if key in c.positive), None)
        self._start(wanted if held is None else wanted[:held + 1])
        for cache in wanted:
            if cache not in self._done:  # below one that had it: never asked
                self._start([cache])
            await self._done[cache].wait()
            answer = self._answers[cache]
            if isinstance(answer, SubstituterError):
                errors.append(str(answer))
                continue
            if isinstance(answer, Exception):
                raise answer
            if answer is not None:
                return cache, answer
        return None


def _parse_keys(keys: Iterable[str]) -> list[PublicKey]:
    parsed = []
    for text in keys:
        try:
            parsed.append(PublicKey.parse(text))
        except LazystoreError as exc:
            raise SubstituterError(f"trusted public key {text[:60]!r}: {exc}") from None
    return parsed
