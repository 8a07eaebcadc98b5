"""`lazystore registry` as a real process on 127.0.0.1 over a real-Nix binary
cache: the images it makes are those `lazystore image build` writes, and
hostile requests get the distribution spec's errors without stopping it."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lazystore.image.oci import OciArchive
from lazystore.registry.manifest import DOCKER_MANIFEST
from lazystore.testing import lazyregistry, nixcache
from lazystore.testing.daemon import LAZYSTORE

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT_BOTH = f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"


class Client:
    def __init__(self, reg: lazyregistry.LazyRegistry) -> None:
        self.reg = reg

    def request(self, path: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        host, port = self.reg.host.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def ok(self, path: str, **kw: Any) -> tuple[dict[str, str], bytes]:
        status, headers, body = self.request(path, **kw)
        assert status == 200, (path, status, body[:500])
        return headers, body

    def manifest(self, name: str, ref: str, accept: str = ACCEPT_BOTH) -> bytes:
        return self.ok(f"/v2/{name}/manifests/{ref}", headers={"Accept": accept})[1]


@pytest.fixture(scope="module")
def reg(binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[lazyregistry.LazyRegistry]:
    with lazyregistry.running(tmp_path_factory.mktemp("reg"), [binary_cache.url],
                              test_key.public_key) as r:
        yield r


def _hash(path: str) -> str:
    return Path(path).name[:32]


def _build(tmp: Path, top: str, *extra: str) -> OciArchive:
    dest = tmp / "image.tar"
    subprocess.run([LAZYSTORE, "image", "build", top, "-o", str(dest), "--name", "x:1",
                    *extra], check=True, capture_output=True)
    return OciArchive(dest)


@pytest.mark.parametrize("tag, extra", [("latest", ()), ("layered", ("--layered", "100"))])
def test_images_are_byte_identical_to_image_build(
    reg: lazyregistry.LazyRegistry, sample_closure: str, tmp_path: Path,
    tag: str, extra: tuple[str, ...],
) -> None:
    client = Client(reg)
    headers, manifest = client.ok(f"/v2/{_hash(sample_closure)}/manifests/{tag}",
                                  headers={"Accept": ACCEPT_BOTH})
    with _build(tmp_path, sample_closure, *extra) as archive:
        assert manifest == archive.read_blob(archive.manifest_descriptor)
        assert headers["docker-content-digest"] == archive.manifest_descriptor.digest
        assert headers["content-type"] == OCI_MANIFEST
        for desc in archive.blobs():
            blob_headers, blob = client.ok(f"/v2/{_hash(sample_closure)}/blobs/{desc.digest}")
            assert blob == archive.read_blob(desc)
            assert blob_headers["docker-content-digest"] == desc.digest
            assert int(blob_headers["content-length"]) == desc.size


def test_max_layers_groups_the_closure_as_image_build_layered_does(
    binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair, sample_closure: str,
    tmp_path: Path,
) -> None:
    assert len(binary_cache.paths) > 2  # so that two layers must group store paths
    with lazyregistry.running(tmp_path / "reg", [binary_cache.url], test_key.public_key,
                              "--max-layers", "2") as two:
        manifest = Client(two).manifest(_hash(sample_closure), "layered", OCI_MANIFEST)
    with _build(tmp_path, sample_closure, "--layered", "2") as archive:
        assert manifest == archive.read_blob(archive.manifest_descriptor)
    assert len(json.loads(manifest)["layers"]) == 2


def test_latest_is_a_nix_image_of_the_closure(
    reg: lazyregistry.LazyRegistry, binary_cache: nixcache.BinaryCache, sample_closure: str,
) -> None:
    doc = json.loads(Client(reg).manifest(_hash(sample_closure), "latest"))
    (layer,) = doc["layers"]
    notes = layer["annotations"]
    assert notes["containerd.io/snapshot/nix-layer"] == "true"
    named = {v for k, v in notes.items() if k.startswith("containerd.io/snapshot/nix-store-path.")}
    assert named == set(binary_cache.paths)


def test_names_digests_and_head_give_the_same_manifest(
    reg: lazyregistry.LazyRegistry, sample_closure: str,
) -> None:
    client = Client(reg)
    by_hash = client.manifest(_hash(sample_closure), "latest")
    by_base = client.manifest(Path(sample_closure).name, "latest")
    assert by_hash == by_base
    headers, _ = client.ok(f"/v2/{_hash(sample_closure)}/manifests/latest")
    digest = headers["docker-content-digest"]
    assert headers["etag"] == f'"{digest}"'
    assert client.manifest(_hash(sample_closure), digest) == by_hash
    status, head, body = client.request(f"/v2/{_hash(sample_closure)}/manifests/latest", "HEAD")
    assert (status, body) == (200, b"")
    assert head["docker-content-digest"] == digest
    assert int(head["content-length"]) == len(by_hash)


def test_docker_schema2_by_accept_header(
    reg: lazyregistry.LazyRegistry, sample_closure: str,
) -> None:
    client = Client(reg)
    headers, body = client.ok(f"/v2/{_hash(sample_closure)}/manifests/latest",
                              headers={"Accept": DOCKER_MANIFEST})
    doc = json.loads(body)
    assert headers["content-type"] == DOCKER_MANIFEST == doc["mediaType"]
    assert doc["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    oci = json.loads(client.manifest(_hash(sample_closure), "latest"))
    assert [d["digest"] for d in doc["layers"]] == [d["digest"] for d in oci["layers"]]
    again = client.manifest(_hash(sample_closure), headers["docker-content-digest"],
                            accept=DOCKER_MANIFEST)
    assert again == body


def test_tags_list(reg: lazyregistry.LazyRegistry, sample_closure: str) -> None:
    _, body = Client(reg).ok(f"/v2/{_hash(sample_closure)}/tags/list")
    assert json.loads(body) == {"name": _hash(sample_closure), "tags": ["latest", "layered"]}


def test_digests_are_the_same_after_a_restart_with_a_new_cache_dir(
    reg: lazyregistry.LazyRegistry, binary_cache: nixcache.BinaryCache,
    test_key: nixcache.KeyPair, sample_closure: str, tmp_path: Path,
) -> None:
    before = [Client(reg).manifest(_hash(sample_closure), t) for t in ("latest", "layered")]
    with lazyregistry.running(tmp_path, [binary_cache.url], test_key.public_key) as other:
        assert other.cache_dir != reg.cache_dir
        after = [Client(other).manifest(_hash(sample_closure), t) for t in ("latest", "layered")]
    assert after == before


def test_a_narinfo_signed_by_no_trusted_key_is_name_unknown(
    binary_cache: nixcache.BinaryCache, sample_closure: str, tmp_path: Path,
) -> None:
    other_key = nixcache.KeyPair.generate(tmp_path / "keys", "someone-else-1")
    with lazyregistry.running(tmp_path / "reg", [binary_cache.url],
                              other_key.public_key) as untrusting:
        status, _, body = Client(untrusting).request(
            f"/v2/{_hash(sample_closure)}/manifests/latest")
        assert "ignoring the narinfo" in untrusting.log()
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"


def test_an_unsigned_narinfo_is_name_unknown(
    binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair, sample_closure: str,
    tmp_path: Path,
) -> None:
    unsigned = tmp_path / "unsigned-cache"
    shutil.copytree(binary_cache.root, unsigned)
    stripped = 0
    for narinfo in unsigned.glob("*.narinfo"):
        lines = narinfo.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith("Sig:")]
        stripped += len(lines) - len(kept)
        narinfo.write_text("".join(kept))
    assert stripped >= len(binary_cache.paths)  # every narinfo had its signature removed
    with lazyregistry.running(tmp_path / "reg", [f"file://{unsigned}"],
                              test_key.public_key) as reg:
        status, _, body = Client(reg).request(f"/v2/{_hash(sample_closure)}/manifests/latest")
        assert "ignoring the narinfo" in reg.log()
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"


ZERO = "sha256:" + "0" * 64
HOSTILE = [
    ("/v2/../manifests/latest", 400, "NAME_INVALID"),
    ("/v2/a/../b/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/Upper/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/" + "a" * 10_000 + "/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/{h}/blobs/md5:0cc175b9c0f1b6a831c399e269772661", 400, "DIGEST_INVALID"),
    ("/v2/{h}/manifests/sha512:" + "0" * 128, 400, "DIGEST_INVALID"),
    ("/v2/{h}/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ("/v2/{h}/blobs/" + ZERO, 404, "BLOB_UNKNOWN"),
    ("/v2/{h}/manifests/" + ZERO, 404, "MANIFEST_UNKNOWN"),
    ("/v2/{h}/manifests/nosuchtag", 404, "MANIFEST_UNKNOWN"),
    ("/v2/{h}/manifests/" + "t" * 200, 400, "TAG_INVALID"),
    ("/v2/00000000000000000000000000000000/manifests/latest", 404, "NAME_UNKNOWN"),
    ("/v2/{h}-notitsname/manifests/latest", 404, "NAME_UNKNOWN"),
    ("/v2/hello/manifests/latest", 404, "NAME_UNKNOWN"),
    ("/v2/a/b/manifests/latest", 404, "NAME_UNKNOWN"),
    ("/v2/nothing-here", 404, "NAME_UNKNOWN"),
]


@pytest.mark.parametrize("path, status, code", HOSTILE)
def test_hostile_requests_get_spec_errors_and_the_registry_keeps_serving(
    reg: lazyregistry.LazyRegistry, sample_closure: str, path: str, status: int, code: str,
) -> None:
    client = Client(reg)
    got, headers, body = client.request(path.replace("{h}", _hash(sample_closure)))
    assert got == status, body[:300]
    assert headers["content-type"] == "application/json"
    (error,) = json.loads(body)["errors"]
    assert error["code"] == code and error["message"]
    assert client.manifest(_hash(sample_closure), "latest")


def test_writes_are_unsupported(reg: lazyregistry.LazyRegistry, sample_closure: str) -> None:
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        status, _, body = Client(reg).request(f"/v2/{_hash(sample_closure)}/blobs/uploads/",
                                              method)
        assert status == 405
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_a_request_head_too_large_is_refused_and_serving_goes_on(
    reg: lazyregistry.LazyRegistry, sample_closure: str,
) -> None:
    client = Client(reg)
    status, _, _ = client.request("/v2/", headers={"X-Big": "x" * 40_000})
    assert status == 431
    assert client.manifest(_hash(sample_closure), "latest")


@pytest.mark.parametrize("listing", [True, False], ids=["listings", "no-listings"])
def test_store_paths_that_are_files_or_symlinks_get_the_placeholders_image_build_writes(
    test_key: nixcache.KeyPair, tmp_path: Path, listing: bool,
) -> None:
    top = nixcache.build(roots="1")
    kinds = {Path(p).name: ("dir" if Path(p).is_dir() and not Path(p).is_symlink() else "file")
             for p in nixcache.closure(top)}
    assert set(kinds.values()) == {"dir", "file"}  # the closure has both kinds of root
    cache = nixcache.make_cache(top, tmp_path / "cache", test_key, listing=listing)
    with lazyregistry.running(tmp_path / "reg", [cache.url], test_key.public_key) as r:
        manifests = {tag: Client(r).manifest(_hash(top), tag) for tag in ("latest", "layered")}
    for tag, extra in (("latest", ()), ("layered", ("--layered", "100"))):
        (tmp_path / tag).mkdir()
        with _build(tmp_path / tag, top, *extra) as archive:
            assert manifests[tag] == archive.read_blob(archive.manifest_descriptor), tag
