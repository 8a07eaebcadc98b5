"""`lazystore registry --expression FILE`: images of attributes, built with
real Nix, whose closures come from the binary cache they were copied to."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.testing import lazyregistry, nixcache
from tests.test_registry_server import Client

ATTRS_NIX = Path(__file__).with_name("support") / "attrs.nix"
BUILT = ("busybox", "hello", "greet", "Mixed")


def attrs_cache(dest: Path, key: nixcache.KeyPair) -> dict[str, str]:
    """Build the attributes of attrs.nix and copy them all into one cache at *dest*."""
    outputs = {}
    for attr in BUILT:
        out = nixcache.run_nix("nix-build", ATTRS_NIX, "--no-out-link", "-A", attr)
        outputs[attr] = out.decode().split()[-1]
        nixcache.make_cache(outputs[attr], dest, key)
    return outputs


@pytest.fixture(scope="module")
def built(test_key: nixcache.KeyPair, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, dict[str, str]]:
    cache = tmp_path_factory.mktemp("attrs-cache")
    return cache, attrs_cache(cache, test_key)


@pytest.fixture()
def reg(built: tuple[Path, dict[str, str]], test_key: nixcache.KeyPair, tmp_path: Path
        ) -> Iterator[lazyregistry.LazyRegistry]:
    expression = tmp_path / "attrs.nix"
    shutil.copy(ATTRS_NIX, expression)
    with lazyregistry.running(tmp_path / "reg", [f"file://{built[0]}"], test_key.public_key,
                              "--expression", str(expression)) as r:
        yield r


def _error(client: Client, path: str) -> tuple[int, dict[str, str]]:
    status, _, body = client.request(path)
    (error,) = json.loads(body)["errors"]
    return status, error


def _layer_members(client: Client, name: str, digest: str) -> dict[str, tarfile.TarInfo]:
    _, blob = client.ok(f"/v2/{name}/blobs/{digest}")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_an_image_of_attributes_has_their_closures_and_a_bin_of_their_programs(
    reg: lazyregistry.LazyRegistry, built: tuple[Path, dict[str, str]],
) -> None:
    outputs, client = built[1], Client(reg)
    manifest = json.loads(client.manifest("hello/greet", "latest"))
    nix_layer, bin_layer = manifest["layers"]
    named = set(nix_layer["annotations"].values()) - {"true"}
    closure = set(nixcache.closure(outputs["hello"])) | set(nixcache.closure(outputs["greet"]))
    assert named == closure
    members = _layer_members(client, "hello/greet", bin_layer["digest"])
    links = {n: m.linkname for n, m in members.items() if m.issym()}
    assert links == {"bin/hello": f"{outputs['hello']}/bin/hello",
                     "bin/greet": f"{outputs['greet']}/bin/greet"}
    _, config = client.ok(f"/v2/hello/greet/blobs/{manifest['config']['digest']}")
    assert json.loads(config)["config"]["Env"] == ["PATH=/bin"]
    layered = json.loads(client.manifest("hello/greet", "layered"))
    assert layered["layers"][-1]["digest"] == bin_layer["digest"]
    assert client.manifest("hello/greet", "latest") == json.dumps(manifest, sort_keys=True,
                                                                  separators=(",", ":")).encode()


def test_a_lower_case_name_finds_an_attribute_of_another_case(
    reg: lazyregistry.LazyRegistry, built: tuple[Path, dict[str, str]],
) -> None:
    manifest = json.loads(Client(reg).manifest("mixed", "latest"))
    assert built[1]["Mixed"] in manifest["layers"][0]["annotations"].values()


def test_unknown_and_failing_attributes_are_name_unknown(reg: lazyregistry.LazyRegistry) -> None:
    client = Client(reg)
    status, error = _error(client, "/v2/hello/nosuchattr/manifests/latest")
    assert (status, error["code"]) == (404, "NAME_UNKNOWN")
    assert "'nosuchattr'" in error["message"]
    status, error = _error(client, "/v2/broken/manifests/latest")
    assert (status, error["code"]) == (404, "NAME_UNKNOWN")
    assert "nix-build" in error["message"]
    assert client.manifest("hello", "latest")


def test_results_are_cached_per_version_of_the_file(
    reg: lazyregistry.LazyRegistry, tmp_path: Path,
) -> None:
    client = Client(reg)
    first = client.manifest("hello", "latest")
    assert client.manifest("hello", "latest") == first
    assert reg.log().count("running nix-instantiate") == 1
    expression = tmp_path / "attrs.nix"
    text = expression.read_text()
    expression.write_text(text.replace("in {", 'in {\n  fresh = program "fresh" "new";', 1))
    assert client.manifest("hello", "latest") == first  # same closure, same image
    assert reg.log().count("running nix-instantiate") == 2
    # Built locally, but in no binary cache: no lazystore node could fetch it.
    status, error = _error(client, "/v2/fresh/manifests/latest")
    assert (status, error["code"]) == (404, "NAME_UNKNOWN")
    assert "binary cache" in error["message"]


def test_an_expression_that_fails_to_evaluate_is_name_unknown_and_serving_goes_on(
    built: tuple[Path, dict[str, str]], test_key: nixcache.KeyPair, tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.nix"
    bad.write_text("{ a = ; }\n")
    with lazyregistry.running(tmp_path / "reg", [f"file://{built[0]}"], test_key.public_key,
                              "--expression", str(bad)) as r:
        client = Client(r)
        status, error = _error(client, "/v2/a/manifests/latest")
        assert (status, error["code"]) == (404, "NAME_UNKNOWN")
        assert "nix-instantiate" in error["message"]
        client.ok("/v2/")
