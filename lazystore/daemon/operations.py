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

from lazystore.errors import ControlError
from lazystore.fs.vfs import FsError, Vfs
from lazystore.store.cache import LocalStore

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[dict[str, Any]]]


class ControlOperations:
    def __init__(
        self, store: LocalStore, vfs: Vfs, mountpoint: str, substituter_urls: list[str]
    ) -> None:
        self.store = store
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
            requests=dict(self.requests),
        )
        return status

    async def prefetch(self, paths: Sequence[str], closure: bool) -> dict[str, Any]:
        return {"fetched": await self.store.prefetch(list(paths), closure)}

    async def closure(self, paths: Sequence[str]) -> dict[str, Any]:
        return {"paths": await self.store.closure(list(paths))}

    async def view_create(
        self, id: str, paths: Sequence[str], closure_info: str | None  # noqa: A002
    ) -> dict[str, Any]:
        bases = [self.store.parse(p).basename for p in paths]
        if closure_info is not None:
            bases += await self._closure_info(closure_info)
        rel = await self.vfs.create_view(id, bases)
        return {"path": f"{self.mountpoint}/{rel}", "paths": list(self.vfs.views[id].bases)}

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
