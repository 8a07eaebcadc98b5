"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1.

Usage (no pytest needed)::

    with registry.running(tmp_path) as reg:
        reg.host        # "127.0.0.1:PORT"
        reg.url         # "http://127.0.0.1:PORT"

Storage is a filesystem directory under the given folder; the process is
stopped (and waited for) when the block ends, whatever happens in it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BINARY = "/usr/bin/docker-registry"

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path  # storage directory
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def available() -> bool:
    return Path(BINARY).is_file() and shutil.which("skopeo") is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(workdir: Path, timeout: float = 30.0) -> Iterator[Registry]:
    """Start a registry with its storage and config under *workdir*."""
    if not Path(BINARY).is_file():
        raise RegistryError(f"{BINARY} is not installed (Debian package docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # another process may take the port between bind and serve
        reg = _start(workdir, attempt)
        try:
            if _wait_ready(reg, timeout):
                yield reg
                return
        finally:
            _stop(reg.process)
    raise RegistryError(f"docker-registry did not start; its log:\n{reg.log()[-2000:]}")


def _start(workdir: Path, attempt: int) -> Registry:
    port = free_port()
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(CONFIG.format(root=root, port=port))
    log_file = workdir / f"registry-{attempt}.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [BINARY, "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Registry(f"127.0.0.1:{port}", root, proc, log_file)


def _wait_ready(reg: Registry, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reg.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{reg.url}/v2/", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
