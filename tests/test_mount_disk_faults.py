"""The cache on a small file system (a 1 MiB tmpfs made by the test): a NAR
that does not fit ends the read with EIO and one log line, leaves nothing
partial, and other paths keep working; a cache file system that vanishes
while mounted gives errors, not a crash."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon
from tests.test_mount_daemon import _need_fuse, by_name

pytestmark = pytest.mark.root


def test_a_nar_that_does_not_fit_fails_alone(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    _need_fuse()
    d = Daemon(tmp_path, http_cache, binary_cache.key.public_key, verbose=False)
    d.cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d.cache)], check=True)
    try:
        d.start()
        busybox = by_name(binary_cache.paths, "busybox")  # about 2 MB unpacked
        liba = by_name(binary_cache.paths, "liba")
        with pytest.raises(OSError) as info:
            (d.mnt / busybox / "bin/busybox").read_bytes()
        assert info.value.errno == errno.EIO
        assert busybox not in os.listdir(d.cache / "store")  # nothing partial
        assert list((d.cache / "tmp").iterdir()) == []
        lines = [ln for ln in d.log.read_text().splitlines() if busybox in ln]
        assert len(lines) == 1 and "WARNING" in lines[0] and "No space left" in lines[0]
        print("\n".join(lines))
        assert (d.mnt / liba / "lib/data").read_bytes() == b"hello from liba\n"
        assert d.status()["paths_materialized"] == [liba]
        # the cache file system vanishes under the daemon: errors, the daemon lives
        subprocess.run(["umount", "-l", str(d.cache)], check=True)
        docs = by_name(binary_cache.paths, "docs")
        readme = (Path("/nix/store") / docs / "share/doc/README").read_bytes()
        for path, want in ((d.mnt / docs / "share/doc/README", readme),
                           (d.mnt / liba / "lib/data", b"hello from liba\n")):
            try:
                got = path.read_bytes()
            except OSError as exc:
                assert exc.errno in (errno.EIO, errno.ENOENT, errno.ENOSPC)
            else:
                assert got == want  # never wrong bytes
        assert "paths_materialized" in d.status()  # still serving
        assert "ERROR" not in d.log.read_text() and "Traceback" not in d.log.read_text()
        assert d.stop() == 0
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(d.cache)], check=False)
