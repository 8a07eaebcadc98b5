"""The snapshotter stopped under real containerd + runc, for tests and benchmarks.

:func:`running` starts ``lazystore mount`` (allow_other) over a real-Nix
binary cache, ``lazystore snapshotter``, a private containerd 1.6 with it as
the proxy plugin ``lazystore`` and Debian's docker-registry, and pushes an
image of six layers: busybox, a nix layer (placeholders of the closure: a
daemon view at Commit) and four plain layers of data. Its files' md5 sums (the
store files as real Nix built them) are checked by containers
(:func:`run_check`, :func:`reader`: ``md5sum -c``) and by mounting every
committed snapshot of it through containerd (:func:`check_image_snapshots`).
containerd reconnects to a restarted proxy plugin with its own backoff: calls
are retried until it does (:meth:`Stack.ctr_retried`, :meth:`Stack.wait_served`).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from lazystore.snapshotter.metadata import Kind
from lazystore.snapshotter.proto import snapshots_pb2 as pb
from lazystore.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lazystore.testing import nixcache, registry
from lazystore.testing.containerd import Containerd, logs_tail, snapshotter_process
from lazystore.testing.daemon import LAZYSTORE, Daemon
from lazystore.testing.ocilayout import oci_archive, placeholder_layer, tar
from lazystore.testing.restarts import store_files
from lazystore.testing.snapcrash import compare, mounted, read_rows

SN = "lazystore"
DATA_LAYERS = 4
DATA_BYTES = 4 << 20  # per data layer: its apply takes a moment
SERVE_TIMEOUT = 90.0  # containerd's reconnect backoff to a proxy plugin is seconds


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
    layers = [(tar([("bin", None, 0o755), ("bin/busybox", busybox, 0o755)]), {}),
              placeholder_layer(top)]
    sums: list[list[tuple[str, str]]] = [[("/bin/busybox", _md5(busybox))]]
    sums.append([(f"/nix/store/{rel}", _md5(data))
                 for rel, data in sorted(store_files(nixcache.closure(top)).items())])
    for i in range(DATA_LAYERS):
        data = _data(i)
        layers.append((tar([("l", None, 0o755), (f"l/{i}", None, 0o755),
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
class SnapshotterStack:
    """A lazystore daemon, ``lazystore snapshotter`` over it (its log at
    ``base/snapshotter.log``) and a private containerd with it as the proxy
    plugin ``lazystore``; the fields a subclass adds come after these."""

    base: Path
    daemon: Daemon
    ctd: Containerd
    registry: registry.Registry
    sn_root: Path
    sn_address: Path
    sn_cm: Any = field(default=None, kw_only=True)
    sn_proc: subprocess.Popen | None = field(default=None, kw_only=True)

    @property
    def sn_log(self) -> Path:
        return self.base / "snapshotter.log"

    def start_snapshotter(self) -> None:
        self.sn_cm = snapshotter_process(self.sn_root, self.sn_address, self.daemon.sock,
                                         self.daemon.mnt, log_file=self.sn_log)
        self.sn_proc = self.sn_cm.__enter__()

    def stop_snapshotter(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send the running snapshotter *sig* and wait for it to exit."""
        assert self.sn_cm is not None and self.sn_proc is not None
        cm, self.sn_cm = self.sn_cm, None
        self.sn_proc.send_signal(sig)
        self.sn_proc.wait(30)
        cm.__exit__(None, None, None)

    def wait_served(self) -> None:
        """Until containerd lists the snapshotter's snapshots (it reconnects
        to a restarted proxy plugin with its own backoff)."""
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


@dataclass
class Stack(SnapshotterStack):
    """:class:`SnapshotterStack` with the six-layer image pushed (:func:`running`)."""

    image: Image
    top: str
    out: Path  # bind-mounted into readers as /out
    serve_again: list[float] = field(default_factory=list)

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


@contextmanager
def running(base: Path, cache_url: str, public_key: str, top: str) -> Iterator[Stack]:
    """The stack under *base* (a short path: unix sockets) over the binary
    cache at *cache_url* holding *top*'s closure, the image pushed."""
    with registry.running(base / "registry") as reg:
        daemon = Daemon(base / "d", cache_url, public_key, "--allow-other")
        daemon.start()
        try:
            image = build_image(base / "six.tar", top, f"{reg.host}/lazy/six:1")
            subprocess.run([LAZYSTORE, "image", "push", str(image.archive), image.ref,
                            "--plain-http"], check=True, capture_output=True, timeout=300)
            st = Stack(base, daemon, Containerd(base / "ctd", {SN: str(base / "sn.sock")}),
                       reg, base / "sn", base / "sn.sock", image, top, base / "out")
            st.out.mkdir()
            (st.out / "sums").write_text(image.sums_file())
            st.start_snapshotter()
            try:
                st.ctd.start()
                try:
                    yield st
                finally:
                    st.ctd.stop()
            finally:
                if st.sn_cm is not None:
                    st.stop_snapshotter()
        finally:
            daemon.stop()


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


def errors_logged(st: Stack) -> list[str]:
    """The snapshotter's ERROR lines."""
    return [ln for ln in st.sn_log.read_text(errors="replace").splitlines()
            if ": ERROR: " in ln]


PREPARED = r"INFO: lazystore\.snapshotter\.snapshots: active "
COMMITTED = r"INFO: lazystore\.snapshotter\.snapshots: committed "


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
