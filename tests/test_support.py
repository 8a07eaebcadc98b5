"""The shared test fixtures produce what later tests rely on."""

import subprocess
import urllib.request
from pathlib import Path

from lazystore.testing import nixcache


def test_sample_closure_has_unread_reference(sample_closure: str) -> None:
    paths = nixcache.closure(sample_closure)
    names = sorted(Path(p).name[33:] for p in paths)
    assert names == ["busybox", "docs", "liba", "prog"]
    out = subprocess.run([f"{sample_closure}/bin/prog"], capture_output=True, check=True)
    assert out.stdout == b"hello from liba\n"


def test_binary_cache_served_over_http(binary_cache: nixcache.BinaryCache, http_cache: str) -> None:
    info = binary_cache.narinfo_path(binary_cache.top)
    with urllib.request.urlopen(f"{http_cache}/{info.name}") as resp:
        body = resp.read().decode()
    assert f"StorePath: {binary_cache.top}\n" in body
    assert f"Sig: {binary_cache.key.public_key.split(':')[0]}:" in body
