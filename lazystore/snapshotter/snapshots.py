"""The snapshotter's operations, independent of gRPC.

Overlay semantics follow containerd's overlayfs snapshotter. Nix layers get a
daemon view directly above them in every descendant's lowerdir stack: found by
content at Commit (empty placeholders under nix/store), or made from labels at
Prepare (then the view is the whole layer and Prepare answers AlreadyExists,
as remote snapshotters do).

Views come from a :class:`~lazystore.snapshotter.views.ViewProvider` given to
the snapshotter. An operation holds the locks of the keys it works on (the
snapshot's and a new name's), never one lock for all: a daemon call for one
snapshot's view, which may take minutes, holds up no other snapshot. Metadata
transactions contain no await, so each is atomic for every other operation,
which re-checks what it read before an await (a parent removed meanwhile is
NotFound). Blocking file system work runs in threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from lazystore.control.protocol import DATA_VIEW_SUFFIX
from lazystore.errors import ControlError
from lazystore.nix import fsio
from lazystore.nix.storepath import DEFAULT_STORE_DIR
from lazystore.snapshotter import filters, nixlayer, overlay
from lazystore.snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from lazystore.snapshotter.metadata import Kind, MetaStore, Snapshot
from lazystore.snapshotter.views import ViewProvider

log = logging.getLogger(__name__)

# containerd's own limit (labels.Validate): a label's key and value together.
LABEL_MAX_BYTES = 4096


def check_labels(labels: Mapping[str, str]) -> None:
    """InvalidArgument for a label containerd itself would refuse (too big)."""
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > LABEL_MAX_BYTES:
            raise InvalidArgument(
                f"label {key[:80]!r} is longer than {LABEL_MAX_BYTES} bytes (key and value)"
            )


def _lock_root(root: Path) -> int:
    """An exclusive lock on *root* for this process's lifetime (a second
    snapshotter on the same directory would corrupt it); its descriptor."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Unavailable(f"another snapshotter already uses {root}") from None
    return fd


def view_prefix(root: Path, instance: str) -> str:
    """Short prefix of this snapshotter's view ids (several may share one daemon,
    and a re-created root must not reuse an old database's views)."""
    ident = f"{root.resolve()}\0{instance}"
    return "sn" + hashlib.sha256(ident.encode()).hexdigest()[:8]


class KeyLocks:
    """One asyncio lock per snapshot key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        """Keys whose lock someone holds or waits for."""
        return len(self._locks)

    def locked(self, key: str) -> bool:
        return key in self._locks and self._locks[key][0].locked()

    @asynccontextmanager
    async def hold(self, *keys: str) -> AsyncIterator[None]:
        """Hold the locks of *keys* (in sorted order, so two holders never deadlock)."""
        async with AsyncExitStack() as stack:
            for key in sorted(set(keys)):
                await stack.enter_async_context(self._one(key))
            yield

    @asynccontextmanager
    async def _one(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Snapshotter:
    def __init__(
        self,
        root: Path,
        views: ViewProvider,
        store_dir: str = DEFAULT_STORE_DIR,
    ) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root
        self.store_dir = store_dir
        self._root_lock = _lock_root(root)
        try:
            self.meta = MetaStore(root / "metadata.db")
        except BaseException:
            os.close(self._root_lock)
            raise
        self.layout = overlay.Layout(root)
        self.views = views
        self._prefix = view_prefix(root, self.meta.instance)
        self.locks = KeyLocks()
        # A kill leaves at most directories without a row (a Prepare whose
        # transaction never committed, a Remove between its row and its
        # directories): removed before the first request, as Cleanup would.
        for path in self.layout.orphans(self.meta.ids()):
            self._remove_orphan(path)

    def close(self) -> None:
        self.meta.close()
        os.close(self._root_lock)

    async def settle(self, timeout: float) -> None:
        """Wait (at most *timeout* s) until no operation holds a snapshot's
        lock: every change is finished or undone."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.locks) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    # -- views --------------------------------------------------------------

    def view_id(self, snapshot_id: int) -> str:
        return f"{self._prefix}-{snapshot_id}"

    async def _view(self, snap: Snapshot, data: bool = False) -> str:
        """The directory of the nix layer's view, which the provider makes if needed;
        with *data*, its view whose files redirect an overlay into the daemon's
        data directory (for an overlay that has it as a data-only layer only)."""
        view_id = self.view_id(snap.id) + (DATA_VIEW_SUFFIX if data else "")
        # the profile goes with the layer's first view (made at pull), not again
        ahead = [] if data else nixlayer.profile_of(snap.labels)
        try:
            await self.views.ensure(view_id, snap.nix_paths or [], snap.nix_closure, ahead)
        except ControlError as exc:
            raise Unavailable(f"no view for nix layer {snap.key!r}: {exc}") from None
        return self.views.path(view_id)

    async def _made_views(self, snap: Snapshot) -> None:
        """The nix layer's view and, where containers' overlays will use it, its
        data view, asked at once (a container's Prepare then finds both made)."""
        data = self.layout.data_layers and await self.views.data_layer() is not None
        made = await asyncio.gather(self._view(snap), *([self._view(snap, True)] if data else []),
                                    return_exceptions=True)
        for result in made:
            if isinstance(result, BaseException):
                raise result

    async def restore_views(self) -> None:
        """Re-create the views of every nix layer (after a restart of either
        process); the daemon's data directory is asked first, before any
        container's Prepare needs it."""
        if self.layout.data_layers:
            await self.views.data_layer()
        layers = [s for s in self.meta.all() if s.is_nix and s.kind == Kind.COMMITTED]
        for snap in layers:
            try:
                await self._view(snap)
            except Unavailable as exc:
                log.warning("%s (will retry when a container needs it)", exc)
        log.info("views of %d nix layers restored", len(layers))

    async def _lowers(self, chain: list[Snapshot], data: bool = False) -> list[str]:
        lowers: list[str] = []
        for snap in chain:
            if snap.is_nix:
                view = await self._view(snap, data)
                link = "view" + (DATA_VIEW_SUFFIX if data else "")
                try:
                    lowers.append(await asyncio.to_thread(self.layout.view_link, snap.id, view,
                                                          link))
                except FileNotFoundError:
                    self._same(snap)  # removed during the daemon call: NotFound
                    raise
            if not snap.remote:
                lowers.append(self.layout.fs(snap.id))
        return lowers

    async def _layers(
        self, chain: list[Snapshot], active: bool, id_: int | None
    ) -> tuple[list[str], str | None]:
        """The lowerdirs of a snapshot over *chain*, and the daemon's data
        directory when it goes below them as a data-only layer: with nix layers,
        on a kernel that has data-only layers, when the options fit in a page
        (*id_* None: not known yet, the longest is assumed); else the plain views."""
        data = None
        if self.layout.data_layers and any(s.is_nix for s in chain):
            data = await self.views.data_layer()
        if data is not None:
            lowers = await self._lowers(chain, data=True)
            some = id_ if id_ is not None else 10**12
            mounts = overlay.mounts(active=active, upper=self.layout.fs(some),
                                    work=self.layout.work(some), lowers=lowers,
                                    index_off=self.layout.index_off, data=data)
            if overlay.with_data_layer(mounts):
                return lowers, data
        return await self._lowers(chain), None

    async def _mounts(self, snap: Snapshot) -> list[overlay.Mount]:
        active = snap.kind == Kind.ACTIVE
        lowers, data = await self._layers(self.meta.chain(snap), active, snap.id)
        return overlay.mounts(
            active=active,
            upper=self.layout.fs(snap.id),
            work=self.layout.work(snap.id),
            lowers=lowers,
            index_off=self.layout.index_off,
            data=data,
        )

    # -- lookups -------------------------------------------------------------

    def _get(self, key: str) -> Snapshot:
        snap = self.meta.get(key) if key else None
        if snap is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return snap

    def parent_key(self, snap: Snapshot) -> str:
        return self.meta.by_id(snap.parent_id).key if snap.parent_id is not None else ""

    def stat(self, key: str) -> Snapshot:
        return self._get(key)

    # -- operations ---------------------------------------------------------

    async def prepare(
        self, key: str, parent: str, labels: Mapping[str, str], kind: Kind = Kind.ACTIVE
    ) -> list[overlay.Mount]:
        labels = dict(labels)
        if not key:
            raise InvalidArgument("snapshot key is empty")
        check_labels(labels)
        nix = nixlayer.parse_labels(labels, self.store_dir)
        target = labels.get(nixlayer.SNAPSHOT_REF, "")
        remote = nix is not None and bool(target) and kind == Kind.ACTIVE
        async with self.locks.hold(key, *([target] if remote else [])):
            if self.meta.get(key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            parent_snap = self._parent(parent)
            if remote:
                assert nix is not None
                await self._remote(target, parent_snap, labels, nix)
                raise AlreadyExists(f"target snapshot {target!r} already exists")
            return await self._create(key, parent_snap, labels, kind, nix)

    def _same(self, snap: Snapshot) -> None:
        """NotFound unless *snap* (read before an await) is still there."""
        now = self.meta.get(snap.key)
        if now is None or now.id != snap.id:
            raise NotFound(f"snapshot {snap.key!r} was removed meanwhile")

    def _parent(self, parent: str) -> Snapshot | None:
        if not parent:
            return None
        snap = self.meta.get(parent)
        if snap is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if snap.kind != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return snap

    async def _create(
        self,
        key: str,
        parent: Snapshot | None,
        labels: dict[str, str],
        kind: Kind,
        nix: nixlayer.NixLabels | None,
    ) -> list[overlay.Mount]:
        # The parents' views first: no daemon call while a transaction is open
        # (Stat and List must never see a row that may still be rolled back).
        chain = [parent, *self.meta.chain(parent)] if parent else []
        lowers, data = await self._layers(chain, kind == Kind.ACTIVE, None)
        with self.meta.transaction():
            if parent is not None:
                self._same(parent)  # not removed during the daemon calls
            snap = self.meta.insert(
                key, parent.id if parent else None, kind, labels,
                nix_paths=list(nix.paths) if nix else None,
                nix_closure=nix.closure if nix else None,
            )
            self.layout.create(snap.id, kind == Kind.ACTIVE)
        mounts = overlay.mounts(
            active=kind == Kind.ACTIVE,
            upper=self.layout.fs(snap.id),
            work=self.layout.work(snap.id),
            lowers=lowers,
            index_off=self.layout.index_off,
            data=data,
        )
        log.info("%s %s (id %d, parent %r)", kind.filter_name, key, snap.id,
                 parent.key if parent else "")
        return mounts

    async def _remote(
        self,
        target: str,
        parent: Snapshot | None,
        labels: dict[str, str],
        nix: nixlayer.NixLabels,
    ) -> None:
        """Commit *target* with a daemon view as its whole content (remote snapshot)."""
        if self.meta.get(target) is not None:
            return
        with self.meta.transaction():
            snap = self.meta.insert(
                target, parent.id if parent else None, Kind.COMMITTED, labels,
                nix_paths=list(nix.paths) or None, nix_closure=nix.closure, remote=True,
            )
            self.layout.create(snap.id, False)
        # The view once the row is committed (no daemon call inside a transaction);
        # if the daemon refuses, the snapshot is taken back. (After a crash in
        # between, the start-up restores its view like any other's.)
        try:
            await self._made_views(snap)
        except BaseException:
            with self.meta.transaction():
                self.meta.delete(snap)
            await asyncio.to_thread(self.layout.remove, snap.id)
            raise
        log.info("remote nix snapshot %s (id %d, %d store paths)", target, snap.id,
                 len(nix.paths))

    async def mounts(self, key: str) -> list[overlay.Mount]:
        async with self.locks.hold(key):
            snap = self._get(key)
            if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            return await self._mounts(snap)

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        check_labels(labels)
        async with self.locks.hold(key, name):
            snap = self._get(key)
            if snap.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            if not name:
                raise InvalidArgument("commit name is empty")
            if self.meta.get(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            fs = self.layout.fs(snap.id)
            size, inodes = await asyncio.to_thread(overlay.usage, fs)
            found = await asyncio.to_thread(nixlayer.scan_placeholders, Path(fs), self.store_dir)
            paths = found or snap.nix_paths
            if paths or snap.nix_closure:
                # The view before the row changes: a refusal leaves the snapshot
                # active, and no transaction is open during the daemon call.
                await self._made_views(dataclasses.replace(snap, nix_paths=paths))
            with self.meta.transaction():
                self.meta.commit(snap, name, dict(labels), size, inodes, paths)
        log.info("committed %s as %s (id %d%s)", key, name, snap.id,
                 f", nix layer of {len(paths)} store paths" if paths else "")

    async def remove(self, key: str) -> None:
        async with self.locks.hold(key):
            snap = self._get(key)
            if self.meta.has_children(snap.id):
                raise FailedPrecondition(f"cannot remove snapshot {key!r} with children")
            with self.meta.transaction():
                self.meta.delete(snap)
            # Directories after the row: a crash in between leaves an orphan for
            # Cleanup, never a listed snapshot without its directory.
            await asyncio.to_thread(self.layout.remove, snap.id)
            if snap.is_nix and snap.kind == Kind.COMMITTED:
                await self._drop_view(snap)
        log.info("removed %s (id %d)", key, snap.id)

    async def _drop_view(self, snap: Snapshot) -> None:
        try:
            await self.views.remove(self.view_id(snap.id))
            await self.views.remove(self.view_id(snap.id) + DATA_VIEW_SUFFIX)
        except ControlError as exc:
            # The snapshot is gone either way; a stale view only costs the daemon memory.
            log.info("view of %s not removed: %s", snap.key, exc)

    async def update(
        self, key: str, labels: Mapping[str, str], paths: list[str]
    ) -> Snapshot:
        check_labels(labels)
        async with self.locks.hold(key):
            snap = self._get(key)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels."):]
                    if label in labels:
                        new[label] = labels[label]
                    else:
                        new.pop(label, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of snapshot {key!r}")
            with self.meta.transaction():
                return self.meta.set_labels(snap, new)

    def list(self, filter_texts: list[str]) -> list[Snapshot]:
        try:
            parsed = filters.parse_any(filter_texts)
        except filters.FilterError as exc:
            raise InvalidArgument(str(exc)) from None
        snaps = self.meta.all()
        keys = {s.id: s.key for s in snaps}
        out = []
        for snap in snaps:
            parent = keys.get(snap.parent_id, "") if snap.parent_id is not None else ""
            adaptor = filters.snapshot_adaptor(snap.key, parent, snap.kind.filter_name,
                                               snap.labels)
            if filters.match_any(parsed, adaptor):
                out.append(snap)
        return out

    async def usage(self, key: str) -> tuple[int, int]:
        snap = self._get(key)
        if snap.kind == Kind.ACTIVE:
            return await asyncio.to_thread(overlay.usage, self.layout.fs(snap.id))
        return snap.size, snap.inodes

    async def cleanup(self) -> None:
        # No lock: a snapshot's directories appear in the transaction of its row,
        # so at any await every directory without a row is an orphan.
        for path in self.layout.orphans(self.meta.ids()):
            await asyncio.to_thread(self._remove_orphan, path)

    @staticmethod
    def _remove_orphan(path: Path) -> None:
        log.info("cleanup: removing %s", path)
        fsio.remove_tree(path, True)

