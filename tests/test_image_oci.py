"""OCI documents, deterministic layers and the image-layout archive."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lazystore.errors import ImageError
from lazystore.image import oci
from lazystore.image.build import build_image
from lazystore.image.oci import Entry, ImageName, OciArchive, RuntimeConfig

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "full"),
    [
        ("prog", "", "prog", "latest", "docker.io/library/prog:latest"),
        ("team/prog:1.0", "", "team/prog", "1.0", "docker.io/team/prog:1.0"),
        ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", "t", "127.0.0.1:5000/a/b:t"),
        ("localhost/x", "localhost", "x", "latest", "localhost/x:latest"),
        (
            "reg.example.org/x_y.z-w:V_1",
            "reg.example.org",
            "x_y.z-w",
            "V_1",
            "reg.example.org/x_y.z-w:V_1",
        ),
    ],
)
def test_image_name_parse(text: str, registry: str, repository: str, tag: str, full: str) -> None:
    name = ImageName.parse(text)
    assert (name.registry, name.repository, name.tag, name.full) == (
        registry,
        repository,
        tag,
        full,
    )


@pytest.mark.parametrize("text", ["", "Prog", "a//b", "a:", "a:-x", "/a", "a/b:t:u", "bad host!/x"])
def test_image_name_rejects(text: str) -> None:
    with pytest.raises(ImageError):
        ImageName.parse(text)


def test_documents_are_canonical_json_with_descriptors() -> None:
    config = oci.config_document(
        RuntimeConfig(["/bin/sh"], ["-c", "true"], ["A=1"]), ["sha256:" + "1" * 64], ["x"], "arm64"
    )
    doc = json.loads(config)
    assert config == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["architecture"] == "arm64" and doc["os"] == "linux"
    assert doc["config"] == {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "Env": ["A=1"]}
    assert doc["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}
    cdesc = oci.Descriptor(oci.MEDIA_CONFIG, oci.digest_of(config), len(config))
    layer = oci.Descriptor(oci.MEDIA_LAYER_GZIP, "sha256:" + "2" * 64, 7, {"k": "v"})
    manifest = json.loads(oci.manifest_document(cdesc, [layer]))
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == oci.MEDIA_MANIFEST
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(config).hexdigest()
    assert manifest["layers"] == [layer.to_json()]
    assert oci.Descriptor.from_json(layer.to_json()) == layer


@pytest.mark.parametrize("digest", ["sha256:abc", "sha512:" + "0" * 128, "sha256:" + "G" * 64])
def test_malformed_digests_are_refused(digest: str) -> None:
    with pytest.raises(ImageError, match="digest"):
        oci.Descriptor.from_json({"mediaType": "x", "digest": digest, "size": 1})


def _entries(tmp_path: Path) -> list[Entry]:
    data = tmp_path / "data"
    data.write_bytes(b"payload\n" * 1000)
    return [
        Entry("nix", "dir", 0o755),
        Entry("nix/f", "file", 0o555, size=data.stat().st_size, source=data),
        Entry("nix/empty", "file", 0o444),
        Entry("nix/l", "symlink", 0o777, linkname="f"),
        Entry("nix/" + "d" * 150, "dir", 0o555),
    ]


def test_layer_is_deterministic_and_hashed(tmp_path: Path) -> None:
    one = oci.write_layer(_entries(tmp_path), tmp_path / "one")
    two = oci.write_layer(_entries(tmp_path), tmp_path / "two")
    blob = one.path.read_bytes()
    assert blob == two.path.read_bytes()
    assert one.digest == oci.digest_of(blob) and one.size == len(blob)
    plain = gzip.decompress(blob)
    assert one.diff_id == oci.digest_of(plain)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [e.name for e in _entries(tmp_path)]
        assert all((m.uid, m.gid, m.mtime, m.uname, m.gname) == (0, 0, 1, "", "") for m in members)
        assert tar.extractfile("nix/f").read() == b"payload\n" * 1000  # type: ignore[union-attr]
        assert members[1].mode == 0o555 and members[3].linkname == "f"


def test_tree_entries_refuse_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ImageError, match="not a regular file"):
        list(oci.tree_entries(tmp_path, "x"))


def test_archive_is_valid_oci_layout(tmp_path: Path, sample_closure: str) -> None:
    out = tmp_path / "image.tar"
    result = build_image([sample_closure], out, "lazystore/sample:1", RuntimeConfig(cmd=["prog"]))
    with tarfile.open(out) as tar:
        names = tar.getnames()
        layout = json.loads(tar.extractfile("oci-layout").read())  # type: ignore[union-attr]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("blobs/sha256/"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == member.name.rsplit("/", 1)[1]
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert {"oci-layout", "index.json"} <= set(names)
    (manifest,) = index["manifests"]
    assert manifest["digest"] == result.manifest_digest
    assert manifest["annotations"] == {
        "io.containerd.image.name": "docker.io/lazystore/sample:1",
        "org.opencontainers.image.ref.name": "1",
    }
    with OciArchive(out) as image:
        assert len(image.layers) == 1
        assert image.config["rootfs"]["diff_ids"][0].startswith("sha256:")
        assert image.config["config"] == {"Cmd": ["prog"]}


def test_rebuild_is_byte_identical(tmp_path: Path, sample_closure: str) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    for out in (a, b):
        build_image([sample_closure], out, "x", RuntimeConfig(), layers=2)
    assert a.read_bytes() == b.read_bytes()


@needs_skopeo
@pytest.mark.parametrize("layers", [None, 3])
def test_skopeo_accepts_archive(tmp_path: Path, sample_closure: str, layers: int | None) -> None:
    out = tmp_path / "image.tar"
    runtime = RuntimeConfig([f"{sample_closure}/bin/prog"], env=["GREETING=hi"])
    result = build_image([sample_closure], out, "sample", runtime, layers=layers)
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{out}"], capture_output=True, text=True, check=True
    )
    info = json.loads(inspect.stdout)
    assert info["Digest"] == result.manifest_digest
    assert info["Env"] == ["GREETING=hi"]
    copied = tmp_path / "dir"
    subprocess.run(
        ["skopeo", "copy", f"oci-archive:{out}", f"dir:{copied}"], capture_output=True, check=True
    )
    with OciArchive(out) as image:
        for desc in image.blobs():
            data = (copied / desc.digest.removeprefix("sha256:")).read_bytes()
            assert oci.digest_of(data) == desc.digest and len(data) == desc.size
        assert (copied / "manifest.json").read_bytes() == image.read_blob(image.manifest_descriptor)
        assert info["Layers"] == [d.digest for d in image.layers]


def _rewrite(src: Path, dest: Path, change: dict[str, bytes]) -> None:
    with tarfile.open(src) as old, tarfile.open(dest, "w") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name in change:
                data = change[member.name]
                member.size = len(data)
            new.addfile(member, io.BytesIO(data) if data is not None else None)


def test_tampered_blob_is_detected(tmp_path: Path, sample_closure: str) -> None:
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    build_image([sample_closure], good, "x", RuntimeConfig())
    with OciArchive(good) as image:
        layer = image.layers[0]
        blob = bytearray(image.read_blob(layer))
    blob[-1] ^= 1
    _rewrite(good, bad, {oci.blob_name(layer.digest): bytes(blob)})
    with OciArchive(bad) as image, pytest.raises(ImageError, match="does not match"):
        image.read_blob(image.layers[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index.json": b"{"}, "not valid JSON"),
        ({"index.json": b'{"manifests": []}'}, "expected one image"),
    ],
)
def test_broken_archives_give_clear_errors(
    tmp_path: Path, sample_closure: str, change: dict[str, bytes], message: str
) -> None:
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    build_image([sample_closure], good, "x", RuntimeConfig())
    _rewrite(good, bad, change)
    with pytest.raises(ImageError, match=message):
        OciArchive(bad)


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"junk" * 300)
    with pytest.raises(ImageError, match="not a readable OCI archive"):
        OciArchive(tmp_path / "junk")
