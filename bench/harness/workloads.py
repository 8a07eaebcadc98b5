"""The workloads: closures built with real Nix from bench/workloads/*.nix and
signed binary caches of them (zstd and xz), cached in bench/.cache; each
cache also as a copy with file indexes (``lazystore cache index``, issue 15)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lazystore.cacheindex import DEFAULT_CHUNK_SIZE
from lazystore.testing import nixcache
from lazystore.testing.daemon import LAZYSTORE

log = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parents[1]
WORKLOADS_DIR = BENCH / "workloads"
CACHE_DIR = BENCH / ".cache"
KEY_NAME = "lazystore-bench-1"
PY_PROGRAM = 'import json, sqlite3; print("ready")'


@dataclass(frozen=True)
class Spec:
    """How to build a workload and what its program prints."""

    name: str
    nix_file: str
    argstr: dict[str, str]
    expect: str  # the program's first line of output starts with this

    def argv(self, top: str) -> list[str]:
        if self.name == "python":
            return [f"{top}/bin/python3", "-c", PY_PROGRAM]
        return [f"{top}/bin/{'hello' if self.name == 'busybox' else 'wide'}"]


SPECS = {
    "python": Spec("python", "python.nix", {}, "ready"),
    "busybox": Spec("busybox", "busybox.nix", {}, "hello from busybox"),
    "wide": Spec("wide", "wide.nix", {}, "wide ready"),
}
# --quick: the same shapes, smaller (fewer paths, less data)
QUICK_ARGS = {"wide": {"parts": "40", "blobs": "4"}, "python": {"dataMB": "8"}}


@dataclass
class Workload:
    name: str
    variant: str  # "" for the first image, "v2" for the delta image
    top: str
    paths: list[str]
    nar_sizes: dict[str, int]  # full store path -> NarSize
    argv: list[str]
    expect: str

    @property
    def nar_bytes(self) -> int:
        return sum(self.nar_sizes.values())

    def summary(self) -> dict[str, object]:
        return {
            "top": self.top,
            "store_paths": len(self.paths),
            "nar_bytes": self.nar_bytes,
            "program": self.argv,
        }


def bench_key() -> nixcache.KeyPair:
    return nixcache.KeyPair.generate(CACHE_DIR / "keys", KEY_NAME)


def build(name: str, variant: str = "", quick: bool = False) -> Workload:
    """Build workload *name* with Nix (a no-op when it is already built)."""
    spec = SPECS[name]
    args = dict(spec.argstr)
    if quick:
        args.update(QUICK_ARGS.get(name, {}))
    if variant:
        args["variant"] = variant
    log.info("building workload %s%s with Nix", name, f" ({variant})" if variant else "")
    top = nixcache.build(WORKLOADS_DIR / spec.nix_file, **args)
    paths = nixcache.closure(top)
    return Workload(name, variant, top, paths, _nar_sizes(paths), spec.argv(top), spec.expect)


def _nar_sizes(paths: list[str]) -> dict[str, int]:
    out = nixcache.run_nix("nix", "path-info", "--json", *paths)
    return {entry["path"]: int(entry["narSize"]) for entry in json.loads(out)}


def write_caches(workloads: list[Workload], compressions: list[str]) -> dict[str, Path]:
    """One signed binary cache per compression holding the closures of all
    *workloads* (written once, then reused from bench/.cache)."""
    tag = "+".join(Path(w.top).name[:12] for w in workloads)
    caches = {}
    for compression in compressions:
        dest = CACHE_DIR / "caches" / f"{workloads[0].name}-{tag}-{compression}"
        done = dest / ".complete"
        if not done.exists():
            if dest.exists():
                shutil.rmtree(dest)
            for w in workloads:
                log.info("writing %s binary cache of %s", compression, w.top)
                nixcache.make_cache(w.top, dest, bench_key(), compression=compression)
            done.touch()
        caches[compression] = dest
    return caches


def indexed_copy(cache: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Path:
    """*cache* with file indexes: a hard-linked copy (Nix's files shared, never
    changed) indexed by ``lazystore cache index`` with the bench key, whose
    public key every lazystore mode trusts; made once per chunk size."""
    dest = cache.with_name(f"{cache.name}-index{chunk_size // 1024}k")
    done = dest / ".indexed"
    if done.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["cp", "-al", str(cache), str(dest)], check=True)
    log.info("indexing %s (%d KiB chunks)", dest.name, chunk_size // 1024)
    proc = subprocess.run([LAZYSTORE, "cache", "index", str(dest), "--secret-key-file",
                           str(bench_key().secret_file), "--chunk-size", f"{chunk_size}",
                           "--jobs", str(os.cpu_count() or 2)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lazystore cache index {dest} failed: {proc.stderr.strip()[-800:]}")
    done.touch()
    return dest
