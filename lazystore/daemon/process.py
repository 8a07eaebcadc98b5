"""The daemon process: owns the mount, the local store and the control server.

Start order: substituters, store (index, tmp cleanup), mountpoint checks,
FUSE mount, control socket, READY=1. Every task lives in the daemon's
nursery; teardown runs in reverse through an AsyncExitStack. SIGTERM/SIGINT
end the FUSE loop and unmount; an unexpected crash leaves the mount to be
cleared by the next start (pyfuse3 ``close(unmount=False)``), never unmounting
silently over a tree that processes still use.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from lazystore import sdnotify
from lazystore.control import server
from lazystore.daemon.mountpoint import mount_options, prepare_mountpoint, raise_fd_limit
from lazystore.errors import StoreError
from lazystore.fs.operations import Operations
from lazystore.fs.vfs import InvalidRequest, Vfs
from lazystore.store.cache import LocalStore

log = logging.getLogger(__name__)


class Daemon:
    def __init__(
        self,
        store: LocalStore,
        mountpoint: str,
        control_socket: str,
        store_dir: str = "/nix/store",
        allow_other: bool = False,
        substituter_urls: list[str] | None = None,
    ) -> None:
        self.store = store
        self.mountpoint = os.path.abspath(mountpoint)
        self.control_socket = control_socket
        self.allow_other = allow_other
        self.substituter_urls = substituter_urls or []
        self.vfs = Vfs(store, store_dir)
        self._stack = AsyncExitStack()

    async def run(self) -> None:
        raise_fd_limit()
        prepare_mountpoint(self.mountpoint)
        server.claim_socket_path(self.control_socket)
        try:
            pyfuse3.init(Operations(self.vfs), self.mountpoint, mount_options(self.allow_other))
        except RuntimeError as exc:
            raise StoreError(f"cannot mount {self.mountpoint}: {exc}") from None
        serving = clean = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, nursery)
                await nursery.start(server.serve, self.control_socket, self.handle)
                log.info("serving %s (control socket %s)", self.mountpoint, self.control_socket)
                sdnotify.notify(f"READY=1\nSTATUS=serving {self.mountpoint}")
                serving = True
                await pyfuse3.main()
                clean = True
                nursery.cancel_scope.cancel()
        finally:
            self.vfs.close_all()
            # A crash while serving leaves the mount for the next start to clear
            # (processes may be using it); a failure before serving does not.
            unmount = clean or not serving
            pyfuse3.close(unmount=unmount)
            log.info("%s %s", "unmounted" if unmount else "left the mount at", self.mountpoint)

    async def _watch_signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting %s", signum, self.mountpoint)
                sdnotify.notify(f"STOPPING=1\nSTATUS=unmounting {self.mountpoint}")
                pyfuse3.terminate()
                return

    # -- control operations ----------------------------------------------

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        method = getattr(self, f"op_{op}")
        try:
            return await method(**args)
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            raise InvalidRequest(f"bad arguments for {op}: {exc}") from None

    async def op_status(self) -> dict[str, Any]:
        status = self.store.status()
        status.update(
            mount_point=self.mountpoint,
            substituters=list(self.substituter_urls),
            views=sorted(self.vfs.views),
            inodes=len(self.vfs.inodes),
            open_files=len(self.vfs.handles),
        )
        return status

    async def op_prefetch(self, paths: list[str], closure: bool = False) -> dict[str, Any]:
        return {"fetched": await self.store.prefetch(_strs(paths), bool(closure))}

    async def op_closure(self, paths: list[str]) -> dict[str, Any]:
        return {"paths": await self.store.closure(_strs(paths))}

    async def op_view_create(
        self, id: str, paths: list[str] | None = None, closure_info: str | None = None  # noqa: A002
    ) -> dict[str, Any]:
        if not isinstance(id, str):
            raise InvalidRequest("view id must be a string")
        if closure_info is None and paths is None:
            raise InvalidRequest("view_create needs paths or closure_info")
        bases = [self.store.parse(p).basename for p in _strs(paths or [])]
        if closure_info is not None:
            bases += await self._closure_info(str(closure_info))
        rel = await self.vfs.create_view(id, bases)
        return {"path": f"{self.mountpoint}/{rel}", "paths": list(self.vfs.views[id].bases)}

    async def _closure_info(self, path: str) -> list[str]:
        base = self.store.parse(path).basename
        text = (await self.store.read_small_file(base, "store-paths")).decode()
        lines = [line.strip() for line in text.splitlines()]
        return [self.store.parse(line).basename for line in lines if line]

    async def op_view_remove(self, id: str) -> dict[str, Any]:  # noqa: A002
        self.vfs.remove_view(str(id))
        return {}

    async def op_evict(self, paths: list[str] | None = None) -> dict[str, Any]:
        return {"evicted": await self.store.evict(_strs(paths or []))}


def _strs(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest("expected a list of store paths")
    return value


async def run(
    substituters: Any,
    *,
    mountpoint: str,
    cache_dir: Path,
    cache_size: int | None,
    control_socket: str,
    store_dir: str,
    allow_other: bool,
    substituter_urls: list[str],
) -> None:
    """Serve until SIGTERM/SIGINT or an external unmount."""
    async with AsyncExitStack() as stack:
        subs = await stack.enter_async_context(substituters)
        store = await stack.enter_async_context(
            LocalStore(subs, cache_dir, cache_size, store_dir=store_dir)
        )
        daemon = Daemon(
            store, mountpoint, control_socket, store_dir, allow_other, substituter_urls
        )
        await daemon.run()

