"""A layered image of a store path far larger than the registry's memory: the
layer is built from the NAR and served as streams, so the registry's peak
resident memory stays far below the layer's size."""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

import pytest

from lazystore.testing import lazyregistry, nixcache

BIG_NIX = Path(__file__).with_name("support") / "big.nix"
MB = 256

pytestmark = pytest.mark.slow


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _get(reg: lazyregistry.LazyRegistry, path: str) -> http.client.HTTPResponse:
    host, port = reg.host.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()[:300]
    return resp


def test_a_large_layer_is_built_and_served_in_bounded_memory(
    test_key: nixcache.KeyPair, tmp_path: Path,
) -> None:
    top = nixcache.build(BIG_NIX, mb=str(MB))
    cache = nixcache.make_cache(top, tmp_path / "cache", test_key, compression="none")
    with lazyregistry.running(tmp_path / "reg", [cache.url], test_key.public_key) as reg:
        name = Path(top).name[:32]
        manifest = json.loads(_get(reg, f"/v2/{name}/manifests/layered").read())
        (layer,) = manifest["layers"]
        assert layer["size"] > MB << 20  # random bytes do not compress
        resp = _get(reg, f"/v2/{name}/blobs/{layer['digest']}")
        digest, size = hashlib.sha256(), 0
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        assert (size, "sha256:" + digest.hexdigest()) == (layer["size"], layer["digest"])
        peak = _peak_rss(reg.process.pid)
    assert peak < layer["size"] // 4, f"peak RSS {peak >> 20} MiB for a {MB} MiB layer"
