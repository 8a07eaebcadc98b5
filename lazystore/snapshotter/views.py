"""Where nix layers' store paths come from: views, by a :class:`ViewProvider`.

The snapshotter never fetches. It names a view after the snapshot and asks its
provider to make it; the provider in production is :class:`DaemonViews` (the
lazystore daemon over its control socket, a blocking client in a daemon thread
per call: a snapshotter that stops never waits for a daemon's answer); tests
hand the snapshotter an in-process one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from lazystore.control.client import ControlClient, DaemonUnavailable
from lazystore.errors import ControlError

log = logging.getLogger(__name__)

# A view of hundreds of paths waits for their narinfos; a daemon that answers
# nothing in this long is treated as unavailable (only the snapshot asking waits).
CALL_TIMEOUT = 300.0
# Daemon calls at once; they run in threads of their own, so slow ones never
# hold up the snapshotter's file system work in asyncio's default threads.
MAX_CALLS = 16
# A daemon restarting (``systemctl restart``, or Restart= after a crash) is away
# for a few seconds: a call for a view (or the data layer) that could not reach
# it, or whose connection it closed before answering, is sent again (they are
# idempotent) for this long, so a pull or a container start rides it out. A
# view's removal is not: a view left behind only costs the daemon memory.
RESTART_WAIT = 60.0
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0)  # between attempts, the last one repeated


class ViewProvider(Protocol):
    """Views of store paths, each a directory laid out as ``nix/store/<path>``."""

    async def ensure(self, view_id: str, paths: Sequence[str], closure: str | None,
                     prefetch: Sequence[str] = ()) -> None:
        """Make view *view_id* of *paths* (full store paths) and, with *closure*,
        of the store paths its closure-info path lists; *prefetch* (an access
        profile's store paths) are fetched ahead in that order. Idempotent: a
        view that exists with the same paths is left as it is. ControlError if
        it cannot."""
        ...

    async def remove(self, view_id: str) -> None:
        """Drop the view (no error if there is none); ControlError if it cannot."""
        ...

    def path(self, view_id: str) -> str:
        """The directory of the view, as the snapshotter's mounts see it."""
        ...

    async def data_layer(self) -> str | None:
        """Where the verified data of materialised paths lies (the daemon's
        ``<cache>/store``), for an overlay's data-only lower layer under views
        whose id ends in ``.data``; None if there is none."""
        ...


class DaemonViews:
    """The daemon's views (``view_create``, ``view_remove``) under its mount point."""

    def __init__(
        self, control_socket: str, mount_point: str, timeout: float = CALL_TIMEOUT
    ) -> None:
        self.control_socket = control_socket
        self.mount_point = mount_point
        self.timeout = timeout
        self._slots = asyncio.Semaphore(MAX_CALLS)
        self._data_dir: str | None = None

    def close(self) -> None:
        """Nothing to wait for: a call still waiting for the daemon ends with
        its socket's timeout, or with the process."""

    def path(self, view_id: str) -> str:
        return os.path.join(self.mount_point, ".views", view_id)

    async def data_layer(self) -> str | None:
        if self._data_dir is None:
            try:
                status = await self._call("status", {})
            except ControlError:
                return None  # the views' own calls will say why
            data_dir = status.get("data_dir") if isinstance(status, dict) else None
            self._data_dir = data_dir if isinstance(data_dir, str) and data_dir else None
        return self._data_dir

    async def ensure(self, view_id: str, paths: Sequence[str], closure: str | None,
                     prefetch: Sequence[str] = ()) -> None:
        args: dict[str, object] = {"id": view_id}
        if paths:
            args["paths"] = list(paths)
        if closure:
            args["closure_info"] = closure
        if prefetch:
            args["prefetch"] = list(prefetch)
        result = await self._call("view_create", args)
        if not isinstance(result, dict) or not isinstance(result.get("path"), str):
            raise ControlError("the daemon answered view_create without a view path")
        log.debug("view %s: %d store paths", view_id, len(result.get("paths") or ()))

    async def remove(self, view_id: str) -> None:
        await self._call("view_remove", {"id": view_id}, wait=0.0)

    async def _call(self, op: str, args: dict[str, object], wait: float | None = None) -> object:
        wait = RESTART_WAIT if wait is None else wait
        deadline = time.monotonic() + wait
        attempt = 0
        while True:
            try:
                return await self._in_thread(op, args)
            except DaemonUnavailable as exc:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                if time.monotonic() + delay > deadline:
                    raise
                if attempt == 0:
                    log.info("%s; %s again for up to %.0f s", exc, op, wait)
                attempt += 1
                await asyncio.sleep(delay)

    async def _in_thread(self, op: str, args: dict[str, object]) -> object:
        """One call, in a daemon thread: the interpreter's exit does not wait
        for it (a pool's threads would hold a stop for up to the call's timeout)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[object] = loop.create_future()

        def settle(result: object, error: Exception | None) -> None:
            if answer.done():  # the asking operation was cancelled
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result)

        def call() -> None:
            result: object = None
            error: Exception | None = None
            try:
                with ControlClient(self.control_socket, timeout=self.timeout) as client:
                    result = client.call(op, **args)
            except Exception as exc:  # handed to the awaiting operation
                error = exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                pass  # the loop is closed: the process is stopping

        async with self._slots:
            threading.Thread(target=call, name=f"daemon-{op}", daemon=True).start()
            return await answer
