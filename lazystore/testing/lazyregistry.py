"""`lazystore registry` as a subprocess for tests and benchmarks.

``with running(workdir, urls, key) as reg: reg.url`` starts it on an
ephemeral port of 127.0.0.1 (its stdout names the address), and stops it
(SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LAZYSTORE = str(Path(sys.executable).with_name("lazystore"))


@dataclass
class LazyRegistry:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log_file: Path
    cache_dir: Path

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def argv(workdir: Path, urls: list[str], key: str, *extra: str,
         cache_dir: Path | None = None) -> list[str]:
    nix_conf = workdir / "nix.conf"
    nix_conf.touch()  # no host nix.conf leaks in
    args = [LAZYSTORE, "-v", "registry", "--listen", "127.0.0.1:0",
            "--nix-conf", str(nix_conf), "--trusted-public-key", key,
            "--cache-dir", str(cache_dir or workdir / "cache"), *extra]
    for url in urls:
        args += ["--substituter", url]
    return args


@contextmanager
def running(workdir: Path, urls: list[str], key: str, *extra: str,
            cache_dir: Path | None = None, timeout: float = 30.0) -> Iterator[LazyRegistry]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "registry.log"
    cmd = argv(workdir, urls, key, *extra, cache_dir=cache_dir)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL)
    try:
        url = _wait_url(proc, log_file, timeout)
        yield LazyRegistry(url, proc, log_file, cache_dir or workdir / "cache")
    finally:
        _stop(proc)


def _wait_url(proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("serving on "):
        _stop(proc)
        raise RuntimeError(f"lazystore registry did not start: {line!r}\n"
                           f"{log_file.read_text(errors='replace')[-3000:]}")
    return line.split()[2]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
