"""kill -9 in the middle of unpacking a large store path, then restart on the
same cache: the stale mount is cleared, nothing half-written is served."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon, is_mounted
from tests.test_mount_daemon import _need_fuse, by_name

BIG_MB = 200

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def big_cache(
    tmp_path_factory: pytest.TempPathFactory, test_key: nixcache.KeyPair
) -> nixcache.BinaryCache:
    """The sample closure with a 200 MB docs file (compresses to almost nothing,
    so the unpack, not the download, takes the time)."""
    top = nixcache.build(bigSize=str(BIG_MB))
    return nixcache.make_cache(top, tmp_path_factory.mktemp("bigcache"), test_key)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _partial_unpack(tmp: Path) -> bool:
    """True once a file is being written under the cache's tmp/."""
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            try:
                if os.lstat(os.path.join(dirpath, name)).st_size > (4 << 20):
                    return True
            except FileNotFoundError:
                pass
    return False


def test_kill9_during_unpack_then_restart_is_consistent(
    tmp_path: Path, big_cache: nixcache.BinaryCache
) -> None:
    _need_fuse()
    from lazystore.testing.httpserver import serve_directory

    docs = by_name(big_cache.paths, "docs")
    expected = _sha256(Path("/nix/store") / docs / "share/doc/manual.txt")
    with serve_directory(big_cache.root) as server:
        url = server.url  # type: ignore[attr-defined]
        d = Daemon(tmp_path, url, big_cache.key.public_key)
        try:
            d.start()
            target = d.mnt / docs / "share/doc/manual.txt"
            reader = threading.Thread(target=lambda: _try_read(target), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while not _partial_unpack(d.cache / "tmp"):
                assert time.monotonic() < deadline, "the unpack never started"
                assert docs not in os.listdir(d.cache / "store"), "unpack finished too fast"
                time.sleep(0.001)
            d.kill9()
            reader.join(30)
            assert docs not in os.listdir(d.cache / "store")  # killed before the rename
            with pytest.raises(OSError) as info:
                os.statvfs(d.mnt)  # the stale mount
            assert info.value.errno == errno.ENOTCONN
            d.start()  # clears the stale mount and tmp/
            assert list((d.cache / "tmp").iterdir()) == []
            assert docs not in d.status()["paths_materialized"]
            assert _sha256(target) == expected
            assert docs in d.status()["paths_materialized"]
            assert d.stop() == 0
            assert not is_mounted(d.mnt)
        finally:
            d.stop()


def _try_read(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError:
        pass  # the daemon was killed under it
