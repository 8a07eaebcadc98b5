"""The ``.ls`` listing of a binary cache, written and read; free of I/O.

Nix publishes, next to a NAR (``write-nar-listing``), a JSON document of its
tree: ``{"version": 1, "root": node}``, where a regular node has ``size``,
``executable`` (only when true) and ``narOffset``, a symlink ``target`` and a
directory ``entries``. :func:`from_nar` builds it from a NAR and
:func:`to_json` writes it byte for byte as Nix does; :func:`parse` and
:func:`events` read one a cache served, as the NAR parser's events (without
contents), so whoever builds a tree from a NAR builds it from a listing the
same way. Every malformed listing is a :class:`ListingError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from lazystore.errors import FormatError, NarError
from lazystore.nix import nar
from lazystore.nix.nar import DirEnd, DirStart, Event, FileData, FileEnd, FileStart, Symlink


class ListingError(FormatError):
    """A ``.ls`` document that is not a listing of a NAR."""


# --- writing ----------------------------------------------------------------


def decode_name(name: bytes) -> str:
    """Entry names as JSON strings: UTF-8, other bytes kept via surrogateescape."""
    return name.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def from_nar(chunks: Iterable[bytes], allow_trailing: bool = False) -> dict[str, Any]:
    """The ``.ls`` document of a NAR given as chunks (NarError if it is not
    one); *allow_trailing* as for :func:`nar.parse`."""
    root: dict[str, Any] | None = None
    stack: list[dict[str, Any]] = []
    for event in nar.parse(chunks, allow_trailing):
        if isinstance(event, (FileData, FileEnd)):
            continue
        if isinstance(event, DirEnd):
            stack.pop()
            continue
        node: dict[str, Any]
        if isinstance(event, FileStart):
            node = {"type": "regular", "size": event.size}
            if event.executable:
                node["executable"] = True
            node["narOffset"] = event.offset
        elif isinstance(event, Symlink):
            node = {"type": "symlink", "target": decode_name(event.target)}
        else:
            node = {"type": "directory", "entries": {}}
        if event.name is None:
            root = node
        else:
            stack[-1][decode_name(event.name)] = node
        if isinstance(event, DirStart):
            stack.append(node["entries"])
    return {"version": 1, "root": root}


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_string(text: str) -> str:
    out = []
    for c in text:
        if c in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[c])
        elif c < " ":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


@dataclass(slots=True)
class _Raw:
    text: str


def to_json(value: object) -> bytes:
    """JSON exactly as Nix 2.8 writes listings: compact, keys in order, UTF-8
    unescaped, control characters as \\n \\r \\t or \\u00XX. Iterative."""
    out: list[str] = []
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            out.append(item.text)
        elif isinstance(item, dict):
            out.append("{")
            pieces: list[object] = []
            for i, (key, sub) in enumerate(item.items()):
                pieces += [_Raw(("," if i else "") + _json_string(key) + ":"), sub]
            pieces.append(_Raw("}"))
            stack.extend(reversed(pieces))
        elif isinstance(item, str):
            out.append(_json_string(item))
        elif item is True or item is False:
            out.append("true" if item else "false")
        elif isinstance(item, int):
            out.append(str(item))
        else:
            raise TypeError(f"cannot write {type(item).__name__} as listing JSON")
    return "".join(out).encode("utf-8", "surrogateescape")


# --- reading ----------------------------------------------------------------


def parse(data: bytes) -> dict[str, Any]:
    """The document of a ``.ls`` file: JSON with a ``root`` object. Names and
    targets that are not UTF-8 are there as their raw bytes (Nix writes them
    so, as :func:`to_json` does) and are read back surrogate-escaped."""
    try:
        document = json.loads(data.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as exc:
        raise ListingError(f"malformed listing: {str(exc)[:200]}") from None
    _root(document)
    return document  # type: ignore[no-any-return]


def _root(document: Any) -> dict[str, Any]:
    if not isinstance(document, dict) or not isinstance(document.get("root"), dict):
        raise ListingError("malformed listing: no 'root' object")
    if document.get("version", 1) != 1:
        raise ListingError(f"malformed listing: version {str(document['version'])[:20]}")
    return document["root"]  # type: ignore[no-any-return]


def events(document: Any, max_depth: int = nar.MAX_DEPTH) -> Iterator[Event]:
    """The events a NAR with this listing's tree gives (no FileData; entries
    in NAR order), checking every node as the NAR parser checks a NAR;
    ListingError for anything else. Iterative, so no depth exhausts the stack."""
    def visit(name: bytes | None, node: Any, depth: int) -> tuple[list[Event], Any]:
        if not isinstance(node, dict):
            raise ListingError("malformed listing: a node is not an object")
        kind = node.get("type")
        if kind == "directory":
            if depth >= max_depth:
                raise ListingError(f"malformed listing: deeper than {max_depth} directories")
            return [DirStart(name)], _entries(node)
        if kind == "regular":
            return [_file(name, node), FileEnd()], None
        if kind == "symlink":
            return [Symlink(name, _target(node.get("target")))], None
        raise ListingError(f"malformed listing: unknown node type {str(kind)[:40]!r}")

    return nar.walk(_root(document), visit)


def _entries(node: dict[str, Any]) -> list[tuple[bytes, Any]]:
    raw = node.get("entries", {})
    if not isinstance(raw, dict):
        raise ListingError("malformed listing: directory entries are not an object")
    return sorted((_name(n), child) for n, child in raw.items())


def _name(name: str) -> bytes:
    data = encode_name(name)
    try:
        nar.check_name(data)
    except NarError:
        raise ListingError(f"malformed listing: invalid file name {nar.show(data)}") from None
    return data


def _target(target: Any) -> bytes:
    if not isinstance(target, str):
        raise ListingError("malformed listing: a symlink without a target")
    data = encode_name(target)
    try:
        nar.check_target(data)
    except NarError:
        raise ListingError(f"malformed listing: bad symlink target {nar.show(data)}") from None
    return data


def _file(name: bytes | None, node: dict[str, Any]) -> FileStart:
    size, executable = node.get("size", 0), node.get("executable", False)
    offset = node.get("narOffset", 0)
    for value in (size, offset):
        if type(value) is not int or value < 0:
            raise ListingError(f"malformed listing: bad file size or offset {str(value)[:20]}")
    if type(executable) is not bool:
        raise ListingError("malformed listing: 'executable' is not a boolean")
    return FileStart(name, executable, size, offset)
