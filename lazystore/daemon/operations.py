"""The control operations the daemon serves.

One handler per entry of :data:`lazystore.control.protocol.OPERATIONS`, with
the same argument names; the control server calls :meth:`handle` only with
requests ``protocol.parse_request`` checked (known operation, declared
arguments of declared types, defaults filled in). What the Vfs refuses (an
invalid view id, a view id taken by other paths) is a control error here,
never an errno.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from lazystore import profile
from lazystore.errors import ControlError
from lazystore.fs.vfs import FsError, Vfs
from lazystore.store.cache import LocalStore

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[dict[str, Any]]]
EVENTS_A_CALL = 10_000


def _parse_profile(text: str) -> profile.Profile:
    try:
        return profile.parse(text.encode("utf-8", "surrogateescape"))
    except profile.ProfileError as exc:
        raise ControlError(str(exc)) from None


def _warn_ignored(whose: str, ignored: list[str]) -> None:
    if ignored:
        log.warning("%s names %d store paths outside its closure, ignored: %s", whose,
                    len(ignored), ", ".join(ignored[:3]) + (" ..." if ignored[3:] else ""))


class ControlOperations:
    def __init__(
        self, store: LocalStore, vfs: Vfs, mountpoint: str, substituter_urls: list[str],
        background_fetch: bool = False,
    ) -> None:
        self.store = store
        self.background_fetch = background_fetch  # a view's other paths after its profile
        self.vfs = vfs
        self.mountpoint = mountpoint
        self.substituter_urls = substituter_urls
        self.requests: Counter[str] = Counter()  # served since start, by operation
        self.handlers: dict[str, Handler] = {
            "status": self.status,
            "prefetch": self.prefetch,
            "closure": self.closure,
            "view_create": self.view_create,
            "view_remove": self.view_remove,
            "evict": self.evict,
            "prefetch_profile": self.prefetch_profile,
            "profile": self.profile,
            "events": self.events,
        }

    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Answer checked request *op* (see the module docstring)."""
        self.requests[op] += 1
        try:
            return await self.handlers[op](**args)
        except FsError as exc:
            raise ControlError(f"{op}: {exc}") from None

    async def status(self) -> dict[str, Any]:
        status = self.store.status()
        status.update(
            mount_point=self.mountpoint,
            substituters=list(self.substituter_urls),
            views=sorted(self.vfs.views),
            inodes=len(self.vfs.inodes),
            open_files=self.vfs.open_files(),
            bytes_served=self.vfs.bytes_served,
            fuse_requests=dict(self.vfs.fuse_requests),
            requests=dict(self.requests),
            data_dir=str(self.store.data_dir),
        )
        return status

    async def prefetch(self, paths: Sequence[str], closure: bool) -> dict[str, Any]:
        return {"fetched": await self.store.prefetch(list(paths), closure)}

    async def closure(self, paths: Sequence[str]) -> dict[str, Any]:
        return {"paths": await self.store.closure(list(paths))}

    async def view_create(
        self, id: str, paths: Sequence[str], closure_info: str | None,  # noqa: A002
        prefetch: Sequence[str],
    ) -> dict[str, Any]:
        bases = [self.store.parse(p).basename for p in paths]
        if closure_info is not None:
            bases += await self._closure_info(closure_info)
        entries = [self._ahead_entry(p) for p in prefetch]  # refused before any view
        new = id not in self.vfs.views
        rel = await self.vfs.create_view(id, bases)
        if new and (prefetch or self.background_fetch):
            ahead = self._view_profile(id, [p for p, _ in entries], set(bases))
            _, files = profile.ahead_files([e for e in entries if e[0] in set(ahead)])
            rest = [b for b in self.vfs.views[id].bases if b not in set(ahead)]
            self.store.prefetch_soon(ahead, why=id, then=rest if self.background_fetch else [],
                                     files=files)
        return {"path": f"{self.mountpoint}/{rel}", "paths": list(self.vfs.views[id].bases)}

    def _ahead_entry(self, entry: str) -> tuple[str, str]:
        """(basename, file) of a view's prefetch entry: a store path (full or
        its basename) or a file of one (``BASENAME/FILE``, ``/nix/store/...``)."""
        prefix = self.store.store_dir + "/"
        found = profile.parse_ahead(entry[len(prefix):] if entry.startswith(prefix) else entry)
        if found is None:
            raise ControlError(f"view_create: {entry[:120]!r} is neither a store path nor "
                               "a file of one")
        return found

    def _view_profile(self, view_id: str, wanted: list[str], closure: set[str]) -> list[str]:
        """A view's profile came with its image (untrusted): only the view's
        paths, at most profile.MAX_PATHS, each once; the rest a warning."""
        paths = list(dict.fromkeys(wanted))
        _warn_ignored(f"view {view_id}'s profile", [p for p in paths if p not in closure])
        paths = [p for p in paths if p in closure]
        if len(paths) > profile.MAX_PATHS:
            log.warning("view %s's profile names %d store paths: only the first %d are "
                        "fetched ahead", view_id, len(paths), profile.MAX_PATHS)
            paths = paths[:profile.MAX_PATHS]
        return paths

    async def prefetch_profile(self, profile: str) -> dict[str, Any]:
        read = _parse_profile(profile)
        _warn_ignored("the profile", read.ignored)
        files: dict[str, list[str]] = {}
        for r in read.reads:
            files.setdefault(r.path, []).append(r.file)
        await self.store.prefetch_in_order(read.paths, files=files)
        return {"fetched": read.paths, "ignored": read.ignored}

    async def profile(self, view: str | None) -> dict[str, Any]:
        if view is None:
            return {"profile": self.vfs.profile.document()}
        found = self.vfs.views.get(view)
        if found is None:
            raise ControlError(f"profile: no view {view!r}")
        return {"profile": found.profile.document()}

    async def events(self, since: int) -> dict[str, Any]:
        events = self.store.events.since(since, EVENTS_A_CALL)
        following = events[-1].seq + 1 if events else max(since, self.store.events.next_seq)
        return {"events": [e.to_dict() for e in events], "next": following}

    async def _closure_info(self, path: str) -> list[str]:
        base = self.store.parse(path).basename
        text = (await self.store.read_small_file(base, "store-paths")).decode()
        lines = [line.strip() for line in text.splitlines()]
        return [self.store.parse(line).basename for line in lines if line]

    async def view_remove(self, id: str) -> dict[str, Any]:  # noqa: A002
        self.vfs.remove_view(id)
        return {}

    async def evict(self, paths: Sequence[str]) -> dict[str, Any]:
        return {"evicted": await self.store.evict(list(paths))}
