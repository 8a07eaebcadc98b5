"""Pure parts of the snapshotter: containerd filters, nix labels, placeholders, mounts."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc
import pytest

from lazystore.errors import ControlError, LazystoreError
from lazystore.snapshotter import errors, filters, nixlayer, overlay
from lazystore.snapshotter.service import status_code

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
    (store / "not-a-store-path").mkdir()
    assert nixlayer.scan_placeholders(tmp_path, "/nix/store") == [
        f"/nix/store/{H}-dir", f"/nix/store/{'0' * 31}2-file",
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


def test_every_snapshotter_error_has_its_grpc_code() -> None:
    assert status_code(errors.NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code(errors.AlreadyExists("x")) == grpc.StatusCode.ALREADY_EXISTS
    assert status_code(errors.FailedPrecondition("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_code(errors.InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(nixlayer.InvalidLabel("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(errors.Unavailable("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_code(ControlError("x")) == grpc.StatusCode.UNKNOWN
    assert status_code(LazystoreError("x")) == grpc.StatusCode.UNKNOWN


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
    from lazystore.snapshotter.metadata import Kind
    from lazystore.snapshotter.snapshots import Snapshotter

    async def scenario() -> None:
        sn = Snapshotter(tmp_path / "root", str(tmp_path / "ctl.sock"), str(tmp_path / "mnt"))
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

    from lazystore.snapshotter.snapshots import Snapshotter

    def view_id(root: Path) -> str:
        sn = Snapshotter(root, str(tmp_path / "ctl.sock"), str(tmp_path / "mnt"))
        try:
            return sn.views.view_id(1)
        finally:
            sn.close()

    root = tmp_path / "root"
    first = view_id(root)
    assert view_id(root) == first  # a restart keeps its views' names
    shutil.rmtree(root)
    assert view_id(root) != first
    assert view_id(tmp_path / "other") != first
