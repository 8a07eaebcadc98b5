"""Daemon views for nix layers, through the control socket (blocking client in a thread)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from lazystore.control.client import ControlClient
from lazystore.errors import ControlError

log = logging.getLogger(__name__)

# A view of hundreds of paths waits for their narinfos; a daemon that answers
# nothing in this long is treated as unavailable (the snapshotter's lock is held).
CALL_TIMEOUT = 300.0


class Views:
    """Creates and removes the daemon's views; never fetches anything itself."""

    def __init__(
        self, control_socket: str, mount_point: str, prefix: str, timeout: float = CALL_TIMEOUT
    ) -> None:
        self.control_socket = control_socket
        self.mount_point = mount_point
        self.prefix = prefix
        self.timeout = timeout

    def view_id(self, snapshot_id: int) -> str:
        return f"{self.prefix}-{snapshot_id}"

    def path(self, snapshot_id: int) -> str:
        return os.path.join(self.mount_point, ".views", self.view_id(snapshot_id))

    def _call(self, op: str, **args: object) -> object:
        with ControlClient(self.control_socket, timeout=self.timeout) as client:
            return client.call(op, **args)

    def _ensure(self, snapshot_id: int, paths: list[str] | None, closure: str | None) -> str:
        path = self.path(snapshot_id)
        try:
            if Path(path).is_dir():
                return path
        except OSError:
            pass  # e.g. ENOTCONN: the daemon died; asking it below says so clearly

        args: dict[str, object] = {"id": self.view_id(snapshot_id)}
        if paths:
            args["paths"] = list(paths)
        if closure:
            args["closure_info"] = closure
        result = self._call("view_create", **args)
        if not isinstance(result, dict) or not isinstance(result.get("path"), str):
            raise ControlError("the daemon answered view_create without a view path")
        log.info("view %s: %d store paths at %s", args["id"], len(paths or ()), result["path"])
        return result["path"]

    async def ensure(self, snapshot_id: int, paths: list[str] | None, closure: str | None) -> str:
        """The directory of the snapshot's view, created by the daemon if it is missing."""
        return await asyncio.to_thread(self._ensure, snapshot_id, paths, closure)

    async def remove(self, snapshot_id: int) -> None:
        await asyncio.to_thread(self._call, "view_remove", id=self.view_id(snapshot_id))
