"""Helpers for the daemon benchmarks: Nix-built closures in signed caches served
on 127.0.0.1, and a `lazystore mount` subprocess that always cleans up."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lazystore.testing import nixcache
from lazystore.testing.daemon import Daemon
from lazystore.testing.daemon import lazystore_mount as support_mount
from lazystore.testing.httpserver import serve_directory

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


@contextmanager
def lazystore_mount(root: Path, url: str, key: str, *extra: str) -> Iterator[Daemon]:
    """A quiet `lazystore mount` (no -v logging) whose control calls may take long."""
    with support_mount(root, url, key, *extra, verbose=False, call_timeout=600) as daemon:
        yield daemon


def load_note() -> str:
    """The machine load while measuring (the VM is shared)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"
