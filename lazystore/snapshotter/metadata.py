"""Snapshot metadata in sqlite: one row per snapshot, survives restarts.

Every change is one transaction (``with store.transaction():``); directories
on disk are named by the row id, so a crash between the filesystem and the
database leaves at most an orphan directory, which Cleanup or the next start
removes.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from lazystore.errors import SnapshotterError


class Kind(IntEnum):
    """Values of containerd's ``Kind`` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        return self.name.lower()


@dataclass
class Snapshot:
    id: int
    key: str
    parent_id: int | None
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0
    # A nix layer: the store paths (full paths) or closure-info path of its view.
    nix_paths: list[str] | None = None
    nix_closure: str | None = None
    # True when the view *is* the layer's content (made from labels, nothing unpacked).
    remote: bool = False

    @property
    def is_nix(self) -> bool:
        return bool(self.nix_paths) or bool(self.nix_closure)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    labels      TEXT NOT NULL DEFAULT '{}',
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    nix_paths   TEXT,
    nix_closure TEXT,
    remote      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_COLUMNS = (
    "id, key, parent_id, kind, created_ns, updated_ns, labels, size, inodes,"
    " nix_paths, nix_closure, remote"
)


def _row(row: tuple) -> Snapshot:
    (id_, key, parent_id, kind, created, updated, labels, size, inodes, paths, closure,
     remote) = row
    return Snapshot(
        id_, key, parent_id, Kind(kind), created, updated, json.loads(labels), size, inodes,
        json.loads(paths) if paths is not None else None, closure, bool(remote),
    )


class MetaStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            # Random, once per database: snapshot ids start again at 1 in a new
            # database, and views named after them must not meet a previous
            # database's views still in a running daemon.
            self._db.execute(
                "INSERT OR IGNORE INTO settings (name, value) VALUES ('instance', ?)",
                (secrets.token_hex(8),),
            )
            self.instance: str = self._db.execute(
                "SELECT value FROM settings WHERE name = 'instance'"
            ).fetchone()[0]
        except sqlite3.Error as exc:
            raise SnapshotterError(f"snapshot metadata {path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All statements inside commit together or not at all.

        A failing COMMIT (disk full, I/O error) rolls back too, so that the
        connection never stays inside a transaction; sqlite errors become one
        SnapshotterError line.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SnapshotterError(f"snapshot metadata {self.path}: {exc}") from None

    def get(self, key: str) -> Snapshot | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,))
        row = cur.fetchone()
        return _row(row) if row else None

    def by_id(self, id_: int) -> Snapshot:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (id_,))
        return _row(cur.fetchone())

    def all(self) -> list[Snapshot]:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id")
        return [_row(r) for r in cur.fetchall()]

    def ids(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def has_children(self, id_: int) -> bool:
        cur = self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (id_,))
        return cur.fetchone() is not None

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """The ancestors of *snap*, nearest parent first."""
        out: list[Snapshot] = []
        parent_id = snap.parent_id
        while parent_id is not None:
            parent = self.by_id(parent_id)
            out.append(parent)
            parent_id = parent.parent_id
        return out

    def insert(
        self,
        key: str,
        parent_id: int | None,
        kind: Kind,
        labels: dict[str, str],
        nix_paths: list[str] | None = None,
        nix_closure: str | None = None,
        remote: bool = False,
    ) -> Snapshot:
        now = time.time_ns()
        cur = self._db.execute(
            "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels,"
            " nix_paths, nix_closure, remote) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), now, now, json.dumps(labels),
             json.dumps(nix_paths) if nix_paths is not None else None, nix_closure, int(remote)),
        )
        assert cur.lastrowid is not None
        return self.by_id(cur.lastrowid)

    def commit(
        self, snap: Snapshot, name: str, labels: dict[str, str], size: int, inodes: int,
        nix_paths: list[str] | None,
    ) -> Snapshot:
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, labels = ?,"
            " size = ?, inodes = ?, nix_paths = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, json.dumps(labels), size, inodes,
             json.dumps(nix_paths) if nix_paths is not None else None, snap.id),
        )
        return self.by_id(snap.id)

    def set_labels(self, snap: Snapshot, labels: dict[str, str]) -> Snapshot:
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(labels), time.time_ns(), snap.id),
        )
        return self.by_id(snap.id)

    def delete(self, snap: Snapshot) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
