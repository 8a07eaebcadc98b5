"""Pure parts of the snapshotter: containerd filters, nix labels, placeholders, mounts."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import sqlite3
from pathlib import Path

import grpc
import pytest

from lazystore import snapshotter
from lazystore.errors import LazystoreError, SnapshotterError
from lazystore.snapshotter import errors, filters, nixlayer, overlay
from lazystore.snapshotter.metadata import Kind
from lazystore.snapshotter.service import status_code
from lazystore.snapshotter.snapshots import Snapshotter
from tests.support.fakeviews import FakeViews

H = "0" * 31 + "1"
P = f"/nix/store/{H}-liba"


def adaptor(name: str = "n", parent: str = "p", kind: str = "active",
            **labels: str) -> filters.Adaptor:
    return filters.snapshot_adaptor(name, parent, kind, labels)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name==n", True),
        ("name==x", False),
        ('name=="n"', True),
        ("parent==p,kind==active", True),
        ("parent==p,kind==view", False),
        ("name!=x", True),
        ("name~=^n$", True),
        ("name~=^x", False),
        ('labels."containerd.io/snapshot.ref"==sha256:abc', True),
        ("labels.containerd.io/snapshot.ref==sha256:abc", True),
        ('labels."containerd.io/snapshot.ref"==sha256:abd', False),
        ("labels.a", True),
        ("labels.missing", False),
        ("labels.missing!=x", True),
        ('labels."with,comma"=="a,b"', True),
        ("  name == n , parent == p ", True),
        ("unknown==x", False),
    ],
)
def test_filter_matches(text: str, expected: bool) -> None:
    ad = adaptor(**{"containerd.io/snapshot.ref": "sha256:abc", "a": "1", "with,comma": "a,b"})
    assert filters.parse(text).matches(ad) is expected


@pytest.mark.parametrize("text", ['name=="open', "==x", "name==", "name==x,,", 'name=="\\q"'])
def test_malformed_filters_are_refused(text: str) -> None:
    with pytest.raises(filters.FilterError):
        filters.parse(text)


def test_several_filters_are_ored_and_none_matches_all() -> None:
    parsed = filters.parse_any(["name==x", "name==n"])
    assert filters.match_any(parsed, adaptor())
    assert filters.match_any(filters.parse_any([]), adaptor())
    assert not filters.match_any(filters.parse_any(["name==x"]), adaptor())


def test_regex_errors_are_filter_errors() -> None:
    with pytest.raises(filters.FilterError):
        filters.parse("name~=(").matches(adaptor())


def test_nix_labels_give_paths_or_closure() -> None:
    labels = {nixlayer.NIX_LAYER: "true", nixlayer.NIX_STORE_PATH + "10": P,
              nixlayer.NIX_STORE_PATH + "2": P + "x", nixlayer.NIX_STORE_PATH + "11": P,
              "other": "ignored"}
    got = nixlayer.parse_labels(labels, "/nix/store")
    assert got == nixlayer.NixLabels((P + "x", P))  # index order, duplicates once
    closure = nixlayer.parse_labels({nixlayer.NIX_CLOSURE: P}, "/nix/store")
    assert closure == nixlayer.NixLabels((), P)
    assert nixlayer.parse_labels({"containerd.io/snapshot.ref": "x"}, "/nix/store") is None


@pytest.mark.parametrize(
    "labels",
    [
        {nixlayer.NIX_STORE_PATH + "0": "/etc/passwd"},
        {nixlayer.NIX_STORE_PATH + "0": f"/nix/store/{H}-x/../../etc"},
        {nixlayer.NIX_STORE_PATH + "0": "/nix/store/.."},
        {nixlayer.NIX_STORE_PATH + "0": "/nix/store/hello"},
        {nixlayer.NIX_STORE_PATH + "0": f"nix/store/{H}-x"},
        {nixlayer.NIX_STORE_PATH + "0": f"/nix/store/{H}-x\n"},
        {nixlayer.NIX_STORE_PATH + "01": P},
        {nixlayer.NIX_STORE_PATH + "-1": P},
        {nixlayer.NIX_CLOSURE: "/tmp/closure"},
        {nixlayer.NIX_LAYER: "true"},
    ],
)
def test_hostile_nix_labels_are_invalid_arguments(labels: dict[str, str]) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        nixlayer.parse_labels(labels, "/nix/store")
    assert "\n" not in str(info.value)


def test_placeholders_are_empty_entries_with_store_path_names(tmp_path: Path) -> None:
    store = tmp_path / "nix/store"
    (store / f"{H}-dir").mkdir(parents=True)
    (store / f"{'0' * 31}2-file").write_bytes(b"")
    (store / f"{'0' * 31}3-full").mkdir()
    (store / f"{'0' * 31}3-full/x").write_bytes(b"x")
    (store / f"{'0' * 31}4-nonempty").write_bytes(b"x")
    (store / f"{'0' * 31}5-link").symlink_to("/")
    (store / f"{'0' * 31}6-script").write_bytes(b"")
    (store / f"{'0' * 31}6-script").chmod(0o555)  # as image build and nix-snapshotter
    (store / f"{'0' * 31}7-empty").write_bytes(b"")
    (store / f"{'0' * 31}7-empty").chmod(0o444)  # a store path that is an empty file
    (store / "not-a-store-path").mkdir()
    assert nixlayer.scan_placeholders(tmp_path, "/nix/store") == [
        f"/nix/store/{H}-dir", f"/nix/store/{'0' * 31}2-file",
        f"/nix/store/{'0' * 31}6-script",
    ]
    assert nixlayer.scan_placeholders(tmp_path / "nothing", "/nix/store") == []


def test_mount_rules_follow_containerds_overlayfs_snapshotter() -> None:
    assert overlay.mounts(active=True, upper="/u", work="/w", lowers=[], index_off=False) == [
        overlay.Mount("bind", "/u", ["rw", "rbind"])]
    assert overlay.mounts(active=False, upper="/u", work="/w", lowers=["/a"],
                          index_off=False) == [overlay.Mount("bind", "/a", ["ro", "rbind"])]
    assert overlay.mounts(active=True, upper="/u", work="/w", lowers=["/a", "/b"],
                          index_off=True) == [overlay.Mount(
                              "overlay", "overlay",
                              ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/a:/b"])]
    assert overlay.mounts(active=False, upper="/u", work="/w", lowers=["/a", "/b"],
                          index_off=False) == [overlay.Mount("overlay", "overlay",
                                                             ["lowerdir=/a:/b"])]


# containerd's errdefs, as its proxy client maps gRPC codes back to them.
ERRDEFS = {
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "AlreadyExists": grpc.StatusCode.ALREADY_EXISTS,
    "FailedPrecondition": grpc.StatusCode.FAILED_PRECONDITION,
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
}


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def _instance(cls: type[Exception]) -> Exception:
    """An instance of *cls* whatever its constructor wants (status_code looks at the class)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, "x")
    return exc


def test_every_snapshotter_error_has_its_grpc_code() -> None:
    # Every module of the snapshotter loaded, so that every error class exists.
    for module in pkgutil.walk_packages(snapshotter.__path__, "lazystore.snapshotter."):
        importlib.import_module(module.name)
    classes = _subclasses(SnapshotterError)
    assert {c.__name__ for c in classes} >= set(ERRDEFS) | {"InvalidLabel"}
    for cls in classes:
        errdefs = [ERRDEFS[base.__name__] for base in cls.__mro__
                   if base.__module__ == errors.__name__ and base.__name__ in ERRDEFS]
        assert errdefs, f"{cls.__qualname__} is not one of containerd's errdefs"
        assert status_code(_instance(cls)) == errdefs[0], cls
    # A failure of the snapshotter's own (its metadata) or of any other layer
    # reaching the service is no errdef: UNKNOWN, and logged as an error.
    for cls in {SnapshotterError} | _subclasses(LazystoreError) - classes - {SnapshotterError}:
        assert status_code(_instance(cls)) == grpc.StatusCode.UNKNOWN, cls


class _FailingCommit:
    """A sqlite connection whose COMMIT fails, as on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


def test_failed_commit_of_a_remove_loses_nothing_and_unblocks(tmp_path: Path) -> None:
    async def scenario() -> None:
        sn = Snapshotter(tmp_path / "root", FakeViews(tmp_path / "mnt"))
        try:
            await sn.prepare("a", "", {}, Kind.ACTIVE)
            fs = Path(sn.layout.fs(sn.stat("a").id))
            (fs / "data").write_bytes(b"kept")
            real = sn.meta._db
            sn.meta._db = _FailingCommit(real)  # type: ignore[assignment]
            with pytest.raises(LazystoreError, match="disk is full") as info:
                await sn.remove("a")
            assert "\n" not in str(info.value)
            sn.meta._db = real
            # The row was rolled back and its directory is untouched...
            assert sn.stat("a").kind == Kind.ACTIVE
            assert (fs / "data").read_bytes() == b"kept"
            # ...and the connection is not left inside a transaction.
            assert not real.in_transaction
            await sn.prepare("b", "", {}, Kind.ACTIVE)
            await sn.remove("a")
            assert not fs.exists() and [s.key for s in sn.list([])] == ["b"]
        finally:
            sn.close()

    asyncio.run(scenario())


def test_view_ids_differ_for_a_recreated_root(tmp_path: Path) -> None:
    # Snapshot ids restart at 1 in a new database: a daemon still holding the old
    # database's views must not have them reused for the new snapshots.
    import shutil

    def view_id(root: Path) -> str:
        sn = Snapshotter(root, FakeViews(tmp_path / "mnt"))
        try:
            return sn.view_id(1)
        finally:
            sn.close()

    root = tmp_path / "root"
    first = view_id(root)
    assert view_id(root) == first  # a restart keeps its views' names
    shutil.rmtree(root)
    assert view_id(root) != first
    assert view_id(tmp_path / "other") != first


def test_a_slow_view_holds_up_no_other_snapshot(tmp_path: Path) -> None:
    async def placeholder(sn: Snapshotter, key: str) -> int:
        await sn.prepare(key, "", {})
        snap_id = sn.stat(key).id
        (Path(sn.layout.fs(snap_id)) / "nix/store" / f"{H}-liba").mkdir(parents=True)
        return snap_id

    async def scenario() -> None:
        views = FakeViews(tmp_path / "mnt")
        sn = Snapshotter(tmp_path / "root", views)
        try:
            slow_id = await placeholder(sn, "slow-extract")
            await placeholder(sn, "quick-extract")
            await sn.prepare("plain", "", {})
            views.hold, views.hold_ids = True, {sn.view_id(slow_id)}
            slow = asyncio.create_task(sn.commit("slow", "slow-extract", {}))
            assert await asyncio.to_thread(views.asked.wait, 60)
            # While the provider sits on that view, every other snapshot is served,
            # another nix layer's view included.
            await sn.prepare("b", "", {"x": "1"})
            assert sn.stat("b").labels == {"x": "1"}
            await sn.update("b", {"x": "2"}, [])
            await sn.commit("quick", "quick-extract", {})
            await sn.mounts("plain")
            await sn.prepare("ctr", "quick", {})
            await sn.remove("b")
            assert {s.key for s in sn.list([])} == {"slow-extract", "quick", "plain", "ctr"}
            assert not slow.done()
            # An operation on the held snapshot itself waits for its turn.
            same = asyncio.create_task(sn.remove("slow-extract"))
            await asyncio.sleep(0)
            assert sn.locks.locked("slow-extract") and not same.done()
            views.release.set()
            await slow
            with pytest.raises(errors.NotFound):  # the commit renamed it first
                await same
            assert sn.stat("slow").kind == Kind.COMMITTED
            assert len(sn.locks) == 0
        finally:
            views.release.set()
            sn.close()

    asyncio.run(scenario())


def test_a_parent_removed_during_a_view_call_fails_the_prepare(tmp_path: Path) -> None:
    async def scenario() -> None:
        views = FakeViews(tmp_path / "mnt")
        sn = Snapshotter(tmp_path / "root", views)
        try:
            await sn.prepare("extract", "", {})
            fs = Path(sn.layout.fs(sn.stat("extract").id))
            (fs / "nix/store" / f"{H}-liba").mkdir(parents=True)
            await sn.commit("nix", "extract", {})
            views.hold = True
            child = asyncio.create_task(sn.prepare("ctr", "nix", {}))
            assert await asyncio.to_thread(views.asked.wait, 60)
            views.hold = False
            await sn.remove("nix")  # no child yet: allowed
            views.release.set()
            with pytest.raises(errors.NotFound, match="removed meanwhile"):
                await child
            assert sn.list([]) == [] and list(sn.layout.snapshots.iterdir()) == []
        finally:
            views.release.set()
            sn.close()

    asyncio.run(scenario())
