"""A pull without waiting, through a real daemon and a real HTTP fault server:
a view is made at once, its narinfos are asked all together of every cache
(each cache once per path), and its reads are served from verified NARs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lazystore.testing import nixcache
from lazystore.testing.daemon import fuse_missing, lazystore_mount
from tests.support.faultserver import Fault, FaultServer

pytestmark = pytest.mark.root


def test_a_views_narinfos_are_asked_at_once_of_every_cache_each_once(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, sample_closure: str,
    test_key: nixcache.KeyPair,
) -> None:
    if reason := fuse_missing():
        pytest.skip(reason)
    # Two caches of the same closure behind one server (worse/ and best/,
    # priority 50 and 10); every narinfo is held until all of them, of both
    # caches, are held at once: asked one path or one cache after another,
    # the first would wait out the gather's minute.
    www = tmp_path / "www"
    shutil.copytree(binary_cache.root, www / "worse")
    nixcache.make_cache(sample_closure, www / "best", test_key)
    (www / "best" / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 10\n")
    paths = [Path(p).name for p in binary_cache.paths]
    names = [f"/{cache}/{p[:32]}.narinfo" for cache in ("worse", "best") for p in paths]
    liba = next(p for p in paths if p.endswith("-liba"))
    with FaultServer(www) as server:
        for name in names:
            server.always(name, Fault.gather(len(names)))
        urls = [f"{server.url}/worse", f"{server.url}/best"]
        with lazystore_mount(tmp_path / "d", urls, test_key.public_key) as d:
            view = d.call("view_create", id="v", paths=paths)  # at once: nothing asked yet
            data = Path(view["path"]) / "nix/store" / liba / "lib/data"
            assert data.read_bytes() == b"hello from liba\n"  # waits for the gather
            assert server.most_held == len(names)
            assert all(server.count(name) == 1 for name in names), server.requests
            nars = [r for r in server.requests if "/nar/" in r]
            assert len(nars) == 1 and nars[0].startswith("/best/")  # the better cache's
