"""kill -9 of ``lazystore snapshotter`` at random moments of its work, for tests and benchmarks.

:class:`Worker` threads drive a real snapshotter process over gRPC the way
containerd's unpacker and garbage collector do: Prepare over a committed
parent, the layer's files written into the upperdir, Commit; View, Update, and
Remove of leaves and of what an earlier run left active. Each layer's files
are named after its key (``layers/<key>/<n>``, and ``top`` holding the key),
so any mount of a snapshot says whether its whole chain is there.
:func:`crash_loop` kills the process with SIGKILL at a random moment, checks
the files it left (:func:`check_files`: ``PRAGMA integrity_check``, parents,
directories, no committed snapshot with a partial layer), starts it again and
checks what it serves (:func:`check_served`: no directory without a row, and
every snapshot, committed or active, mounts and shows its chain). Plain
layers only: no daemon is asked (nix layers' views: tests/test_snapshotter_restarts.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lazystore.snapshotter.metadata import Kind
from lazystore.snapshotter.proto import snapshots_pb2 as pb
from lazystore.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lazystore.testing.containerd import snapshotter_process

# The label naming the key a layer's files were written under.
KEY_LABEL = "lazystore.test/layer-key"
FILES_PER_LAYER = 3
MAX_DEPTH = 5  # layers in a chain
MAX_SNAPSHOTS = 30  # above this, workers mostly remove
# Codes a worker expects: the process was killed under it, or another worker's
# Remove or Commit got there first.
GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
RACES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.ALREADY_EXISTS}


def layer_files(key: str) -> dict[str, bytes]:
    """What the layer written under *key* holds, by path below its root."""
    out = {f"layers/{key}/{n}": hashlib.sha256(f"{key}/{n}".encode()).digest() * (n + 1)
           for n in range(FILES_PER_LAYER)}
    out["top"] = key.encode()
    return out


@dataclass
class Row:
    id: int
    key: str
    parent_id: int | None
    kind: Kind
    labels: dict[str, str]


def read_rows(db: Path) -> list[Row]:
    with _connect(db) as conn:
        return [Row(i, k, p, Kind(kind), json.loads(labels)) for i, k, p, kind, labels in
                conn.execute("SELECT id, key, parent_id, kind, labels FROM snapshots")]


@contextmanager
def _connect(db: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(db)
    try:
        yield conn
    finally:
        conn.close()


def check_files(root: Path) -> tuple[list[str], int]:
    """What is wrong in a snapshotter root its process left (the process is
    gone), and how many directories no row owns (the next start removes them)."""
    db = root / "metadata.db"
    problems = []
    with _connect(db) as conn:
        check = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if check != ["ok"]:
            problems.append(f"integrity_check: {check}")
        if bad := conn.execute("PRAGMA foreign_key_check").fetchall():
            problems.append(f"foreign_key_check: {bad}")
    rows = {r.id: r for r in read_rows(db)}
    snapshots = root / "snapshots"
    for row in rows.values():
        where = f"snapshot {row.key!r} (id {row.id})"
        parent = rows.get(row.parent_id) if row.parent_id is not None else None
        if row.parent_id is not None and (parent is None or parent.kind != Kind.COMMITTED):
            problems.append(f"{where}: parent id {row.parent_id} is not a committed snapshot")
        fs = snapshots / str(row.id) / "fs"
        if not fs.is_dir():
            problems.append(f"{where}: no directory {fs}")
            continue
        if row.kind == Kind.ACTIVE and not (snapshots / str(row.id) / "work").is_dir():
            problems.append(f"{where}: active without its work directory")
        if row.kind == Kind.COMMITTED and (key := row.labels.get(KEY_LABEL)):
            problems += compare(fs, layer_files(key), f"committed {where}")
    orphans = sum(1 for p in snapshots.iterdir() if not (p.name.isdigit() and int(p.name) in rows))
    return problems, orphans


def compare(top: Path, want: Mapping[str, object], where: str,
            digest: Callable[[bytes], object] = bytes) -> list[str]:
    """The files of *want* (path below *top* -> their *digest*, by default
    their bytes) that are missing or differ below *top*, one line each."""
    out = []
    for rel, expected in want.items():
        try:
            got = digest((top / rel).read_bytes())
        except OSError as exc:
            out.append(f"{where}: {rel}: {exc.strerror}")
            continue
        if got != expected:
            out.append(f"{where}: {rel} has other bytes")
    return out


def _upper(mounts: list) -> Path:
    """Where a Prepare's layer goes: its bind mount's source, or the overlay's upperdir."""
    if mounts[0].type == "bind":
        return Path(mounts[0].source)
    opt = next(o for o in mounts[0].options if o.startswith("upperdir="))
    return Path(opt[len("upperdir="):])


class Worker(threading.Thread):
    """Makes, views, relabels and removes snapshots until stopped; records
    each answer it did not expect and the call it was in when stopped."""

    def __init__(self, address: Path, tag: str, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.address, self.tag, self.rng = address, tag, rng
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.calls: Counter[str] = Counter()
        self.current: str | None = None
        self._n = 0

    def run(self) -> None:
        with grpc.insecure_channel(f"unix:{self.address}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            while not self.stop.is_set():
                try:
                    self._step(stub)
                except grpc.RpcError as exc:
                    code = exc.code()  # type: ignore[attr-defined]
                    if code in GONE:
                        self.stop.wait(0.05)
                    elif code not in RACES:
                        self.errors.append(f"{self.current}: {code.name}: "
                                           f"{exc.details()}")  # type: ignore[attr-defined]
                except OSError as exc:
                    # the upperdir went: only a Remove of this worker's active
                    # snapshot by someone else would do that (none does)
                    self.errors.append(f"writing a layer: {exc}")
                finally:
                    self.current = None

    def _call(self, name: str, fn: Callable, request: object) -> object:
        self.current = name
        self.calls[name] += 1
        return fn(request, timeout=30)

    def _key(self, what: str) -> str:
        self._n += 1
        return f"{what}-{self.tag}-{self._n}"

    def _step(self, stub: pb_grpc.SnapshotsStub) -> None:
        infos = [i for r in self._call("List", stub.List, pb.ListSnapshotsRequest())
                 for i in r.info]  # type: ignore[attr-defined]
        committed = [i for i in infos if i.kind == pb.COMMITTED]
        depth = _depths(infos)
        parents = [i.name for i in committed if depth[i.name] < MAX_DEPTH]
        # what a killed run left active (containerd's garbage collector removes it)
        run = "-" + self.tag.split(".")[0] + "."
        stale = [i.name for i in infos if i.kind != pb.COMMITTED and run not in i.name]
        has_children = {i.parent for i in infos}
        leaves = [i.name for i in committed if i.name not in has_children]
        r = self.rng.random()
        if stale and r < 0.3:
            self._call("Remove", stub.Remove, pb.RemoveSnapshotRequest(key=self.rng.choice(stale)))
        elif leaves and (len(infos) > MAX_SNAPSHOTS or r < 0.4):
            self._call("Remove", stub.Remove, pb.RemoveSnapshotRequest(key=self.rng.choice(leaves)))
        elif committed and r < 0.5:
            snap = self.rng.choice(committed)
            labels = {**snap.labels, "lazystore.test/touched": str(self._n)}
            self._call("Update", stub.Update, pb.UpdateSnapshotRequest(
                info=pb.Info(name=snap.name, labels=labels)))
        elif parents and r < 0.6:
            key = self._key("view")
            self._call("View", stub.View, pb.ViewSnapshotRequest(
                key=key, parent=self.rng.choice(parents)))
            self._call("Remove", stub.Remove, pb.RemoveSnapshotRequest(key=key))
        else:
            self._layer(stub, self.rng.choice(["", *parents]))

    def _layer(self, stub: pb_grpc.SnapshotsStub, parent: str) -> None:
        key = self._key("extract")
        resp = self._call("Prepare", stub.Prepare,
                          pb.PrepareSnapshotRequest(key=key, parent=parent))
        upper = _upper(list(resp.mounts))  # type: ignore[attr-defined]
        self.current = "write"
        for rel, data in layer_files(key).items():
            (upper / rel).parent.mkdir(parents=True, exist_ok=True)
            (upper / rel).write_bytes(data)
        self._call("Commit", stub.Commit, pb.CommitSnapshotRequest(
            name=self._key("layer"), key=key, labels={KEY_LABEL: key}))


def _depths(infos: list) -> dict[str, int]:
    parent = {i.name: i.parent for i in infos}
    out: dict[str, int] = {}
    for name in parent:
        n, p = 1, parent[name]
        while p and n <= len(parent):
            n, p = n + 1, parent.get(p, "")
        out[name] = n
    return out


def check_served(stub: pb_grpc.SnapshotsStub, root: Path, scratch: Path) -> list[str]:
    """What is wrong with a (re)started snapshotter: a directory no row owns,
    or a snapshot that does not mount or does not show its chain's files."""
    rows = read_rows(root / "metadata.db")
    ids = {r.id for r in rows}
    problems = [f"directory {p.name} has no row (not removed at start)"
                for p in (root / "snapshots").iterdir()
                if not (p.name.isdigit() and int(p.name) in ids)]
    by_id = {r.id: r for r in rows}
    for row in rows:
        if row.kind == Kind.COMMITTED:
            key = f"check-{row.id}"
            resp = stub.View(pb.ViewSnapshotRequest(key=key, parent=row.key), timeout=30)
            try:
                problems += _check_mount(list(resp.mounts), _chain(row, by_id), scratch,
                                         f"view of {row.key!r}")
            finally:
                stub.Remove(pb.RemoveSnapshotRequest(key=key), timeout=30)
        elif row.kind == Kind.ACTIVE:
            resp = stub.Mounts(pb.MountsRequest(key=row.key), timeout=30)
            parent = by_id.get(row.parent_id) if row.parent_id is not None else None
            chain = _chain(parent, by_id) if parent else []
            # its own layer may be half written: its top is not checked
            problems += _check_mount(list(resp.mounts), chain, scratch, f"active {row.key!r}",
                                     top=False)
    return problems


def _chain(row: Row, by_id: dict[int, Row]) -> list[str]:
    """The layer keys of *row* and its ancestors, nearest first."""
    keys: list[str] = []
    cur: Row | None = row
    while cur is not None:
        if key := cur.labels.get(KEY_LABEL):
            keys.append(key)
        cur = by_id.get(cur.parent_id) if cur.parent_id is not None else None
    return keys


@contextmanager
def mounted(mounts: list, scratch: Path) -> Iterator[Path]:
    """The one mount of a snapshot (its gRPC ``Mount`` messages, as containerd
    mounts them) on a new directory below *scratch*; CalledProcessError if it
    does not mount."""
    target = Path(tempfile.mkdtemp(dir=scratch))
    try:
        (m,) = mounts
        kind = [] if m.type == "bind" else ["-t", m.type]
        subprocess.run(["mount", *kind, "-o", ",".join(m.options), m.source, str(target)],
                       check=True, capture_output=True, text=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        target.rmdir()


def _check_mount(mounts: list, chain: list[str], scratch: Path, where: str,
                 top: bool = True) -> list[str]:
    """Mount *mounts* below *scratch*: the files of the layers *chain* (keys,
    nearest first) must be there, and with *top* the nearest layer's ``top``."""
    try:
        with mounted(mounts, scratch) as target:
            out = []
            for key in chain:
                want = layer_files(key)
                want.pop("top")
                out += compare(target, want, where)
            if chain and top:
                out += compare(target, {"top": chain[0].encode()}, where)
            return out
    except subprocess.CalledProcessError as exc:
        return [f"{where} does not mount: {exc.stderr.strip()}"]


@dataclass
class LoopResult:
    kills: int = 0
    problems: list[str] = field(default_factory=list)
    # calls workers were in at the kills ("write": writing a layer between its
    # Prepare and its Commit), and directories a kill left without a row
    in_flight: Counter[str] = field(default_factory=Counter)
    orphans_left: int = 0
    kills_leaving_orphans: int = 0
    calls: int = 0
    snapshots_max: int = 0
    # from each kill to the new process answering a List
    serve_again: list[float] = field(default_factory=list)


def crash_loop(base: Path, kills: int, seed: int = 0, workers: int = 3,
               max_delay: float = 1.5, progress: Callable[[int, LoopResult], None] | None = None,
               ) -> LoopResult:
    """Start the snapshotter on *base*/sn, let *workers* work on it for a random
    while (up to *max_delay* s), SIGKILL it, check, *kills* times."""
    rng = random.Random(seed)
    root, address = base / "sn", base / "sn.sock"
    scratch = base / "mnt"
    scratch.mkdir(parents=True, exist_ok=True)
    result = LoopResult()
    killed_at: float | None = None
    for i in range(kills + 1):
        with snapshotter_process(root, address, base / "no-daemon.sock", base / "no-mount",
                                 log_file=base / "snapshotter.log") as proc:
            with grpc.insecure_channel(f"unix:{address}") as channel:
                stub = pb_grpc.SnapshotsStub(channel)
                list(stub.List(pb.ListSnapshotsRequest(), timeout=30))
                if killed_at is not None:
                    result.serve_again.append(time.monotonic() - killed_at)
                result.problems += [f"after kill {i}: {p}"
                                    for p in check_served(stub, root, scratch)]
            if i == kills:
                break
            crew = [Worker(address, f"r{i}.w{w}", random.Random(rng.random()))
                    for w in range(workers)]
            for w in crew:
                w.start()
            time.sleep(rng.uniform(0.05, max_delay))
            result.in_flight.update(w.current or "between calls" for w in crew)
            proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            proc.wait()
            for w in crew:
                w.stop.set()
            for w in crew:
                w.join(60)
                result.problems += [f"kill {i + 1}: {e}" for e in w.errors]
                result.calls += sum(w.calls.values())
        result.kills += 1
        problems, orphans = check_files(root)
        result.problems += [f"kill {i + 1}: {p}" for p in problems]
        result.orphans_left += orphans
        result.kills_leaving_orphans += orphans > 0
        result.snapshots_max = max(result.snapshots_max, len(read_rows(root / "metadata.db")))
        if progress:
            progress(i + 1, result)
    return result
