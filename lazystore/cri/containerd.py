"""containerd's side of a ``nix:0`` pull: importing a checked layout with ``ctr``.

``ctr images import --snapshotter NAME`` stores the blobs in containerd's
content store, creates the image (named by the layout's index) and unpacks it
on that snapshotter, which is what containerd's CRI plugin needs to run it; the
plugin then adopts the image from containerd's image event (it adds the image
id as a second name and its ``io.cri-containerd.image=managed`` label), the
same bookkeeping as after its own pull.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from lazystore.cri.errors import Unavailable

log = logging.getLogger(__name__)

IMPORT_TIMEOUT = 600.0


class Ctr:
    """``ctr --address ADDRESS --namespace NAMESPACE ...`` as an async call."""

    def __init__(self, address: str, namespace: str, snapshotter: str, ctr: str = "ctr") -> None:
        self.address, self.namespace, self.snapshotter, self.ctr = (
            address, namespace, snapshotter, ctr)

    async def run(self, *args: str, timeout: float = IMPORT_TIMEOUT) -> str:
        argv = [self.ctr, "--address", self.address, "--namespace", self.namespace, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise Unavailable(f"cannot run {self.ctr}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
            raise Unavailable(f"ctr {' '.join(args[:2])} failed: {lines[-1]}")
        return out.decode(errors="replace")

    async def import_layout(self, layout: Path) -> None:
        log.info("importing %s into containerd (snapshotter %s)", layout, self.snapshotter)
        await self.run("images", "import", "--snapshotter", self.snapshotter, str(layout))
