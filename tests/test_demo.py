"""scripts/demo as a user runs it: what it prints is true, and Ctrl-C in the
middle leaves no mount, no process and no folder behind.

The demo is given a temporary base folder of the test's own
(``LAZYSTORE_DEMO_TMPDIR``), so that what it leaves can be checked exactly:
everything it makes lives in one folder under that base, every process it
starts names that folder in its arguments, and its containers run in the
containerd namespace ``lazystore-demo-<suffix of the folder>``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.testing import nixcache, registry
from lazystore.testing.containerd import have_containerd
from lazystore.testing.daemon import fuse_missing

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo"
CONTAINER = "demo-prog"  # the id the demo gives its container
LISTED = re.compile(r"\s+(fetched|never fetched):\s+(/nix/store/\S+)")

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def base() -> Iterator[Path]:
    """The demo's temporary base folder: short, as it holds unix sockets."""
    missing = fuse_missing()
    if missing:
        pytest.skip(missing)
    if not have_containerd():
        pytest.skip("needs root, containerd, ctr and runc")
    if not registry.available():
        pytest.skip("docker-registry/skopeo is not installed")
    if not nixcache.have_nix():
        pytest.skip("real Nix (nix-bin) is not installed")
    path = Path(tempfile.mkdtemp(prefix="lzd-", dir="/tmp"))
    try:
        yield path
    finally:
        if not mounts_below(path):  # never remove through a mount the demo left
            shutil.rmtree(path, ignore_errors=True)


def start_demo(base: Path) -> subprocess.Popen[str]:
    """scripts/demo in a session of its own (its process group gets Ctrl-C's SIGINT)."""
    env = dict(os.environ, LAZYSTORE_DEMO_TMPDIR=str(base))
    # SIGINT as a terminal's shell leaves it (pytest may have been started with it ignored).
    return subprocess.Popen(
        ["env", "--default-signal=INT", str(DEMO)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )


def mounts_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def processes_naming(path: Path) -> dict[int, list[str]]:
    """pid -> argv of every process with *path* in its command line."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(str(path) in arg for arg in argv):
            found[int(proc.name)] = argv
    return found


def processes_in_cgroups_of(namespace: str) -> list[int]:
    """Processes in a cgroup of the containerd namespace (the container's processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"/{namespace}/" in (proc / "cgroup").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def cgroup_dirs(namespace: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [p for p in [root / namespace, *root.glob(f"*/{namespace}")] if p.is_dir()]


def kind(argv: list[str]) -> str | None:
    """Which of the demo's services *argv* is."""
    program = Path(argv[0]).name
    if program == "containerd" and "--config" in argv:
        return "containerd"
    if program == "docker-registry":
        return "registry"
    if "http.server" in argv:
        return "cache server"
    if any(Path(a).name == "lazystore" for a in argv[:2]):
        for command in ("mount", "snapshotter"):
            if command in argv:
                return f"lazystore {command}"
    return None


def section(output: str, title: str) -> list[str]:
    """The lines printed under the ``== TITLE...`` header, up to the next header."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title}"))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("== "):
            break
        body.append(line)
    return body


def listed(lines: list[str]) -> tuple[set[str], set[str]]:
    """(fetched, never fetched) store paths of a listing the demo printed."""
    got: dict[str, set[str]] = {"fetched": set(), "never fetched": set()}
    for line in lines:
        match = LISTED.fullmatch(line)
        assert match, f"not a listing line: {line!r}"
        got[match[1]].add(match[2])
    return got["fetched"], got["never fetched"]


def work_of(output: str, base: Path) -> Path:
    """The demo's folder, from its output (it mounts lazystore at <folder>/mnt)."""
    mounted = re.search(r"^== mounting lazystore at (.*)/mnt$", output, re.M)
    assert mounted, output[-3000:]
    work = Path(mounted[1])
    assert work.parent == base
    return work


def namespace_of(work: Path) -> str:
    return "lazystore-demo-" + work.name.rpartition(".")[2]


def assert_nothing_left(base: Path, work: Path) -> None:
    """No mount, process, folder, cgroup or shim socket of the demo run in *work*."""
    namespace = namespace_of(work)
    assert mounts_below(base) == []
    assert processes_naming(base) == {}  # containerd, its shims, services, lazystore
    assert processes_in_cgroups_of(namespace) == []  # the container's processes
    assert os.listdir(base) == []
    assert cgroup_dirs(namespace) == []
    assert not Path("/run/containerd/runc", namespace).exists()
    shim = hashlib.sha256(f"{work}/ctd.sock/{namespace}/{CONTAINER}".encode()).hexdigest()
    assert not Path("/run/containerd/s", shim).exists()


def test_demo_pulls_no_nar_and_fetches_only_what_the_program_reads(base: Path) -> None:
    proc = start_demo(base)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    top = nixcache.build()  # the same derivation the demo builds: the same store path
    closure = set(nixcache.closure(top))
    by_name = {Path(p).name[33:]: p for p in closure}
    read = {top, by_name["busybox"], by_name["liba"]}  # prog runs busybox, cats liba

    assert section(out, "running /nix/store/") == ["hello from liba"]  # from the FUSE mount
    assert listed(section(out, "what the program fetched")) == (read, {by_name["docs"]})
    assert section(out, "pulling it: ctr image pull --snapshotter lazystore") == [
        "   NAR bytes fetched during the pull: 0 (0 NARs)"]
    assert section(out, "running it: ctr run") == ["hello from liba"]  # from the container
    fetched, never = listed(section(out, "store paths of the image"))
    assert never, "the never-fetched list is empty"
    assert fetched | never == closure
    assert never == {by_name["docs"]}
    assert fetched == read  # after `lazystore evict`, fetched again by the container

    assert re.fullmatch(r"demo: done in \d+\.\d s; nothing it started or made is left",
                        out.splitlines()[-1])
    assert_nothing_left(base, work_of(out, base))


@pytest.mark.parametrize(
    "stage, expected",
    [
        ("== mounting lazystore", {"cache server"}),
        ("== pulling it", {"cache server", "lazystore mount", "registry",
                           "lazystore snapshotter", "containerd"}),
        ("== running it", {"cache server", "lazystore mount", "registry",
                           "lazystore snapshotter", "containerd"}),
    ],
)
def test_ctrl_c_leaves_no_mount_process_or_folder(
    base: Path, stage: str, expected: set[str]
) -> None:
    proc = start_demo(base)
    assert proc.stdout is not None
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            if line.startswith(stage):
                break
        else:
            pytest.fail(f"the demo ended before {stage!r}:\n{''.join(printed)[-5000:]}")
        (work,) = base.iterdir()
        started = processes_naming(base)
        assert expected <= {kind(argv) for argv in started.values()}
        if stage != "== mounting lazystore":
            assert mounts_below(base)  # at least the FUSE mount
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(printed) + rest
    assert proc.returncode == 130, out[-5000:]
    assert "demo: interrupted" in out

    assert_nothing_left(base, work)


def test_a_failing_step_leaves_nothing_either(base: Path, tmp_path: Path) -> None:
    # The real ctr, but `ctr run` gets a program that does not exist in the
    # image: runc fails to start the container after containerd created it.
    ctr = shutil.which("ctr")
    wrapper = tmp_path / "bin" / "ctr"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = run ] && exec {ctr} "$@" /nonexistent\n'
        f'exec {ctr} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{wrapper.parent}:{os.environ['PATH']}")
    proc = subprocess.run([str(DEMO)], env=env | {"LAZYSTORE_DEMO_TMPDIR": str(base)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "/nonexistent" in proc.stderr  # runc's error, passed on by ctr
    assert proc.stderr.splitlines()[-1].startswith("demo: failed after ")
    assert_nothing_left(base, work_of(proc.stdout, base))
