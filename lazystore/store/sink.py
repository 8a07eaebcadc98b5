"""The store's end of a fetch: one attempt at putting a NAR into ``store/``.

The substituter streams NAR bytes into a sink and finishes it only once the
NarHash verified (lazystore.substituter.download.NarSink). This sink unpacks
under a fresh temporary name in ``tmp/``, builds the metadata tree from the
parser's events as the bytes arrive, and on ``finish()`` renames the whole
path into ``store/`` in one step: nothing unverified is ever visible there.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lazystore.errors import StoreError, UnpackError
from lazystore.nix import fsio
from lazystore.nix.fsio import NarUnpacker
from lazystore.store import tree
from lazystore.store.tree import Node

log = logging.getLogger(__name__)

T = TypeVar("T")


class CacheWriteError(StoreError):
    """The cache directory cannot take a path (full disk, permissions, ...)."""


class CacheFullError(CacheWriteError):
    """The cache's file system has no room left for a path (ENOSPC, EDQUOT)."""

    def __init__(self, message: str, reason: str = os.strerror(errno.ENOSPC)) -> None:
        super().__init__(message)
        self.reason = reason  # in the OS's words


FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class StoreSink:
    """Unpacks one NAR for store path *base* of a cache whose directories are
    *tmp_dir* and *data_dir*. After ``finish()``: ``tree`` and ``disk_bytes``."""

    def __init__(self, base: str, tmp_dir: Path, data_dir: Path) -> None:
        self.base = base
        self.dest = data_dir / base
        self.tmp = tmp_dir / f"{base}.{secrets.token_hex(6)}"
        self.tree: Node | None = None
        self.disk_bytes = 0
        self._builder = tree.TreeBuilder(base)
        self._unpacker = self._local(lambda: NarUnpacker(self.tmp, on_events=self._builder.add))

    def feed(self, data: bytes) -> None:
        self._local(lambda: self._unpacker.feed(data))

    def finish(self) -> None:
        self._local(self._unpacker.finish)
        node = self._builder.tree()
        try:
            if os.path.lexists(self.dest):
                raise CacheWriteError(f"{self.dest} already exists")
            self._local(lambda: os.rename(self.tmp, self.dest))
        except BaseException:
            self.abort()
            raise
        self.tree, self.disk_bytes = node, tree.footprint(node)

    def abort(self) -> None:
        self._unpacker.abort()  # removes what it wrote; never raises
        try:
            fsio.remove_tree(self.tmp)  # in case the rename's check failed after finish
        except OSError as exc:
            log.debug("cannot remove %s: %s", self.tmp, exc)

    def _local(self, step: Callable[[], T]) -> T:
        """Map local trouble once to a store error; NarError passes (bad data)."""
        try:
            return step()
        except (UnpackError, OSError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            full = isinstance(cause, OSError) and cause.errno in FULL
            message = (f"cannot write {self.base} into the cache {self.dest.parent.parent}: "
                       f"{fsio.reason(exc)}")
            if full:
                raise CacheFullError(message, fsio.reason(exc)) from None
            raise CacheWriteError(message) from None
