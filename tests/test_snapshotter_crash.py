"""kill -9 of a real ``lazystore snapshotter`` process at random moments, in a loop.

Worker threads make, view, relabel and remove snapshots over gRPC as
containerd does, writing each layer's files into its upperdir; the process is
killed with SIGKILL at a random moment, then (lazystore.testing.snapcrash)
its sqlite file passes ``PRAGMA integrity_check``, every row's parent and
directories exist, no committed snapshot has a partial layer, and once it is
started again no directory without a row is left and every snapshot mounts
(real overlay and bind mounts) showing its whole chain. The same loop with a
count: bench/snapshotter_faults.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.testing.containerd import unmount_below
from lazystore.testing.snapcrash import crash_loop

KILLS = 30

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def base() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounts overlays: needs root")
    path = Path(tempfile.mkdtemp(prefix="lzsc-", dir="/tmp"))  # short unix socket paths
    try:
        yield path
    finally:
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


def test_kill_9_at_random_moments_leaves_a_consistent_store_whose_snapshots_mount(
    base: Path,
) -> None:
    result = crash_loop(base, KILLS, seed=19)
    assert result.kills == KILLS
    assert result.problems == []
    # the kills did land inside multi-step changes (a Prepare's directories made
    # in its open transaction, a Remove between its row and its directories),
    # and the loop did real work between them
    assert result.kills_leaving_orphans > 0
    assert result.calls > 50 * KILLS
    log = (base / "snapshotter.log").read_text()
    assert ": ERROR: " not in log
