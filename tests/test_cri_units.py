"""The image service's pure parts: nix:0 references and archive checks."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from lazystore.cri import archive, reference
from lazystore.cri.errors import BadArchive, InvalidReference
from lazystore.nix import labels
from tests.support import hostile_archives

H = "0" * 31 + "1"
P = f"/nix/store/{H}-image.tar"


@pytest.mark.parametrize("ref", [f"nix:0{P}", f"nix:0{P}:latest"])
def test_reference_names_the_store_path_and_the_containerd_image(ref: str) -> None:
    parsed = reference.parse(ref)
    assert parsed.path == P
    assert parsed.image_name == f"nix:0{P}:latest"


@pytest.mark.parametrize("ref, words", [
    ("docker.io/library/busybox:1", "does not start with nix:0/"),
    ("nix:1/nix/store/x", "does not start with nix:0/"),
    (f"nix:0{P}@sha256:" + "a" * 64, "no digest"),
    (f"nix:0{P}:v1", "only tag"),
    (f"nix:0{P}/", "trailing"),
    (f"nix:0{P}/bin", "sub-path"),
    (f"nix:0/nix/store/../{H}-image.tar", "not a store path"),
    (f"nix:0/gnu/store/{H}-image.tar", "not in the store"),
    (f"nix:0/nix/store/{H}-Image.tar", "cannot be part of an image name"),
    (f"nix:0/nix/store/{H}-a..b", "cannot be part of an image name"),
    ("nix:0/nix/store/short-image.tar", "not a store path"),
])
def test_reference_refusals_say_why(ref: str, words: str) -> None:
    with pytest.raises(InvalidReference, match=words.replace(".", r"\.")):
        reference.parse(ref)


def test_is_nix_claims_the_nix_scheme_only() -> None:
    assert reference.is_nix("nix:0/nix/store/x") and reference.is_nix("nix:bogus")
    assert not reference.is_nix("registry.example:5000/nix:0")
    assert not reference.is_nix("nixos/nix:latest")


def test_a_valid_nix_archive_is_read_with_its_store_paths(tmp_path: Path) -> None:
    path = hostile_archives.layout(tmp_path / "ok.tar", hostile_archives.NIX_NOTES)
    image = archive.inspect(path, nix_only=True)
    assert image.is_nix and image.store_paths == [hostile_archives.NIX_NOTES[
        "containerd.io/snapshot/nix-store-path.0"]]
    assert image.id == image.config.digest and len(image.layers) == 1


def test_the_closure_annotation_is_read_and_checked(tmp_path: Path) -> None:
    info = f"/nix/store/{H}-closure-info"
    image = archive.inspect(hostile_archives.layout(tmp_path / "c.tar", {labels.NIX_CLOSURE: info}))
    assert image.closures == [info] and image.store_paths == [] and image.is_nix
    bad = hostile_archives.layout(tmp_path / "bad.tar", {labels.NIX_CLOSURE: "/etc/passwd"})
    with pytest.raises(BadArchive, match="not in the store"):
        archive.inspect(bad)


def test_nix_only_refuses_ordinary_layers(tmp_path: Path) -> None:
    path = hostile_archives.layout(tmp_path / "plain.tar")
    assert not archive.inspect(path).is_nix
    with pytest.raises(BadArchive, match="is not a nix layer"):
        archive.inspect(path, nix_only=True)


@pytest.mark.parametrize("what", sorted(hostile_archives.MESSAGES))
def test_hostile_archive_is_refused_in_one_line(tmp_path: Path, what: str) -> None:
    path = hostile_archives.write_all(tmp_path)[what]
    with pytest.raises(BadArchive) as info:
        archive.inspect(path)
    assert hostile_archives.MESSAGES[what] in str(info.value)
    assert "\n" not in str(info.value)


def test_a_directory_is_no_archive(tmp_path: Path) -> None:
    with pytest.raises(BadArchive, match="a directory"):
        archive.inspect(tmp_path)


def test_import_layout_holds_only_the_verified_blobs_and_names_the_image(tmp_path: Path) -> None:
    index, blobs = hostile_archives.documents(hostile_archives.NIX_NOTES)
    files = hostile_archives.entries(index, blobs)
    files.append(("blobs/sha256/" + "e" * 64, b"not part of the image", ""))
    files.append(("manifest.json", b"[]", ""))
    src = hostile_archives.write_tar(tmp_path / "src.tar", files)
    image = archive.inspect(src)
    dest = tmp_path / "import.tar"
    archive.write_import(src, image, "nix:0/nix/store/x:latest", dest)
    with tarfile.open(dest) as tar:
        names = sorted(tar.getnames())
        new_index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert names == sorted(["oci-layout", "index.json", *(f"blobs/sha256/{d[7:]}" for d in blobs)])
    [desc] = new_index["manifests"]
    assert desc["digest"] == image.manifest.digest
    assert desc["annotations"] == {"io.containerd.image.name": "nix:0/nix/store/x:latest"}
    assert archive.inspect(dest).id == image.id


def test_a_symlink_is_no_archive_even_to_a_valid_one(tmp_path: Path) -> None:
    target = hostile_archives.layout(tmp_path / "ok.tar", hostile_archives.NIX_NOTES)
    (tmp_path / "link.tar").symlink_to(target)
    with pytest.raises(BadArchive, match="a symlink"):
        archive.inspect(tmp_path / "link.tar")


def test_the_layout_nix_snapshotter_writes_is_read(tmp_path: Path) -> None:
    # containerd's archive.Export (nix-snapshotter's buildImage): "blobs/" and
    # "blobs/sha256/" directory entries, blobs 0444, a Docker manifest.json, the
    # index naming the image; entries sorted by name.
    index, blobs = hostile_archives.documents(hostile_archives.NIX_NOTES)
    index["manifests"][0]["annotations"] = {
        "io.containerd.image.name": "docker.io/library/redis:latest",
        "org.opencontainers.image.ref.name": "latest"}
    docker = [{"Config": "blobs/sha256/x", "RepoTags": ["redis:latest"], "Layers": []}]
    files = hostile_archives.entries(index, blobs) + [
        ("blobs/", None, ""), ("blobs/sha256/", None, ""),
        ("manifest.json", json.dumps(docker).encode(), "")]
    src = hostile_archives.write_tar(tmp_path / "export.tar", sorted(files))
    image = archive.inspect(src, nix_only=True)
    assert image.store_paths == [hostile_archives.NIX_NOTES[labels.NIX_STORE_PATH + "0"]]
