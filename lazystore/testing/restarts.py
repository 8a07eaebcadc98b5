"""Daemon restarts and kills under live readers, for tests and benchmarks.

:class:`Reader` reads every file of a closure through the mount again and
again (and keeps one file and one directory open), comparing with the bytes
real Nix built; :func:`check_cache` says what is wrong in a cache directory
after a kill (a store path in ``store/`` that differs from Nix's, an index
record whose verified tree is not Nix's); :func:`crash_loop` kills a
supervised daemon at random moments of a fetch/unpack/evict/index-save churn
and starts it again, checking after each start. :class:`ContainerLoop` is a
container (``ctr run -d``) whose busybox shell reads store files in a loop, in
rounds the caller names, logging every read's md5sum and time into a
bind-mounted directory, checked against what Nix built (:meth:`results`).
"""

from __future__ import annotations

import errno
import hashlib
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
from lazystore.testing.containerd import Containerd
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


# -- containers across restarts ------------------------------------------------

# The container's loop (busybox sh): each pass reads every file that
# files.<round> lists (the test names the round in the file "round"), timing
# each read from /proc/uptime (10 ms ticks); one line per read, "ROUND T0 T1
# STATUS MD5SUM-OUTPUT", and "ROUND start"/"ROUND pass" around each pass.
CONTAINER_LOOP = """\
bb=$1
cd /out
while [ ! -e stop ]; do
  read round < round
  echo "$round start" >> log
  while read f; do
    read t0 idle < /proc/uptime
    s=$($bb md5sum "$f" 2>&1)
    rc=$?
    read t1 idle < /proc/uptime
    echo "$round $t0 $t1 $rc $s" >> log
  done < files.$round
  echo "$round pass" >> log
done
echo exit >> log
"""


@dataclass
class ContainerReads:
    reads: int = 0
    errors: list[str] = field(default_factory=list)  # failed reads and wrong bytes
    slowest: float = 0.0
    exited: bool = False  # the loop saw "stop" and ended


class ContainerLoop:
    """A long-running container (``ctr run -d`` through *snapshotter*) whose
    busybox shell reads store files in a loop, in rounds the caller names
    (:meth:`next_round`), and logs each read into *out* (bind-mounted at /out)."""

    def __init__(self, ctd: Containerd, snapshotter: str, image: str, out: Path,
                 busybox: str) -> None:
        self.ctd, self.snapshotter, self.image, self.busybox = ctd, snapshotter, image, busybox
        self.out = out
        self.name = f"loop{time.monotonic_ns()}"
        self.round = -1
        self.files: set[str] = set()  # every file any round listed

    @property
    def log(self) -> Path:
        return self.out / "log"

    def start(self, files: list[str]) -> None:
        """Start the container, reading *files* (round 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "loop.sh").write_text(CONTAINER_LOOP)
        self.log.touch()
        self.next_round(files)
        self.ctd.ctr("run", "-d", "--snapshotter", self.snapshotter,
                     "--mount", f"type=bind,src={self.out},dst=/out,options=rbind:rw",
                     self.image, self.name, self.busybox, "sh", "/out/loop.sh", self.busybox,
                     timeout=180)

    def next_round(self, files: list[str]) -> int:
        """From its next pass on, the container reads *files* (absolute store paths)."""
        self.round += 1
        self.files.update(files)
        (self.out / f"files.{self.round}").write_text("".join(f + "\n" for f in files))
        tmp = self.out / "round.tmp"
        tmp.write_text(f"{self.round}\n")
        tmp.rename(self.out / "round")
        return self.round

    def lines(self) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:  # not started
            return []
        return text[: text.rfind("\n") + 1].splitlines()

    def wait_pass(self, round_: int, after: int = 0, timeout: float = 180.0) -> None:
        """Until a whole pass of *round_* began after the log's first *after* lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()[after:]
            if f"{round_} start" in lines and f"{round_} pass" in \
                    lines[lines.index(f"{round_} start"):]:
                return
            if time.monotonic() > deadline:
                tail = "\n".join(lines[-10:])
                raise AssertionError(f"no pass of round {round_} in {timeout} s:\n{tail}")
            time.sleep(0.05)

    def running(self) -> bool:
        out = self.ctd.ctr("tasks", "ls").stdout.splitlines()[1:]
        return any(line.split()[:1] == [self.name] and "RUNNING" in line for line in out)

    def task_pid(self) -> int:
        out = self.ctd.ctr("tasks", "ls").stdout.splitlines()[1:]
        return next(int(line.split()[1]) for line in out if line.split()[:1] == [self.name])

    def stop(self, timeout: float = 120.0) -> None:
        """Ask the loop to end after its pass; wait until it did."""
        if self.round < 0:
            return
        (self.out / "stop").touch()
        deadline = time.monotonic() + timeout
        while "exit" not in self.lines() and time.monotonic() < deadline:
            time.sleep(0.05)

    def remove(self) -> None:
        """The container and its task gone (killed if still running)."""
        for args in (("tasks", "kill", "-s", "SIGKILL", self.name),
                     ("tasks", "delete", "--force", self.name),
                     ("containers", "delete", self.name)):
            self.ctd.ctr(*args, check=False, timeout=60)

    def results(self) -> ContainerReads:
        """Every read of the log checked against the bytes Nix built."""
        want = {f: hashlib.md5(Path(f).read_bytes()).hexdigest() for f in self.files}
        out = ContainerReads()
        for line in self.lines():
            fields = line.split(maxsplit=4)
            if len(fields) < 4:
                out.exited |= fields == ["exit"]
                continue
            out.reads += 1
            out.slowest = max(out.slowest, float(fields[2]) - float(fields[1]))
            got = fields[4].split() if len(fields) == 5 else []
            if fields[3] != "0":
                out.errors.append(f"round {fields[0]}: {' '.join(fields[3:])}")
            elif len(got) != 2 or got[1] not in want or want[got[1]] != got[0]:
                out.errors.append(f"round {fields[0]}: wrong bytes: {fields[4]}")
        return out


@dataclass
class RoundsRun:
    restart_times: list[float] = field(default_factory=list)  # signal to serving again
    fetched_early: list[str] = field(default_factory=list)  # a round's paths fetched before it
    task_pid: int = 0  # the container's, once it runs


def restart_rounds(
    d: Daemon, loop: ContainerLoop, reader: Reader, rounds: list[list[str]],
    always: list[str], evictable: list[str], seed: int = 19,
) -> RoundsRun:
    """Start *loop* on round 0, then for each further round: it reads the files of
    that round's store paths (*rounds*: base names, none fetched yet), of the
    round before, of round 0 (which the caller may have fetched before: a
    container reads those through overlay's data-only layer) and *always*;
    once it began the round, the daemon is stopped (SIGTERM, odd rounds) or
    killed (SIGKILL, even rounds) at a random moment of it and started again;
    then a whole pass of the round on the new daemon and some reads of
    *reader*, and *evictable* evicted (read, so fetched, again)."""
    rng = random.Random(seed)
    out = RoundsRun()

    def files(i: int) -> list[str]:
        bases = sorted({*rounds[0], *rounds[max(i - 1, 0)], *rounds[i]})
        return [*always, *(f"/nix/store/{rel}" for rel in sorted(store_files(bases)))]

    loop.start(files(0))
    loop.wait_pass(0)
    out.task_pid = loop.task_pid()
    for i in range(1, len(rounds)):
        materialized = set(d.status()["paths_materialized"])
        out.fetched_early += sorted(set(rounds[i]) & materialized)
        mark = len(loop.lines())
        loop.next_round(files(i))
        deadline = time.monotonic() + 120
        while f"{i} start" not in loop.lines()[mark:] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # likely a read of a path being fetched
        start = time.monotonic()
        d.restart(kill=i % 2 == 0)
        out.restart_times.append(time.monotonic() - start)
        loop.wait_pass(i, after=len(loop.lines()))
        reader.wait_reads(len(reader.files))
        d.call("evict", paths=evictable)
    return out
