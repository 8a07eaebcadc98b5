"""Type=notify for real: `lazystore mount` and `lazystore snapshotter` send
READY=1 to $NOTIFY_SOCKET, and only once they serve (the FUSE mount is up
and the control socket answers; the gRPC socket accepts connections). They
run as their units run them: no new privileges and only the capabilities of
the units' CapabilityBoundingSet (applied with setpriv)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from lazystore import deploy
from lazystore.control import protocol
from lazystore.control.client import ControlClient
from lazystore.errors import ControlError
from lazystore.nix.signing import SecretKey
from lazystore.snapshotter.proto import snapshots_pb2 as pb
from lazystore.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lazystore.testing import nixcache
from lazystore.testing.daemon import fuse_missing, is_mounted
from tests.support.fakeviews import FakeViews
from tests.test_snapshotter_service import (
    NIX_LAYER,
    NIX_PATH,
    P1,
    REF,
    layer,
    nix_layer,
    prepare,
)

LAZYSTORE = str(Path(sys.executable).with_name("lazystore"))


class ViewsOverSocket(socketserver.ThreadingUnixStreamServer):
    """A control socket answering view_create/view_remove with FakeViews's views,
    for a real snapshotter process whose daemon is not under test here."""

    daemon_threads = True

    def __init__(self, socket_path: str, views: FakeViews) -> None:
        self.views = views
        super().__init__(socket_path, _ViewsHandler)

    def answer(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "view_create":
            paths, closure = args.get("paths") or [], args.get("closure_info")
            asyncio.run(self.views.ensure(args["id"], paths, closure))
            return {"path": self.views.path(args["id"]), "paths": paths}
        if op == "view_remove":
            asyncio.run(self.views.remove(args["id"]))
            return {}
        raise ControlError(f"unexpected operation {op}")


class _ViewsHandler(socketserver.StreamRequestHandler):
    server: ViewsOverSocket

    def handle(self) -> None:
        while header := self.rfile.read(protocol.HEADER_SIZE):
            body = self.rfile.read(protocol.frame_length(header))
            op, args = protocol.parse_request(protocol.decode_body(body))
            try:
                reply = protocol.ok(self.server.answer(op, args))
            except ControlError as exc:
                reply = protocol.error(str(exc))
            self.wfile.write(protocol.encode_frame(reply))
# A guard against hanging forever, not a speed requirement.
READY_TIMEOUT = 90.0

pytestmark = pytest.mark.root


@contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(READY_TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


def as_unit(argv: list[str], capabilities: list[str]) -> list[str]:
    """*argv* with the unit's capability bounding set and NoNewPrivileges."""
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in capabilities)
    return ["setpriv", "--no-new-privs", f"--bounding-set=-all,{caps}", "--", *argv]


@contextmanager
def started(argv: list[str], notify: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, NOTIFY_SOCKET=str(notify))
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def receive(sock: socket.socket, log: Path, what: str) -> list[str]:
    """The lines of the next notification (e.g. ``READY=1``, ``STATUS=...``)."""
    try:
        message = sock.recv(4096)
    except TimeoutError:
        raise AssertionError(f"no {what}: {log.read_text(errors='replace')[-3000:]}") from None
    return message.decode().split("\n")


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> list[str]:
    lines = receive(sock, log, "READY=1")
    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
    assert "READY=1" in lines
    return lines


@pytest.fixture
def daemon_argv(tmp_path: Path) -> list[str]:
    if reason := fuse_missing():
        pytest.skip(reason)
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    cache = tmp_path / "binary-cache"
    cache.mkdir()
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 40\n")
    (tmp_path / "nix.conf").touch()
    key = SecretKey.generate("deploy-test-1").public_key
    return as_unit([
        LAZYSTORE, "mount", str(tmp_path / "mnt"),
        "--substituter", f"file://{cache}", "--trusted-public-key", str(key),
        "--nix-conf", str(tmp_path / "nix.conf"), "--cache-dir", str(tmp_path / "cache"),
        "--control-socket", str(tmp_path / "ctl.sock"), "--allow-other",
    ], deploy.DAEMON_CAPABILITIES)


def test_daemon_and_snapshotter_notify_ready_once_serving_with_unit_privileges(
    tmp_path: Path, daemon_argv: list[str]
) -> None:
    mnt, control = tmp_path / "mnt", tmp_path / "ctl.sock"
    try:
        with (
            notify_socket(tmp_path / "notify-daemon") as daemon_notify,
            started(daemon_argv, tmp_path / "notify-daemon", tmp_path / "daemon.log") as daemon,
        ):
            ready = wait_ready(daemon_notify, daemon, tmp_path / "daemon.log")
            assert is_mounted(mnt), "READY=1 before the FUSE mount was up"
            assert f"STATUS=serving {mnt}" in ready
            with ControlClient(str(control), timeout=30) as client:
                assert isinstance(client.call("status"), dict)

            address = tmp_path / "snapshotter.sock"
            snapshotter_argv = as_unit([
                LAZYSTORE, "snapshotter", "--address", str(address),
                "--root", str(tmp_path / "snapshotter"), "--control-socket", str(control),
                "--mount-point", str(mnt),
            ], deploy.SNAPSHOTTER_CAPABILITIES)
            with (
                notify_socket(tmp_path / "notify-sn") as sn_notify,
                started(snapshotter_argv, tmp_path / "notify-sn", tmp_path / "sn.log") as sn,
            ):
                ready = wait_ready(sn_notify, sn, tmp_path / "sn.log")
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(str(address))  # listening when READY=1 arrived
                assert any(line.startswith("STATUS=serving") for line in ready)
                sn.send_signal(signal.SIGTERM)
                assert "STOPPING=1" in receive(sn_notify, tmp_path / "sn.log", "STOPPING=1")
                assert sn.wait(timeout=30) == 0

            daemon.send_signal(signal.SIGTERM)
            stopping = receive(daemon_notify, tmp_path / "daemon.log", "STOPPING=1")
            assert "STOPPING=1" in stopping and f"STATUS=unmounting {mnt}" in stopping
            assert daemon.wait(timeout=30) == 0
            assert not is_mounted(mnt), "SIGTERM unmounts"
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def allowed_syscalls(groups: list[str]) -> set[str]:
    """The system calls systemd's SystemCallFilter= *groups* allow (nested groups expanded)."""
    calls: set[str] = set()
    seen: set[str] = set()
    pending = list(groups)
    while pending:
        group = pending.pop()
        if group in seen:
            continue
        seen.add(group)
        out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines()[1:]:
            word = line.strip()
            if word.startswith("@"):
                pending.append(word)
            elif word and not word.startswith("#"):
                calls.add(word)
    return calls


def within_the_units_sandbox(trace: str) -> set[str]:
    """The system calls in an ``strace -f`` *trace*, once checked against the
    units' SystemCallFilter=, and against what ProtectClock=,
    RestrictAddressFamilies= and RestrictNamespaces= take away."""
    used = set(re.findall(r"^\d+ +([a-z0-9_]+)\(", trace, re.MULTILINE))
    filter_groups = deploy.HARDENING["SystemCallFilter"]
    families = deploy.HARDENING["RestrictAddressFamilies"]
    assert isinstance(filter_groups, list) and isinstance(families, list)
    assert used - allowed_syscalls(filter_groups) == set()
    assert used & allowed_syscalls(["@clock"]) == set(), "ProtectClock= denies @clock"
    opened = set(re.findall(r"^\d+ +socket\((AF_[A-Z0-9]+)", trace, re.MULTILINE))
    assert "AF_UNIX" in opened and opened <= set(families)
    assert not {"unshare", "setns"} & used and "CLONE_NEW" not in trace
    return used


def test_daemon_stays_within_the_units_system_call_filter(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    """Fetching, reading, evicting and unmounting use only system calls that
    the unit's SystemCallFilter= allows (traced with strace)."""
    for tool in ("strace", "systemd-analyze", "setpriv", "fusermount3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse for a FUSE mount")
    mnt, trace = tmp_path / "mnt", tmp_path / "daemon.strace"
    (tmp_path / "nix.conf").touch()
    argv = ["strace", "-f", "-qq", "-o", str(trace), *as_unit([
        LAZYSTORE, "mount", str(mnt), "--substituter", http_cache,
        "--trusted-public-key", binary_cache.key.public_key,
        "--nix-conf", str(tmp_path / "nix.conf"), "--cache-dir", str(tmp_path / "cache"),
        "--control-socket", str(tmp_path / "ctl.sock"), "--cache-size", "1M", "--allow-other",
    ], deploy.DAEMON_CAPABILITIES)]
    try:
        with (
            notify_socket(tmp_path / "notify") as notify,
            started(argv, tmp_path / "notify", tmp_path / "daemon.log") as daemon,
        ):
            wait_ready(notify, daemon, tmp_path / "daemon.log")
            read = 0
            for path in binary_cache.paths:  # fetch everything; the 1M quota evicts
                for dirpath, _, files in os.walk(mnt / os.path.basename(path)):
                    for name in files:
                        file = Path(dirpath) / name
                        if file.is_file() and not file.is_symlink():
                            read += len(file.read_bytes())
            assert read > 0
            with ControlClient(str(tmp_path / "ctl.sock"), timeout=30) as client:
                status = client.call("status")
            assert len(status["paths_materialized"]) < len(binary_cache.paths), "evicted"
            # SIGTERM the daemon itself (strace's child), then strace ends with it.
            children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text()
            os.kill(int(children.split()[0]), signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    used = within_the_units_sandbox(trace.read_text())
    assert "mount" in used or "fsmount" in used


def test_snapshotter_stays_within_the_units_system_call_filter(tmp_path: Path) -> None:
    """Serving containerd's calls (plain and nix layers, overlay and bind
    mounts, views, commit, usage, remove, cleanup) uses only system calls
    that the unit's SystemCallFilter= allows (traced with strace). The daemon
    behind the control socket answers with the snapshotter tests' fake views
    (no FUSE)."""
    for tool in ("strace", "systemd-analyze", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root for the units' capabilities")
    base = Path(tempfile.mkdtemp(prefix="lzsc-", dir="/tmp"))  # short unix socket paths
    mnt, control, address = base / "mnt", base / "ctl.sock", base / "sn.sock"
    mnt.mkdir()
    fake = ViewsOverSocket(str(control), FakeViews(mnt))
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    trace, log = tmp_path / "sn.strace", tmp_path / "sn.log"
    argv = ["strace", "-f", "-qq", "-o", str(trace), *as_unit([
        LAZYSTORE, "snapshotter", "--address", str(address), "--root", str(base / "root"),
        "--control-socket", str(control), "--mount-point", str(mnt),
    ], deploy.SNAPSHOTTER_CAPABILITIES)]
    try:
        with (
            notify_socket(tmp_path / "notify") as notify,
            started(argv, tmp_path / "notify", log) as proc,
        ):
            wait_ready(notify, proc, log)
            with grpc.insecure_channel(f"unix:{address}") as channel:
                sn = pb_grpc.SnapshotsStub(channel)
                layer(sn, "l1", files={"etc/a": b"1"}, dirs=("tmp",))
                layer(sn, "l2", "l1", files={"b": b"2"})
                nix_layer(sn, "nix")  # placeholders: a view made at Commit
                with pytest.raises(grpc.RpcError) as remote:  # labels: a remote snapshot
                    prepare(sn, "extract sha256:c", "l2",
                            **{REF: "sha256:c", NIX_LAYER: "true", NIX_PATH + "0": P1})
                assert remote.value.code() == grpc.StatusCode.ALREADY_EXISTS
                prepare(sn, "ctr", "sha256:c")
                sn.View(pb.ViewSnapshotRequest(key="v", parent="l2"))
                sn.Mounts(pb.MountsRequest(key="ctr"))
                sn.Usage(pb.UsageRequest(key="l1"))
                list(sn.List(pb.ListSnapshotsRequest()))
                for key in ("v", "ctr", "sha256:c", "nix", "l2", "l1"):
                    sn.Remove(pb.RemoveSnapshotRequest(key=key))
                sn.Cleanup(pb.CleanupRequest())
            # SIGTERM the snapshotter itself (strace's child), then strace ends with it.
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
            os.kill(int(children.split()[0]), signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        fake.shutdown()
        fake.server_close()
        shutil.rmtree(base, ignore_errors=True)
    # Commit and the remote Prepare made two views (each asked for again by later mounts).
    assert len({a["id"] for a in fake.views.creates()}) == 2, "nix layers were served"
    used = within_the_units_sandbox(trace.read_text())
    assert {"openat", "connect", "accept4"} <= used, "the whole process was traced"


def test_registry_notifies_ready_once_serving_with_unit_privileges(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    cache = tmp_path / "binary-cache"
    cache.mkdir()
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    (tmp_path / "nix.conf").touch()
    key = SecretKey.generate("deploy-test-1").public_key
    cfg = deploy.DeployConfig(executable=LAZYSTORE, substituters=[f"file://{cache}"],
                              trusted_public_keys=[str(key)], registry=True,
                              registry_listen="127.0.0.1:0",
                              registry_cache_dir=str(tmp_path / "registry"))
    assert "CapabilityBoundingSet=\n" in deploy.registry_unit(cfg)  # no capability at all
    argv = as_unit([*deploy.registry_argv(cfg), "--nix-conf", str(tmp_path / "nix.conf")], [])
    argv[argv.index("--bounding-set=-all,")] = "--bounding-set=-all"
    log = tmp_path / "registry.log"
    with (
        notify_socket(tmp_path / "notify") as notify,
        started(argv, tmp_path / "notify", log) as proc,
    ):
        ready = wait_ready(notify, proc, log)
        url = next(line for line in ready if line.startswith("STATUS=serving ")).split()[1]
        with urllib.request.urlopen(f"{url}/v2/", timeout=30) as resp:  # serving at READY=1
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive(notify, log, "STOPPING=1")
        assert proc.wait(timeout=30) == 0
