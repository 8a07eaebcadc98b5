"""What one cold read through a real mount costs at the binary cache: the
fault server's request log, with `lazystore mount` as a subprocess."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lazystore.nix.narinfo import NarInfo
from lazystore.testing import nixcache
from lazystore.testing.daemon import fuse_missing, lazystore_mount
from tests.support.faultserver import FaultServer

pytestmark = pytest.mark.root


@pytest.mark.parametrize("listings", [True, False])
def test_a_cold_read_is_one_narinfo_one_listing_one_nar_request(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, sample_closure: str,
        test_key: nixcache.KeyPair, listings: bool) -> None:
    if reason := fuse_missing():
        pytest.skip(reason)
    cache = nixcache.make_cache(sample_closure, tmp_path_factory.mktemp("cache"), test_key,
                                listing=listings)
    liba = next(Path(p).name for p in cache.paths if p.endswith("-liba"))
    nar = "/" + NarInfo.parse(cache.narinfo_path(liba).read_text()).url
    with FaultServer(cache.root) as server:
        with lazystore_mount(tmp_path / "d", server.url, test_key.public_key) as daemon:
            data = daemon.mnt / liba / "lib" / "data"
            assert os.stat(data).st_size == 16  # lookup, then the tree
            assert (nar in server.requests) is not listings  # no listing: the NAR gives it
            assert data.read_bytes() == b"hello from liba\n"  # the first read: the NAR
            assert (daemon.mnt / liba / "lib" / "data-link").read_bytes() == data.read_bytes()
        # nix-cache-info once; the .ls is asked for (a 404 without listings), once
        # an indexed cache's marker is asked with the first narinfo (either first)
        assert server.requests[0] == "/nix-cache-info"
        assert set(server.requests[1:3]) == {f"/{liba[:32]}.narinfo", "/lzindex-info"}
        assert server.requests[3:] == [f"/{liba[:32]}.ls", nar]


def test_a_started_daemon_has_asked_its_caches_before_any_lookup(
        tmp_path: Path, binary_cache: nixcache.BinaryCache) -> None:
    # So that the first lookup costs the narinfo's round trip alone.
    if reason := fuse_missing():
        pytest.skip(reason)
    with FaultServer(binary_cache.root) as server:
        with lazystore_mount(tmp_path / "d", server.url, binary_cache.key.public_key):
            deadline = time.monotonic() + 30
            while len(server.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(server.requests) == ["/lzindex-info", "/nix-cache-info"]
