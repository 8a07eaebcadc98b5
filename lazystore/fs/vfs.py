"""What the mounted tree looks like, as inodes over the store API, without FUSE.

    /                                   ROOT: every store path, looked up by name
    /<hash>-<name>/...                  STORE inodes, keyed by (basename, relpath)
    /.views/                            VIEWS
    /.views/<id>/nix/store/<basename>   VIEWDIR levels, then the STORE root inode

A store path has one inode per (basename, relpath), whichever way it is
reached, so the kernel caches its pages once. Lookup counts follow the FUSE
rules (lookup and readdirplus add, forget subtracts); an unreferenced STORE
inode is dropped. readdir offsets are stable hashes of names (tree.name_key),
so a listing survives the tree being replaced by the authoritative one. Only
``open``/``read``/``readlink`` need a path's data.

The kernel's references outlive the daemon when it restarts under a live
mount, so they are stable: an inode number is a hash of what it names
(:func:`stable_ino`), an inode the table does not know is found again from the
trees of the cache's index (:meth:`Vfs._recover`), views are restored from the
session state, and a file handle is the inode number, so a handle opened by the
last daemon is opened again from its inode (never EBADF).
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lazystore.errors import LazystoreError
from lazystore.nix.fileindex import FileEntry
from lazystore.profile import Recorder
from lazystore.store.cache import LocalStore, PathNotFound
from lazystore.store.tree import DIRECTORY, REGULAR, SYMLINK, Node, name_key, resolve

log = logging.getLogger(__name__)

ROOT_INODE = 1
VIEWS_INODE = 2
VIEWS_NAME = ".views"
LONG_TIMEOUT = 86400.0
ROOT_ATTR_TIMEOUT = 1.0
HINT_TIMEOUT = 1.0
DIR_ROWS_CACHE = 1024  # directories whose readdir rows are kept
# A view whose id ends so has inodes of its own carrying overlay data redirects
# (Vfs.overlay_xattr); overlays of other views and the root see none.
REDIRECTS_SUFFIX = ".data"
REDIRECTING = "redirecting"
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"
LEARN_PARALLEL = 32  # lookups at once while listing a directory of store paths
INO_BITS = 56  # below the bits overlayfs's xino takes for its layers
FIRST_INO = 16  # numbers below are the fixed inodes'


def stable_ino(*key: str) -> int:
    """The inode number of *key* (store path basename and the names below it, or
    a view's id and level), the same in every daemon process."""
    raw = "\0".join(key).encode("utf-8", "surrogateescape")
    h = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    h &= (1 << INO_BITS) - 1
    return h if h >= FIRST_INO else h + FIRST_INO


class FsError(LazystoreError):
    """A request the file system refuses; carries the errno to answer with."""

    errno = errno.EIO


class NoEntry(FsError):
    errno = errno.ENOENT


class NotADir(FsError):
    errno = errno.ENOTDIR


class IsADir(FsError):
    errno = errno.EISDIR


class InvalidRequest(FsError):
    errno = errno.EINVAL


class BadHandle(FsError):
    errno = errno.EBADF


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of an inode (owner root, mtime 1, modes as in /nix/store)."""

    ino: int
    kind: str
    size: int = 0
    executable: bool = False

    @property
    def mode(self) -> int:
        if self.kind == DIRECTORY:
            return stat.S_IFDIR | 0o555
        if self.kind == SYMLINK:
            return stat.S_IFLNK | 0o777
        return stat.S_IFREG | (0o555 if self.executable else 0o444)

    @classmethod
    def of(cls, ino: int, node: Node) -> Attr:
        """The attributes of store inode *ino* whose tree node is *node*: a
        symlink's size is its target's length in bytes, as lstat shows it."""
        if node.kind == SYMLINK:
            return cls(ino, SYMLINK, len(node.target.encode("utf-8", "surrogateescape")))
        return cls(ino, node.kind, node.size, node.executable)


@dataclass(slots=True)
class Inode:
    ino: int
    kind: str  # "root", "views", "viewdir", "store"
    base: str = ""  # store path basename ("store")
    rel: tuple[str, ...] = ()  # path below the store path ("store")
    space: str = ""  # REDIRECTING: below a view with overlay data redirects ("store")
    view: View | None = None  # ("viewdir")
    level: int = 0  # 0 = .views/<id>, then one per store dir component ("viewdir")
    lookups: int = 0


@dataclass(eq=False)
class View:
    id: str
    bases: tuple[str, ...]
    dirs: list[int] = field(default_factory=list)  # inode of each level
    profile: Recorder = field(default_factory=Recorder)  # first reads of its paths

    @property
    def space(self) -> str:
        """The inodes of its store paths: their own, with overlay data redirects,
        for a view whose id ends in REDIRECTS_SUFFIX; else those of the root."""
        return REDIRECTING if self.id.endswith(REDIRECTS_SUFFIX) else ""


@dataclass(slots=True)
class Handle:
    """The cache file behind the open files of one inode (the handle number)."""

    fd: int  # -1 while the file is read chunk by chunk (entry)
    base: str
    opens: int = 1
    entry: FileEntry | None = None  # its file index entry (LocalStore.open_indexed)


def check_view_id(view_id: str) -> None:
    if (
        not view_id or view_id.startswith(".") or "/" in view_id or "\0" in view_id
        or len(view_id) > 200
    ):
        raise InvalidRequest(f"invalid view id {view_id!r}")


class Vfs:
    """The mounted tree. All methods run on the trio thread."""

    def __init__(self, store: LocalStore, store_dir: str = "/nix/store") -> None:
        self.store = store
        self.store_dir_parts = tuple(p for p in store_dir.split("/") if p)
        self.bytes_served = 0  # bytes read through the mount
        self.fuse_requests: Counter[str] = Counter()  # answered by the FUSE handlers, by kind
        self.inodes: dict[int, Inode] = {
            ROOT_INODE: Inode(ROOT_INODE, "root", lookups=1),
            VIEWS_INODE: Inode(VIEWS_INODE, "views", lookups=1),
        }
        self._store_inodes: dict[tuple[str, tuple[str, ...], str], int] = {}
        self.views: dict[str, View] = {}
        self.handles: dict[int, Handle] = {}
        self._dir_rows: dict[int, tuple[Node, list[tuple[int, str, Attr]]]] = {}
        self._known: dict[int, tuple[str, tuple[str, ...]]] | None = None  # see _recover
        self._known_records = -1
        self.views_changed: Callable[[dict[str, list[str]]], None] | None = None
        self.handed_out: Callable[[str], None] | None = None  # a store path's first inode
        self._handed: set[str] = set()
        self._unindexed: list[str] = []
        self._learning_lost = trio.Lock()
        self.profile = Recorder()  # first reads through the root and every view
        self._opened: set[tuple[str, tuple[str, ...]]] = set()

    # -- inode table ------------------------------------------------------

    def _get(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            raise NoEntry(f"stale inode {ino}")
        return node

    async def _inode(self, ino: int) -> Inode:
        """Inode *ino*, also one the kernel holds from an earlier daemon: found
        again by its number among every (basename, path) of the trees the index
        has, else of the store paths the earlier daemons had handed out
        (:attr:`handed_out`, whose trees are fetched again where the index
        lost them in a crash)."""
        node = self.inodes.get(ino)
        if node is not None:
            return node
        key = self._known_key(ino)
        if key is None and self._unindexed:
            # One learning of the lost trees; a miss meanwhile waits for it
            # instead of answering ENOENT for an inode it is about to know.
            async with self._learning_lost:
                missing = list(self._unindexed)
                for base in missing:
                    try:
                        await self.store.tree(base)
                    except LazystoreError as exc:
                        log.info("store path %s of an earlier daemon: %s", base, exc)
                self._unindexed = [b for b in self._unindexed if b not in missing]
                if missing:  # a record that had no tree still counts one record
                    self._known = None
            key = self._known_key(ino)
        # a collision gave this number to another; or the key is known already
        if key is None or self.store_inode(*key) != ino:
            raise NoEntry(f"stale inode {ino}")
        return self.inodes[ino]

    def _known_key(self, ino: int) -> tuple[str, tuple[str, ...], str] | None:
        if self._known is None or self._known_records != len(self.store.records):
            self._known_records = len(self.store.records)
            self._known = dict(_numbered(self.store.records.items()))
        return self._known.get(ino)

    def adopt_handed_out(self, bases: Iterable[str]) -> None:
        """Store paths whose inodes earlier daemons of this mount handed out."""
        for base in bases:
            self._handed.add(base)
            rec = self.store.records.get(base)
            if rec is None or rec.tree is None:
                self._unindexed.append(base)

    def store_inode(self, base: str, rel: tuple[str, ...] = (), space: str = "") -> int:
        ino = self._store_inodes.get((base, rel, space))
        if ino is None:
            if base not in self._handed:
                self._handed.add(base)
                if self.handed_out is not None:  # before the kernel has the number
                    self.handed_out(base)
            ino = _space_ino(space, base, rel)
            while ino in self.inodes:  # 2**-56 a pair: the later one moves on
                ino += 1
            self._store_inodes[(base, rel, space)] = ino
            self.inodes[ino] = Inode(ino, "store", base=base, rel=rel, space=space)
        return ino

    def remember(self, ino: int) -> None:
        """The kernel took one more reference (lookup, readdirplus)."""
        self._get(ino).lookups += 1

    def forget(self, ino: int, nlookup: int) -> None:
        node = self.inodes.get(ino)
        if node is None:
            return
        node.lookups -= nlookup
        if node.lookups <= 0 and node.kind == "store":
            del self.inodes[ino]
            del self._store_inodes[(node.base, node.rel, node.space)]
            self._dir_rows.pop(ino, None)
        elif node.lookups <= 0 and node.kind == "viewdir" and node.view not in self.views.values():
            del self.inodes[ino]

    def timeouts(self, ino: int) -> tuple[float, float]:
        """(entry, attribute) timeouts: a verified store path never changes; a
        listing is only a hint until its NAR verified; views come and go."""
        inode = self.inodes.get(ino)
        if inode is None:
            return 0.0, ROOT_ATTR_TIMEOUT
        if inode.kind == "views" or (inode.kind == "viewdir" and inode.level > 0):
            # fixed for the life of the daemon / of the view (a view made again
            # under the same id gets new inodes, found through .views/<id>)
            return LONG_TIMEOUT, ROOT_ATTR_TIMEOUT
        if inode.kind != "store":
            return 0.0, ROOT_ATTR_TIMEOUT
        rec = self.store.records.get(inode.base)
        if rec is not None and rec.tree_verified:
            return LONG_TIMEOUT, LONG_TIMEOUT
        return HINT_TIMEOUT, HINT_TIMEOUT

    # -- metadata ---------------------------------------------------------

    async def node(self, inode: Inode) -> Node:
        root = await self.store.tree(inode.base)
        node = resolve(root, inode.rel)
        if node is None:
            raise NoEntry(f"{inode.base}/{'/'.join(inode.rel)} does not exist")
        return node

    async def getattr(self, ino: int) -> Attr:
        inode = await self._inode(ino)
        if inode.kind != "store":
            return Attr(ino, DIRECTORY)
        node = await self.node(inode)
        return Attr.of(ino, node)

    async def lookup(self, parent: int, name: str) -> Attr:
        """Resolve *name* in *parent*, counting one kernel reference."""
        attr = await self._lookup(await self._inode(parent), name)
        self.remember(attr.ino)
        return attr

    async def _lookup(self, parent: Inode, name: str) -> Attr:
        if name in (".", ".."):
            raise NoEntry(name)  # the kernel resolves these itself
        if parent.kind == "root":
            if name == VIEWS_NAME:
                return Attr(VIEWS_INODE, DIRECTORY)
            return await self._lookup_store_path(name)
        if parent.kind == "views":
            view = self.views.get(name)
            if view is None:
                raise NoEntry(name)
            return Attr(view.dirs[0], DIRECTORY)
        if parent.kind == "viewdir":
            return await self._lookup_in_view(parent, name)
        node = await self.node(parent)
        if node.kind != DIRECTORY:
            raise NotADir(name)
        child = node.child(name)
        if child is None:
            raise NoEntry(name)
        ino = self.store_inode(parent.base, (*parent.rel, name), parent.space)
        return Attr.of(ino, child)

    async def _lookup_store_path(self, name: str) -> Attr:
        if name.startswith(".") or await self.store.lookup(name) is None:
            raise NoEntry(name)
        return await self._store_root(name)

    async def _store_root(self, base: str, space: str = "") -> Attr:
        root = await self.store.tree(base)
        # The inode is taken only after the last await, so that no forget can
        # drop it between here and the caller counting the kernel's reference.
        return Attr.of(self.store_inode(base, (), space), root)

    async def _lookup_in_view(self, parent: Inode, name: str) -> Attr:
        view = parent.view
        assert view is not None
        if self.views.get(view.id) is not view:
            raise NoEntry(f"view {view.id} was removed")
        if parent.level < len(self.store_dir_parts):
            if name != self.store_dir_parts[parent.level]:
                raise NoEntry(name)
            return Attr(view.dirs[parent.level + 1], DIRECTORY)
        if name not in view.bases:
            raise NoEntry(name)
        try:
            return await self._store_root(name, view.space)
        except PathNotFound as exc:  # the view was made without waiting to know
            log.warning("view %s: %s", view.id, exc)
            raise NoEntry(name) from None

    async def listdir(self, ino: int, start: int) -> Iterator[tuple[int, str, Attr]]:
        """Entries of directory *ino* whose readdir key is above *start*, in key
        order; lazy, since FUSE takes a page of entries at a time."""
        inode = await self._inode(ino)
        if inode.kind == "store":
            node = await self.node(inode)
            if node.kind != DIRECTORY:
                raise NotADir(inode.base)
            return self._list_store_dir(inode, node, start)
        if inode.kind == "root":
            names = [VIEWS_NAME] + [b for b, r in self.store.records.items() if r.tree]
        elif inode.kind == "views":
            names = list(self.views)
        else:
            names = self._viewdir_names(inode)
        wanted = [(k, n) for k, n in sorted((name_key(n), n) for n in names) if k > start]
        await self._learn(inode, [n for _, n in wanted])  # first every tree (this may wait) ...
        out = []
        for key, name in wanted:  # ... then take the inodes without waiting in between
            try:
                out.append((key, name, await self._lookup(inode, name)))
            except NoEntry:
                continue
        return iter(out)

    async def _learn(self, inode: Inode, names: list[str]) -> None:
        """Look up *names* in *inode* at once (their narinfos and listings are
        asked in parallel); errors are left for the lookups that follow."""
        limiter = trio.CapacityLimiter(LEARN_PARALLEL)

        async def one(name: str) -> None:
            async with limiter:
                try:
                    await self._lookup(inode, name)
                except LazystoreError:
                    pass

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)

    def _viewdir_names(self, inode: Inode) -> list[str]:
        assert inode.view is not None
        if inode.level < len(self.store_dir_parts):
            return [self.store_dir_parts[inode.level]]
        return list(inode.view.bases)

    def _list_store_dir(
        self, inode: Inode, node: Node, start: int
    ) -> Iterator[tuple[int, str, Attr]]:
        rows = self._rows(inode, node)
        keys = node.sorted_keys()
        for i in range(bisect.bisect_right(keys, (start, "\U0010ffff")), len(rows)):
            row = rows[i]
            if row[2].ino not in self.inodes:  # forgotten since: a new inode
                attr = row[2]
                ino = self.store_inode(inode.base, (*inode.rel, row[1]), inode.space)
                row = rows[i] = (row[0], row[1], Attr(ino, attr.kind, attr.size, attr.executable))
            yield row

    def _rows(self, inode: Inode, node: Node) -> list[tuple[int, str, Attr]]:
        """(key, name, attr) of every entry of a store directory, kept while the
        tree is the verified one: warm walks list the same directories again."""
        cached = self._dir_rows.get(inode.ino)
        if cached is not None and cached[0] is node:
            return cached[1]
        assert node.entries is not None
        rows = []
        for key, name in node.sorted_keys():
            child = node.entries[name]
            ino = self.store_inode(inode.base, (*inode.rel, name), inode.space)
            rows.append((key, name, Attr.of(ino, child)))
        rec = self.store.records.get(inode.base)
        if rec is not None and rec.tree_verified:
            if len(self._dir_rows) >= DIR_ROWS_CACHE:
                self._dir_rows.clear()
            self._dir_rows[inode.ino] = (node, rows)
        return rows

    # -- overlay data redirects --------------------------------------------

    async def overlay_xattr(self, ino: int, name: bytes) -> bytes | None:
        """``trusted.overlay.metacopy``/``redirect`` of a regular file whose path
        is materialised: an overlay with ``<cache>/store`` as a data-only lower
        layer then reads its data there (one page cache, no FUSE), and the file
        through FUSE otherwise. Only overlay (as root) reads these names.
        An inode the kernel holds from an earlier daemon is found again first:
        overlay asks metacopy, then redirect, and across a restart the two
        questions may reach two daemons; saying "none" to the second is EIO
        for the file ("metacopy with no lower data found")."""
        if name not in (METACOPY, REDIRECT):
            return None
        inode = await self._inode(ino)
        if inode.kind != "store" or inode.space != REDIRECTING:
            return None
        rec = self.store.records.get(inode.base)
        if rec is None or not rec.materialized or not rec.tree_verified or rec.tree is None:
            return None
        node = resolve(rec.tree, inode.rel)
        if node is None or node.kind != REGULAR:
            return None
        if name == METACOPY:
            return b""
        return os.fsencode("/" + "/".join((inode.base, *inode.rel)))

    # -- data -------------------------------------------------------------

    async def _data_path(self, inode: Inode) -> Path:
        root = await self.store.materialize(inode.base)
        return root.joinpath(*inode.rel)

    async def readlink(self, ino: int) -> str:
        inode = await self._inode(ino)
        if inode.kind != "store" or (await self.node(inode)).kind != SYMLINK:
            raise InvalidRequest("not a symlink")
        target = await self.store.indexed_target(inode.base, inode.rel)
        if target is not None:
            return target
        self.store.pin(inode.base)
        try:
            return os.readlink(await self._data_path(inode))
        finally:
            self.store.unpin(inode.base)

    async def open(self, ino: int) -> int:
        """Open regular file *ino* for reading (fetching its store path); the
        handle is *ino* itself, one cache file for all its open files."""
        inode = await self._inode(ino)
        if inode.kind != "store":
            raise IsADir("directory")
        node = await self.node(inode)
        if node.kind == DIRECTORY:
            raise IsADir(inode.base)
        if node.kind != REGULAR:
            raise InvalidRequest("not a regular file")
        self.store.pin(inode.base)
        try:
            handle = self.handles.get(ino)
            if handle is None:
                handle = await self._open_handle(inode)
            else:
                handle.opens += 1
        except BaseException:
            self.store.unpin(inode.base)
            raise
        self.store.touch(inode.base)
        self._first_read(inode, node)
        return ino

    async def _open_handle(self, inode: Inode) -> Handle:
        """A new handle: read chunk by chunk when the path's cache offers a
        trusted file index, else from the materialised path."""
        entry = await self.store.open_indexed(inode.base, inode.rel)
        if entry is None:
            return await self._open_data(inode)
        handle = self.handles.get(inode.ino)  # opened by another open meanwhile
        if handle is not None:
            self.store.close_indexed(entry)
            handle.opens += 1
            return handle
        handle = self.handles[inode.ino] = Handle(-1, inode.base, entry=entry)
        return handle

    async def _open_data(self, inode: Inode) -> Handle:
        path = await self._data_path(inode)
        handle = self.handles.get(inode.ino)  # opened by another open meanwhile
        if handle is not None:
            handle.opens += 1
            return handle
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        handle = self.handles[inode.ino] = Handle(fd, inode.base)
        return handle

    def _first_read(self, inode: Inode, node: Node) -> None:
        """The event log and the profiles learn of a file's first open. An
        inode is shared by every way to a path, so a read counts for the root
        and for every view that has the path."""
        if (inode.base, inode.rel) in self._opened:
            return
        self._opened.add((inode.base, inode.rel))
        file = "/".join(inode.rel)
        when = self.store.events.record("read", inode.base, file=file, size=node.size).time
        for recorder in [self.profile] + [v.profile for v in self.views.values()
                                          if inode.base in v.bases]:
            recorder.read(inode.base, file, node.size, when)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if handle is None:
            handle = await self._reopen(fh)
        if handle.entry is not None:
            data = await self.store.read_indexed(handle.base, handle.entry, offset, size)
            if data is not None:
                self.bytes_served += len(data)
                return data
            await self._whole_nar(fh, handle)  # the index failed: never again for this path
        if size > 1 << 20:
            data = await trio.to_thread.run_sync(os.pread, handle.fd, size, offset)
        else:
            data = os.pread(handle.fd, size, offset)
        self.bytes_served += len(data)
        return data

    async def _whole_nar(self, fh: int, handle: Handle) -> None:
        path = await self._data_path(await self._inode(fh))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if handle.entry is None or self.handles.get(fh) is not handle:
            os.close(fd)  # another read got there first, or the file was released
            return
        self.store.close_indexed(handle.entry)
        handle.fd, handle.entry = fd, None

    async def _reopen(self, fh: int) -> Handle:
        """The handle of a file an earlier daemon opened: opened again from its
        inode, counted as one open (the next release closes it; a later read
        opens it again)."""
        try:
            inode = await self._inode(fh)
        except NoEntry:
            raise BadHandle(f"file handle {fh}") from None
        if inode.kind != "store":
            raise BadHandle(f"file handle {fh}")
        log.debug("file handle %d of an earlier daemon: opening %s again", fh, inode.base)
        self.store.pin(inode.base)
        try:
            return await self._open_handle(inode)
        except BaseException:
            self.store.unpin(inode.base)
            raise

    def release(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if handle is None:  # opened by an earlier daemon and never read here
            return
        handle.opens -= 1
        self.store.unpin(handle.base)
        if handle.opens <= 0:
            del self.handles[fh]
            if handle.entry is not None:
                self.store.close_indexed(handle.entry)
            else:
                os.close(handle.fd)

    def open_files(self) -> int:
        return sum(h.opens for h in self.handles.values())

    def close_all(self) -> None:
        for fh, handle in list(self.handles.items()):
            for _ in range(handle.opens):
                self.release(fh)

    def statfs(self) -> dict[str, int]:
        """Sizes as df shows them: the room the cache has (its quota, else the
        file system it is on), what it holds, and what is left to fetch into."""
        block = 4096
        disk = os.statvfs(self.store.cache_dir)
        disk_free = disk.f_bavail * disk.f_frsize // block
        used = -(-self.store.used_bytes // block)
        if self.store.cache_limit is None:
            total, free = disk.f_blocks * disk.f_frsize // block, disk_free
        else:
            total = max(used, self.store.cache_limit // block)
            free = min(total - used, disk_free)
        return {
            "f_bsize": block, "f_frsize": block, "f_blocks": total,
            "f_bfree": free, "f_bavail": free,
            "f_files": len(self.store.records) + len(self.inodes),
            "f_ffree": 0, "f_favail": 0, "f_namemax": 255,
        }

    # -- views ------------------------------------------------------------

    async def create_view(self, view_id: str, bases: list[str]) -> str:
        """Create view *view_id* of store paths *bases*; returns ``.views/<id>``."""
        check_view_id(view_id)
        wanted = tuple(dict.fromkeys(bases))
        if self._existing_view(view_id, wanted):
            return f"{VIEWS_NAME}/{view_id}"
        # The view exists at once; its paths' narinfos and listings come in the
        # background, and a lookup of one waits only for that one.
        for base in wanted:
            self.store.parse(base)  # a name that is no store path: refused now
        self._add_view(view_id, wanted)
        self.store.resolve_soon(list(wanted))
        log.info("view %s created with %d store paths", view_id, len(wanted))
        self._views_changed()
        return f"{VIEWS_NAME}/{view_id}"

    def _add_view(self, view_id: str, bases: tuple[str, ...]) -> None:
        view = View(view_id, bases)
        for level in range(len(self.store_dir_parts) + 1):
            ino = stable_ino("\1view", view_id, str(level))
            while ino in self.inodes:  # a collision, or the last view of this id
                ino += 1
            self.inodes[ino] = Inode(ino, "viewdir", view=view, level=level)
            view.dirs.append(ino)
        for base in bases:
            self.store.pin(base)
        self.views[view_id] = view

    def restore_views(self, views: dict[str, list[str]]) -> None:
        """The views an earlier daemon served on this mount, with their inodes."""
        for view_id, bases in views.items():
            check_view_id(view_id)
            self._add_view(view_id, tuple(bases))
            self.store.resolve_soon(list(bases))
        if views:
            log.info("%d views restored", len(views))

    def _views_changed(self) -> None:
        if self.views_changed is not None:
            self.views_changed({i: list(v.bases) for i, v in self.views.items()})

    def _existing_view(self, view_id: str, wanted: tuple[str, ...]) -> bool:
        """True if *view_id* exists with exactly *wanted*; an error if with others."""
        old = self.views.get(view_id)
        if old is None:
            return False
        if old.bases != wanted:
            raise InvalidRequest(f"view {view_id} exists with other store paths")
        return True

    def remove_view(self, view_id: str) -> None:
        view = self.views.pop(view_id, None)
        if view is None:  # idempotent: the snapshotter may remove after a restart
            log.info("view %s does not exist: nothing to remove", view_id)
            return
        for base in view.bases:
            self.store.unpin(base)
        for ino in view.dirs:
            inode = self.inodes.get(ino)
            if inode is not None and inode.lookups <= 0:
                del self.inodes[ino]
        log.info("view %s removed", view_id)
        self._views_changed()


def _space_ino(space: str, base: str, rel: tuple[str, ...]) -> int:
    return stable_ino(base, *rel) if not space else stable_ino("\2" + space, base, *rel)


def _numbered(
    records: Iterable[tuple[str, Any]],
) -> Iterator[tuple[int, tuple[str, tuple[str, ...], str]]]:
    """(stable inode number, (basename, path, space)) of every node of every
    known tree, in both spaces."""
    for base, rec in records:
        if rec.tree is None:
            continue
        stack: list[tuple[tuple[str, ...], Node]] = [((), rec.tree)]
        while stack:
            rel, node = stack.pop()
            yield stable_ino(base, *rel), (base, rel, "")
            yield _space_ino(REDIRECTING, base, rel), (base, rel, REDIRECTING)
            if node.kind == DIRECTORY and node.entries:
                stack.extend(((*rel, name), child) for name, child in node.entries.items())
