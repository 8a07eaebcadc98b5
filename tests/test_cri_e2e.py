"""End to end through containerd 1.6's CRI plugin: `lazystore image-service`
in front of it, pods and containers started on containerd's RuntimeService.

One node per module (lazystore.testing.cri.node: the daemon, the snapshotter,
containerd with its CRI plugin, the image service under test as its unit runs
it) over real-Nix binary caches on 127.0.0.1: the sample closure, and the
image archives as store paths of their own. Tests run in file order.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from lazystore.testing import cri, nixcache
from lazystore.testing.containerd import CRI_NAMESPACE, lazystore_process
from lazystore.testing.cri import SN, CriClient, Pod, lazystore
from lazystore.testing.daemon import container_stack_missing
from lazystore.testing.httpserver import serve_directory

SAMPLE_IMAGE = Path(__file__).with_name("support") / "sample-image.nix"
pytestmark = [pytest.mark.root, pytest.mark.slow]


def _need_tools() -> None:
    if reason := container_stack_missing():
        pytest.skip(reason)


def add_to_store(path: Path) -> str:
    """``nix-store --add``: the file as a store path of its own (no references)."""
    return nixcache.run_nix("nix-store", "--add", str(path)).decode().strip()


def base(path: str) -> str:
    return Path(path).name


def named(paths: list[str], name: str) -> str:
    return next(p for p in paths if base(p)[33:] == name)


@dataclass
class Stack(cri.Node):
    prog: str  # the sample program's store path
    closure: list[str]
    archive: str  # store path of the nix image archive of prog
    hostile: dict[str, str]  # what is wrong -> store path of such an archive
    built: str  # SAMPLE_IMAGE (nix-closure form), built by Nix
    built_two: str  # the same with tag "two" (prog-two)
    plain_archive: str  # a valid archive of an ordinary (non-nix) layer


def nix_image(dest: Path, top: str, name: str) -> str:
    archive = dest / f"{name}.tar"
    lazystore("image", "build", top, "-o", str(archive), "--name", f"lazy/{name}:1")
    return add_to_store(archive)


@pytest.fixture(scope="module")
def stack(
    binary_cache: nixcache.BinaryCache, http_cache: str, test_key: nixcache.KeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    _need_tools()
    from tests.support import hostile_archives

    work = tmp_path_factory.mktemp("cri-images")
    prog = binary_cache.top
    closure = nixcache.closure(prog)
    archive = nix_image(work, prog, "prog-image")
    built = nixcache.build(SAMPLE_IMAGE)
    built_two = nixcache.build(SAMPLE_IMAGE, tag="two")
    hostile = {what: add_to_store(path)
               for what, path in hostile_archives.write_all(work / "hostile").items()}
    plain_archive = add_to_store(hostile_archives.layout(work / "plain-layer.tar"))
    archives = tmp_path_factory.mktemp("cache-archives")
    for path in [archive, built, built_two, plain_archive, *hostile.values()]:
        nixcache.make_cache(path, archives, test_key)
    with serve_directory(archives) as server, \
            cri.node([http_cache, server.url], test_key.public_key,  # type: ignore[attr-defined]
                     named(closure, "busybox"), work) as n:
        yield Stack(**vars(n), prog=prog, closure=closure, archive=archive, hostile=hostile,
                    built=built, built_two=built_two, plain_archive=plain_archive)


def nix_ref(path: str) -> str:
    return f"nix:0{path}"


# -- tests (in order) ---------------------------------------------------------


def test_nix_pull_imports_into_containerd_fetching_only_the_archive(stack: Stack) -> None:
    before = stack.materialized()
    image_ref = stack.service.pull(nix_ref(stack.archive))
    assert image_ref.startswith("sha256:")
    # containerd's own CRI sees the image, under the reference and by its id
    seen = stack.containerd.image_status(nix_ref(stack.archive))
    assert seen is not None and seen.id == image_ref, stack.logs()
    assert f"nix:0{stack.archive}:latest" in seen.repo_tags
    assert stack.containerd.image_status(image_ref).id == image_ref  # type: ignore[union-attr]
    assert stack.materialized() - before == {base(stack.archive)}
    assert not {base(p) for p in stack.closure} & stack.materialized()


def test_image_service_runs_with_its_units_privileges(stack: Stack) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    status = Path(f"/proc/{stack.service_pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_nix_pull_again_is_a_noop(stack: Stack) -> None:
    first = stack.service.pull(nix_ref(stack.archive))
    stack.daemon.call("evict", paths=[stack.archive])
    assert base(stack.archive) not in stack.materialized()
    images = stack.cri_images()
    # the kubelet's form of the reference (":latest" added) names the same image
    assert stack.service.pull(nix_ref(stack.archive) + ":latest") == first
    assert base(stack.archive) not in stack.materialized()  # not read again
    assert stack.cri_images() == images


def test_pod_runs_the_nix_image_fetching_only_what_it_touches(stack: Stack) -> None:
    image_ref = stack.service.pull(nix_ref(stack.archive))
    before = stack.materialized()
    pod = Pod(stack.containerd, stack.base / "pods" / "nix")
    try:
        code, out = pod.run(image_ref, [f"{stack.prog}/bin/prog"])
    finally:
        pod.remove()
    assert (code, out) == (0, "hello from liba\n"), stack.logs()
    fetched = stack.materialized() - before
    wanted = {base(stack.prog), base(named(stack.closure, "busybox")),
              base(named(stack.closure, "liba"))}
    assert fetched == wanted - before
    assert base(named(stack.closure, "docs")) not in stack.materialized()


def test_ordinary_image_is_forwarded_and_runs(stack: Stack) -> None:
    archive = stack.base / "plain.tar"
    lazystore("image", "build", stack.prog, "-o", str(archive), "--name", "plain:1",
              "--layered", "2")
    ref = f"{stack.registry.host}/plain/prog:1"
    lazystore("image", "push", str(archive), ref, "--plain-http")
    views = stack.daemon.status()["views"]
    image_ref = stack.service.pull(ref)
    assert stack.containerd.image_status(ref).id == image_ref  # type: ignore[union-attr]
    pod = Pod(stack.containerd, stack.base / "pods" / "plain")
    try:
        code, out = pod.run(ref, [f"{stack.prog}/bin/prog"])
    finally:
        pod.remove()
    assert (code, out) == (0, "hello from liba\n"), stack.logs()
    assert stack.daemon.status()["views"] == views  # its own layers: the daemon is not asked
    stack.service.remove(ref)
    assert stack.containerd.image_status(ref) is None


def test_image_status_and_list_answer_from_containerd(stack: Stack) -> None:
    image_ref = stack.service.pull(nix_ref(stack.archive))
    mine = stack.service.image_status(nix_ref(stack.archive))
    theirs = stack.containerd.image_status(nix_ref(stack.archive))
    assert mine == theirs and mine is not None and mine.id == image_ref
    ids = sorted(i.id for i in stack.service.list_images())
    assert ids == sorted(i.id for i in stack.containerd.list_images())  # (Go map order)
    assert ids.count(image_ref) == 1


def test_image_fs_info_adds_the_lazystore_cache(stack: Stack) -> None:
    from lazystore.cri.proto import api_pb2 as api

    mine = stack.service.images.ImageFsInfo(api.ImageFsInfoRequest()).image_filesystems
    theirs = stack.containerd.images.ImageFsInfo(api.ImageFsInfoRequest()).image_filesystems
    assert [f.fs_id.mountpoint for f in mine[:-1]] == [f.fs_id.mountpoint for f in theirs]
    status = stack.daemon.status()
    ours = mine[-1]
    assert ours.fs_id.mountpoint == status["cache_dir"]
    assert ours.used_bytes.value == status["cache_bytes"] > 0
    files = sum(len(dirs) + len(names) for _, dirs, names in os.walk(stack.daemon.cache / "store"))
    assert ours.inodes_used.value == files > 0


def test_remove_image_removes_it_and_unpins_its_paths(stack: Stack) -> None:
    image_ref = stack.service.pull(nix_ref(stack.archive))
    pins = [v for v in stack.daemon.status()["views"] if v.startswith("cri-")]
    assert pins and all(image_ref[7:] in v for v in pins)
    stack.service.remove(nix_ref(stack.archive))
    assert stack.containerd.image_status(nix_ref(stack.archive)) is None
    assert stack.containerd.image_status(image_ref) is None
    assert not [v for v in stack.daemon.status()["views"] if v.startswith("cri-")]
    stack.service.remove(nix_ref(stack.archive))  # idempotent, as the CRI wants
    # the kubelet's image GC removes by id
    assert stack.service.pull(nix_ref(stack.archive)) == image_ref
    assert [v for v in stack.daemon.status()["views"] if v.startswith("cri-")] == pins
    stack.service.remove(image_ref)
    assert stack.containerd.image_status(nix_ref(stack.archive)) is None
    assert not [v for v in stack.daemon.status()["views"] if v.startswith("cri-")]


def pins(stack: Stack) -> list[str]:
    return sorted(v for v in stack.daemon.status()["views"] if v.startswith("cri-"))


def drop_pins(stack: Stack) -> None:
    """What a restart of the daemon does to them."""
    for view in pins(stack):
        stack.daemon.call("view_remove", id=view)


def test_lost_pins_are_made_again_by_the_next_pull(stack: Stack) -> None:
    image_ref = stack.service.pull(nix_ref(stack.archive))
    pinned = pins(stack)
    assert pinned and all(image_ref[7:] in v for v in pinned)
    drop_pins(stack)
    assert stack.service.pull(nix_ref(stack.archive)) == image_ref
    assert pins(stack) == pinned


def test_pins_are_made_again_when_the_service_starts(stack: Stack) -> None:
    stack.service.pull(nix_ref(stack.archive))
    pinned = pins(stack)
    drop_pins(stack)
    args = ["image-service", "--address", str(stack.base / "img3.sock"),
            "--runtime-endpoint", str(stack.ctd.address),
            "--control-socket", str(stack.daemon.sock), "--mount-point", str(stack.daemon.mnt)]
    with lazystore_process(args, stack.base, stack.base / "image-service-3.log"):
        log = (stack.base / "image-service-3.log").read_text()
        assert pins(stack) == pinned, log  # before READY=1


@pytest.mark.parametrize("ref, message", [
    ("nix:0/nix/store/../../etc/passwd", "not a store path"),
    ("nix:0nix/store/aaaa", "does not start with nix:0/"),
    ("nix:0/tmp/" + "a" * 32 + "-x.tar", "is not in the store"),
    ("nix:0/nix/store/not-a-store-path", "not a store path"),
    ("nix:0/nix/store/" + "a" * 32 + "-x.tar/sub", "sub-path"),
    ("nix:0/nix/store/" + "a" * 32 + "-X.tar", "cannot be part of an image name"),
    ("nix:0/nix/store/" + "a" * 32 + "-x.tar:v2", "only tag"),
])
def test_hostile_reference_is_invalid_argument(stack: Stack, ref: str, message: str) -> None:
    _refused(stack, ref, grpc.StatusCode.INVALID_ARGUMENT, message)


def test_store_path_no_substituter_has_is_not_found(stack: Stack) -> None:
    missing = "/nix/store/" + "0" * 32 + "-missing-image.tar"
    _refused(stack, nix_ref(missing), grpc.StatusCode.NOT_FOUND, "not in any substituter")


def test_hostile_archives_are_failed_precondition(stack: Stack) -> None:
    from tests.support import hostile_archives

    for what, path in stack.hostile.items():
        _refused(stack, nix_ref(path), grpc.StatusCode.FAILED_PRECONDITION,
                 hostile_archives.MESSAGES[what])


def _refused(stack: Stack, ref: str, code: grpc.StatusCode, message: str) -> None:
    images, views = stack.cri_images(), stack.daemon.status()["views"]
    with pytest.raises(grpc.RpcError) as info:
        stack.service.pull(ref)
    err: Any = info.value
    assert err.code() == code, err.details()
    assert message in err.details()
    assert "\n" not in err.details()
    assert stack.cri_images() == images  # nothing imported
    assert stack.daemon.status()["views"] == views
    assert stack.service.list_images() is not None  # and it keeps serving


# -- buildImage (nixos-module/build-image.nix) and the nix-closure form ----------


def closure_info(image: str) -> str:
    return next(p for p in nixcache.references(image) if p.endswith("-closure-info"))


def test_build_image_archive_is_a_store_path_referencing_its_closure(stack: Stack) -> None:
    info = closure_info(stack.built)
    listed = Path(info, "store-paths").read_text().split()
    assert listed == sorted(stack.closure)  # prog's closure, nothing of the build itself
    assert set(nixcache.closure(stack.built)) == {stack.built, info, *stack.closure}
    assert nixcache.build(SAMPLE_IMAGE) == stack.built
    from lazystore.cri import archive

    image = archive.inspect(Path(stack.built), nix_only=True)
    assert image.closures == [info] and image.store_paths == []


def test_built_image_runs_through_nix0_fetching_only_what_it_touches(stack: Stack) -> None:
    before = stack.materialized()
    image_ref = stack.service.pull(nix_ref(stack.built))
    # the archive, and the small closure-info path the pin reads; nothing of the closure
    assert stack.materialized() - before == {base(stack.built), base(closure_info(stack.built))}
    after_pull = stack.materialized()
    pod = Pod(stack.containerd, stack.base / "pods" / "built")
    try:
        assert pod.run(image_ref, []) == (0, "hello from liba\n"), stack.logs()  # entrypoint
        assert pod.run(image_ref, ["/bin/prog"]) == (0, "hello from liba\n")  # copyToRoot
    finally:
        pod.remove()
    wanted = {base(stack.prog), base(named(stack.closure, "busybox")),
              base(named(stack.closure, "liba"))}
    assert stack.materialized() - after_pull == wanted - after_pull
    assert base(named(stack.closure, "docs")) not in stack.materialized()
    stack.service.remove(nix_ref(stack.built))


def test_built_image_by_labels_through_cri_downloads_no_layer(stack: Stack) -> None:
    ref = f"{stack.registry.host}/lazy/built-two:1"
    lazystore("image", "push", stack.built_two, ref, "--plain-http")
    from lazystore.cri import archive

    image = archive.inspect(Path(stack.built_two))
    layer = image.layers[0].digest
    image_ref = stack.service.pull(ref)  # forwarded: containerd's CRI pulls, with labels
    content = stack.ctd.ctr("content", "ls", "-q", namespace=CRI_NAMESPACE).stdout.split()
    assert image.manifest.digest in content and image.config.digest in content
    assert layer not in content  # a remote snapshot from the nix-closure label
    two = nixcache.closure(stack.built_two)
    pod = Pod(stack.containerd, stack.base / "pods" / "built-two")
    try:
        code, out = pod.run(image_ref, [])
    finally:
        pod.remove()
    assert (code, out) == (0, "extra two\nhello from liba\n"), stack.logs()
    assert base(named(two, "extra-two")) in stack.materialized()


def test_built_image_by_content_with_ctr(stack: Stack) -> None:
    stack.ctd.ctr("images", "import", "--snapshotter", SN, stack.built)
    out = stack.ctd.ctr("run", "--snapshotter", SN, "--rm", "docker.io/library/sample-image:latest",
                        f"c{os.getpid()}", timeout=180).stdout
    assert out == "hello from liba\n"


def test_behind_another_cri_proxy_and_nix_only(stack: Stack) -> None:
    # A second image service whose runtime endpoint is the first one (as it would
    # sit in front of stargz's or SOCI's proxy), importing into containerd directly.
    sock = stack.base / "img2.sock"
    args = ["image-service", "--address", str(sock),
            "--runtime-endpoint", str(stack.base / "img.sock"),
            "--containerd-address", str(stack.ctd.address), "--nix-only",
            "--control-socket", str(stack.daemon.sock), "--mount-point", str(stack.daemon.mnt)]
    with lazystore_process(args, stack.base, stack.base / "image-service-2.log"), \
            CriClient(sock) as chained:
        pause = f"{stack.registry.host}/pause:1"
        assert chained.image_status(pause) == stack.containerd.image_status(pause)
        image_ref = chained.pull(nix_ref(stack.archive))
        assert stack.containerd.image_status(nix_ref(stack.archive)).id == image_ref  # type: ignore[union-attr]
        images = stack.cri_images()
        with pytest.raises(grpc.RpcError) as info:
            chained.pull(nix_ref(stack.plain_archive))
        err: Any = info.value
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is not a nix layer (--nix-only)" in err.details()
        assert stack.cri_images() == images
        chained.remove(nix_ref(stack.archive))
    assert stack.containerd.image_status(nix_ref(stack.archive)) is None
