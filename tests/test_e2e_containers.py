"""End to end: real containerd + runc + registry + lazystore daemon + snapshotter.

One stack per module (module-scoped fixtures): a private containerd with the
proxy plugin ``lazystore``, ``lazystore mount`` (allow_other) over the sample
closure's real-Nix binary cache(s) on 127.0.0.1 HTTP, ``lazystore snapshotter``
and Debian's docker-registry. Each test starts with the daemon restarted on an
empty cache (fixture ``stack``), so what a test sees fetched it fetched itself,
whichever tests ran before it, in whatever order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from lazystore import cacheindex
from lazystore.image.oci import OciArchive
from lazystore.nix import fileindex, fsio
from lazystore.nix.signing import SecretKey
from lazystore.snapshotter.proto import snapshots_pb2 as pb
from lazystore.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lazystore.testing import nixcache, registry
from lazystore.testing.containerd import Containerd
from lazystore.testing.daemon import LAZYSTORE, Daemon, container_stack_missing
from lazystore.testing.httpserver import serve_directory
from lazystore.testing.ocilayout import oci_archive, placeholder_layer
from lazystore.testing.ocilayout import tar as _tar
from lazystore.testing.snapstack import SnapshotterStack

SN = "lazystore"
WIDE_NIX = Path(__file__).resolve().parents[1] / "bench/workloads/wide.nix"
# A made-up chain id for the remote snapshot test (no image references it, so
# containerd's garbage collector may remove it at any time afterwards).
REMOTE_CHAIN = "sha256:" + hashlib.sha256(b"lazystore remote test").hexdigest()
PROFILE_CHAIN = "sha256:" + hashlib.sha256(b"lazystore profile test").hexdigest()

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _need_tools() -> None:
    if reason := container_stack_missing():
        pytest.skip(reason)


@dataclass
class Stack(SnapshotterStack):
    one: str  # sample closure top (prog)
    two: str  # overlapping closure top (prog-two)
    wide: str  # bench's "wide" closure: over 300 store paths
    roots: str = ""  # roots-prog: file, executable, empty and symlink store paths
    big: str = ""  # prog with a 3 MiB docs path, from a cache with file indexes
    big_cache: Path | None = None  # that cache's folder
    big_server: Any = None  # and its server (its requests)

    def fresh_daemon(self) -> None:
        """The daemon restarted on an empty cache dir (the snapshotter's views
        come back as containers mount them)."""
        self.daemon.stop()
        fsio.remove_tree(self.daemon.cache)
        self.daemon.start()

    def materialized(self) -> set[str]:
        return set(self.daemon.status()["paths_materialized"])


@pytest.fixture(scope="module")
def shared_stack(
    binary_cache: nixcache.BinaryCache, http_cache: str, test_key: nixcache.KeyPair,
    roots_cache: nixcache.BinaryCache, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    _need_tools()
    two = nixcache.build(tag="two")
    cache_two = nixcache.make_cache(two, tmp_path_factory.mktemp("cache-two"), test_key)
    wide = nixcache.build(WIDE_NIX)
    cache_wide = nixcache.make_cache(wide, tmp_path_factory.mktemp("cache-wide"), test_key)
    big = nixcache.build(bigSize="3")
    cache_big = nixcache.make_cache(big, tmp_path_factory.mktemp("cache-big"), test_key)
    cacheindex.index_cache(cache_big.root, SecretKey.parse(test_key.secret_file.read_text()))
    base = Path(tempfile.mkdtemp(prefix="lze-", dir="/tmp"))  # short unix socket paths
    os.chmod(base, 0o755)
    try:
        with serve_directory(cache_two.root) as server_two, \
                serve_directory(cache_wide.root) as server_wide, \
                serve_directory(roots_cache.root) as server_roots, \
                serve_directory(cache_big.root) as server_big, \
                registry.running(base / "registry") as reg:
            urls = [http_cache, server_two.url, server_wide.url,  # type: ignore[attr-defined]
                    server_roots.url, server_big.url]  # type: ignore[attr-defined]
            daemon = Daemon(base, urls, test_key.public_key, "--allow-other")
            daemon.start()
            st = Stack(base, daemon, Containerd(base / "ctd", {SN: str(base / "sn.sock")}),
                       reg, base / "sn", base / "sn.sock", binary_cache.top, two, wide,
                       roots_cache.top, big, cache_big.root, server_big)
            try:
                st.start_snapshotter()
                st.ctd.start()
                yield st
            finally:
                st.ctd.stop()
                if st.sn_cm is not None:
                    st.stop_snapshotter()
                daemon.stop()
    finally:
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The module's stack, its daemon on an empty cache."""
    shared_stack.fresh_daemon()
    assert shared_stack.materialized() == set()
    return shared_stack


def _unmount_below(path: Path) -> None:
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f if line.split()[1].startswith(str(path) + "/")]
    for t in sorted(targets, reverse=True):
        subprocess.run(["umount", "-l", t], capture_output=True)


def lazystore(*args: str) -> str:
    proc = subprocess.run([LAZYSTORE, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def run(st: Stack, image: str, *argv: str) -> str:
    name = f"c{time.monotonic_ns()}"
    proc = st.ctd.ctr("run", "--snapshotter", SN, "--rm", image, name, *argv,
                      check=False, timeout=180)
    assert proc.returncode == 0, f"ctr run failed: {proc.stderr}\n{st.logs()}"
    return proc.stdout


def base(path: str) -> str:
    return Path(path).name


def closure_bases(top: str) -> set[str]:
    return {base(p) for p in nixcache.closure(top)}


def named(bases: set[str], name: str) -> str:
    return next(b for b in bases if b[33:] == name)


# -- tests (in order) ---------------------------------------------------------


def test_ordinary_image_runs_on_the_lazystore_snapshotter(stack: Stack) -> None:
    busybox = Path("/bin/busybox").read_bytes()
    layer1 = _tar([("bin", None, 0o755), ("bin/busybox", busybox, 0o755)])
    layer2 = _tar([("etc", None, 0o755), ("etc/greeting", b"plain layers work\n", 0o644)])
    archive = oci_archive(stack.base / "plain.tar", "example.test/plain:1",
                          [(layer1, {}), (layer2, {})], ["/bin/busybox"])
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    out = run(stack, "example.test/plain:1", "/bin/busybox", "cat", "/etc/greeting")
    assert out == "plain layers work\n"
    snaps = stack.ctd.ctr("snapshots", "--snapshotter", SN, "ls").stdout
    assert "Committed" in snaps


def test_nix_image_pull_fetches_nothing_and_run_fetches_only_touched_paths(
    stack: Stack,
) -> None:
    archive = stack.base / "one.tar"
    lazystore("image", "build", stack.one, "-o", str(archive), "--name", "lazy/one:1")
    ref = f"{stack.registry.host}/lazy/one:1"
    lazystore("image", "push", str(archive), ref, "--plain-http")
    before = cli_status(stack)
    stack.ctd.ctr("image", "pull", "--snapshotter", SN, "--plain-http", ref, timeout=300)
    after_pull = cli_status(stack)
    assert after_pull["bytes_downloaded"] == before["bytes_downloaded"]
    assert after_pull["paths_materialized"] == before["paths_materialized"]
    bases = closure_bases(stack.one)
    prog = base(stack.one)
    out = run(stack, ref, f"{stack.one}/bin/prog")
    assert out == "hello from liba\n"
    fetched = stack.materialized() - set(before["paths_materialized"])
    assert fetched == {prog, named(bases, "busybox"), named(bases, "liba")}
    assert named(bases, "docs") not in stack.materialized()
    assert cli_status(stack)["bytes_downloaded"] > after_pull["bytes_downloaded"]


def test_a_container_reads_materialised_files_from_the_cache_not_through_fuse(
    stack: Stack,
) -> None:
    ref = imported_one(stack)
    bases = closure_bases(stack.one)
    docs, busybox = named(bases, "docs"), named(bases, "busybox")
    manual = f"/nix/store/{docs}/share/doc/manual.txt"
    stack.daemon.call("prefetch", paths=[f"/nix/store/{docs}", f"/nix/store/{busybox}"])
    digest = hashlib.md5((stack.daemon.cache / "store" / docs / "share/doc/manual.txt")
                         .read_bytes()).hexdigest()
    served = stack.daemon.status()["bytes_served"]
    # overlay follows each file's metacopy redirect into the cache's data-only
    # layer (busybox's binary too): the daemon serves none of their bytes
    out = run(stack, ref, f"/nix/store/{busybox}/bin/busybox", "md5sum", manual)
    assert out.split()[0] == digest
    assert stack.daemon.status()["bytes_served"] == served


def test_a_containers_first_read_of_a_big_file_fetches_its_chunk_not_the_nar(
    stack: Stack,
) -> None:
    """From a cache with file indexes, a container reading the last KiB of a
    3 MiB file (through the snapshotter's view) makes the daemon fetch the
    one chunk holding it (and, read behind, the small file before it), by
    Range requests, and not the path's NAR."""
    archive = stack.base / "big.tar"
    lazystore("image", "build", stack.big, "-o", str(archive), "--name", "lazy/big:1")
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    image = next(n for n in stack.ctd.ctr("image", "ls", "-q").stdout.split()
                 if "lazy/big:1" in n)
    docs = named(closure_bases(stack.big), "docs")
    busybox = named(closure_bases(stack.big), "busybox")
    assert stack.big_cache is not None
    index = fileindex.parse((stack.big_cache / f"{docs[:32]}.lzindex").read_bytes())
    manual = next(f for f in index.files if f.path[-1] == b"manual.txt")
    before = stack.daemon.status()
    out = run(stack, image, f"/nix/store/{busybox}/bin/busybox", "dd",
              f"if=/nix/store/{docs}/share/doc/manual.txt", "bs=1024", "skip=3071", "count=1")
    assert out == "d" * 1024
    previous = index.files[index.files.index(manual) - 1]  # the README, 29 bytes
    assert sum(c.length for c in previous.chunks) < 1024
    status = stack.daemon.status_when("chunk_bytes", before["chunk_bytes"]
                                      + manual.chunks[-1].length + previous.chunks[-1].length)
    assert docs not in status["paths_materialized"]
    assert f"/{index.data}" in stack.big_server.range_requests
    assert not [r for r in stack.big_server.requests if r.startswith("/nar/")]


def cli_status(st: Stack) -> dict[str, Any]:
    """``lazystore status --json``, as a user would check what was fetched."""
    return json.loads(lazystore("status", "--json", "--control-socket", str(st.daemon.sock)))


def test_second_image_fetches_only_new_paths(stack: Stack) -> None:
    run(stack, imported_one(stack), f"{stack.one}/bin/prog")  # the first image's paths
    archive = stack.base / "two.tar"
    lazystore("image", "build", stack.two, "-o", str(archive), "--name", "lazy/two:1")
    ref = f"{stack.registry.host}/lazy/two:1"
    lazystore("image", "push", str(archive), ref, "--plain-http")
    before = stack.materialized()
    stack.ctd.ctr("image", "pull", "--snapshotter", SN, "--plain-http", ref, timeout=300)
    assert stack.materialized() == before
    out = run(stack, ref, f"{stack.two}/bin/prog")
    assert out == "extra two\nhello from liba\n"
    new = closure_bases(stack.two) - closure_bases(stack.one)
    assert stack.materialized() - before == new


def test_layered_image_runs_from_its_own_layers(stack: Stack) -> None:
    # `--layered`: real contents in ordinary layers, no placeholders, so no view and
    # nothing asked of the daemon.
    archive = stack.base / "layered.tar"
    lazystore("image", "build", stack.one, "-o", str(archive), "--name", "lazy/layered:1",
              "--layered", "3")
    before = stack.daemon.status()  # the import unpacks and commits each layer
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    out = run(stack, "docker.io/lazy/layered:1", f"{stack.one}/bin/prog")
    assert out == "hello from liba\n"
    after = stack.daemon.status()
    assert after["views"] == before["views"]
    assert after["bytes_downloaded"] == before["bytes_downloaded"]


def test_closure_of_hundreds_of_paths_has_no_128_limit(stack: Stack) -> None:
    bases = closure_bases(stack.wide)
    assert len(bases) > 300
    archive = stack.base / "wide.tar"
    lazystore("image", "build", stack.wide, "-o", str(archive), "--name", "lazy/wide:1")
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    before = stack.materialized()
    assert run(stack, "docker.io/lazy/wide:1", f"{stack.wide}/bin/wide") == "wide ready\n"
    wanted = {base(stack.wide), named(bases, "bench-busybox"), named(bases, "wide-part-000"),
              named(bases, "wide-part-007"), named(bases, "wide-blob-003")}
    assert stack.materialized() - before == wanted


def test_deep_image_needs_lowerdir_options_longer_than_a_page(stack: Stack) -> None:
    # 130 small layers over a nix layer: the absolute lowerdir option is longer than
    # the one page the kernel accepts, so this only runs if containerd can shorten it
    # (all lowerdirs, the view included, under <root>/snapshots/).
    n = 130
    assert n * len(f"{stack.sn_root}/snapshots/123/fs:") > 4096
    layers = [placeholder_layer(stack.one)]
    layers += [(_tar([("l", None, 0o755), (f"l/{i}", f"{i}\n".encode(), 0o644)]), {})
               for i in range(n)]
    busybox = f"/nix/store/{named(closure_bases(stack.one), 'busybox')}/bin/busybox"
    archive = oci_archive(
        stack.base / "deep.tar", "example.test/deep:1", layers,
        [busybox, "sh", "-c", f"{busybox} cat /l/0 /l/{n - 1}; {stack.one}/bin/prog"],
    )
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive), timeout=600)
    assert run(stack, "example.test/deep:1") == f"0\n{n - 1}\nhello from liba\n"


def imported_one(st: Stack) -> str:
    """Import the first image's archive (``ctr image import``); returns its name."""
    archive = st.base / "one.tar"  # built by the pull test; rebuilt when run alone
    if not archive.exists():
        lazystore("image", "build", st.one, "-o", str(archive), "--name", "lazy/one:1")
    st.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    names = st.ctd.ctr("image", "ls", "-q").stdout.split()
    return next(n for n in names if "lazy/one:1" in n and "127.0.0.1" not in n)


def test_imported_archive_runs_without_labels(stack: Stack) -> None:
    image = imported_one(stack)
    assert run(stack, image, f"{stack.one}/bin/prog") == "hello from liba\n"


def test_non_root_user_reads_store_paths(stack: Stack) -> None:
    # ctr 1.6 has no --user; the image config's User (as `docker run --user` would) is
    # applied by `ctr run` instead.
    busybox = f"/nix/store/{named(closure_bases(stack.one), 'busybox')}/bin/busybox"
    archive = oci_archive(
        stack.base / "user.tar", "example.test/user:1", [placeholder_layer(stack.one)],
        [busybox, "sh", "-c", f"{busybox} id -u; {stack.one}/bin/prog"], user="1000:1000",
    )
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    assert run(stack, "example.test/user:1") == "1000\nhello from liba\n"


def test_nix_snapshotter_style_image_runs(stack: Stack) -> None:
    archive = oci_archive(stack.base / "nixsn.tar", "example.test/nixsn:1",
                          [placeholder_layer(stack.one)], [f"{stack.one}/bin/prog"])
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    assert run(stack, "example.test/nixsn:1") == "hello from liba\n"


ROOTS_OUTPUT = (
    "hello from a text path\n" * 2 + "hello from liba\nhello from a script path\n0\n")


def test_nix_image_with_file_and_symlink_store_paths_runs(stack: Stack) -> None:
    # `image build` writes an empty file placeholder for each store path that is
    # not a directory; the view above it in the overlay shows the real file or
    # symlink there. prog cats a writeText-style file path and a symlink path to
    # it, reads through a symlink path to a directory, runs a writeScript-style
    # script path and counts an empty file path's bytes.
    archive = stack.base / "roots.tar"
    lazystore("image", "build", stack.roots, "-o", str(archive), "--name", "lazy/roots:1")
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    image = "docker.io/lazy/roots:1"
    assert run(stack, image, f"{stack.roots}/bin/prog") == ROOTS_OUTPUT
    bases = closure_bases(stack.roots)
    text = f"/nix/store/{named(bases, 'greeting.txt')}"
    script = f"/nix/store/{named(bases, 'greet-script')}"
    busybox = f"/nix/store/{named(bases, 'busybox')}/bin/busybox"
    assert run(stack, image, script) == "hello from a script path\n"
    link = f"/nix/store/{named(bases, 'greeting-link')}"
    checked = [text, script, link, f"/nix/store/{named(bases, 'empty-file')}"]
    shown = run(stack, image, busybox, "stat", "-c", "%A %s", *checked)
    host = [os.lstat(p) for p in checked]  # as the host's /nix/store has them
    assert shown.splitlines() == [f"{stat.filemode(h.st_mode)} {h.st_size}" for h in host]
    assert run(stack, image, busybox, "readlink", link) == f"{text}\n"


def test_layered_image_with_an_empty_file_store_path_asks_the_daemon_nothing(
    stack: Stack,
) -> None:
    # One layer per store path: the empty-file path's layer holds just that empty
    # 0444 file under nix/store, real content that must not be taken for a placeholder.
    archive = stack.base / "roots-layered.tar"
    lazystore("image", "build", stack.roots, "-o", str(archive), "--name",
              "lazy/roots-layered:1", "--layered", "20")
    before = stack.daemon.status()  # the import unpacks and commits each layer
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    assert run(stack, "docker.io/lazy/roots-layered:1", f"{stack.roots}/bin/prog") == ROOTS_OUTPUT
    assert stack.daemon.status()["views"] == before["views"]


@pytest.mark.parametrize("all_dirs", [False, True], ids=["nix-snapshotter", "dirs"])
def test_nix_snapshotter_style_image_with_file_and_symlink_store_paths_runs(
    stack: Stack, all_dirs: bool
) -> None:
    # nix-snapshotter's own layer (empty files for non-directories), and one with
    # an empty directory for every path: the view's file or symlink hides either.
    name = f"example.test/nixsn-roots-{int(all_dirs)}:1"
    archive = oci_archive(stack.base / f"nixsn-roots-{int(all_dirs)}.tar", name,
                          [placeholder_layer(stack.roots, all_dirs)],
                          [f"{stack.roots}/bin/prog"])
    stack.ctd.ctr("image", "import", "--snapshotter", SN, str(archive))
    assert run(stack, name) == ROOTS_OUTPUT


def _containerd_snapshots(st: Stack) -> tuple[grpc.Channel, pb_grpc.SnapshotsStub]:
    channel = grpc.insecure_channel(f"unix:{st.ctd.address}")
    return channel, pb_grpc.SnapshotsStub(channel)


def test_hostile_labels_through_containerd_are_refused_and_nothing_mounted(
    stack: Stack,
) -> None:
    md = (("containerd-namespace", stack.ctd.namespace),)
    before = {p.name for p in (stack.sn_root / "snapshots").iterdir()}
    views_before = stack.daemon.status()["views"]
    channel, snaps = _containerd_snapshots(stack)
    with channel:
        for bad in ("/etc/passwd", "/nix/store/../../etc", "/nix/store/not-a-store-path"):
            labels = {"containerd.io/snapshot.ref": "sha256:" + "e" * 64,
                      "containerd.io/snapshot/nix-layer": "true",
                      "containerd.io/snapshot/nix-store-path.0": bad}
            with pytest.raises(grpc.RpcError) as info:
                snaps.Prepare(pb.PrepareSnapshotRequest(
                    snapshotter=SN, key=f"evil-{len(bad)}", labels=labels), metadata=md)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    # (containerd may garbage-collect old snapshots meanwhile: only check nothing is new)
    assert {p.name for p in (stack.sn_root / "snapshots").iterdir()} <= before
    listed = stack.ctd.ctr("snapshots", "--snapshotter", SN, "ls").stdout
    assert "evil" not in listed and "e" * 64 not in listed
    assert stack.daemon.status()["views"] == views_before  # the daemon was never asked


def test_labelled_prepare_through_containerd_makes_a_remote_snapshot(stack: Stack) -> None:
    # A lease keeps containerd's garbage collector off the snapshots made here.
    lease = f"lz-remote-{time.monotonic_ns()}"
    stack.ctd.ctr("leases", "create", "--id", lease)
    md = (("containerd-namespace", stack.ctd.namespace), ("containerd-lease", lease))
    chain = REMOTE_CHAIN
    labels = {"containerd.io/snapshot.ref": chain, "containerd.io/snapshot/nix-layer": "true"}
    labels.update({f"containerd.io/snapshot/nix-store-path.{i}": p
                   for i, p in enumerate(nixcache.closure(stack.one))})
    channel, snaps = _containerd_snapshots(stack)
    try:
        with pytest.raises(grpc.RpcError) as info:
            snaps.Prepare(pb.PrepareSnapshotRequest(
                snapshotter=SN, key=f"extract-1 {chain}", labels=labels), metadata=md)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
        got = snaps.Stat(pb.StatSnapshotRequest(snapshotter=SN, key=chain), metadata=md).info
        assert got.kind == pb.COMMITTED
        mounts = snaps.View(pb.ViewSnapshotRequest(snapshotter=SN, key="rv", parent=chain),
                            metadata=md).mounts
        # The view is the layer's whole content: a read-only bind mount of the daemon's view.
        assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["ro", "rbind"])]
        assert os.path.realpath(mounts[0].source).startswith(f"{stack.daemon.mnt}/.views/")
        prog = Path(mounts[0].source) / stack.one.lstrip("/") / "bin/prog"
        assert prog.read_text().startswith("#!")
    finally:
        channel.close()
        stack.ctd.ctr("leases", "delete", lease, check=False)


def test_restart_of_snapshotter_and_daemon_keeps_snapshots_mountable(stack: Stack) -> None:
    image = imported_one(stack)
    listed = committed(stack)
    assert listed
    stack.stop_snapshotter(signal.SIGKILL)
    stack.daemon.stop(kill=True)
    stack.daemon.start()
    stack.start_snapshotter()
    stack.wait_served()  # containerd reconnects to the new socket with its own backoff
    assert committed(stack) == listed
    assert run(stack, image, f"{stack.one}/bin/prog") == "hello from liba\n"
    # The daemon alone restarts: the next container's mounts re-create its views.
    stack.daemon.stop(kill=True)
    stack.daemon.start()
    assert stack.daemon.status()["views"] == []
    assert run(stack, image, f"{stack.one}/bin/prog") == "hello from liba\n"
    assert stack.daemon.status()["views"] != []


def committed(st: Stack) -> set[str]:
    out = st.ctd.ctr("snapshots", "--snapshotter", SN, "ls").stdout
    names = {line.split()[0] for line in out.splitlines()[1:] if "Committed" in line}
    return names - {REMOTE_CHAIN, PROFILE_CHAIN}


def test_containerd_helper_leaves_no_shim_behind(tmp_path: Path) -> None:
    # lazystore.testing.containerd without a proxy plugin (as bench uses it for overlayfs):
    # a container still running at stop must not outlive the helper.
    _need_tools()
    work = Path(tempfile.mkdtemp(prefix="lzc-", dir="/tmp"))
    try:
        busybox = Path("/bin/busybox").read_bytes()
        archive = oci_archive(tmp_path / "bb.tar", "example.test/bb:1",
                              [(_tar([("bin", None, 0o755), ("bin/busybox", busybox, 0o755)]),
                                {})], ["/bin/busybox"])
        with Containerd(work) as ctd:
            ctd.ctr("image", "import", str(archive))
            ctd.ctr("run", "-d", "example.test/bb:1", "sleeper", "/bin/busybox", "sleep", "600")
            assert ctd.ctr("tasks", "ls", "-q").stdout.split() == ["sleeper"]
            address = str(ctd.address)
        shims = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and address.encode() in _cmdline(p)]
        assert shims == []
        assert not (Path("/run/containerd/runc") / ctd.namespace).exists()
    finally:
        _unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_image_with_a_profile_is_fetched_ahead_before_the_container_reads(
    stack: Stack,
) -> None:
    # Record: the program run once on a view (as a container's rootfs would be).
    bases = closure_bases(stack.one)
    prog, busybox, liba = base(stack.one), named(bases, "busybox"), named(bases, "liba")
    stack.daemon.call("view_create", id="record", paths=sorted(bases))
    out = _chroot_prog(stack.daemon.mnt / ".views/record", stack.one)
    saved = stack.base / "profile.json"
    lazystore("profile", "save", "--view", "record", str(saved),
              "--control-socket", str(stack.daemon.sock))
    stack.daemon.call("view_remove", id="record")
    archive = stack.base / "profiled.tar"
    lazystore("image", "build", stack.one, "-o", str(archive), "--name", "lazy/profiled:1",
              "--profile", str(saved))
    with OciArchive(archive) as image:
        (layer,) = image.layers
    # The pull on a fresh node: the layer's annotations as containerd's CRI
    # unpacker passes them (disable_snapshot_annotations = false), under a
    # chain id of this test's own (so no earlier snapshot of the same layer).
    stack.fresh_daemon()
    lease = f"lz-profile-{time.monotonic_ns()}"
    stack.ctd.ctr("leases", "create", "--id", lease)
    md = (("containerd-namespace", stack.ctd.namespace), ("containerd-lease", lease))
    chain = PROFILE_CHAIN
    labels = {"containerd.io/snapshot.ref": chain, **layer.annotations}
    channel, snaps = _containerd_snapshots(stack)
    try:
        with pytest.raises(grpc.RpcError) as info:
            snaps.Prepare(pb.PrepareSnapshotRequest(
                snapshotter=SN, key=f"extract-1 {chain}", labels=labels), metadata=md)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
        mounts = snaps.View(pb.ViewSnapshotRequest(snapshotter=SN, key="pv", parent=chain),
                            metadata=md).mounts
        deadline = time.monotonic() + 60
        while {e["path"] for e in stack.daemon.call("events")["events"]
               if e["kind"] == "nar-done"} < {prog, busybox, liba}:
            assert time.monotonic() < deadline, f"the profile was not fetched\n{stack.logs()}"
            time.sleep(0.05)
        assert _chroot_prog(Path(mounts[0].source), stack.one) == out
    finally:
        channel.close()
        stack.ctd.ctr("leases", "delete", lease, check=False)
    events = stack.daemon.call("events")["events"]
    asked = [(e["path"], e["view"]) for e in events if e["kind"] == "profile"]
    assert [p for p, _ in asked] == [prog, busybox, liba], asked
    nars = [e for e in events if e["kind"] == "nar"]
    assert sorted(e["path"] for e in nars) == sorted([prog, busybox, liba])
    # every NAR came before any read of the program reached the daemon (fetched
    # ahead, the paths are bound over the mount: its reads may not reach it at all)
    reads = [e["seq"] for e in events if e["kind"] == "read"]
    assert all(e["seq"] < min(reads, default=events[-1]["seq"] + 1) for e in nars)


def _chroot_prog(root: Path, top: str) -> str:
    out = subprocess.run(["chroot", str(root), f"{top}/bin/prog"], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout == "hello from liba\n", out.stderr
    return out.stdout
