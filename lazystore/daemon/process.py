"""The daemon process: owns the mount, the local store and the control server.

Start order: substituters, store (index, tmp cleanup), the FUSE session (the
one the service manager passed back, else mountpoint checks and a new mount,
see ``session``), control socket, READY=1. Every task lives in the daemon's
nursery; teardown runs in reverse through an AsyncExitStack. SIGTERM/SIGINT
end the FUSE loop and unmount, unless the manager keeps the /dev/fuse
descriptor (``$FDSTORE``): then the mount stays for the next daemon. An
unexpected crash leaves the mount too, never unmounting silently over a tree
that processes still use.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from lazystore import sdnotify
from lazystore.control import server
from lazystore.daemon.binds import Binds
from lazystore.daemon.mountpoint import mount_options, prepare_mountpoint, raise_fd_limit
from lazystore.daemon.operations import ControlOperations
from lazystore.daemon.session import FDNAME, FuseSession
from lazystore.errors import StoreError
from lazystore.fs.operations import Operations
from lazystore.fs.vfs import Vfs
from lazystore.store.cache import LocalStore

log = logging.getLogger(__name__)

SESSION_FILE = "fuse-session"


class Daemon:
    def __init__(
        self,
        store: LocalStore,
        mountpoint: str,
        control_socket: str,
        store_dir: str = "/nix/store",
        allow_other: bool = False,
        substituter_urls: list[str] | None = None,
        bind_finished: bool = True,
        background_fetch: bool = False,
        learn_caches: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.store = store
        # Read every cache's nix-cache-info (and file index marker) as FUSE is
        # served, so that the first lookup does not wait for them.
        self.learn_caches = learn_caches
        self.mountpoint = os.path.abspath(mountpoint)
        self.control_socket = control_socket
        self.allow_other = allow_other
        self.vfs = Vfs(store, store_dir)
        self.operations = ControlOperations(
            store, self.vfs, self.mountpoint, list(substituter_urls or []), background_fetch
        )
        # finished paths bound over the mount (binds.py); off: all through FUSE
        self.binds = Binds(store, self.mountpoint) if bind_finished else None

    async def run(self) -> None:
        raise_fd_limit()
        server.claim_socket_path(self.control_socket)
        session = self._session()
        ops = Operations(self.vfs)
        self.vfs.restore_views(session.state.views)
        self.vfs.adopt_handed_out(session.handed_out)
        self.vfs.views_changed = session.set_views
        self.vfs.handed_out = session.note_path
        try:
            session.start(ops, mount_options(self.allow_other))
        except BaseException:
            session.close(unmount_it=not session.taken_over)
            raise
        keep = sdnotify.fdstore_enabled() and session.hand_over()
        serving = clean = False
        # From the start, not once the binds are adopted: an eviction meanwhile
        # would remove a path still bound by the last daemon (its release waits
        # for the adoption).
        self.store.direct = self.binds
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, nursery, keep)
                if self.binds is not None:
                    nursery.start_soon(self._bind_finished, nursery)
                if self.learn_caches is not None:
                    nursery.start_soon(self.learn_caches)
                await nursery.start(server.serve, self.control_socket, self.operations.handle)
                log.info("serving %s (control socket %s)", self.mountpoint, self.control_socket)
                sdnotify.notify(f"READY=1\nSTATUS=serving {self.mountpoint}")
                serving = True
                await pyfuse3.main()
                clean = True
                nursery.cancel_scope.cancel()
        finally:
            self.vfs.close_all()
            # A crash while serving leaves the mount for the next start (processes
            # may be using it); so does a stop whose descriptor the manager keeps.
            unmount = (clean and not keep) or (not serving and not session.taken_over)
            session.close(unmount_it=unmount)
            log.info("%s %s", "unmounted" if unmount else "left the mount at", self.mountpoint)

    async def _bind_finished(self, nursery: trio.Nursery) -> None:
        """Start binding finished paths. Not before FUSE is served: adopting the
        binds an earlier daemon left unmounts some, and those path walks go
        through the mount (a daemon that took the mount over hung there)."""
        await nursery.start(self.binds.run)  # type: ignore[union-attr]

    def _session(self) -> FuseSession:
        """The session the manager passed back, else a new mount."""
        state_file = Path(self.store.cache_dir) / SESSION_FILE
        passed = sdnotify.listen_fds().get(FDNAME, [])
        for extra in passed[1:]:
            os.close(extra)
        if passed:
            taken = FuseSession.take_over(passed[0], self.mountpoint, state_file)
            if taken is not None:
                return taken
        prepare_mountpoint(self.mountpoint)
        try:
            return FuseSession.mount(self.mountpoint, self.allow_other, state_file)
        except OSError as exc:
            raise StoreError(f"cannot mount {self.mountpoint}: {exc.strerror}") from None

    async def _watch_signals(self, nursery: trio.Nursery, keep: bool) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if keep:
                    # Requests in flight stay unanswered: the next daemon has the
                    # kernel resend them, and adopts the binds over the mount.
                    log.info("signal %d: stopping; the mount stays for the next daemon",
                             signum)
                    sdnotify.notify("STOPPING=1\nSTATUS=stopping, the mount stays")
                    nursery.cancel_scope.cancel()
                    return
                log.info("signal %d: unmounting %s", signum, self.mountpoint)
                sdnotify.notify(f"STOPPING=1\nSTATUS=unmounting {self.mountpoint}")
                if self.binds is not None:
                    self.store.direct = None
                    await self.binds.detach_all()  # while FUSE still answers
                pyfuse3.terminate()
                return


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
    metrics_address: str | None = None,
    bind_finished: bool = True,
    background_fetch: bool = False,
    verify_complete: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT or an external unmount (with Prometheus
    metrics on *metrics_address* when given)."""
    async with AsyncExitStack() as stack:
        subs = await stack.enter_async_context(substituters)
        store = await stack.enter_async_context(
            LocalStore(subs, cache_dir, cache_size, store_dir=store_dir,
                       negative_ttl=subs.config.negative_ttl,  # nix.conf's
                       verify_complete=verify_complete)
        )
        daemon = Daemon(
            store, mountpoint, control_socket, store_dir, allow_other, substituter_urls,
            bind_finished, background_fetch, subs.substituters,
        )
        if metrics_address is not None:
            stack.enter_context(_metrics(daemon, metrics_address))
        await daemon.run()


def _metrics(daemon: Daemon, address: str) -> AbstractContextManager[object]:
    """The exporter: each scrape reads the control ``status`` map on the trio thread."""
    from lazystore import metrics

    token = trio.lowlevel.current_trio_token()
    registry = metrics.Metrics()
    registry.collect(lambda: metrics.daemon_families(
        trio.from_thread.run(daemon.operations.status, trio_token=token)))
    return metrics.exporter(registry, address)

