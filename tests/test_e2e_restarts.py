"""End to end: the daemon restarts and is killed under running containers.

One stack for the module: a private containerd with the lazystore snapshotter
(proxy plugin), Debian's docker-registry, and ``lazystore mount`` run by a
supervisor doing what systemd does (lazystore.testing.supervisor: notify
socket, descriptor store, LISTEN_FDS), over real-Nix binary caches of the
bench's "wide" closure and the sample closure on 127.0.0.1 HTTP. containerd
and the snapshotter run throughout; only the daemon is stopped and started.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.control.protocol import DATA_VIEW_SUFFIX
from lazystore.testing import nixcache, registry
from lazystore.testing.containerd import Containerd
from lazystore.testing.daemon import Daemon
from lazystore.testing.httpserver import serve_directory
from lazystore.testing.ocilayout import oci_archive, placeholder_layer
from lazystore.testing.restarts import ContainerLoop, Reader, restart_rounds, store_files
from lazystore.testing.supervisor import Supervisor
from tests.test_e2e_containers import (
    SN,
    WIDE_NIX,
    Stack,
    _need_tools,
    _unmount_below,
    closure_bases,
    lazystore,
    named,
    run,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

RESTARTS = 20
# The longest any read may wait, in the container or on the root mount: a read
# blocked across a restart waits for the daemon to come back (python start-up,
# index load, takeover: 1.3 s median, 3 s at most measured at load 6-9 on 2
# cores) and then for its fetch (a 4 MiB NAR from 127.0.0.1); 30 s leaves a
# wide margin for a machine shared by several test runs.
READ_BOUND = 30.0
PARTS_PER_ROUND = 8


@pytest.fixture(scope="module")
def st(
    binary_cache: nixcache.BinaryCache, http_cache: str, test_key: nixcache.KeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    _need_tools()
    two = nixcache.build(tag="two")
    cache_two = nixcache.make_cache(two, tmp_path_factory.mktemp("cache-two"), test_key)
    wide = nixcache.build(WIDE_NIX)
    cache_wide = nixcache.make_cache(wide, tmp_path_factory.mktemp("cache-wide"), test_key)
    base = Path(tempfile.mkdtemp(prefix="lzr-", dir="/tmp"))  # short unix socket paths
    os.chmod(base, 0o755)
    supervisor = Supervisor(base)
    try:
        with serve_directory(cache_wide.root) as server_wide, \
                serve_directory(cache_two.root) as server_two, \
                registry.running(base / "registry") as reg:
            urls = [server_wide.url, http_cache, server_two.url]  # type: ignore[attr-defined]
            daemon = Daemon(base, urls, test_key.public_key, "--allow-other",
                            supervisor=supervisor)
            daemon.start()
            stack = Stack(base, daemon, Containerd(base / "ctd", {SN: str(base / "sn.sock")}),
                          reg, base / "sn", base / "sn.sock", binary_cache.top, two, wide)
            try:
                stack.start_snapshotter()
                stack.ctd.start()
                yield stack
            finally:
                stack.ctd.stop()
                if stack.sn_cm is not None:
                    stack.stop_snapshotter()
                daemon.stop()
    finally:
        supervisor.close()
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


def files_of(base: str) -> list[str]:
    """The regular files of store path *base*, as absolute store paths."""
    return sorted(f"/nix/store/{rel}" for rel in store_files([base]))


def imported(st: Stack, top: str, name: str) -> str:
    """``lazystore image build`` of *top*, imported into containerd; its name."""
    archive = st.base / f"{name}.tar"
    lazystore("image", "build", top, "-o", str(archive), "--name", f"lazy/{name}:1")
    st.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    return f"docker.io/lazy/{name}:1"


def test_a_container_and_a_reader_lose_no_read_across_twenty_restarts(
    st: Stack, binary_cache: nixcache.BinaryCache,
) -> None:
    """A container's shell reads files of the wide closure in a loop: each
    round adds store paths nobody fetched yet (the restart lands while they
    are fetched) and keeps those of the round before and of the first round
    (fetched before the container started: their data read from the cache
    through overlay's data-only layer); a reader on the
    root mount reads the sample closure, evicted and so fetched again each
    round. The daemon is stopped (SIGTERM, descriptor stored) or killed
    (SIGKILL) and started again 20 times. Every read gets the bytes Nix
    built, none fails, none waits longer than READ_BOUND; the container,
    containerd and the snapshotter are the same processes at the end."""
    d = st.daemon
    bases = closure_bases(st.wide)
    parts = sorted(b for b in bases if b[33:].startswith("wide-part-"))
    blobs = sorted(b for b in bases if b[33:].startswith("wide-blob-"))
    rounds = [parts[PARTS_PER_ROUND * i:PARTS_PER_ROUND * (i + 1)] + blobs[i - 1:i]
              for i in range(RESTARTS + 1)]  # a 4 MiB blob from round 1 on
    busybox = f"/nix/store/{named(bases, 'bench-busybox')}/bin/busybox"
    image = imported(st, st.wide, "wide-loop")
    d.call("prefetch", paths=[f"/nix/store/{b}" for b in rounds[0]])  # fetched before
    sample = store_files(binary_cache.paths)
    liba = next(os.path.basename(p) for p in binary_cache.paths if p.endswith("-liba"))
    evictable = [os.path.basename(p) for p in binary_cache.paths if not p.endswith("-liba")]
    reader = Reader(d.mnt, sample, f"{liba}/lib/data")
    loop = ContainerLoop(st.ctd, SN, image, st.base / "loop", busybox)
    takeovers = d.log.read_text().count("taking over the FUSE session")
    log_start = d.log.stat().st_size
    assert st.ctd.proc is not None and st.sn_proc is not None
    processes = (st.ctd.proc.pid, st.sn_proc.pid)
    try:
        reader.start()
        reader.wait_reads(len(sample))
        done = restart_rounds(d, loop, reader, rounds, [busybox], evictable)
        assert done.fetched_early == []  # each round's paths were new to it
        assert set(rounds[RESTARTS]) <= st.materialized()
        assert loop.running() and loop.task_pid() == done.task_pid
        assert st.ctd.proc.poll() is None and st.sn_proc.poll() is None
        assert (st.ctd.proc.pid, st.sn_proc.pid) == processes
        reader.wait_reads(len(sample))
    finally:
        reader.stop.set()
        loop.stop()
        got = loop.results()
        loop.remove()
    reader.join(READ_BOUND)
    print(f"container: {got.reads} reads, slowest {got.slowest:.2f} s; "
          f"root mount: {reader.reads} reads, slowest {reader.slowest:.2f} s")
    assert got.exited, f"the container's loop did not end\n{st.logs()}"
    warned = [line for line in d.log.read_text(errors="replace").splitlines()
              if "WARNING" in line or "ERROR" in line]
    assert got.errors == [], (got.errors[:10], warned[-20:])
    assert got.reads > RESTARTS * PARTS_PER_ROUND * 2
    assert got.slowest < READ_BOUND
    assert not reader.is_alive() and reader.errors == [] and reader.slowest < READ_BOUND
    log = d.log.read_text()
    assert log.count("taking over the FUSE session") == takeovers + RESTARTS
    with open(d.log, "rb") as f:
        f.seek(log_start)
        new = f.read().decode(errors="replace")
    assert "Traceback" not in new and " ERROR " not in new


# -- a restart while a pull or a container's start waits for a view -----------


def pending_connections(sock: Path) -> int:
    """Connections waiting in the listen queue of unix socket *sock* (ss)."""
    out = subprocess.run(["ss", "-xlH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] == str(sock):
            return int(fields[2])
    return 0


def restart_under(st: Stack, command: list[str], kill: bool) -> subprocess.CompletedProcess[str]:
    """Run ctr *command* while the daemon is frozen (SIGSTOP); once the
    snapshotter's call waits in the control socket's queue, stop (SIGTERM) or
    kill the daemon and let the supervisor start the next; *command*'s result."""
    d = st.daemon
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    done: list[subprocess.CompletedProcess[str]] = []
    worker = threading.Thread(target=lambda: done.append(
        st.ctd.ctr(*command, check=False, timeout=300)))
    try:
        worker.start()
        deadline = time.monotonic() + 60
        while pending_connections(d.sock) == 0:
            assert worker.is_alive(), f"ctr ended before asking the daemon: {done}"
            assert time.monotonic() < deadline, "the snapshotter never called the daemon"
            time.sleep(0.02)
        d.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    d.proc.wait(60)
    d.supervisor.receive()  # type: ignore[union-attr]
    d.start()
    worker.join(300)
    assert done, "ctr did not finish"
    return done[0]


def reconnected(st: Stack) -> None:
    """Once containerd's connection to a snapshotter started again is back
    (containerd reconnects with its own backoff)."""
    deadline = time.monotonic() + 60
    while st.ctd.ctr("snapshots", "--snapshotter", SN, "ls", check=False).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def md5_listing(files: list[str]) -> str:
    return "".join(f"{hashlib.md5(Path(f).read_bytes()).hexdigest()}  {f}\n" for f in files)


def reads_right(st: Stack, image: str, top: str) -> None:
    """A container of *image* reads every file of *top*'s closure as Nix built it."""
    bases = closure_bases(top)
    busybox = f"/nix/store/{named(bases, 'busybox')}/bin/busybox"
    files = [f for b in sorted(bases) for f in files_of(b)]
    assert run(st, image, busybox, "md5sum", *files) == md5_listing(files)


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_a_restart_during_a_pull_leaves_its_view_correct(st: Stack, kill: bool) -> None:
    # each case a closure of its own: the pull's commit makes a new view
    top, name, output = ((st.one, "pulled-one", "hello from liba\n") if not kill
                         else (st.two, "pulled-two", "extra two\nhello from liba\n"))
    archive = st.base / f"{name}.tar"
    lazystore("image", "build", top, "-o", str(archive), "--name", f"lazy/{name}:1")
    ref = f"{st.registry.host}/lazy/{name}:1"
    lazystore("image", "push", str(archive), ref, "--plain-http")
    views = set(st.daemon.status()["views"])
    pulled = restart_under(st, ["image", "pull", "--snapshotter", SN, "--plain-http", ref], kill)
    assert pulled.returncode == 0, f"{pulled.stderr}\n{st.logs()}"
    # the layer's view, and its data view where overlays take the daemon's data directory
    made = set(st.daemon.status()["views"]) - views
    assert len({v.removesuffix(DATA_VIEW_SUFFIX) for v in made}) == 1, made
    assert run(st, ref, f"{top}/bin/prog") == output
    reads_right(st, ref, top)


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_a_restart_during_a_containers_view_creation_leaves_it_correct(
    st: Stack, kill: bool
) -> None:
    # nix-snapshotter style images of a closure each (a nix layer of their own):
    # the import makes the layer's views
    top = st.two if kill else st.one
    name = f"example.test/view-{int(kill)}:1"
    archive = oci_archive(st.base / f"view-{int(kill)}.tar", name,
                          [placeholder_layer(top)], [f"{top}/bin/prog"])
    st.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    # A snapshotter started again knows of no view made, so the container's
    # start asks for its view; the call caught below is that one once the
    # start's own calls (the data directory, the layers' views) are answered.
    restored = (st.base / "snapshotter.log").read_text().count("nix layers restored")
    st.stop_snapshotter()
    st.start_snapshotter()
    deadline = time.monotonic() + 60
    while (st.base / "snapshotter.log").read_text().count("nix layers restored") == restored:
        assert time.monotonic() < deadline, st.logs()
        time.sleep(0.05)
    reconnected(st)
    views = set(st.daemon.status()["views"])
    started = restart_under(st, ["run", "--snapshotter", SN, "--rm", name,
                                 f"c{time.monotonic_ns()}"], kill)
    assert started.returncode == 0, f"{started.stderr}\n{st.logs()}"
    assert started.stdout.endswith("hello from liba\n")
    assert set(st.daemon.status()["views"]) == views, st.logs()  # none lost, none extra
    reads_right(st, name, top)


def test_the_snapshotter_starts_while_the_daemon_is_down(st: Stack) -> None:
    # It serves at once and makes the views of committed nix layers again
    # meanwhile, waiting for a daemon that is away (as for a restarting one);
    # a container started once the daemon is back runs.
    image = imported(st, st.wide, "wide-loop")
    st.stop_snapshotter()
    st.daemon.stop()
    log = (st.base / "snapshotter.log").read_text()
    try:
        st.start_snapshotter()  # READY=1 within snapshotter_process's 30 s
        # the data directory and the views are asked in the background: its
        # first call (status) finds the daemon away
        deadline = time.monotonic() + 30
        while True:
            started = (st.base / "snapshotter.log").read_text()[len(log):]
            if "status again for up to 60 s" in started or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        st.daemon.start()
    assert "status again for up to 60 s" in started
    reconnected(st)
    wide = f"{st.wide}/bin/wide"
    assert run(st, image, wide) == "wide ready\n"
