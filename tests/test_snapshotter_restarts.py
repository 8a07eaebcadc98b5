"""The snapshotter killed and restarted under real containerd + runc, while
containers run and while a pull is in flight.

One stack per module: ``lazystore mount`` (allow_other) over the sample
closure's real-Nix binary cache on 127.0.0.1, ``lazystore snapshotter``, a
private containerd 1.6 with it as the proxy plugin ``lazystore`` and Debian's
docker-registry. The image has six layers: busybox, a nix layer (placeholders
of the sample closure: a daemon view at Commit) and four plain layers of data.
Its files' md5 sums (the store files as real Nix built them) are checked by
containers with ``md5sum -c`` and by mounting every committed snapshot of it.
containerd reconnects to a restarted proxy plugin with its own backoff: the
tests retry its calls until it does (and print how long that took).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from lazystore.snapshotter.metadata import Kind
from lazystore.snapshotter.proto import snapshots_pb2 as pb
from lazystore.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lazystore.testing import nixcache, registry
from lazystore.testing.containerd import (
    Containerd,
    logs_tail,
    snapshotter_process,
    unmount_below,
)
from lazystore.testing.daemon import LAZYSTORE, Daemon, container_stack_missing
from lazystore.testing.restarts import store_files
from lazystore.testing.snapcrash import compare, mounted, read_rows
from tests.test_e2e_containers import _tar, oci_archive, placeholder_layer

SN = "lazystore"
DATA_LAYERS = 4
DATA_BYTES = 4 << 20  # per data layer: its apply takes a moment
SERVE_TIMEOUT = 90.0  # containerd's reconnect backoff to a proxy plugin is seconds

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _data(i: int) -> bytes:
    block = hashlib.sha256(f"layer {i}".encode()).digest()
    return block * (DATA_BYTES // len(block))


@dataclass
class Image:
    archive: Path
    ref: str
    chain_ids: list[str]  # one per layer, bottom first
    # per layer: (path inside the rootfs, md5) of what it brings
    sums: list[list[tuple[str, str]]]

    def sums_file(self) -> str:
        return "".join(f"{md5}  {path}\n" for layer in self.sums for path, md5 in layer)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def build_image(dest: Path, top: str, ref: str) -> Image:
    busybox = Path("/bin/busybox").read_bytes()
    layers = [(_tar([("bin", None, 0o755), ("bin/busybox", busybox, 0o755)]), {}),
              placeholder_layer(top)]
    sums: list[list[tuple[str, str]]] = [[("/bin/busybox", _md5(busybox))]]
    sums.append([(f"/nix/store/{rel}", _md5(data))
                 for rel, data in sorted(store_files(nixcache.closure(top)).items())])
    for i in range(DATA_LAYERS):
        data = _data(i)
        layers.append((_tar([("l", None, 0o755), (f"l/{i}", None, 0o755),
                             (f"l/{i}/data", data, 0o644)]), {}))
        sums.append([(f"/l/{i}/data", _md5(data))])
    oci_archive(dest, ref, layers, ["/bin/busybox"])
    chain: list[str] = []
    for data, _ in layers:
        diff = "sha256:" + hashlib.sha256(data).hexdigest()
        chain.append(diff if not chain else
                     "sha256:" + hashlib.sha256(f"{chain[-1]} {diff}".encode()).hexdigest())
    return Image(dest, ref, chain, sums)


@dataclass
class Stack:
    base: Path
    daemon: Daemon
    ctd: Containerd
    registry: registry.Registry
    image: Image
    top: str
    sn_root: Path
    sn_address: Path
    out: Path  # bind-mounted into readers as /out
    sn_cm: Any = None
    sn_proc: subprocess.Popen | None = None
    serve_again: list[float] = field(default_factory=list)

    @property
    def sn_log(self) -> Path:
        return self.base / "snapshotter.log"

    def start_snapshotter(self) -> None:
        self.sn_cm = snapshotter_process(self.sn_root, self.sn_address, self.daemon.sock,
                                         self.daemon.mnt, log_file=self.sn_log)
        self.sn_proc = self.sn_cm.__enter__()

    def stop_snapshotter(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.sn_cm is not None and self.sn_proc is not None
        cm, self.sn_cm = self.sn_cm, None
        self.sn_proc.send_signal(sig)
        self.sn_proc.wait(30)
        cm.__exit__(None, None, None)

    def restart_snapshotter(self, sig: signal.Signals) -> float:
        """Stop it with *sig*, start it again; the time from the signal until
        containerd lists its snapshots again."""
        start = time.monotonic()
        self.stop_snapshotter(sig)
        self.start_snapshotter()
        self.wait_served()
        took = time.monotonic() - start
        self.serve_again.append(took)
        return took

    def wait_served(self) -> None:
        deadline = time.monotonic() + SERVE_TIMEOUT
        while True:
            proc = self.ctd.ctr("snapshots", "--snapshotter", SN, "ls", check=False)
            if proc.returncode == 0:
                return
            assert time.monotonic() < deadline, f"containerd: {proc.stderr}\n{self.logs()}"
            time.sleep(0.2)

    def ctr_retried(self, *args: str, timeout: float = 300) -> str:
        """ctr *args*, again while containerd has not reconnected to the snapshotter."""
        deadline = time.monotonic() + SERVE_TIMEOUT
        while True:
            proc = self.ctd.ctr(*args, check=False, timeout=timeout)
            if proc.returncode == 0:
                return proc.stdout
            assert time.monotonic() < deadline, f"ctr {args}: {proc.stderr}\n{self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        return logs_tail([self.sn_log, self.daemon.log], self.ctd)


@pytest.fixture(scope="module")
def stack(binary_cache: nixcache.BinaryCache, http_cache: str,
          test_key: nixcache.KeyPair) -> Iterator[Stack]:
    if reason := container_stack_missing():
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="lzsr-", dir="/tmp"))  # short unix socket paths
    os.chmod(base, 0o755)
    try:
        with registry.running(base / "registry") as reg:
            daemon = Daemon(base / "d", http_cache, test_key.public_key, "--allow-other")
            daemon.start()
            image = build_image(base / "six.tar", binary_cache.top, "lazy/six:1")
            ref = f"{reg.host}/lazy/six:1"
            subprocess.run([LAZYSTORE, "image", "push", str(image.archive), ref, "--plain-http"],
                           check=True, capture_output=True, timeout=300)
            image.ref = ref
            st = Stack(base, daemon, Containerd(base / "ctd", {SN: str(base / "sn.sock")}),
                       reg, image, binary_cache.top, base / "sn", base / "sn.sock", base / "out")
            st.out.mkdir()
            (st.out / "sums").write_text(image.sums_file())
            try:
                st.start_snapshotter()
                st.ctd.start()
                yield st
            finally:
                st.ctd.stop()
                if st.sn_cm is not None:
                    st.stop_snapshotter()
                daemon.stop()
                if st.serve_again:
                    print(f"\nsnapshotter restarts: {len(st.serve_again)}, its start to containerd "
                          f"listing again: max {max(st.serve_again):.2f} s, "
                          f"all {[round(t, 2) for t in st.serve_again]}")
    finally:
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


def pull(st: Stack) -> None:
    st.ctr_retried("image", "pull", "--snapshotter", SN, "--plain-http", st.image.ref)


def run_check(st: Stack) -> str:
    """A new container from the image: prog's output, then its md5 check of every file."""
    out = st.ctr_retried(
        "run", "--snapshotter", SN, "--rm", "--mount",
        f"type=bind,src={st.out},dst=/out,options=rbind:ro", st.image.ref,
        f"check{time.monotonic_ns()}", "/bin/busybox", "sh", "-c",
        f"{st.top}/bin/prog && /bin/busybox md5sum -c -s /out/sums && echo all-sums-ok")
    return out


@contextmanager
def reader(st: Stack, name: str) -> Iterator[Path]:
    """A running container that checks every file's md5 again and again,
    appending ``ok`` or ``bad`` to the log this yields."""
    log = st.out / f"{name}.log"
    st.ctd.ctr("run", "-d", "--snapshotter", SN, "--mount",
               f"type=bind,src={st.out},dst=/out,options=rbind:rw", st.image.ref, name,
               "/bin/busybox", "sh", "-c",
               f"while true; do if /bin/busybox md5sum -c -s /out/sums; then echo ok; "
               f"else echo bad; fi >> /out/{name}.log; /bin/busybox sleep 0.1; done")
    try:
        yield log
    finally:
        st.ctr_retried("tasks", "kill", "-s", "SIGKILL", name)
        deadline = time.monotonic() + 30
        while st.ctd.ctr("tasks", "delete", name, check=False).returncode != 0:
            assert time.monotonic() < deadline, st.logs()
            time.sleep(0.2)
        # the container's snapshot goes with it, through the (restarted) snapshotter
        st.ctr_retried("containers", "rm", name)


def reads(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def wait_reads(log: Path, more_than: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(reads(log)) <= more_than:
        assert time.monotonic() < deadline, f"the reader stopped: {reads(log)[-5:]}"
        time.sleep(0.1)


@contextmanager
def containerd_snapshots(st: Stack) -> Iterator[tuple[pb_grpc.SnapshotsStub, tuple]]:
    """containerd's Snapshots API under a lease of its own."""
    lease = f"lz-check-{time.monotonic_ns()}"
    st.ctr_retried("leases", "create", "--id", lease)
    md = (("containerd-namespace", st.ctd.namespace), ("containerd-lease", lease))
    channel = grpc.insecure_channel(f"unix:{st.ctd.address}")
    try:
        yield pb_grpc.SnapshotsStub(channel), md
    finally:
        channel.close()
        st.ctd.ctr("leases", "delete", lease, check=False)


def check_image_snapshots(st: Stack) -> list[str]:
    """Every committed snapshot of the image, stat'ed and mounted (a View of
    it) through containerd: each shows exactly its layers' files."""
    problems = []
    with containerd_snapshots(st) as (snaps, md):
        for n, chain_id in enumerate(st.image.chain_ids):
            info = snaps.Stat(pb.StatSnapshotRequest(snapshotter=SN, key=chain_id),
                              metadata=md, timeout=60).info
            if info.kind != pb.COMMITTED:
                problems.append(f"layer {n} ({chain_id}) is {info.kind}")
                continue
            key = f"check-{n}-{time.monotonic_ns()}"
            mounts = snaps.View(pb.ViewSnapshotRequest(snapshotter=SN, key=key, parent=chain_id),
                                metadata=md, timeout=120).mounts
            try:
                problems += [f"layer {n}: {p}" for p in
                             _mounted_sums(st, list(mounts), st.image.sums[: n + 1])]
            finally:
                snaps.Remove(pb.RemoveSnapshotRequest(snapshotter=SN, key=key),
                             metadata=md, timeout=60)
    return problems


def _mounted_sums(st: Stack, mounts: list, layers: list[list[tuple[str, str]]]) -> list[str]:
    want = {path.lstrip("/"): md5 for layer in layers for path, md5 in layer}
    with mounted(mounts, st.base) as target:
        return compare(target, want, "view", _md5)


def remove_image(st: Stack) -> None:
    """The image and its snapshots gone (containerd's garbage collector
    removes them from the snapshotter); then the snapshotter holds nothing."""
    st.ctr_retried("image", "rm", "--sync", st.image.ref)
    deadline = time.monotonic() + 60
    while True:
        rows = read_rows(st.sn_root / "metadata.db")
        dirs = sorted(p.name for p in (st.sn_root / "snapshots").iterdir())
        if not rows and not dirs:
            return
        assert time.monotonic() < deadline, (
            f"left in the snapshotter: {[r.key for r in rows]}, directories {dirs}\n{st.logs()}")
        # another garbage collection (what one could not remove yet, e.g. a
        # parent whose child went in the same run)
        lease = f"lz-gc-{time.monotonic_ns()}"
        st.ctd.ctr("leases", "create", "--id", lease)
        st.ctd.ctr("leases", "delete", "--sync", lease)
        time.sleep(0.5)


def half_committed(st: Stack) -> list[str]:
    """Committed snapshots of the image's layers (containerd's backend keys end
    in the chain id) whose own directory lacks some of the layer's files."""
    out = []
    for row in read_rows(st.sn_root / "metadata.db"):
        chain_id = row.key.rsplit("/", 1)[-1]
        if row.kind != Kind.COMMITTED or chain_id not in st.image.chain_ids:
            continue
        n = st.image.chain_ids.index(chain_id)
        fs = st.sn_root / "snapshots" / str(row.id) / "fs"
        if n == 1:  # the nix layer: its placeholders
            want = [fs / p.lstrip("/") for p in nixcache.closure(st.top)]
            out += [f"layer 1: no placeholder {p}" for p in want if not os.path.lexists(p)]
            continue
        want = {path.lstrip("/"): md5 for path, md5 in st.image.sums[n]}
        out += compare(fs, want, f"layer {n} ({row.key}), committed", _md5)
    return out


def no_errors_logged(st: Stack) -> list[str]:
    return [ln for ln in st.sn_log.read_text(errors="replace").splitlines()
            if ": ERROR: " in ln]


# -- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_running_containers_survive_snapshotter_restarts_and_everything_mounts_after(
    stack: Stack, sig: signal.Signals,
) -> None:
    pull(stack)
    assert "all-sums-ok" in run_check(stack)
    name = f"reader-{sig.name.lower()}"
    with reader(stack, name) as log:
        wait_reads(log, 0)
        for _ in range(3):
            seen = len(reads(log))
            stack.stop_snapshotter(sig)
            # the container's overlay needs no snapshotter: it reads on meanwhile
            wait_reads(log, seen + 3)
            start = time.monotonic()
            stack.start_snapshotter()
            stack.wait_served()
            stack.serve_again.append(time.monotonic() - start)
        # everything the snapshotter holds is there, stat'ed and mounted
        listed = stack.ctr_retried("snapshots", "--snapshotter", SN, "ls").splitlines()[1:]
        keys = [ln.split()[0] for ln in listed]
        assert name in keys and set(stack.image.chain_ids) <= set(keys)
        for key in keys:
            stack.ctr_retried("snapshots", "--snapshotter", SN, "info", key)
        assert check_image_snapshots(stack) == []
        mounts = stack.ctr_retried("snapshots", "--snapshotter", SN, "mounts", "/mnt", name)
        assert "upperdir=" in mounts  # the running container's active snapshot
        assert "all-sums-ok" in run_check(stack)  # a new container, same image
        seen = len(reads(log))
        wait_reads(log, seen + 3)
    got = reads(log)
    assert got and set(got) == {"ok"}, f"{got.count('bad')} bad reads of {len(got)}"
    keys = [ln.split()[0] for ln in
            stack.ctr_retried("snapshots", "--snapshotter", SN, "ls").splitlines()[1:]]
    assert name not in keys  # removed cleanly with its container
    ids = {r.id for r in read_rows(stack.sn_root / "metadata.db")}
    assert {p.name for p in (stack.sn_root / "snapshots").iterdir()} == {str(i) for i in ids}
    remove_image(stack)
    assert no_errors_logged(stack) == []


class Killer(threading.Thread):
    """Sends *sig* to the snapshotter once its log shows the *nth* line
    matching *pattern* (its INFO line for a Prepare or a Commit, logged before
    the answer goes back to containerd)."""

    def __init__(self, st: Stack, sig: signal.Signals, pattern: str, nth: int) -> None:
        super().__init__(daemon=True)
        self.st, self.sig, self.pattern, self.nth = st, sig, re.compile(pattern), nth
        self.offset = st.sn_log.stat().st_size
        self.fired = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        assert self.st.sn_proc is not None
        while not self.stop.is_set():
            with open(self.st.sn_log, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode(errors="replace")
            if len(self.pattern.findall(text)) >= self.nth:
                self.st.sn_proc.send_signal(self.sig)
                self.fired.set()
                return
            time.sleep(0.005)


PREPARED = r"INFO: lazystore\.snapshotter\.snapshots: active "
COMMITTED = r"INFO: lazystore\.snapshotter\.snapshots: committed "
# (signal, pattern, nth): after the first layer's Prepare (its unpack under
# way), the nix layer's Prepare (its unpack, then its Commit asks the daemon for
# its view) and Commit, a data layer's Prepare and Commit, the last Commit
KILL, TERM = signal.SIGKILL, signal.SIGTERM
STOP_POINTS = [(KILL, PREPARED, 1), (KILL, PREPARED, 2), (KILL, COMMITTED, 2),
               (KILL, PREPARED, 4), (KILL, COMMITTED, 4), (KILL, COMMITTED, 6),
               (TERM, PREPARED, 2), (TERM, COMMITTED, 3)]


@pytest.mark.parametrize("sig,pattern,nth", STOP_POINTS,
                         ids=[f"{'kill-9' if s == KILL else 'term'}-"
                              f"{'prepare' if p == PREPARED else 'commit'}-{n}"
                              for s, p, n in STOP_POINTS])
def test_stopped_during_a_pull_then_the_pull_again_gives_correct_snapshots(
    stack: Stack, sig: signal.Signals, pattern: str, nth: int,
) -> None:
    # a fresh pull each time: nothing of the image in containerd or the snapshotter
    stack.ctd.ctr("image", "rm", "--sync", stack.image.ref, check=False)
    killer = Killer(stack, sig, pattern, nth)
    killer.start()
    first = stack.ctd.ctr("image", "pull", "--snapshotter", SN, "--plain-http",
                          stack.image.ref, check=False, timeout=300)
    killer.stop.set()
    killer.join(10)
    assert killer.fired.is_set(), f"no kill: {first.stderr}\n{stack.logs()}"
    assert stack.sn_proc is not None
    stack.sn_proc.wait(30)
    # no half-committed snapshot: what the killed process left, before a restart
    assert half_committed(stack) == []
    left = read_rows(stack.sn_root / "metadata.db")
    print(f"\n{sig.name} at {pattern.split()[-1]} {nth}: pull exit {first.returncode}, left "
          f"{sum(r.kind == Kind.ACTIVE for r in left)} active, "
          f"{sum(r.kind == Kind.COMMITTED for r in left)} committed snapshots, directories "
          f"{len(list((stack.sn_root / 'snapshots').iterdir()))}")
    stack.sn_cm.__exit__(None, None, None)
    stack.sn_cm = None
    start = time.monotonic()
    stack.start_snapshotter()
    stack.wait_served()
    stack.serve_again.append(time.monotonic() - start)
    pull(stack)
    assert check_image_snapshots(stack) == []
    assert "all-sums-ok" in run_check(stack)
    remove_image(stack)
    assert no_errors_logged(stack) == []
