"""Access profiles: which store paths and files a program read first, in order.

Free of I/O. The daemon records one per view and one for its root
(:class:`Recorder`, fed by the Vfs's first opens during ``WINDOW`` seconds
after the first); ``lazystore profile save`` writes it as JSON; ``lazystore
prefetch --profile`` and a view made with one fetch its paths ahead of use.

The document (version 1)::

    {"lazystore-profile": 1,
     "window": 60.0,                      # seconds recorded after the first read
     "reads": [{"path": "<hash>-<name>",  # store path basename
                "file": "bin/python3",    # inside it ("" for the path itself)
                "size": 12345,            # bytes of that file
                "at": 0.012}, ...]}       # seconds after the first read

A profile read back is untrusted input: at most ``MAX_BYTES`` of JSON and
``MAX_READS`` reads, and, given the closure it is for, only paths of that
closure (the others are dropped and named in the result's ``ignored``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lazystore.errors import LazystoreError
from lazystore.nix.storepath import is_valid_basename

VERSION = 1
WINDOW = 60.0
MAX_BYTES = 10 << 20
MAX_READS = 50_000
MAX_PATHS = 10_000  # store paths a view fetches ahead


class ProfileError(LazystoreError):
    """A profile that cannot be used (too large, not a profile)."""


@dataclass(frozen=True, slots=True)
class Read:
    path: str
    file: str
    size: int
    at: float


class Recorder:
    """First reads from the first one on, for *window* seconds, each (path,
    file) once and at most ``MAX_READS``."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self.reads: list[Read] = []
        self._start: float | None = None
        self._seen: set[tuple[str, str]] = set()

    def read(self, path: str, file: str, size: int, now: float) -> None:
        if self._start is None:
            self._start = now
        at = now - self._start
        if at > self.window or len(self.reads) >= MAX_READS or (path, file) in self._seen:
            return
        self._seen.add((path, file))
        self.reads.append(Read(path, file, size, round(at, 6)))

    def document(self) -> dict[str, Any]:
        return {"lazystore-profile": VERSION, "window": self.window,
                "reads": [{"path": r.path, "file": r.file, "size": r.size, "at": r.at}
                          for r in self.reads]}


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1).encode() + b"\n"


@dataclass
class Profile:
    reads: list[Read]
    ignored: list[str] = field(default_factory=list)  # paths outside the closure

    @property
    def paths(self) -> list[str]:
        """The store paths in the order they were first read."""
        return list(dict.fromkeys(r.path for r in self.reads))


def parse(data: bytes, closure: set[str] | None = None) -> Profile:
    """The profile in *data*; with *closure* (basenames), only its paths."""
    if len(data) > MAX_BYTES:
        raise ProfileError(f"the profile is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"the profile is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("lazystore-profile") != VERSION:
        raise ProfileError(f"not a lazystore profile of version {VERSION}")
    rows = doc.get("reads")
    if not isinstance(rows, list):
        raise ProfileError("the profile has no list of reads")
    if len(rows) > MAX_READS:
        raise ProfileError(f"the profile has {len(rows)} reads, more than {MAX_READS}")
    reads, ignored = [], []
    for i, row in enumerate(rows):
        read = _read(row)
        if read is None:
            raise ProfileError(f"read {i} of the profile is not a path, file, size and time")
        if closure is not None and read.path not in closure:
            ignored.append(read.path)
            continue
        reads.append(read)
    return Profile(reads, list(dict.fromkeys(ignored)))


def _read(row: object) -> Read | None:
    if not isinstance(row, dict):
        return None
    path, file, size, at = (row.get(k) for k in ("path", "file", "size", "at"))
    if not (isinstance(path, str) and is_valid_basename(path) and isinstance(file, str)
            and isinstance(size, int) and size >= 0 and isinstance(at, (int, float))):
        return None
    return Read(path, file, size, float(at))


# -- "ahead" entries: what an image's label or a view's prefetch names -------
# An entry is a store path basename (fetch the whole path) or BASENAME/FILE
# (one file of it: its chunks where the cache offers a file index, else the
# whole path), in the order a start reads them.


def ahead_entry(path: str, file: str = "") -> str:
    """The entry naming *file* of store path *path* ("" for the path itself)."""
    return f"{path}/{file}" if file else path


def parse_ahead(entry: str) -> tuple[str, str] | None:
    """(basename, file) of an untrusted entry, None if it is not one: the
    basename a store path's, the file a plain relative path (no empty, ``.``
    or ``..`` part, no NUL)."""
    path, _, file = entry.partition("/")
    if not is_valid_basename(path):
        return None
    if file and ("\0" in file or any(p in ("", ".", "..") for p in file.split("/"))):
        return None
    return path, file


def ahead_files(entries: list[tuple[str, str]]) -> tuple[list[str], dict[str, list[str]]]:
    """The store paths of parsed *entries* in order, each once, and for those
    named only by files, their files (in order): the arguments of a
    prefetch that fetches those files' chunks and the other paths whole."""
    paths = list(dict.fromkeys(p for p, _ in entries))
    whole = {p for p, f in entries if not f}
    files: dict[str, list[str]] = {}
    for path, file in entries:
        if path not in whole:
            files.setdefault(path, [])
            if file not in files[path]:
                files[path].append(file)
    return paths, files
