"""The snapshotter killed and restarted under real containerd + runc, while
containers run and while a pull is in flight (lazystore.testing.snapstack:
the daemon over the sample closure's real-Nix binary cache on 127.0.0.1, the
snapshotter, a private containerd 1.6, docker-registry, a six-layer image).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.snapshotter.metadata import Kind
from lazystore.testing import nixcache
from lazystore.testing.containerd import unmount_below
from lazystore.testing.daemon import container_stack_missing
from lazystore.testing.snapcrash import read_rows
from lazystore.testing.snapstack import (
    COMMITTED,
    PREPARED,
    SN,
    Killer,
    Stack,
    check_image_snapshots,
    errors_logged,
    half_committed,
    pull,
    reader,
    reads,
    remove_image,
    run_check,
    running,
    wait_reads,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(binary_cache: nixcache.BinaryCache, http_cache: str,
          test_key: nixcache.KeyPair) -> Iterator[Stack]:
    if reason := container_stack_missing():
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="lzsr-", dir="/tmp"))  # short unix socket paths
    os.chmod(base, 0o755)
    try:
        with running(base, http_cache, test_key.public_key, binary_cache.top) as st:
            yield st
            if st.serve_again:
                print(f"\nsnapshotter restarts: {len(st.serve_again)}, its start to containerd "
                      f"listing again: max {max(st.serve_again):.2f} s, "
                      f"all {[round(t, 2) for t in st.serve_again]}")
    finally:
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


# -- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_running_containers_survive_snapshotter_restarts_and_everything_mounts_after(
    stack: Stack, sig: signal.Signals,
) -> None:
    pull(stack)
    assert "all-sums-ok" in run_check(stack)
    name = f"reader-{sig.name.lower()}"
    with reader(stack, name) as log:
        wait_reads(log, 0)
        for _ in range(3):
            seen = len(reads(log))
            stack.stop_snapshotter(sig)
            # the container's overlay needs no snapshotter: it reads on meanwhile
            wait_reads(log, seen + 3)
            start = time.monotonic()
            stack.start_snapshotter()
            stack.wait_served()
            stack.serve_again.append(time.monotonic() - start)
        # everything the snapshotter holds is there, stat'ed and mounted
        listed = stack.ctr_retried("snapshots", "--snapshotter", SN, "ls").splitlines()[1:]
        keys = [ln.split()[0] for ln in listed]
        assert name in keys and set(stack.image.chain_ids) <= set(keys)
        for key in keys:
            stack.ctr_retried("snapshots", "--snapshotter", SN, "info", key)
        assert check_image_snapshots(stack) == []
        mounts = stack.ctr_retried("snapshots", "--snapshotter", SN, "mounts", "/mnt", name)
        assert "upperdir=" in mounts  # the running container's active snapshot
        assert "all-sums-ok" in run_check(stack)  # a new container, same image
        seen = len(reads(log))
        wait_reads(log, seen + 3)
    got = reads(log)
    assert got and set(got) == {"ok"}, f"{got.count('bad')} bad reads of {len(got)}"
    keys = [ln.split()[0] for ln in
            stack.ctr_retried("snapshots", "--snapshotter", SN, "ls").splitlines()[1:]]
    assert name not in keys  # removed cleanly with its container
    # containerd's garbage collector removes it from the snapshotter meanwhile
    # (its directory renamed to rm-<id>, then deleted): at the end no directory
    # without a row
    deadline = time.monotonic() + 30
    while True:
        ids = {str(r.id) for r in read_rows(stack.sn_root / "metadata.db")}
        dirs = {p.name for p in (stack.sn_root / "snapshots").iterdir()}
        if dirs == ids or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert dirs == ids
    remove_image(stack)
    assert errors_logged(stack) == []


# (signal, pattern, nth): after the first layer's Prepare (its unpack under
# way), the nix layer's Prepare (its unpack, then its Commit asks the daemon for
# its view) and Commit, a data layer's Prepare and Commit, the last Commit
KILL, TERM = signal.SIGKILL, signal.SIGTERM
STOP_POINTS = [(KILL, PREPARED, 1), (KILL, PREPARED, 2), (KILL, COMMITTED, 2),
               (KILL, PREPARED, 4), (KILL, COMMITTED, 4), (KILL, COMMITTED, 6),
               (TERM, PREPARED, 2), (TERM, COMMITTED, 3)]


@pytest.mark.parametrize("sig,pattern,nth", STOP_POINTS,
                         ids=[f"{'kill-9' if s == KILL else 'term'}-"
                              f"{'prepare' if p == PREPARED else 'commit'}-{n}"
                              for s, p, n in STOP_POINTS])
def test_stopped_during_a_pull_then_the_pull_again_gives_correct_snapshots(
    stack: Stack, sig: signal.Signals, pattern: str, nth: int,
) -> None:
    # a fresh pull each time: nothing of the image in containerd or the snapshotter
    stack.ctd.ctr("image", "rm", "--sync", stack.image.ref, check=False)
    killer = Killer(stack, sig, pattern, nth)
    killer.start()
    first = stack.ctd.ctr("image", "pull", "--snapshotter", SN, "--plain-http",
                          stack.image.ref, check=False, timeout=300)
    killer.stop.set()
    killer.join(10)
    assert killer.fired.is_set(), f"no kill: {first.stderr}\n{stack.logs()}"
    assert stack.sn_proc is not None
    stack.sn_proc.wait(30)
    # no half-committed snapshot: what the killed process left, before a restart
    assert half_committed(stack) == []
    left = read_rows(stack.sn_root / "metadata.db")
    print(f"\n{sig.name} at {pattern.split()[-1]} {nth}: pull exit {first.returncode}, left "
          f"{sum(r.kind == Kind.ACTIVE for r in left)} active, "
          f"{sum(r.kind == Kind.COMMITTED for r in left)} committed snapshots, directories "
          f"{len(list((stack.sn_root / 'snapshots').iterdir()))}")
    stack.sn_cm.__exit__(None, None, None)
    stack.sn_cm = None
    start = time.monotonic()
    stack.start_snapshotter()
    stack.wait_served()
    stack.serve_again.append(time.monotonic() - start)
    pull(stack)
    assert check_image_snapshots(stack) == []
    assert "all-sums-ok" in run_check(stack)
    remove_image(stack)
    assert errors_logged(stack) == []
