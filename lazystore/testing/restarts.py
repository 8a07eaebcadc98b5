"""Daemon restarts and kills under live readers, for tests and benchmarks.

:class:`Reader` reads every file of a closure through the mount again and
again (and keeps one file and one directory open), comparing with the bytes
real Nix built; :func:`check_cache` says what is wrong in a cache directory
after a kill (a store path in ``store/`` that differs from Nix's, an index
record whose verified tree is not Nix's); :func:`crash_loop` kills a
supervised daemon at random moments of a fetch/unpack/evict/index-save churn
and starts it again, checking after each start.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazystore.errors import ControlError
from lazystore.store import index, tree
from lazystore.testing.daemon import Daemon

NIX_STORE = Path("/nix/store")


def store_files(paths: list[str], limit: int = 8 << 20) -> dict[str, bytes]:
    """Every regular file of *paths* as real Nix built them, by path below the store."""
    out = {}
    for p in paths:
        root = NIX_STORE / os.path.basename(p)
        for dirpath, _, names in os.walk(root):
            for name in names:
                full = Path(dirpath) / name
                if not full.is_symlink() and full.is_file() and full.stat().st_size < limit:
                    out[str(full.relative_to(NIX_STORE))] = full.read_bytes()
    return out


class Reader(threading.Thread):
    """Reads every file again and again; keeps one file and one directory open.
    Each read's errors (errno names) and the slowest read are recorded."""

    def __init__(self, mnt: Path, files: dict[str, bytes], held: str) -> None:
        super().__init__(daemon=True)
        self.mnt, self.files, self.held = mnt, files, held
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []
        self.slowest = 0.0

    def run(self) -> None:
        held = os.open(self.mnt / self.held, os.O_RDONLY)
        held_dir = os.open(self.mnt / os.path.dirname(self.held), os.O_RDONLY | os.O_DIRECTORY)
        names = sorted(os.listdir(held_dir))
        want = self.files[self.held]
        try:
            while not self.stop.is_set():
                for rel, data in self.files.items():
                    self._timed(rel, lambda r=rel: (self.mnt / r).read_bytes(), data)
                    self._timed("held file", lambda: os.pread(held, len(want) + 1, 0), want)
                    self._timed("held dir", lambda: sorted(os.listdir(held_dir)), names)
                    self._timed("fstat", lambda: os.fstat(held).st_size, len(want))
        finally:
            os.close(held)
            os.close(held_dir)

    def _timed(self, what: str, fn: Callable[[], Any], want: object) -> None:
        start = time.monotonic()
        try:
            got = fn()
        except OSError as exc:
            self.errors.append(f"{what}: {errno.errorcode.get(exc.errno or 0)} {exc}")
            got = want
        self.slowest = max(self.slowest, time.monotonic() - start)
        if got != want:
            self.errors.append(f"{what}: wrong bytes")
        self.reads += 1

    def wait_reads(self, n: int, timeout: float = 120.0) -> None:
        target = self.reads + n
        deadline = time.monotonic() + timeout
        while self.reads < target:
            if not self.is_alive():
                raise AssertionError("the reader ended")
            if time.monotonic() > deadline:
                raise AssertionError("the reader made no progress")
            time.sleep(0.005)


def check_cache(cache: Path) -> list[str]:
    """What is wrong in cache directory *cache*: a path in ``store/`` whose tree
    or bytes differ from what Nix built, an index record whose verified tree is
    not Nix's. Empty when everything is as it must be."""
    problems = []
    for entry in sorted((cache / "store").iterdir()):
        real = NIX_STORE / entry.name
        if tree.from_disk(entry) != tree.from_disk(real):
            problems.append(f"store/{entry.name}: tree differs from Nix's")
            continue
        for dirpath, _, names in os.walk(entry):
            for name in names:
                ours = Path(dirpath) / name
                theirs = real / ours.relative_to(entry)
                if not ours.is_symlink() and ours.read_bytes() != theirs.read_bytes():
                    problems.append(f"store/{entry.name}: {name} differs from Nix's")
    for base, rec in index.load(cache / "index").items():
        if rec.tree_verified and rec.tree != tree.from_disk(NIX_STORE / base):
            problems.append(f"index: verified tree of {base} differs from Nix's")
    return problems


@dataclass
class CrashLoop:
    iterations: int = 0
    problems: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)  # tmp/ entries a start left
    phases: dict[str, int] = field(default_factory=dict)  # what was going on at each kill


def _phase(cache: Path, pid: int) -> str:
    """Roughly what daemon *pid* was doing when it was killed (for the figures)."""
    tmp = [p.name for p in (cache / "tmp").iterdir()]
    if any(n.startswith("evict-") for n in tmp):
        return "eviction"
    if (cache / f".index.{pid}.tmp").exists():
        return "index save"
    if tmp:
        return "fetch/unpack"
    return "serving"


TARGETS = (None, "fetch/unpack", "eviction", "index save")  # None: any moment


def _temporaries(cache: Path) -> set[str]:
    """Entries of tmp/, and temporary files of atomic writes in the cache dir."""
    return ({f"tmp/{p.name}" for p in (cache / "tmp").iterdir()}
            | {p.name for p in cache.glob(".*.tmp")})


def crash_loop(
    d: Daemon, reader: Reader, evictable: list[str], iterations: int,
    max_delay: float = 0.4, seed: int = 0,
) -> CrashLoop:
    """Kill *d* with SIGKILL *iterations* times, each at a random moment while
    *evictable* are evicted and read (so fetched and unpacked) again, and start
    it again (a supervised restart); check the cache after every kill and
    every start."""
    rng = random.Random(seed)
    out = CrashLoop()
    for _ in range(iterations):
        evicting = threading.Thread(target=_evict, args=(d, evictable), daemon=True)
        evicting.start()
        assert d.proc is not None
        target = TARGETS[out.iterations % len(TARGETS)]
        if target is None:
            time.sleep(rng.uniform(0, max_delay))
        else:  # wait for that phase to begin (a while at most), then a little more
            deadline = time.monotonic() + 1
            while _phase(d.cache, d.proc.pid) != target and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.005))
        d.proc.kill()
        d.proc.wait()
        evicting.join(30)
        phase = _phase(d.cache, d.proc.pid)
        out.phases[phase] = out.phases.get(phase, 0) + 1
        left = _temporaries(d.cache)
        out.problems += check_cache(d.cache)
        d.restart(kill=True)  # the process is gone already: this starts it
        out.survivors += sorted(left & _temporaries(d.cache))
        materialized = d.status()["paths_materialized"]
        on_disk = {p.name for p in (d.cache / "store").iterdir()}
        out.problems += [f"listed as materialised, not in store/: {b}"
                         for b in materialized if b not in on_disk]
        reader.wait_reads(len(reader.files) // 2 + 1)
        out.iterations += 1
    return out


def _evict(d: Daemon, paths: list[str]) -> None:
    try:
        d.call("evict", paths=paths)
    except (ControlError, OSError):
        pass  # killed under it
