"""`lazystore mount` as a subprocess for tests and benchmarks: start it, wait
until it serves (mounted and answering on its control socket), stop it, and
never leave a mount behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lazystore.control.client import ControlClient
from lazystore.errors import ControlError
from lazystore.testing.supervisor import Supervisor

LAZYSTORE = str(Path(sys.executable).with_name("lazystore"))


def fuse_missing() -> str | None:
    """Why real FUSE mounts cannot be tested here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root for FUSE mounts and mount namespaces"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "FUSE (/dev/fuse, fusermount3) is not available"
    return None


def container_stack_missing() -> str | None:
    """Why the end-to-end stack (FUSE, containerd + runc, docker-registry, real
    Nix) cannot be tested here, or None when it can."""
    from lazystore.testing import nixcache, registry
    from lazystore.testing.containerd import have_containerd

    if not have_containerd():
        return "needs root, containerd, ctr and runc"
    if reason := fuse_missing():
        return reason
    if not registry.available():
        return "docker-registry is not installed"
    if not nixcache.have_nix():
        return "real Nix (nix-bin) is not installed"
    return None


def is_mounted(path: Path) -> bool:
    # the real path of the parent only: a stat of a mount whose server is gone
    # (but whose /dev/fuse a supervisor still holds) never returns
    parent, name = os.path.split(os.path.abspath(path))
    real = os.path.join(os.path.realpath(parent), name)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class Daemon:
    """One `lazystore mount` process under *root* (mnt, cache, ctl.sock, daemon.log)."""

    def __init__(
        self, root: Path, urls: str | list[str], key: str, *extra: str,
        verbose: bool = True, call_timeout: float = 120.0,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.mnt, self.cache, self.sock = root / "mnt", root / "cache", root / "ctl.sock"
        root.mkdir(parents=True, exist_ok=True)
        (root / "nix.conf").touch()  # no host nix.conf leaks into the test
        self.log = root / "daemon.log"
        self.call_timeout = call_timeout
        self.argv = [
            LAZYSTORE, *(["-v"] if verbose else []), "mount", str(self.mnt),
            "--trusted-public-key", key,
            "--nix-conf", str(root / "nix.conf"), "--cache-dir", str(self.cache),
            "--control-socket", str(self.sock), *extra,
        ]
        for url in [urls] if isinstance(urls, str) else urls:
            self.argv += ["--substituter", url]
        self.proc: subprocess.Popen[bytes] | None = None
        self.supervisor = supervisor  # a service manager with a notify socket

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        argv, fds = self.argv, ()
        if self.supervisor is not None:
            argv, fds = self.supervisor.argv(self.argv), self.supervisor.pass_fds()
            env = self.supervisor.env(env)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, pass_fds=fds)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.supervisor is not None:
                self.supervisor.receive()
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text()[-3000:]}")
            if self.sock.exists() and is_mounted(self.mnt):
                try:
                    self.status()
                    return
                except ControlError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"daemon did not come up: {self.log.read_text()[-3000:]}")

    def call(self, op: str, **args: object) -> Any:
        with ControlClient(str(self.sock), timeout=self.call_timeout) as client:
            return client.call(op, **args)

    def status(self) -> dict[str, Any]:
        return self.call("status")  # type: ignore[no-any-return]

    def status_when(self, key: str, value: Any, timeout: float = 30.0) -> dict[str, Any]:
        """The status once its *key* is *value* (background work such as a
        read-ahead arrived); AssertionError with the last value after *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status[key] == value:
                return status
            assert time.monotonic() < deadline, f"status {key} is {status[key]!r}, not {value!r}"
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> int | None:
        """SIGTERM (SIGKILL with *kill*, or when it hangs); never leaves a mount."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        if self.supervisor is not None:  # a stopped unit's descriptor store is emptied
            self.supervisor.receive()
            self.supervisor.flush()
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        return code

    def restart(self, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop with SIGTERM (SIGKILL with *kill*), leaving the mount to the
        supervisor's descriptor store, and start again; as a unit restarts."""
        assert self.proc is not None and self.supervisor is not None
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.supervisor.receive()
        self.start(timeout)

    def rss_bytes(self) -> int:
        """Resident memory of the daemon process now."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def kill9(self) -> None:
        """SIGKILL and leave the (now stale) mount for the next start to clear."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@contextmanager
def lazystore_mount(
    root: Path, urls: str | list[str], key: str, *extra: str, **options: Any
) -> Iterator[Daemon]:
    """A started :class:`Daemon` (*options* as its keyword arguments), always stopped."""
    daemon = Daemon(root, urls, key, *extra, **options)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
