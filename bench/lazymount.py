"""Helpers for the daemon benchmarks: Nix-built closures in signed caches served
on 127.0.0.1, and a `lazystore mount` subprocess that always cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lazystore.control.client import ControlClient
from lazystore.errors import ControlError
from tests.support import nixcache
from tests.support.httpserver import serve_directory

LAZYSTORE = str(Path(sys.executable).with_name("lazystore"))
WORKLOADS = Path(__file__).with_name("workloads")


def build_expr(expr: str, **argstr: str) -> str:
    """nix-build a Nix expression given as text (derivations from local files)."""
    with tempfile.NamedTemporaryFile("w", suffix=".nix", dir=WORKLOADS, delete=False) as f:
        f.write(expr)
    try:
        return nixcache.build(Path(f.name), **argstr)
    finally:
        os.unlink(f.name)


MANY_FILES_NIX = """
{ files ? "20000", perDir ? "500" }:
(import ./common.nix).mk "bench-many-files-${files}" ''
  mkdir -p $out
  cd $out
  n=$(( ${files} / ${perDir} ))
  for d in $(seq 1 $n); do
    mkdir d$d
    (cd d$d && seq -f "f%05g" 1 ${perDir} | xargs touch)
  done
''
"""


@contextmanager
def signed_cache(top: str, root: Path, compression: str = "zstd") -> Iterator[tuple[str, str]]:
    """(url, public key) of a signed cache of *top*'s closure served over HTTP."""
    key = nixcache.KeyPair.generate(root / "keys")
    cache = nixcache.make_cache(top, root / "cache", key, compression=compression)
    with serve_directory(cache.root) as server:
        yield server.url, key.public_key  # type: ignore[attr-defined]


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class Mount:
    def __init__(self, proc: subprocess.Popen[bytes], mnt: Path, sock: Path, cache: Path) -> None:
        self.proc, self.mnt, self.sock, self.cache = proc, mnt, sock, cache

    def call(self, op: str, **args: object) -> object:
        with ControlClient(str(self.sock), timeout=600) as client:
            return client.call(op, **args)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@contextmanager
def lazystore_mount(root: Path, url: str, key: str, *extra: str) -> Iterator[Mount]:
    root.mkdir(parents=True, exist_ok=True)
    mnt, sock, cache = root / "mnt", root / "ctl.sock", root / "cache-dir"
    (root / "nix.conf").touch()
    argv = [LAZYSTORE, "mount", str(mnt), "--substituter", url, "--trusted-public-key", key,
            "--nix-conf", str(root / "nix.conf"), "--cache-dir", str(cache),
            "--control-socket", str(sock), *extra]
    with open(root / "daemon.log", "ab") as log:
        proc = subprocess.Popen(argv, stderr=log)
    try:
        m = Mount(proc, mnt, sock, cache)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "daemon.log").read_text()[-2000:])
            try:
                if is_mounted(mnt):
                    m.call("status")
                    break
            except ControlError:
                pass
            time.sleep(0.02)
        yield m
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def load_note() -> str:
    """The machine load while measuring (the VM is shared)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"
