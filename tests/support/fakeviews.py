"""An in-process :class:`~lazystore.snapshotter.views.ViewProvider` for the
snapshotter's tests: a view of P is a directory ``<mnt>/.views/<id>`` holding
``nix/store/<P>/content``. It records every call, can refuse (as a daemon that
cannot make the view), and can hold calls until the test lets them go."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lazystore.errors import ControlError

# Store paths a closure-info path stands for in these tests.
CLOSURE = ["/nix/store/" + "0" * 31 + "1-liba", "/nix/store/" + "0" * 31 + "2-busybox"]


class FakeViews:
    def __init__(self, mount_point: Path) -> None:
        self.mount_point = mount_point
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse = False
        # Calls for these view ids (all, if None) wait for `release` once `hold` is set;
        # each announces itself on `asked` first.
        self.hold = False
        self.hold_ids: set[str] | None = None
        self.release = threading.Event()
        self.asked = threading.Event()

    def path(self, view_id: str) -> str:
        return os.path.join(self.mount_point, ".views", view_id)

    async def data_layer(self) -> str | None:
        return None  # no daemon: every file is read from the view

    async def ensure(self, view_id: str, paths: Sequence[str], closure: str | None,
                     prefetch: Sequence[str] = ()) -> None:
        args: dict[str, Any] = {"id": view_id, "paths": list(paths)}
        if closure:
            args["closure_info"] = closure
        if prefetch:
            args["prefetch"] = list(prefetch)
        await self._answer("view_create", args)
        view = Path(self.path(view_id))
        for p in [*paths, *(CLOSURE if closure else [])]:
            d = view / p.lstrip("/")
            d.mkdir(parents=True, exist_ok=True)
            (d / "content").write_text(f"content of {Path(p).name}\n")
        view.mkdir(parents=True, exist_ok=True)

    async def remove(self, view_id: str) -> None:
        await self._answer("view_remove", {"id": view_id})
        shutil.rmtree(self.path(view_id), ignore_errors=True)

    async def _answer(self, op: str, args: dict[str, Any]) -> None:
        self.calls.append((op, args))
        if self.hold and (self.hold_ids is None or args["id"] in self.hold_ids):
            self.asked.set()
            assert await asyncio.to_thread(self.release.wait, 60), "the test never released"
        if self.refuse:
            raise ControlError("daemon refuses (test)")

    def creates(self) -> list[dict[str, Any]]:
        return [args for op, args in self.calls if op == "view_create"]

    def reset_views(self) -> None:
        """As a restarted daemon: no views."""
        shutil.rmtree(self.mount_point / ".views", ignore_errors=True)
        self.calls.clear()
