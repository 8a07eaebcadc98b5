"""A private containerd 1.6 (and the lazystore snapshotter) for tests and benchmarks.

Plain module, no pytest: ``with Containerd(workdir, proxy_plugins={"lazystore":
sock}) as ctd: ctd.ctr("images", "ls")``. containerd gets its own root, state,
gRPC address and config.toml under *workdir* and ``ctr()`` its own namespace
(``ctd.namespace``); it is stopped (its tasks killed first) when the context
exits, and what runc and the shims leave outside *workdir* goes with it
(runc state, shim sockets, the namespace's cgroup directories). With
``cri=Cri(...)`` its CRI plugin is configured for pods (sandbox
image, snapshotter, plain-HTTP registries; the CRI's containers live in the
fixed namespace ``k8s.io``, whose runc state is cleaned per container, never
as a whole). ``snapshotter_process``
starts ``lazystore snapshotter`` as a child process and waits for READY=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lazystore import deploy

NAMESPACE_PREFIX = "lazystore-test"
# runc v2 keeps container state in /run/containerd/runc/<namespace>/ whatever
# containerd's own root and state are: each instance gets its own namespace so
# that runs (and their leftovers) never collide.
RUNC_ROOT = Path("/run/containerd/runc")
# Shims listen on /run/containerd/s/<sha256 of "ADDRESS/NAMESPACE/ID"> (containerd
# 1.6, runtime v2): a shim that is killed leaves its socket there.
SHIM_SOCKETS = Path("/run/containerd/s")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CRI_NAMESPACE = "k8s.io"  # containerd 1.6's CRI plugin always uses it


def have_containerd() -> bool:
    return all(shutil.which(t) for t in ("containerd", "ctr", "runc")) and os.geteuid() == 0


@dataclass(frozen=True)
class Cri:
    """Settings of containerd's CRI plugin for a test that drives it (pods)."""

    sandbox_image: str
    snapshotter: str = "overlayfs"
    plain_http: tuple[str, ...] = ()  # registry hosts reached over http://

    def toml(self, workdir: Path) -> list[str]:
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        lines = [
            f"    sandbox_image = {json.dumps(self.sandbox_image)}",
            '    stream_server_port = "0"',
            # A negative oom_score_adj (CRI's -998 for sandboxes) needs CAP_SYS_RESOURCE
            # beyond what a nested test machine may grant: runc init would fail.
            "    restrict_oom_score_adj = true",
            f"  {cri}.containerd]",
            f"    snapshotter = {json.dumps(self.snapshotter)}",
            "    disable_snapshot_annotations = false",
            f"  {cri}.cni]",
            f'    bin_dir = "{workdir}/cni/bin"',
            f'    conf_dir = "{workdir}/cni/conf"',
        ]
        for host in self.plain_http:
            lines += [f'  {cri}.registry.mirrors."{host}"]',
                      f'    endpoint = ["http://{host}"]']
        return lines


def config_toml(root: Path, state: Path, address: Path,
                proxy_plugins: Mapping[str, str], cri: Cri | None = None) -> str:
    lines = [
        "version = 2",
        f'root = "{root}"',
        f'state = "{state}"',
        "[grpc]",
        f'  address = "{address}"',
        "[ttrpc]",
        f'  address = "{address}.ttrpc"',
        "[debug]",
        f'  address = "{address}.debug"',
        "[metrics]",
        '  address = ""',
        "[plugins]",
        # Its default is /opt/containerd, outside the instance.
        '  [plugins."io.containerd.internal.v1.opt"]',
        f'    path = "{root}/opt"',
        '  [plugins."io.containerd.grpc.v1.cri"]',
        "    disable_apparmor = true",
    ]
    if cri is not None:
        lines += cri.toml(root.parent)
    stanzas = [deploy.proxy_plugin_stanza(str(sock), name) for name, sock in proxy_plugins.items()]
    return "\n".join(lines) + "\n" + "".join(stanzas)


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {path} within {timeout}s")


class Containerd:
    """A running private containerd; ``ctr()`` runs ctr against it."""

    def __init__(
        self,
        workdir: Path,
        proxy_plugins: Mapping[str, str] | None = None,
        namespace: str | None = None,
        cri: Cri | None = None,
    ) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.address = workdir / "containerd.sock"
        self.config = workdir / "config.toml"
        self.log_file = workdir / "containerd.log"
        self.namespace = namespace or f"{NAMESPACE_PREFIX}-{uuid.uuid4().hex[:12]}"
        self.proxy_plugins = dict(proxy_plugins or {})
        self.cri = cri
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for d in (self.root, self.state):
            d.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            config_toml(self.root, self.state, self.address, self.proxy_plugins, self.cri)
        )
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            _wait_for_socket(self.address, self.proc, 30, "containerd")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None:
            return
        cri_tasks = self._task_ids(CRI_NAMESPACE) if self.cri is not None else []
        containers = self._container_ids()
        for namespace, tasks in ((self.namespace, self._task_ids()), (CRI_NAMESPACE, cri_tasks)):
            for task in tasks:
                self.ctr("tasks", "kill", "--all", "-s", "SIGKILL", task, check=False,
                         timeout=30, namespace=namespace)
                self.ctr("tasks", "delete", "--force", task, check=False, timeout=30,
                         namespace=namespace)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._kill_own_shims()
        ids = set(containers) | set(self._runc_containers())
        self._kill_runc_containers()
        unmount_below(self.state)
        unmount_below(self.root)
        shutil.rmtree(RUNC_ROOT / self.namespace, ignore_errors=True)
        for task in cri_tasks:
            shutil.rmtree(RUNC_ROOT / CRI_NAMESPACE / task, ignore_errors=True)
        for namespace, names in ((self.namespace, ids), (CRI_NAMESPACE, cri_tasks)):
            for name in names:
                (SHIM_SOCKETS / self.shim_socket_name(namespace, name)).unlink(missing_ok=True)
        for top in self.cgroup_dirs():
            _remove_cgroup_tree(top)

    def shim_socket_name(self, namespace: str, container: str) -> str:
        return hashlib.sha256(f"{self.address}/{namespace}/{container}".encode()).hexdigest()

    def cgroup_dirs(self) -> list[Path]:
        """The cgroup directories runc made for this instance's namespace (the
        containers' cgroups below them): v1, one per controller; v2, one."""
        return sorted(p for p in (CGROUP_ROOT / self.namespace,
                                  *CGROUP_ROOT.glob(f"*/{self.namespace}")) if p.is_dir())

    def _runc_containers(self) -> list[str]:
        runc_root = RUNC_ROOT / self.namespace
        return [p.name for p in runc_root.iterdir()] if runc_root.is_dir() else []

    def _kill_runc_containers(self) -> None:
        """Containers whose shim is gone (killed above, or containerd died)."""
        runc_root = str(RUNC_ROOT / self.namespace)
        for container in self._runc_containers():
            for args in (("kill", container, "KILL"), ("delete", "--force", container)):
                subprocess.run(["runc", "--root", runc_root, *args],
                               capture_output=True, timeout=30)

    def _task_ids(self, namespace: str | None = None) -> list[str]:
        out = self.ctr("tasks", "ls", "-q", check=False, namespace=namespace, timeout=30)
        return out.stdout.split() if out.returncode == 0 else []

    def _container_ids(self) -> list[str]:
        out = self.ctr("containers", "ls", "-q", check=False, timeout=30)
        return out.stdout.split() if out.returncode == 0 else []

    def _kill_own_shims(self) -> None:
        """Shims outlive containerd by design; end those serving this instance only."""
        needle = f"-address\0{self.address}\0".encode()
        killed = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(proc)
                except ProcessLookupError:
                    pass
        _wait_until(lambda: not any(_alive(p) for p in killed))

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 300,
        input: bytes | None = None,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address … --namespace … ARGS``; raise with its output when *check*."""
        argv = ["ctr", "--address", str(self.address),
                "--namespace", namespace or self.namespace, *args]
        proc = subprocess.run(
            argv, capture_output=True, timeout=timeout,
            input=input.decode() if input is not None else None, text=True,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[5:])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        return proc

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def unmount_below(path: Path) -> None:
    """Lazily unmount everything mounted below *path* (a test's tree), deepest first."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    for target in sorted((t for t in targets if t.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def logs_tail(logs: Sequence[Path], ctd: Containerd, chars: int = 3000) -> str:
    """The ends of *logs* (those that exist) and of containerd's, for a failure's message."""
    parts = [f"--- {p.name}\n" + p.read_text(errors="replace")[-chars:]
             for p in logs if p.exists()]
    parts.append("--- containerd\n" + ctd.log_tail())
    return "\n".join(parts)


def _alive(proc: Path) -> bool:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_until(done: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def _remove_cgroup_tree(top: Path) -> None:
    """rmdir *top* and its sub-cgroups, deepest first. A process killed just
    before may take a moment to leave its cgroup (EBUSY until then); one that
    does not leave keeps its cgroup, as does anything that is not a cgroup."""
    def removed() -> bool:
        for dirpath, _dirnames, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
        return not top.exists()

    _wait_until(removed, timeout=5)


@contextmanager
def snapshotter_process(
    root: Path,
    address: Path,
    control_socket: str | Path,
    mount_point: str | Path,
    extra_args: Sequence[str] = (),
    log_file: Path | None = None,
    timeout: float = 30,
) -> Iterator[subprocess.Popen]:
    """Run ``lazystore snapshotter`` until the context exits; waits for READY=1."""
    args = ["snapshotter", "--address", str(address), "--root", str(root),
            "--control-socket", str(control_socket), "--mount-point", str(mount_point),
            *extra_args]
    with lazystore_process(args, root.parent, log_file, timeout) as proc:
        yield proc


@contextmanager
def lazystore_process(
    args: Sequence[str], notify_dir: Path, log_file: Path | None = None, timeout: float = 30,
    wrapper: Sequence[str] = (),
) -> Iterator[subprocess.Popen]:
    """Run ``lazystore -v ARGS`` (a daemon that sends READY=1, with its
    notify socket in *notify_dir*) until the context exits; *wrapper* runs it
    (e.g. ``setpriv ... --``)."""
    notify_path = notify_dir / f".notify-{os.getpid()}-{time.monotonic_ns()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(timeout)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    argv = [*wrapper, sys.executable, "-m", "lazystore", "-v", *args]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            message = notify.recv(4096)
        except TimeoutError:
            raise RuntimeError(f"lazystore {args[0]} sent no READY=1") from None
        # sd_notify: newline-separated assignments (READY=1 with a STATUS= line).
        if b"READY=1" not in message.split(b"\n"):
            raise RuntimeError(f"unexpected sd_notify message {message!r}")
        yield proc
    finally:
        notify.close()
        notify_path.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log_file:
            out.close()  # type: ignore[union-attr]
