"""Where nix layers' store paths come from: views, by a :class:`ViewProvider`.

The snapshotter never fetches. It names a view after the snapshot and asks its
provider to make it; the provider in production is :class:`DaemonViews` (the
lazystore daemon over its control socket, through
:class:`lazystore.control.aio.AsyncControl`); tests
hand the snapshotter an in-process one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Protocol

from lazystore.control.aio import CALL_TIMEOUT, RESTART_WAIT, AsyncControl, DaemonWatch
from lazystore.errors import ControlError

log = logging.getLogger(__name__)

# A call for a view (or the data layer) is asked again while the daemon
# restarts (control.aio.RESTART_WAIT), so a pull or a container start rides it
# out; a view's removal is not: a view left behind only costs the daemon memory.
# A view made on the daemon that still serves is not asked for again (a
# container's start asks for its views up to three times, each a round trip
# to a daemon busy with the start's first fetches): a DaemonWatch tells that
# daemon from the next one, which may have lost every view (a fresh mount).


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
        self._control = AsyncControl(control_socket, timeout)
        self._data_dir: str | None = None
        self._watch = DaemonWatch(control_socket)
        # view id -> (its paths and closure, the watch it was made under)
        self._made: dict[str, tuple[tuple[tuple[str, ...], str | None], int]] = {}
        self._removals = 0  # a view removed during an ensure may be the one it made

    def close(self) -> None:
        """Nothing to wait for: a call still waiting for the daemon ends with
        its socket's timeout, or with the process."""
        self._watch.close()

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
        what = (tuple(paths), closure)
        made = self._made.get(view_id)
        if made is not None and made == (what, self._watch.current()):
            return  # made by the daemon serving now (the prefetch went with it)
        watch, removals = self._watch.open(), self._removals
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
        if watch is not None and self._watch.current() == watch and removals == self._removals:
            self._made[view_id] = (what, watch)

    async def remove(self, view_id: str) -> None:
        self._made.pop(view_id, None)
        self._removals += 1
        await self._call("view_remove", {"id": view_id}, wait=0.0)

    async def _call(self, op: str, args: dict[str, object], wait: float | None = None) -> object:
        started = time.monotonic()
        answer = await self._control.call(op, args, RESTART_WAIT if wait is None else wait)
        log.debug("daemon %s %s: answered in %.3f s", op, args.get("id", ""),
                  time.monotonic() - started)
        return answer
