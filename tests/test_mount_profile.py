"""Access profiles through a real mount: a program run in a chroot on a view
(as a container's rootfs would be) is recorded, `lazystore profile save`
writes exactly what it read in order, and a fresh daemon given that profile
with the view fetches those paths before the program asks for them (the
daemon's event log, not timing)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lazystore import profile
from lazystore.testing import nixcache
from lazystore.testing.daemon import LAZYSTORE, Daemon, fuse_missing, lazystore_mount

pytestmark = pytest.mark.root


def _by_name(paths: list[str], suffix: str) -> str:
    return os.path.basename(next(p for p in paths if p.endswith(f"-{suffix}")))


def _run_prog(d: Daemon, view: str, prog: str) -> str:
    root = d.mnt / ".views" / view
    out = subprocess.run(["chroot", str(root), f"/nix/store/{prog}/bin/prog"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _events(d: Daemon) -> list[dict[str, Any]]:
    return d.call("events", since=0)["events"]  # type: ignore[no-any-return]


def test_profile_recorded_through_the_mount_prefetches_on_a_fresh_daemon(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, http_cache: str
) -> None:
    if fuse_missing():
        pytest.skip(fuse_missing())
    key = binary_cache.key.public_key
    paths = list(binary_cache.paths)
    prog, busybox, liba = (_by_name(paths, n) for n in ("prog", "busybox", "liba"))
    saved = tmp_path / "profile.json"
    with lazystore_mount(tmp_path / "first", http_cache, key) as d:
        d.call("view_create", id="ctr1", paths=paths)
        assert _run_prog(d, "ctr1", prog) == "hello from liba\n"
        out = subprocess.run([LAZYSTORE, "profile", "save", "--view", "ctr1", str(saved),
                              "--control-socket", str(d.sock)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        reads = [e for e in _events(d) if e["kind"] == "read"]
    doc = json.loads(saved.read_text())
    # the script (exec), the shell it names (busybox's, a symlink to busybox), cat's data
    assert [(r["path"], r["file"]) for r in doc["reads"]] == [
        (prog, "bin/prog"), (busybox, "bin/busybox"), (liba, "lib/data")]
    assert [(r["path"], r["file"]) for r in doc["reads"]] == [
        (e["path"], e["file"]) for e in reads]
    sizes = {"bin/prog": (Path(binary_cache.top) / "bin/prog").stat().st_size,
             "lib/data": len(b"hello from liba\n")}
    for r in doc["reads"]:
        if r["file"] in sizes:
            assert r["size"] == sizes[r["file"]]

    with lazystore_mount(tmp_path / "second", http_cache, key) as d:
        ahead = profile.parse(saved.read_bytes()).paths
        d.call("view_create", id="ctr2", paths=paths, prefetch=ahead)
        deadline = time.monotonic() + 60
        while {e["path"] for e in _events(d) if e["kind"] == "nar-done"} < {prog, busybox, liba}:
            assert time.monotonic() < deadline, "the profile's paths were not fetched"
            time.sleep(0.05)
        assert _run_prog(d, "ctr2", prog) == "hello from liba\n"
        events = _events(d)
        # Fetched ahead, the paths are bound over the mount: the run may not
        # reach FUSE at all; any read that did came after every NAR.
        first_read = min((e["seq"] for e in events if e["kind"] == "read"),
                         default=events[-1]["seq"] + 1)
        nars = [e for e in events if e["kind"] == "nar"]
        assert sorted(e["path"] for e in nars) == sorted([prog, busybox, liba])  # no others
        assert all(e["seq"] < first_read for e in nars)
        assert [e["path"] for e in events if e["kind"] == "profile"] == [prog, busybox, liba]
