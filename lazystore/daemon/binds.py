"""Finished store paths bound read-only over their directory in the mount.

A store path whose data is in the cache is verified and never changes, so
nothing the daemon does is needed to read it: once a directory path has been
materialised, the daemon bind-mounts ``<cache>/store/<base>`` (read-only,
nosuid, nodev) over ``<mountpoint>/<base>``. The kernel then resolves
everything below it on the cache's file system (native reads and stat walks,
the cache file system's page cache) and never asks FUSE.

- Only verified data: a bind is made after ``materialize`` returned, from the
  path's directory in ``store/``, where only a verified NAR is renamed to.
  The unpacker gives everything Nix's mtime (1), so a bind shows what FUSE
  shows; a path in an older cache, unpacked with real mtimes, stays on FUSE.
- Eviction: the store asks :meth:`Binds.release` first; the bind is unmounted
  without ``MNT_DETACH``, so a path that a process still uses below the bind
  (an open file, a mapping, a working directory) is busy (EBUSY), and the
  store keeps it as if it were pinned. A mount namespace made since (``unshare
  -m``, a container runtime, every Nix command) holds a copy of every mount,
  ours included, that our unmount does not reach unless the mount is shared:
  each such copy at the path's place in a copy of the FUSE mount is unmounted
  in its own namespace first, also without ``MNT_DETACH`` (EBUSY while used
  there: the path stays), after which that namespace reads the path through
  its copy of the FUSE mount. Any other copy (a bind someone made of the
  path) keeps the path. Nothing is pulled from under a reader.
- The mount calls resolve ``<mountpoint>/<base>`` through FUSE: they run in a
  worker thread while the trio thread goes on answering the kernel.
- The bind is made with the new mount API (``open_tree``, ``mount_setattr``,
  ``move_mount``): it is read-only from the moment it appears.
- Stop: every bind is detached (``MNT_DETACH``) before the FUSE mount goes.
  At start, binds left over the mount by an earlier daemon (a restart that
  kept the mount) are adopted if their path is still materialised, else
  detached; an eviction asked before that waits for it (else it would delete
  a directory the old bind still shows: ENOENT below it).
- Where mounting is not permitted (no CAP_SYS_ADMIN), binding is switched off
  with one INFO line and everything is served through FUSE as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import trio

from lazystore.nix.fsio import NIX_TIMES
from lazystore.store.cache import LocalStore
from lazystore.store.tree import DIRECTORY

log = logging.getLogger(__name__)

# x86_64 and aarch64 share these numbers (the new syscalls are numbered alike).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
CLONE_FS = 0x200
CLONE_NEWNS = 0x20000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def bind_read_only(source: str, target: str) -> None:
    """Mount a read-only (nosuid, nodev) clone of *source* on *target* (blocking)."""
    fd = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                              OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), "open_tree")
    try:
        attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
        _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                             ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
               "mount_setattr")
        _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target),
                             MOVE_MOUNT_F_EMPTY_PATH), "move_mount")
    finally:
        os.close(fd)


def _bind_canonical(source: str, target: str) -> bool:
    """Bind *source* on *target* if it was unpacked with Nix's mtime (as the mount
    shows it); a path unpacked by an older lazystore is left to FUSE."""
    if os.lstat(source).st_mtime != NIX_TIMES[1]:
        return False
    bind_read_only(source, target)
    return True


def unmount(target: str, lazily: bool) -> None:
    """umount2(*target*); OSError(EBUSY) if in use and not *lazily* (blocking)."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazily else 0)
    _check(_libc.umount2(os.fsencode(target), flags), "umount2")


def _optional(fields: list[str]) -> list[str]:
    """A mountinfo line's optional fields (shared:N, master:N, ...)."""
    return fields[6:fields.index("-")]


class _Bind(NamedTuple):
    """Our bind as /proc/self/mountinfo shows it."""

    device: str  # major:minor of the cache's file system
    root: str  # the path's directory within it
    groups: set[str]  # peer groups, as "shared:N" and "master:N"
    parent_device: str  # the FUSE mount's major:minor


class Copy(NamedTuple):
    """Another mount of a bind's tree: a bind of it, or a mount namespace's copy."""

    pid: int  # a process of its mount namespace
    ns: int  # that namespace's inode
    mount_id: str
    point: str  # its mount point, as *pid* sees it
    over_mount: bool  # at the path's place in a copy of the FUSE mount


def _mountinfo_bind(target: str) -> _Bind | None:
    """Our bind at *target* (the last mount there: the one on top)."""
    found: list[str] | None = None
    devices: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            devices[fields[0]] = fields[2]
            if _unescape(fields[4]) == target:
                found = fields
    if found is None:
        return None
    groups = {g.replace("shared:", "master:") for g in _optional(found)
              if g.startswith("shared:")}
    groups |= {g.replace("master:", "shared:") for g in groups}
    return _Bind(found[2], _unescape(found[3]), groups, devices.get(found[1], ""))


def _namespaces() -> Iterator[tuple[int, int, list[list[str]]]]:
    """(a pid, namespace inode, mountinfo lines split) of every mount namespace."""
    seen: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if ns in seen:
                continue
            with open(f"/proc/{pid}/mountinfo") as f:
                lines = [line.split() for line in f]
        except OSError:  # gone, or a kernel thread
            continue
        seen.add(ns)
        yield int(pid), ns, lines


def copies_of(bind: _Bind, target: str) -> list[Copy]:
    """Every mount of the tree *bind* shows except our bind at *target* and
    those our unmount reaches (our peer group, or a slave of it: a namespace
    made later under a shared mount), in every mount namespace (blocking)."""
    own_ns = os.stat("/proc/self/ns/mnt").st_ino
    base = os.path.basename(target)
    out = []
    for pid, ns, lines in _namespaces():
        mounts = {fields[0]: fields for fields in lines}
        for fields in lines:
            mroot = _unescape(fields[3])
            if fields[2] != bind.device or not _within(mroot, bind.root):
                continue
            point = _unescape(fields[4])
            if ns == own_ns and point == target:
                continue  # ours
            if bind.groups & set(_optional(fields)):
                continue  # our unmount reaches it
            parent = mounts.get(fields[1])
            over = (parent is not None and mroot == bind.root
                    and parent[2] == bind.parent_device
                    and _place(parent, point) == "/" + base)
            out.append(Copy(pid, ns, fields[0], point, over))
    return out


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _place(parent: list[str], point: str) -> str:
    """Where *point* is within the file system of the *parent* mount."""
    rel = posixpath.relpath(point, _unescape(parent[4]))
    return posixpath.normpath(posixpath.join(_unescape(parent[3]), rel))


def unmount_copy(copy: Copy) -> None:
    """Unmount *copy* in its own mount namespace, not lazily: OSError(EBUSY)
    while something there uses it; nothing if its namespace is gone (blocking).
    A thread may enter another mount namespace only with a file system context
    (root, working directory) of its own: a fresh thread makes one and ends."""
    if copy.ns == os.stat("/proc/self/ns/mnt").st_ino:
        unmount(copy.point, lazily=False)
        return
    failure: list[OSError] = []
    thread = threading.Thread(target=_unmount_there, args=(copy, failure),
                              name="unmount-copy")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _unmount_there(copy: Copy, failure: list[OSError]) -> None:
    try:
        _check(_libc.unshare(CLONE_FS), "unshare")
        try:
            root = os.open(f"/proc/{copy.pid}/root", os.O_PATH | os.O_DIRECTORY)
            ns = os.open(f"/proc/{copy.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return  # the process is gone
        try:
            if os.fstat(ns).st_ino != copy.ns:
                return  # its pid is another process's now
            _check(_libc.setns(ns, CLONE_NEWNS), "setns")
            os.fchdir(root)  # mountinfo's paths are from the process's root
            os.chroot(".")
            unmount(copy.point, lazily=False)
        finally:
            os.close(root)
            os.close(ns)
    except OSError as exc:
        failure.append(exc)


def mounts_below(directory: str) -> list[str]:
    """Mount points directly below *directory*, from /proc/self/mountinfo."""
    prefix = directory.rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point.startswith(prefix) and "/" not in point[len(prefix):]:
                out.append(point)
    return out


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    raw = field.encode()
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


class Binds:
    """The binds over one mount point; all methods run on the trio thread."""

    def __init__(self, store: LocalStore, mountpoint: str) -> None:
        self.store = store
        self.mountpoint = mountpoint
        self.bound: set[str] = set()
        self.enabled = True
        self._lock = trio.Lock()  # one mount call at a time, never two for one path
        self._send, self._receive = trio.open_memory_channel[str](10_000)
        self._queued: set[str] = set()
        # Set once the binds an earlier daemon left are known (adopted or
        # detached): until then a release would not know a path is bound.
        self._adopted = trio.Event()

    def _target(self, base: str) -> str:
        return os.path.join(self.mountpoint, base)

    def materialized(self, base: str) -> None:
        """*base*'s data is in the cache: bind it soon (a no-op if bound or queued)."""
        if not self.enabled or base in self.bound or base in self._queued:
            return
        try:
            self._send.send_nowait(base)
        except trio.WouldBlock:  # a burst: this one is bound on its next use
            return
        self._queued.add(base)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The binding task (the daemon's nursery): adopt leftovers, then bind
        what :meth:`materialized` queues, one at a time."""
        try:
            await self._adopt()
        finally:
            self._adopted.set()
        task_status.started()
        async for base in self._receive:
            self._queued.discard(base)
            if self.enabled:
                await self._bind(base)

    async def _adopt(self) -> None:
        points = await trio.to_thread.run_sync(mounts_below, self.mountpoint)
        for point in points:
            base = os.path.basename(point)
            rec = self.store.records.get(base)
            if rec is not None and rec.materialized:
                self.bound.add(base)
                continue
            log.info("detaching the bind over %s left by an earlier daemon", point)
            try:
                await trio.to_thread.run_sync(unmount, point, True)
            except OSError as exc:
                log.warning("cannot detach %s: %s", point, exc.strerror)
        if self.bound:
            log.info("adopted %d binds left by an earlier daemon", len(self.bound))

    async def _bind(self, base: str) -> None:
        async with self._lock:
            rec = self.store.records.get(base)
            if (base in self.bound or rec is None or not rec.materialized
                    or rec.tree is None or rec.tree.kind != DIRECTORY):
                return
            source = str(self.store.data_path(base))
            try:
                # The mount call resolves its target through FUSE: a stop that
                # cancels the FUSE loop meanwhile must not wait for it (it would
                # never return), so it is abandoned; a bind it still makes is
                # adopted by the next daemon, as any bind left over.
                if not await trio.to_thread.run_sync(_bind_canonical, source,
                                                     self._target(base),
                                                     abandon_on_cancel=True):
                    return
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOSYS):
                    self.enabled = False
                    log.info("not binding finished paths over the mount (%s): "
                             "everything is served through FUSE", exc.strerror)
                elif exc.errno != errno.ENOENT:  # evicted meanwhile: nothing to bind
                    log.warning("cannot bind %s: %s", base, exc.strerror)
                return
            self.bound.add(base)
            log.debug("bound %s", base)

    async def release(self, base: str) -> bool:
        """Unbind *base* before its data goes; False if a process still uses it.
        Always under the lock: a bind of it in progress finishes first (it may
        have opened the directory already), then is undone. Not before the
        binds an earlier daemon left are adopted: evicting a path whose old
        bind is not yet known would leave that bind over a deleted directory
        (ENOENT for everything below it). Copies of the bind in other mount
        namespaces go first (:meth:`_free_copies`)."""
        await self._adopted.wait()
        async with self._lock:
            if base not in self.bound:
                return True
            target = self._target(base)
            bind = await trio.to_thread.run_sync(_mountinfo_bind, target)
            if bind is not None and not await self._free_copies(base, bind, target):
                return False
            try:
                await trio.to_thread.run_sync(unmount, target, False)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    log.info("%s is in use below its bind: not evicted", base)
                    return False
                if exc.errno != errno.EINVAL:  # EINVAL: not a mount point (any more)
                    log.warning("cannot unbind %s: %s", base, exc.strerror)
                    return False
            self.bound.discard(base)
            # A namespace made since the first look copied the bind: kept if
            # that copy cannot go (here the path is served by FUSE meanwhile).
            return bind is None or await self._free_copies(base, bind, target)

    async def _free_copies(self, base: str, bind: _Bind, target: str) -> bool:
        """Unmount the copies of *base*'s bind that our unmount would not reach,
        each in its own mount namespace (``unshare -m``, a container runtime and
        every Nix command make one, with a copy of every mount), so they do not
        keep the path while nothing uses them: there, the path is then read
        through that namespace's copy of the FUSE mount, as here. False (the
        path stays) if one is in use, or is not at the path's place in a copy
        of the mount (a bind someone made of it: unmounting that would show
        whatever is below it)."""
        copies = await trio.to_thread.run_sync(copies_of, bind, target)
        for copy in copies:
            if not copy.over_mount:
                log.info("%s is mounted elsewhere too (at %s, the mount namespace of "
                         "pid %d): not evicted", base, copy.point, copy.pid)
                return False
        for copy in copies:
            try:
                await trio.to_thread.run_sync(unmount_copy, copy)
            except OSError as exc:
                if copy not in await trio.to_thread.run_sync(copies_of, bind, target):
                    continue  # gone meanwhile (its namespace unmounted it)
                if exc.errno == errno.EBUSY:
                    log.info("%s is in use below a copy of its bind (the mount "
                             "namespace of pid %d): not evicted", base, copy.pid)
                else:
                    log.info("%s is mounted elsewhere too (the mount namespace of "
                             "pid %d: %s): not evicted", base, copy.pid, exc)
                return False
            log.debug("unmounted the copy of %s's bind in the mount namespace of pid %d",
                      base, copy.pid)
        return True

    async def detach_all(self) -> None:
        """Detach every bind (lazily: readers keep theirs), before the mount goes."""
        self.enabled = False
        async with self._lock:
            for base in sorted(self.bound):
                try:
                    await trio.to_thread.run_sync(unmount, self._target(base), True)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        log.warning("cannot detach the bind of %s: %s", base, exc.strerror)
            if self.bound:
                log.info("detached %d binds", len(self.bound))
            self.bound.clear()


def bound_paths(mountpoint: str | Path) -> list[str]:
    """Basenames bound over *mountpoint* (for tests and status)."""
    return sorted(os.path.basename(p) for p in mounts_below(str(mountpoint)))
