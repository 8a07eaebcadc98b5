"""pyfuse3 Operations: a protocol adapter over the Vfs, nothing more.

Every handler goes through :func:`to_errno`, the one place where exceptions
become errno values: in pyfuse3 any exception other than FUSEError would end
``main()`` and with it the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from lazystore.errors import LazystoreError, StoreError
from lazystore.fs.vfs import Attr, FsError, Vfs
from lazystore.store.cache import PathNotFound
from lazystore.store.sink import CacheFullError

log = logging.getLogger(__name__)

T = TypeVar("T")
MTIME_NS = 1_000_000_000  # mtime 1, as in /nix/store
ENTRY_CACHE = 65536


def to_errno(exc: BaseException) -> int:
    """The errno a failed request answers with; logs what is not expected."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, PathNotFound):  # in none of the substituters (any more)
        return errno.ENOENT
    if isinstance(exc, CacheFullError):
        # The kernel passes a reply's errno to the reader as it is: "No space
        # left on device" names the cause, where EIO would suggest bad data.
        log.warning("%s", exc)
        return errno.ENOSPC
    if isinstance(exc, StoreError):
        log.warning("%s", exc)
        return errno.EIO
    if isinstance(exc, LazystoreError):
        log.warning("%s", exc)
        return errno.EIO
    if isinstance(exc, OSError):
        log.warning("I/O error in the cache: %s", exc)
        return errno.EIO
    log.error("internal error answered with EIO", exc_info=exc)
    return errno.EIO


def mapped(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The handler *fn* with its errors mapped (:func:`to_errno`), counted in
    the Vfs's ``fuse_requests`` (``status``: what a start asks of the daemon)."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        args[0].vfs.fuse_requests[fn.__name__] += 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = to_errno(exc)
            log.debug("%s: %s (%s)", fn.__name__, errno.errorcode.get(code), exc)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def read_only(*_: Any, **__: Any) -> Awaitable[Any]:
    async def refuse() -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return refuse()


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs) -> None:
        super().__init__()
        self.vfs = vfs
        self.on_init: Callable[[], None] | None = None  # libfuse handles the INIT
        self._entries: dict[
            int, tuple[Attr, tuple[float, float], pyfuse3.EntryAttributes]
        ] = {}

    def entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """EntryAttributes of *attr*, built once per Attr object (the Vfs keeps the
        rows of directories it lists, so warm walks hand back the same ones)."""
        cached = self._entries.get(id(attr))
        if cached is not None and cached[0] is attr:
            # Only the Vfs's kept rows reuse Attr objects, and it keeps rows of
            # verified trees only, whose timeouts never change.
            return cached[2]
        timeouts = self.vfs.timeouts(attr.ino)
        if len(self._entries) >= ENTRY_CACHE:
            self._entries.clear()
        e = self._build_entry(attr, *timeouts)
        self._entries[id(attr)] = (attr, timeouts, e)  # holds attr: its id stays its own
        return e

    def _build_entry(self, attr: Attr, entry: float, attrs: float) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout, e.attr_timeout = entry, attrs
        e.st_mode = attr.mode
        e.st_nlink = 1
        e.st_uid = e.st_gid = 0
        e.st_rdev = 0
        e.st_size = attr.size
        e.st_blksize = 4096
        e.st_blocks = -(-attr.size // 512)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = MTIME_NS
        return e

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    @mapped
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self.entry(await self.vfs.lookup(parent_inode, os.fsdecode(name)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.vfs.fuse_requests["forget"] += 1
        for ino, n in inode_list:  # must never raise
            self.vfs.forget(ino, n)

    @mapped
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self.entry(await self.vfs.getattr(inode))

    @mapped
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self.vfs.readlink(inode))

    @mapped
    async def opendir(self, inode: int, ctx: Any) -> int:
        attr = await self.vfs.getattr(inode)
        if attr.kind != "d":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @mapped
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        reply, entry, remember = pyfuse3.readdir_reply, self.entry, self.vfs.remember
        for key, name, attr in await self.vfs.listdir(fh, start_id):
            if not reply(token, name.encode("utf-8", "surrogateescape"), entry(attr), key):
                break
            remember(attr.ino)

    async def releasedir(self, fh: int) -> None:
        pass

    @mapped
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=await self.vfs.open(inode), keep_cache=True)

    @mapped
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    async def release(self, fh: int) -> None:
        self.vfs.fuse_requests["release"] += 1
        try:
            self.vfs.release(fh)
        except OSError as exc:
            log.warning("closing a cache file failed: %s", exc)

    @mapped
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            return False
        await self.vfs.getattr(inode)
        return True

    @mapped
    async def statfs(self, ctx: Any) -> Any:
        st = pyfuse3.StatvfsData()
        for name, value in self.vfs.statfs().items():
            setattr(st, name, value)
        return st

    @mapped
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        value = await self.vfs.overlay_xattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = read_only  # type: ignore[assignment]
    write = create = setxattr = removexattr = read_only  # type: ignore[assignment]
