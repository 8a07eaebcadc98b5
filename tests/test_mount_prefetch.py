"""`lazystore prefetch P1 P2 …` against a real daemon and a real HTTP cache:
one control request, the NARs fetched in parallel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lazystore.testing import nixcache
from lazystore.testing.daemon import LAZYSTORE, fuse_missing, lazystore_mount
from tests.support.faultserver import Fault, FaultServer

pytestmark = pytest.mark.root


def _nar_url(cache: nixcache.BinaryCache, path: str) -> str:
    text = cache.narinfo_path(path).read_text()
    return "/" + next(ln[5:] for ln in text.splitlines() if ln.startswith("URL: "))


def test_prefetch_of_several_paths_is_one_request_fetched_in_parallel(
    tmp_path: Path, binary_cache: nixcache.BinaryCache
) -> None:
    if fuse_missing():
        pytest.skip(fuse_missing())
    www = tmp_path / "www"
    shutil.copytree(binary_cache.root, www)
    leaves = [p for p in binary_cache.paths if p != binary_cache.top]
    assert len(leaves) >= 3
    with FaultServer(www) as server:
        # Every NAR is held until all of them are asked for at once: one at a
        # time, the first would wait its full minute and the count stay at 1.
        for path in leaves:
            server.always(_nar_url(binary_cache, path), Fault.gather(len(leaves)))
        with lazystore_mount(tmp_path / "d", server.url, binary_cache.key.public_key) as d:
            before = d.status()["requests"]
            out = subprocess.run(
                [LAZYSTORE, "prefetch", *leaves, "--control-socket", str(d.sock)],
                capture_output=True, text=True, timeout=300,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout == f"{len(leaves)} store paths present\n"
            after = d.status()
            assert server.most_held == len(leaves)
            sent = {op: n - before.get(op, 0) for op, n in after["requests"].items()}
            assert sent == {"prefetch": 1, "status": 1}  # the status call just above
            names = sorted(os.path.basename(p) for p in leaves)
            assert after["paths_materialized"] == names
            nars = [r for r in server.requests if r.startswith("/nar/")]
            assert len(nars) == len(leaves)
