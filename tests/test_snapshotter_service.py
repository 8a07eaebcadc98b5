"""The snapshotter's gRPC service called exactly as containerd calls it.

The service runs in this process (its own asyncio loop in a thread) over an
in-process fake of the view provider (tests/support/fakeviews.py), so these
tests need neither FUSE nor a daemon; the real provider, the daemon's views
over the control socket, is covered end to end (tests/test_e2e_containers.py,
tests/test_deploy_ready.py). What only the process does (READY=1, refusing a
second instance, one-line errors) is tested on a ``lazystore snapshotter``
child process. Tests that mount overlays need root and skip without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from lazystore.snapshotter.proto import snapshots_pb2 as pb
from lazystore.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lazystore.snapshotter.service import start_server
from lazystore.snapshotter.snapshots import Snapshotter
from lazystore.testing.containerd import snapshotter_process, unmount_below
from lazystore.testing.snapcrash import read_rows
from tests.support.fakeviews import FakeViews

H1 = "0" * 31 + "1"
H2 = "0" * 31 + "2"
H3 = "0" * 31 + "3"
P1, P2, P3 = f"/nix/store/{H1}-liba", f"/nix/store/{H2}-busybox", f"/nix/store/{H3}-hello.txt"
REF = "containerd.io/snapshot.ref"
NIX_LAYER = "containerd.io/snapshot/nix-layer"
NIX_PATH = "containerd.io/snapshot/nix-store-path."
ROOT = os.geteuid() == 0
T = TypeVar("T")


class Env:
    """A snapshotter serving gRPC on a unix socket from a loop thread of this process."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.address = base / "sn.sock"
        self.mount_point = base / "mnt"
        self.mount_point.mkdir()
        self.views = FakeViews(self.mount_point)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.snapshotter: Snapshotter | None = None
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.Channel | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def start(self) -> pb_grpc.SnapshotsStub:
        """As ``lazystore snapshotter`` starts: views restored (the process serves
        meanwhile; here first, so that tests see them in order), serving."""

        async def up() -> tuple[Snapshotter, grpc.aio.Server]:
            sn = Snapshotter(self.root, self.views)
            try:
                await sn.restore_views()
                return sn, await start_server(sn, str(self.address))
            except BaseException:
                sn.close()
                raise

        self.snapshotter, self.server = self.run(up())
        self.channel = grpc.insecure_channel(f"unix:{self.address}")
        return pb_grpc.SnapshotsStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.server is not None:
            self.run(self.server.stop(None))
            self.server = None
        if self.snapshotter is not None:
            self.snapshotter.close()
            self.snapshotter = None

    def close(self) -> None:
        self.views.release.set()  # nothing may stay held
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(60)
        self.loop.close()


@pytest.fixture
def env() -> Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="lzsn-", dir="/tmp"))  # unix socket paths are short
    e = Env(base)
    try:
        yield e
    finally:
        e.close()
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sn(env: Env) -> pb_grpc.SnapshotsStub:
    return env.start()


# -- helpers ------------------------------------------------------------------


def prepare(sn: pb_grpc.SnapshotsStub, key: str, parent: str = "", **labels: str) -> list:
    return list(sn.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)).mounts)


def commit(sn: pb_grpc.SnapshotsStub, name: str, key: str) -> None:
    sn.Commit(pb.CommitSnapshotRequest(name=name, key=key))


def listing(sn: pb_grpc.SnapshotsStub, *filters: str) -> list[pb.Info]:
    return [i for resp in sn.List(pb.ListSnapshotsRequest(filters=filters)) for i in resp.info]


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def upper_of(mounts: list) -> str:
    if mounts[0].type == "bind":
        return mounts[0].source
    return next(o for o in mounts[0].options if o.startswith("upperdir="))[len("upperdir="):]


def lowers_of(mounts: list) -> list[str]:
    opt = next(o for o in mounts[0].options if o.startswith("lowerdir="))
    return opt[len("lowerdir="):].split(":")


def layer(sn: pb_grpc.SnapshotsStub, name: str, parent: str = "", files: dict | None = None,
          dirs: tuple[str, ...] = ()) -> None:
    """Prepare, write *files* (relative path -> bytes) and *dirs*, commit as *name*."""
    mounts = prepare(sn, f"extract-{name}", parent)
    upper = Path(upper_of(mounts))
    for d in dirs:
        (upper / d).mkdir(parents=True, exist_ok=True)
    for rel, data in (files or {}).items():
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        (upper / rel).write_bytes(data)
    commit(sn, name, f"extract-{name}")


# -- overlay semantics --------------------------------------------------------


def test_socket_is_private(env: Env, sn: pb_grpc.SnapshotsStub) -> None:
    assert stat.S_IMODE(os.stat(env.address).st_mode) == 0o600
    assert listing(sn) == []


def test_the_process_notifies_ready_once_it_serves(env: Env) -> None:
    # No nix layers yet, so no daemon is asked at start: none runs here.
    with snapshotter_process(env.root, env.address, env.base / "no-daemon.sock",
                             env.mount_point, log_file=env.base / "snapshotter.log"):
        # snapshotter_process waited for READY=1 on NOTIFY_SOCKET; it serves by then.
        with grpc.insecure_channel(f"unix:{env.address}") as channel:
            assert listing(pb_grpc.SnapshotsStub(channel)) == []
        assert stat.S_IMODE(os.stat(env.address).st_mode) == 0o600


def test_sigterm_while_the_daemon_makes_a_view_stops_at_once_and_takes_the_snapshot_back(
    env: Env,
) -> None:
    # A daemon that takes a connection and answers nothing (a view of a huge
    # closure, a daemon hung): the stop must not wait for it (the view call's
    # timeout is minutes; systemd would SIGKILL), and the remote snapshot the
    # call was for is taken back before the database closes.
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(env.base / "ctl.sock"))
    hung.listen(8)
    log = env.base / "snapshotter.log"
    with hung, snapshotter_process(env.root, env.address, env.base / "ctl.sock",
                                   env.mount_point, log_file=log) as proc:
        with grpc.insecure_channel(f"unix:{env.address}") as channel:
            labels = {REF: "sha256:" + "a" * 64, NIX_LAYER: "true", NIX_PATH + "0": P1}
            call = pb_grpc.SnapshotsStub(channel).Prepare.future(
                pb.PrepareSnapshotRequest(key="extract-1", labels=labels))
            asked, _ = hung.accept()  # the view call is in flight
            with asked:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
            assert call.exception().code() in (  # type: ignore[union-attr]
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert ": ERROR: " not in log.read_text()
    assert read_rows(env.root / "metadata.db") == []
    assert list((env.root / "snapshots").iterdir()) == []


def test_a_start_serves_before_the_views_of_its_nix_layers_come_back(env: Env) -> None:
    # A restart while the daemon is hung (or busy with a restart of its own):
    # containerd gets answers at once, the views are re-made meanwhile.
    nix_layer(env.start())
    env.stop()
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(env.base / "ctl.sock"))
    hung.listen(8)
    log = env.base / "snapshotter.log"
    with hung, snapshotter_process(env.root, env.address, env.base / "ctl.sock",
                                   env.mount_point, log_file=log, timeout=20) as proc:
        with grpc.insecure_channel(f"unix:{env.address}") as channel:
            assert [i.name for i in listing(pb_grpc.SnapshotsStub(channel))] == ["nix"]
        asked, _ = hung.accept()  # the view is being asked for
        with asked:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    assert ": ERROR: " not in log.read_text()


def test_first_layer_is_a_bind_mount_and_commit_makes_it_committed(
    sn: pb_grpc.SnapshotsStub,
) -> None:
    mounts = prepare(sn, "k1", **{"x": "y"})
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rw", "rbind"])]
    info = sn.Stat(pb.StatSnapshotRequest(key="k1")).info
    assert (info.name, info.kind, info.parent) == ("k1", pb.ACTIVE, "")
    assert dict(info.labels) == {"x": "y"}
    commit(sn, "c1", "k1")
    info = sn.Stat(pb.StatSnapshotRequest(key="c1")).info
    assert (info.name, info.kind) == ("c1", pb.COMMITTED)
    assert info.created_at.seconds > 0
    assert code_of(lambda: sn.Stat(pb.StatSnapshotRequest(key="k1"))) == grpc.StatusCode.NOT_FOUND


def test_active_snapshot_stacks_lowerdirs_nearest_parent_first(sn: pb_grpc.SnapshotsStub) -> None:
    layer(sn, "l1", files={"a": b"1"})
    layer(sn, "l2", "l1", files={"b": b"2"})
    mounts = prepare(sn, "ctr", "l2")
    assert mounts[0].type == "overlay"
    lowers = lowers_of(mounts)
    assert len(lowers) == 2
    assert (Path(lowers[0]) / "b").read_bytes() == b"2"
    assert (Path(lowers[1]) / "a").read_bytes() == b"1"
    opts = list(mounts[0].options)
    assert any(o.startswith("workdir=") for o in opts)
    assert any(o.startswith("upperdir=") for o in opts)
    assert len(",".join(opts)) < 4096
    assert list(sn.Mounts(pb.MountsRequest(key="ctr")).mounts) == mounts


def test_views_are_read_only(sn: pb_grpc.SnapshotsStub) -> None:
    layer(sn, "l1", files={"a": b"1"})
    one = list(sn.View(pb.ViewSnapshotRequest(key="v1", parent="l1")).mounts)
    assert [(m.type, list(m.options)) for m in one] == [("bind", ["ro", "rbind"])]
    assert (Path(one[0].source) / "a").read_bytes() == b"1"
    layer(sn, "l2", "l1", files={"b": b"2"})
    two = list(sn.View(pb.ViewSnapshotRequest(key="v2", parent="l2")).mounts)
    assert two[0].type == "overlay"
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in two[0].options)
    assert len(lowers_of(two)) == 2
    assert sn.Stat(pb.StatSnapshotRequest(key="v2")).info.kind == pb.VIEW


def test_errors_use_the_codes_containerd_expects(sn: pb_grpc.SnapshotsStub) -> None:
    prepare(sn, "a")
    assert code_of(lambda: prepare(sn, "a")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: prepare(sn, "b", "nope")) == grpc.StatusCode.NOT_FOUND
    # an active parent
    assert code_of(lambda: prepare(sn, "b", "a")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: prepare(sn, "")) == grpc.StatusCode.INVALID_ARGUMENT
    commit(sn, "ca", "a")
    assert code_of(lambda: commit(sn, "x", "ca")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: commit(sn, "x", "nope")) == grpc.StatusCode.NOT_FOUND
    prepare(sn, "c", "ca")
    assert code_of(lambda: commit(sn, "ca", "c")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(
        lambda: sn.Mounts(pb.MountsRequest(key="ca"))
    ) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(
        lambda: sn.Remove(pb.RemoveSnapshotRequest(key="ca"))
    ) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(
        lambda: sn.Remove(pb.RemoveSnapshotRequest(key="zz"))
    ) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: sn.Usage(pb.UsageRequest(key="zz"))) == grpc.StatusCode.NOT_FOUND
    # "c" still active: nothing was lost by the failed calls.
    assert sn.Stat(pb.StatSnapshotRequest(key="c")).info.kind == pb.ACTIVE


def test_remove_frees_the_parent_and_the_directories(env: Env, sn: pb_grpc.SnapshotsStub) -> None:
    layer(sn, "l1", files={"a": b"1"})
    upper = upper_of(prepare(sn, "c", "l1"))
    sn.Remove(pb.RemoveSnapshotRequest(key="c"))
    assert not Path(upper).exists()
    sn.Remove(pb.RemoveSnapshotRequest(key="l1"))
    assert listing(sn) == []
    assert [p.name for p in (env.root / "snapshots").iterdir()] == []


def test_update_labels_with_and_without_field_mask(sn: pb_grpc.SnapshotsStub) -> None:
    prepare(sn, "k", a="1", b="2")

    def update(labels: dict, paths: list[str] | None) -> dict:
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="k", labels=labels))
        if paths is not None:
            req.update_mask.paths.extend(paths)
        return dict(sn.Update(req).info.labels)

    assert update({"b": "20", "c": "3"}, ["labels.b"]) == {"a": "1", "b": "20"}
    assert update({}, ["labels.a"]) == {"b": "20"}  # absent from info: removed
    assert update({"z": "9"}, ["labels"]) == {"z": "9"}
    assert update({"y": "8"}, None) == {"y": "8"}
    assert dict(sn.Stat(pb.StatSnapshotRequest(key="k")).info.labels) == {"y": "8"}
    assert code_of(lambda: update({}, ["parent"])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(
        lambda: sn.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="nope")))
    ) == grpc.StatusCode.NOT_FOUND


def test_list_filters(sn: pb_grpc.SnapshotsStub) -> None:
    prepare(sn, "k1", **{REF: "sha256:one"})
    commit(sn, "base", "k1")
    prepare(sn, "k2", "base", **{REF: "sha256:two"})
    prepare(sn, "k3", "base", other="x")

    def names(*filters: str) -> set[str]:
        return {i.name for i in listing(sn, *filters)}

    assert names() == {"base", "k2", "k3"}
    assert names(f'labels."{REF}"==sha256:two') == {"k2"}
    assert names(f'labels."{REF}"==sha256:two,parent=="base"') == {"k2"}
    assert names(f'labels."{REF}"==sha256:two,parent=="other"') == set()
    assert names('parent==base') == {"k2", "k3"}
    assert names("kind==committed") == {"base"}
    assert names("labels.other", "name==base") == {"k3", "base"}  # several filters: OR
    assert names("name~=^k[23]$,labels.other!=x") == {"k2"}
    assert code_of(lambda: listing(sn, 'name=="unterminated')) == grpc.StatusCode.INVALID_ARGUMENT
    info = next(i for i in listing(sn, "name==k2"))
    assert info.parent == "base"


def test_usage_counts_active_and_committed_content(sn: pb_grpc.SnapshotsStub) -> None:
    upper = Path(upper_of(prepare(sn, "k")))
    (upper / "f").write_bytes(b"x" * 100_000)
    usage = sn.Usage(pb.UsageRequest(key="k"))
    assert usage.size >= 100_000 and usage.inodes == 1
    commit(sn, "c", "k")
    assert sn.Usage(pb.UsageRequest(key="c")).size == usage.size


def test_cleanup_removes_directories_no_snapshot_owns(env: Env, sn: pb_grpc.SnapshotsStub) -> None:
    layer(sn, "l1", files={"a": b"1"})
    orphan = env.root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)
    sn.Cleanup(pb.CleanupRequest())
    assert not orphan.exists()
    assert sn.Stat(pb.StatSnapshotRequest(key="l1")).info.kind == pb.COMMITTED
    assert len(list((env.root / "snapshots").iterdir())) == 1



def test_a_start_removes_directories_a_killed_snapshotter_left(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    # What a kill -9 leaves (lazystore.testing.snapcrash makes them for real):
    # a Prepare's directory whose row never committed, one half made, one a
    # Remove had renamed away and one it had not (its row already gone).
    layer(sn, "l1", files={"a": b"1"})
    env.stop()
    snapshots = env.root / "snapshots"
    for name in ("7", "new-8", "rm-9", "10"):
        (snapshots / name / "fs" / "etc").mkdir(parents=True)
        (snapshots / name / "fs" / "etc" / "f").write_bytes(b"left")
    (snapshots / "7" / "work").mkdir()
    sn2 = env.start()
    assert sorted(p.name for p in snapshots.iterdir()) == ["1"]
    assert sn2.Stat(pb.StatSnapshotRequest(key="l1")).info.kind == pb.COMMITTED
    mounts = list(sn2.View(pb.ViewSnapshotRequest(key="v", parent="l1")).mounts)
    assert (Path(mounts[0].source) / "a").read_bytes() == b"1"


# -- nix layers ---------------------------------------------------------------


def nix_layer(sn: pb_grpc.SnapshotsStub, name: str = "nix") -> None:
    """A layer as `lazystore image build` / nix-snapshotter make: empty placeholders."""
    layer(
        sn, name,
        dirs=(f"nix/store/{H1}-liba", f"nix/store/{H2}-busybox", f"nix/store/{'0' * 31}4-full",
              "nix/store/not-a-store-path"),
        files={f"nix/store/{H3}-hello.txt": b"", f"nix/store/{'0' * 31}4-full/x": b"real"},
    )


def test_nix_layer_is_detected_by_its_placeholders(env: Env, sn: pb_grpc.SnapshotsStub) -> None:
    nix_layer(sn)
    creates = env.views.creates()
    assert len(creates) == 1
    # Only empty placeholders with store path names; the non-empty dir is real content.
    assert sorted(creates[0]["paths"]) == [P1, P2, P3]
    mounts = prepare(sn, "ctr", "nix")
    lowers = lowers_of(mounts)
    view = env.mount_point / ".views" / creates[0]["id"]
    assert os.path.realpath(lowers[0]) == str(view)  # the view sits directly above its layer
    assert (Path(lowers[1]) / "nix/store" / f"{H1}-liba").is_dir()


def test_view_stays_directly_above_its_layer_in_a_deeper_chain(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    layer(sn, "base", files={"etc/os": b"base"})
    nix_layer(sn)  # parentless, so build a chain: base -> nix' -> top
    layer(sn, "nix2", "base", dirs=(f"nix/store/{H1}-liba",))
    layer(sn, "top", "nix2", files={"etc/app": b"app"})
    lowers = lowers_of(prepare(sn, "ctr", "top"))
    assert len(lowers) == 4
    assert (Path(lowers[0]) / "etc/app").exists()
    assert ".views" in os.path.realpath(lowers[1])
    assert (Path(lowers[2]) / "nix/store" / f"{H1}-liba").is_dir()
    assert (Path(lowers[3]) / "etc/os").exists()


@pytest.mark.skipif(not ROOT, reason="mounting overlayfs needs root")
def test_overlay_shows_view_content_through_placeholders(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    nix_layer(sn)
    mounts = prepare(sn, "ctr", "nix")
    target = env.base / "rootfs"
    target.mkdir()
    m = mounts[0]
    subprocess.run(["mount", "-t", m.type, m.source, str(target), "-o", ",".join(m.options)],
                   check=True)
    try:
        store = target / "nix/store"
        assert (store / f"{H1}-liba/content").read_text() == f"content of {H1}-liba\n"
        assert (store / f"{H2}-busybox/content").exists()
        assert (store / f"{'0' * 31}4-full/x").read_bytes() == b"real"
        (target / "written").write_text("rw")  # the container's upper layer is writable
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert (Path(upper_of(mounts)) / "written").read_text() == "rw"


def test_labels_make_a_remote_snapshot_as_containerds_unpacker_expects(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    layer(sn, "default/1/base", files={"etc/os": b"base"})
    labels = {REF: "sha256:chain", NIX_LAYER: "true", NIX_PATH + "0": P1, NIX_PATH + "1": P2}
    key = "default/2/extract-123 sha256:chain"
    assert code_of(lambda: prepare(sn, key, "default/1/base", **labels)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    # containerd's metadata layer then looks the target up by ref and parent...
    found = listing(sn, f'labels."{REF}"==sha256:chain,parent=="default/1/base"')
    assert [(i.name, i.kind, i.parent) for i in found] == [
        ("sha256:chain", pb.COMMITTED, "default/1/base")
    ]
    assert found[0].labels[REF] == "sha256:chain"
    # ...and Stats it; the extract key itself was never created.
    assert sn.Stat(pb.StatSnapshotRequest(key="sha256:chain")).info.kind == pb.COMMITTED
    assert code_of(lambda: sn.Stat(pb.StatSnapshotRequest(key=key))) == grpc.StatusCode.NOT_FOUND
    creates = env.views.creates()
    assert [sorted(a["paths"]) for a in creates] == [[P1, P2]]
    # The view is the layer's whole content: directly above the base layer.
    lowers = lowers_of(prepare(sn, "ctr", "sha256:chain"))
    assert os.path.realpath(lowers[0]) == str(env.mount_point / ".views" / creates[0]["id"])
    assert (Path(lowers[1]) / "etc/os").exists() and len(lowers) == 2
    # A second pull of the same layer: AlreadyExists again, no second view.
    before = len(env.views.calls)
    assert code_of(lambda: prepare(sn, "default/3/extract-456 sha256:chain", "default/1/base",
                                   **labels)) == grpc.StatusCode.ALREADY_EXISTS
    assert env.views.calls[before:] == []
    assert {a["id"] for a in env.views.creates()} == {creates[0]["id"]}


def test_closure_label_asks_for_a_closure_view(env: Env, sn: pb_grpc.SnapshotsStub) -> None:
    info = f"/nix/store/{'1' * 32}-closure-info"
    labels = {REF: "sha256:c", "containerd.io/snapshot/nix-closure": info}
    assert code_of(lambda: prepare(sn, "x sha256:c", **labels)) == grpc.StatusCode.ALREADY_EXISTS
    creates = env.views.creates()
    assert creates[0]["closure_info"] == info
    mounts = prepare(sn, "ctr", "sha256:c")
    assert [os.path.realpath(p) for p in lowers_of(mounts)] == [
        str(env.mount_point / ".views" / creates[0]["id"])
    ]


@pytest.mark.parametrize(
    ("label", "value", "message"),
    [
        (NIX_PATH + "0", "/etc/passwd", "not in the store"),
        (NIX_PATH + "0", f"/nix/store/../../etc/{H1}-x", "sub-path"),
        (NIX_PATH + "0", "/nix/store/..", "store path"),
        (NIX_PATH + "0", "/nix/store/not-a-store-path", "store path"),
        (NIX_PATH + "0", f"/nix/store/{H1}-x/../../etc", "sub-path"),
        (NIX_PATH + "0", f"/nix/store/{H1}-x/bin", "sub-path"),
        (NIX_PATH + "x", P1, "index"),
        ("containerd.io/snapshot/nix-closure", "relative/path", "not in the store"),
        (NIX_LAYER, "true", "without any"),
    ],
)
def test_hostile_labels_are_refused_and_nothing_is_created(
    env: Env, sn: pb_grpc.SnapshotsStub, label: str, value: str, message: str
) -> None:
    labels = {REF: "sha256:evil", NIX_LAYER: "true", label: value}
    with pytest.raises(grpc.RpcError) as info:
        prepare(sn, "extract sha256:evil", **labels)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details() and "\n" not in info.value.details()
    assert listing(sn) == []
    assert env.views.calls == []
    assert list((env.root / "snapshots").iterdir()) == []


def test_oversized_labels_are_refused_as_containerd_refuses_them(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    # containerd's limit: key and value together at most 4096 bytes.
    fits = {"k": "v" * 4095}
    big = {"k": "v" * 4096}
    assert code_of(lambda: prepare(sn, "a", **big)) == grpc.StatusCode.INVALID_ARGUMENT
    assert listing(sn) == [] and list((env.root / "snapshots").iterdir()) == []
    prepare(sn, "a", **fits)
    assert code_of(
        lambda: sn.Commit(pb.CommitSnapshotRequest(name="c", key="a", labels=big))
    ) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: sn.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="a", labels=big)))) == grpc.StatusCode.INVALID_ARGUMENT
    info = sn.Stat(pb.StatSnapshotRequest(key="a")).info
    assert info.kind == pb.ACTIVE and dict(info.labels) == fits
    # A large nix label set (1000 store paths) is fine: no 128-path limit.
    many = {NIX_LAYER: "true"}
    many.update({f"{NIX_PATH}{i}": f"/nix/store/{i:032d}-p" for i in range(1000)})
    prepare(sn, "n", **many)
    commit(sn, "nc", "n")
    creates = env.views.creates()
    assert len(creates[-1]["paths"]) == 1000


def test_labels_without_ref_describe_the_layer_committed_later(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    # No snapshot.ref: an ordinary Prepare; the labelled paths make the layer a nix
    # layer at Commit even though the layer itself holds no placeholders.
    prepare(sn, "k", **{NIX_LAYER: "true", NIX_PATH + "0": P1})
    commit(sn, "c", "k")
    creates = env.views.creates()
    assert [a["paths"] for a in creates] == [[P1]]
    lowers = lowers_of(prepare(sn, "ctr", "c"))
    assert os.path.realpath(lowers[0]) == str(env.mount_point / ".views" / creates[0]["id"])


def test_daemon_unavailable_fails_commit_and_loses_nothing(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    mounts = prepare(sn, "k")
    (Path(upper_of(mounts)) / f"nix/store/{H1}-liba").mkdir(parents=True)
    env.views.refuse = True
    assert code_of(lambda: commit(sn, "c", "k")) == grpc.StatusCode.UNAVAILABLE
    assert sn.Stat(pb.StatSnapshotRequest(key="k")).info.kind == pb.ACTIVE
    env.views.refuse = False
    commit(sn, "c", "k")
    assert sn.Stat(pb.StatSnapshotRequest(key="c")).info.kind == pb.COMMITTED


def test_no_uncommitted_state_is_visible_while_the_daemon_is_asked(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    # Stat and List do not wait for the snapshotter's lock: while a daemon call is
    # pending (a slow view), they must show only what is committed.
    nix_layer(sn)
    prepare(sn, "k")
    env.views.reset_views()  # as a restarted daemon: the next mounts ask for the view

    def pending(call: Any) -> grpc.StatusCode:
        env.views.hold, env.views.refuse = True, True
        env.views.release.clear()
        env.views.asked.clear()
        result: list[grpc.StatusCode] = []
        worker = threading.Thread(target=lambda: result.append(code_of(call)))
        worker.start()
        try:
            assert env.views.asked.wait(60)
            # while the daemon thinks:
            names = {i.name: i.kind for i in listing(sn)}
            assert names == {"nix": pb.COMMITTED, "k": pb.ACTIVE}
            assert code_of(lambda: sn.Stat(pb.StatSnapshotRequest(key="ctr"))) == \
                grpc.StatusCode.NOT_FOUND
            assert code_of(lambda: sn.Stat(pb.StatSnapshotRequest(key="c"))) == \
                grpc.StatusCode.NOT_FOUND
        finally:
            env.views.release.set()
            worker.join(60)
            env.views.hold, env.views.refuse = False, False
        return result[0]

    # Prepare over a nix layer whose view the daemon then refuses: nothing is created.
    assert pending(lambda: prepare(sn, "ctr", "nix")) == grpc.StatusCode.UNAVAILABLE
    # Commit of a layer with placeholders, view refused: it stays active.
    (Path(upper_of(list(sn.Mounts(pb.MountsRequest(key="k")).mounts)))
     / f"nix/store/{H1}-liba").mkdir(parents=True)
    assert pending(lambda: commit(sn, "c", "k")) == grpc.StatusCode.UNAVAILABLE
    assert {i.name: i.kind for i in listing(sn)} == {"nix": pb.COMMITTED, "k": pb.ACTIVE}
    assert sorted(p.name for p in (env.root / "snapshots").iterdir()) == ["1", "2"]


def test_restart_keeps_snapshots_and_recreates_views(env: Env, sn: pb_grpc.SnapshotsStub) -> None:
    nix_layer(sn)
    layer(sn, "app", "nix", files={"app": b"1"})
    before = lowers_of(prepare(sn, "ctr", "app"))
    env.stop()  # (a SIGKILL of the process: tests/test_e2e_containers.py)
    env.views.reset_views()  # the daemon restarted too
    sn2 = env.start()
    # Views are re-created at start, before any request.
    assert [op for op, _ in env.views.calls] == ["view_create"]
    assert {i.name for i in listing(sn2)} == {"nix", "app", "ctr"}
    assert lowers_of(list(sn2.Mounts(pb.MountsRequest(key="ctr")).mounts)) == before
    assert (Path(before[1]) / "nix/store" / f"{H1}-liba/content").exists()
    commit(sn2, "ctr-c", "ctr")
    assert sn2.Stat(pb.StatSnapshotRequest(key="ctr-c")).info.parent == "app"


def test_print_containerd_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lazystore", "snapshotter",
         "--address", "/run/x.sock", "--print-containerd-config"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out == '[proxy_plugins.lazystore]\n  type = "snapshot"\n  address = "/run/x.sock"\n'


@pytest.mark.skipif(shutil.which("containerd") is None, reason="needs containerd")
def test_printed_containerd_config_is_read_by_containerd(tmp_path: Path) -> None:
    address = '/run/odd "name" \\ \t\x7f é.sock'
    config = tmp_path / "config.toml"
    config.write_text(subprocess.run(
        [sys.executable, "-m", "lazystore", "snapshotter",
         "--address", address, "--print-containerd-config"],
        capture_output=True, text=True, check=True,
    ).stdout)
    dump = subprocess.run(["containerd", "--config", str(config), "config", "dump"],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    # containerd re-encodes what it parsed: the same stanza, the same address.
    stanza = dump.stdout.split("[proxy_plugins.lazystore]", 1)[1].split("\n\n", 1)[0]
    fields = dict(line.strip().split(" = ", 1) for line in stanza.strip().splitlines())
    assert fields["type"] == '"snapshot"'
    assert json.loads(fields["address"]) == address


def test_long_chains_stay_under_one_directory_for_containerds_option_compaction(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    nix_layer(sn, "l0")
    for i in range(1, 120):
        layer(sn, f"l{i}", f"l{i - 1}", files={f"f{i}": b"x"})
    mounts = prepare(sn, "ctr", "l119")
    lowers = lowers_of(mounts)
    assert len(lowers) == 121  # 120 layers + the view of l0, directly above it
    assert len(",".join(mounts[0].options)) > 4096  # too long for one page as it is...
    common = str(env.root / "snapshots") + "/"
    assert all(p.startswith(common) for p in lowers)  # ...but containerd can shorten it
    if not ROOT:
        return
    # Mount as containerd does with such options: relative paths from the common dir.
    rel = [p[len(common):] for p in lowers]
    opts = [o for o in mounts[0].options if not o.startswith("lowerdir=")]
    opts.append("lowerdir=" + ":".join(rel))
    assert len(",".join(opts)) < 4096
    target = env.base / "rootfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", str(target), "-o", ",".join(opts)],
                   check=True, cwd=common)
    try:
        assert (target / "f119").read_bytes() == b"x" and (target / "f1").exists()
        assert (target / f"nix/store/{H1}-liba/content").exists()
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_second_snapshotter_does_not_steal_a_live_socket(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lazystore", "snapshotter", "--address", str(env.address),
         "--root", str(env.base / "other"), "--control-socket", str(env.base / "ctl.sock")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"lazystore: error: another process already serves {env.address}"
    assert listing(sn) == []  # the first one still serves


def test_unreadable_metadata_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "metadata.db").write_bytes(b"not a database at all" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "lazystore", "snapshotter", "--address", str(tmp_path / "s.sock"),
         "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("lazystore: error: snapshot metadata ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unusable_socket_address_is_one_clear_error(tmp_path: Path) -> None:
    address = tmp_path / "no-such-dir" / "s.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "lazystore", "snapshotter", "--address", str(address),
         "--root", str(tmp_path / "root")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"lazystore: error: cannot listen on {address}: no directory {address.parent}\n"
    )


def test_a_second_snapshotter_on_the_same_root_is_refused(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    prepare(sn, "a")
    proc = subprocess.run(
        [sys.executable, "-m", "lazystore", "snapshotter", "--address", str(env.base / "2.sock"),
         "--root", str(env.root), "--control-socket", str(env.base / "ctl.sock")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"lazystore: error: another snapshotter already uses {env.root}\n"
    assert not (env.base / "2.sock").exists()
    assert [i.name for i in listing(sn)] == ["a"]  # the first one still serves, unharmed


@pytest.mark.allow_log(r"label containerd.io/snapshot/lazystore-profile: ignoring 3 names")
def test_a_profile_label_is_handed_to_the_view_as_paths_and_files_to_fetch_ahead(
    env: Env, sn: pb_grpc.SnapshotsStub
) -> None:
    b1, b2 = os.path.basename(P1), os.path.basename(P2)
    words = f"{b2} ../../etc {b1}/bin/run {b1}/../../etc/shadow {b1} {b2}/lib//x"
    labels = {REF: "sha256:prof", NIX_LAYER: "true", NIX_PATH + "0": P1, NIX_PATH + "1": P2,
              "containerd.io/snapshot/lazystore-profile": words}
    assert code_of(lambda: prepare(sn, "x sha256:prof", **labels)) == (
        grpc.StatusCode.ALREADY_EXISTS)
    [created] = env.views.creates()
    # in the profile's order, the names that are no store path or plain file of one dropped
    assert created["prefetch"] == [b2, f"{b1}/bin/run", b1]
