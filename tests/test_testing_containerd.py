"""lazystore.testing.containerd cleans up after itself outside its workdir.

Real containerd, shim and runc. runc and the shims put state in fixed places
(/run/containerd/runc/<namespace>, /run/containerd/s/<sha256>, the namespace's
cgroup directories under /sys/fs/cgroup): every test run used to leave some
of them behind, and containerd's opt plugin made /opt/containerd.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from lazystore.testing import containerd
from lazystore.testing.containerd import RUNC_ROOT, SHIM_SOCKETS, Containerd

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not containerd.have_containerd() or not shutil.which("busybox"),
                       reason="needs root, containerd, runc and busybox"),
]

CONTAINER = "sleeper"


def processes_of(ctd: Containerd) -> list[int]:
    """Processes in the namespace's cgroups, or whose argv names the instance."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cgroups = (proc / "cgroup").read_text()
            argv = (proc / "cmdline").read_bytes()
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # dead already; reaping it is its parent's (init's) job
        except (OSError, IndexError):
            continue
        if f"/{ctd.namespace}/" in cgroups or str(ctd.workdir).encode() in argv:
            found.append(int(proc.name))
    return found


def leftovers(ctd: Containerd) -> list[str]:
    left = [str(p) for p in ctd.cgroup_dirs()]
    left += [str(p) for p in [RUNC_ROOT / ctd.namespace] if p.exists()]
    socket = SHIM_SOCKETS / ctd.shim_socket_name(ctd.namespace, CONTAINER)
    left += [str(socket)] if os.path.lexists(socket) else []
    left += [f"process {pid}" for pid in processes_of(ctd)]
    return left


def start_sleeper(ctd: Containerd, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", rootfs / "bin" / "busybox")
    ctd.ctr("run", "-d", "--rootfs", str(rootfs), CONTAINER, "/bin/busybox", "sleep", "600")
    # Not vacuous: each kind exists while the container runs.
    running = leftovers(ctd)
    assert any(p.startswith("/sys/fs/cgroup/") for p in running), running
    assert str(RUNC_ROOT / ctd.namespace) in running
    assert str(SHIM_SOCKETS / ctd.shim_socket_name(ctd.namespace, CONTAINER)) in running
    assert any(p.startswith("process ") for p in running), running


def test_its_containerd_keeps_the_opt_plugin_in_its_root(tmp_path: Path) -> None:
    with Containerd(tmp_path / "ctd") as ctd:
        assert 'path = "' + str(ctd.root / "opt") + '"' in ctd.config.read_text()
        assert (ctd.root / "opt").is_dir()  # containerd made it there, not in /opt


def test_stop_leaves_no_runc_state_shim_socket_cgroup_or_process(tmp_path: Path) -> None:
    ctd = Containerd(tmp_path / "ctd")
    with ctd:
        start_sleeper(ctd, tmp_path)
    assert leftovers(ctd) == []


def test_stop_after_containerd_died_still_ends_the_container(tmp_path: Path) -> None:
    ctd = Containerd(tmp_path / "ctd")
    with ctd:
        start_sleeper(ctd, tmp_path)
        assert ctd.proc is not None
        ctd.proc.send_signal(signal.SIGKILL)  # no tasks to list: shim and runc are cleaned
        ctd.proc.wait()
    assert leftovers(ctd) == []
