"""NAR, the Nix ARchive: a sans-I/O streaming parser and a writer.

A NAR is a sequence of strings, each an 8-byte little-endian length followed by
the bytes and zero padding to a multiple of 8::

    nar       = "nix-archive-1" node
    node      = "(" "type" ( regular | symlink | directory ) ")"
    regular   = "regular" [ "executable" "" ] "contents" <data>
    symlink   = "symlink" "target" <target>
    directory = "directory" { "entry" "(" "name" <name> "node" node ")" }

:class:`NarParser` turns bytes, fed in chunks of any size, into :data:`Event`
objects. It never buffers more than one token (file contents are handed out as
views of the fed chunk, never gathered), never allocates from a declared
length, keeps its own stack instead of recursing, and rejects everything Nix
rejects with a :class:`NarError`. :class:`NarWriter` turns the same events back
into bytes. The ``.ls`` listing of a NAR is in :mod:`lazystore.nix.listing`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from lazystore.errors import NarError

MAGIC = b"nix-archive-1"
NAME_MAX = 255  # longest entry name (bytes), as on Linux
TARGET_MAX = 4095  # longest symlink target (bytes), as on Linux
MAX_DEPTH = 10_000  # deepest directory nesting accepted
_TAG_MAX = 64  # tags longer than this cannot be right; reported by length only


def encode_string(value: bytes) -> bytes:
    """One NAR string: length, bytes, zero padding to a multiple of 8."""
    return len(value).to_bytes(8, "little") + value + bytes(-len(value) % 8)


_S = encode_string
_OPEN, _CLOSE = _S(b"("), _S(b")")
_ENTRY_START = _S(b"entry") + _OPEN + _S(b"name")
_NODE = _S(b"node")
_TYPE_REGULAR = _OPEN + _S(b"type") + _S(b"regular")
_TYPE_SYMLINK = _OPEN + _S(b"type") + _S(b"symlink") + _S(b"target")
_TYPE_DIRECTORY = _OPEN + _S(b"type") + _S(b"directory")
_EXECUTABLE = _S(b"executable") + _S(b"")
_CONTENTS = _S(b"contents")
_ZEROS = bytes(8)


# --- events -----------------------------------------------------------------
# `name` is the entry name in the enclosing directory, or None for the root.


@dataclass(slots=True)
class DirStart:
    name: bytes | None


@dataclass(slots=True)
class DirEnd:
    pass


@dataclass(slots=True)
class FileStart:
    name: bytes | None
    executable: bool
    size: int
    offset: int = 0  # NAR offset of the first content byte ("narOffset")


@dataclass(slots=True)
class FileData:
    data: bytes | memoryview  # a view of the fed chunk: use it before the next feed


@dataclass(slots=True)
class FileEnd:
    pass


@dataclass(slots=True)
class Symlink:
    name: bytes | None
    target: bytes


Event = DirStart | DirEnd | FileStart | FileData | FileEnd | Symlink


def show(name: bytes) -> str:
    """A NAR string for messages: quoted, undecodable bytes escaped, shortened."""
    text = name[:80].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(name) > 80 else ""))


def check_name(name: bytes) -> None:
    """Raise NarError unless *name* may be a directory entry."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise NarError(f"NAR contains invalid file name {show(name)}")
    if len(name) > NAME_MAX:
        raise NarError(f"NAR contains a file name of {len(name)} bytes (at most {NAME_MAX})")


def check_target(target: bytes) -> None:
    if not target:
        raise NarError("NAR contains a symlink with an empty target")
    if b"\0" in target:
        raise NarError(f"NAR contains a symlink target with a NUL byte: {show(target)}")
    if len(target) > TARGET_MAX:
        raise NarError(
            f"NAR contains a symlink target of {len(target)} bytes (at most {TARGET_MAX})"
        )


# --- parser -----------------------------------------------------------------

# Parser states: what comes next.
(
    _MAGIC, _NODE_OPEN, _TYPE_KEY, _TYPE_VALUE, _REGULAR_FIELD, _EXECUTABLE_VALUE,
    _CONTENTS_KEY, _CONTENTS_SIZE, _DATA, _PADDING, _NODE_CLOSE, _TARGET_KEY,
    _TARGET, _DIR_FIELD, _ENTRY_OPEN, _NAME_KEY, _NAME, _NODE_KEY, _ENTRY_CLOSE, _DONE,
) = range(20)

_WANTED = {
    _MAGIC: "the NAR magic", _NODE_OPEN: "'('", _TYPE_KEY: "'type'",
    _TYPE_VALUE: "a file type", _REGULAR_FIELD: "'contents'", _EXECUTABLE_VALUE: "''",
    _CONTENTS_KEY: "'contents'", _CONTENTS_SIZE: "a file size", _DATA: "file contents",
    _PADDING: "padding", _NODE_CLOSE: "')'", _TARGET_KEY: "'target'",
    _TARGET: "a symlink target", _DIR_FIELD: "'entry' or ')'", _ENTRY_OPEN: "'('",
    _NAME_KEY: "'name'", _NAME: "a file name", _NODE_KEY: "'node'", _ENTRY_CLOSE: "')'",
}

# Tags expected in a state where only one is valid: (encoded, text).
_EXPECTED = {
    _NODE_OPEN: (_OPEN, "("), _TYPE_KEY: (_S(b"type"), "type"),
    _CONTENTS_KEY: (_CONTENTS, "contents"), _NODE_CLOSE: (_CLOSE, ")"),
    _TARGET_KEY: (_S(b"target"), "target"), _ENTRY_OPEN: (_OPEN, "("),
    _NAME_KEY: (_S(b"name"), "name"), _NODE_KEY: (_NODE, "node"),
    _ENTRY_CLOSE: (_CLOSE, ")"),
}
# Where each expected tag leads.
_AFTER = {
    _NODE_OPEN: _TYPE_KEY, _TYPE_KEY: _TYPE_VALUE, _CONTENTS_KEY: _CONTENTS_SIZE,
    _TARGET_KEY: _TARGET, _ENTRY_OPEN: _NAME_KEY, _NAME_KEY: _NAME, _ENTRY_CLOSE: _DIR_FIELD,
    _NODE_KEY: _NODE_OPEN,
}
# Frequent token sequences, checked first in one comparison each:
# state -> ((encoded tokens, state after them, executable flag to set or None), ...)
_SHORTCUTS = {
    _NODE_KEY: (
        (_NODE + _TYPE_REGULAR + _CONTENTS, _CONTENTS_SIZE, False),
        (_NODE + _TYPE_REGULAR + _EXECUTABLE + _CONTENTS, _CONTENTS_SIZE, True),
    ),
    _NODE_CLOSE: ((_CLOSE + _CLOSE, _DIR_FIELD, None),),  # only inside a directory
}
_REGULAR_HEADERS = (
    (_TYPE_REGULAR + _CONTENTS, False), (_TYPE_REGULAR + _EXECUTABLE + _CONTENTS, True),
)
_MAGIC_STRING = _S(MAGIC)
_LIMITS = {_NAME: NAME_MAX, _TARGET: TARGET_MAX}
_TYPES = {b"regular": _REGULAR_FIELD, b"symlink": _TARGET_KEY, b"directory": _DIR_FIELD}


class NarParser:
    """Streaming NAR parser: ``feed(chunk) -> [events]`` any number of times, then
    ``close()``. Raises NarError at the first byte Nix would reject. Bytes after
    the end of the NAR are an error too, unless *allow_trailing* (as
    ``nix-store --restore`` and ``nix nar ls/cat``, which never look past the
    end): then they are ignored and ``offset`` stays the NAR's size."""

    def __init__(self, max_depth: int = MAX_DEPTH, allow_trailing: bool = False) -> None:
        self._state = _MAGIC
        self._pending = b""  # an incomplete token carried over to the next feed
        self._base = 0  # NAR offset of the current buffer's first byte
        self._left = 0  # content bytes still to come
        self._padding = 0
        self._executable = False
        self._name: bytes | None = None  # name of the node being parsed
        self._previous: list[bytes] = []  # per open directory: its last entry name
        self._max_depth = max_depth
        self._allow_trailing = allow_trailing

    @property
    def done(self) -> bool:
        """True once the root node is complete."""
        return self._state == _DONE

    @property
    def offset(self) -> int:
        """Bytes parsed so far (a token split across feeds counts once complete)."""
        return self._base

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._state == _DONE:
            if data and not self._allow_trailing:
                self._fail(0, "trailing data after the end of the NAR")
            return []
        events: list[Event] = []
        if self._state == _DATA and not self._pending:
            # File contents straight from the caller's buffer, without a copy.
            view = memoryview(data).cast("B")
            n = min(self._left, len(view))
            if n:
                events.append(FileData(view[:n]))
                self._left -= n
                self._base += n
            if n == len(view):
                if not self._left:
                    self._state = _PADDING
                return events
            data = view[n:]
        if self._pending:
            buf = self._pending + bytes(data)
        else:
            buf = data if type(data) is bytes else bytes(data)
        pos = self._parse(buf, events)
        self._pending = buf[pos:] if self._state != _DONE else b""  # trailing bytes dropped
        self._base += pos
        return events

    def close(self) -> None:
        """Raise NarError unless the NAR was complete."""
        if self._state == _DONE:
            return
        at = self._base + len(self._pending)
        if self._state == _DATA:
            what = f"{self._left} bytes of file contents missing"
        else:
            what = f"expected {_WANTED[self._state]}"
        raise NarError(f"NAR is truncated: unexpected end at byte {at} ({what})")

    def _parse(self, buf: bytes, events: list[Event]) -> int:
        """Parse as much of buf as possible; return the position reached."""
        pos, end = 0, len(buf)
        while pos < end or self._state in (_DATA, _PADDING):
            state = self._state
            if state == _DONE:
                if self._allow_trailing:
                    return pos
                self._fail(pos, "trailing data after the end of the NAR")
            if state == _DATA:
                n = min(self._left, end - pos)
                if n:
                    events.append(FileData(memoryview(buf)[pos:pos + n]))
                    pos += n
                    self._left -= n
                if self._left:
                    return pos
                self._state = _PADDING
            elif state == _PADDING:
                pad = self._padding
                if end - pos < pad:
                    return pos
                if buf[pos:pos + pad] != _ZEROS[:pad]:
                    self._fail(pos, "non-zero padding after file contents")
                pos += pad
                events.append(FileEnd())
                self._state = _NODE_CLOSE
            else:
                new = self._shortcut(state, buf, pos, events)
                if new < 0:
                    new = self._step(state, buf, pos, events)
                    if new < 0:
                        return pos
                pos = new
        return pos

    def _shortcut(self, state: int, buf: bytes, pos: int, events: list[Event]) -> int:
        """Skip a frequent token sequence in a few comparisons (for speed only);
        -1 to leave it to the token-by-token path, which also reports errors."""
        if state == _DIR_FIELD:
            return self._entry_shortcut(buf, pos, events)
        if state in _SHORTCUTS and (state != _NODE_CLOSE or self._previous):
            for encoded, after, executable in _SHORTCUTS[state]:
                if buf.startswith(encoded, pos):
                    self._state = after
                    if executable is not None:
                        self._executable = executable
                    return pos + len(encoded)
        return -1

    def _entry_shortcut(self, buf: bytes, pos: int, events: list[Event]) -> int:
        """A directory entry's head: 'entry' '(' 'name' <name> 'node' and, for a
        regular file, its header up to the size, when all of it is in buf."""
        if not buf.startswith(_ENTRY_START, pos):
            return -1
        at = pos + len(_ENTRY_START)
        length = int.from_bytes(buf[at:at + 8], "little")
        start, end = at + 8, at + 8 + length + (-length % 8)
        if len(buf) - at < 8 or length > NAME_MAX or not buf.startswith(_NODE, end):
            return -1
        name = buf[start:start + length]
        if (
            buf[start + length:end] != _ZEROS[:end - start - length]
            or not name or name in (b".", b"..") or b"/" in name or b"\0" in name
            or name <= self._previous[-1]
        ):
            return -1
        self._previous[-1] = self._name = name
        at = end + len(_NODE)
        for header, executable in _REGULAR_HEADERS:
            if buf.startswith(header, at) and len(buf) - at >= len(header) + 8:
                at += len(header)
                size = int.from_bytes(buf[at:at + 8], "little")
                events.append(FileStart(name, executable, size, self._base + at + 8))
                self._executable, self._left, self._padding = executable, size, -size % 8
                self._state = _DATA
                return at + 8
        self._state = _NODE_OPEN
        return at

    def _step(self, state: int, buf: bytes, pos: int, events: list[Event]) -> int:
        """Consume one token; the new position, or -1 if buf has only part of it."""
        if state == _MAGIC:
            head = buf[pos:pos + len(_MAGIC_STRING)]
            if not _MAGIC_STRING.startswith(head):
                self._fail(pos, "not a NAR (bad magic)")
            if len(head) < len(_MAGIC_STRING):
                return -1
            self._state = _NODE_OPEN
            return pos + len(head)
        if state in _EXPECTED:
            encoded, text = _EXPECTED[state]
            if buf.startswith(encoded, pos):
                self._after_tag(state)
                return pos + len(encoded)
            got = self._token(buf, pos, _TAG_MAX, tag=True)
            if got is None:
                return -1
            self._fail(pos, f"expected tag {text!r}, got {show(got[0])}")
        return self._field(state, buf, pos, events)

    def _after_tag(self, state: int) -> None:
        if state == _NODE_CLOSE:
            self._node_end()
        else:
            self._state = _AFTER[state]

    def _node_end(self) -> None:
        self._state = _ENTRY_CLOSE if self._previous else _DONE

    def _field(self, state: int, buf: bytes, pos: int, events: list[Event]) -> int:
        """States whose token is a value or one of several tags."""
        if state == _CONTENTS_SIZE:
            if len(buf) - pos < 8:
                return -1
            size = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
            events.append(FileStart(self._name, self._executable, size, self._base + pos))
            self._left, self._padding, self._state = size, -size % 8, _DATA
            return pos
        limit = _LIMITS.get(state, _TAG_MAX)
        got = self._token(buf, pos, limit, tag=state not in (_NAME, _TARGET))
        if got is None:
            return -1
        value, new = got
        if state == _TYPE_VALUE:
            self._type(value, pos, events)
        elif state == _REGULAR_FIELD:
            if value == b"executable":
                self._executable, self._state = True, _EXECUTABLE_VALUE
            elif value == b"contents":
                self._state = _CONTENTS_SIZE
            else:
                self._fail(pos, f"expected tag 'contents', got {show(value)}")
        elif state == _EXECUTABLE_VALUE:
            if value:
                self._fail(pos, f"executable marker has non-empty value {show(value)}")
            self._state = _CONTENTS_KEY
        elif state == _TARGET:
            self._check(check_target, value, pos)
            events.append(Symlink(self._name, value))
            self._state = _NODE_CLOSE
        elif state == _DIR_FIELD:
            self._dir_field(value, pos, events)
        elif state == _NAME:
            self._entry_name(value, pos)
        return new

    def _type(self, value: bytes, pos: int, events: list[Event]) -> None:
        state = _TYPES.get(value)
        if state is None:
            self._fail(pos, f"unknown file type {show(value)}")
        self._state = state
        self._executable = False
        if state == _DIR_FIELD:
            if len(self._previous) >= self._max_depth:
                self._fail(pos, f"NAR nests directories deeper than {self._max_depth} levels")
            self._previous.append(b"")
            events.append(DirStart(self._name))

    def _dir_field(self, value: bytes, pos: int, events: list[Event]) -> None:
        if value == b"entry":
            self._state = _ENTRY_OPEN
        elif value == b")":
            self._previous.pop()
            events.append(DirEnd())
            self._node_end()
        else:
            self._fail(pos, f"expected tag 'entry' or ')', got {show(value)}")

    def _entry_name(self, name: bytes, pos: int) -> None:
        self._check(check_name, name, pos)
        previous = self._previous[-1]
        if name <= previous:
            what = "duplicate entry" if name == previous else "entry"
            self._fail(
                pos, f"NAR directory is not sorted: {what} {show(name)} after {show(previous)}"
            )
        self._previous[-1] = self._name = name
        self._state = _NODE_KEY

    def _token(self, buf: bytes, pos: int, limit: int, tag: bool) -> tuple[bytes, int] | None:
        """The string at *pos* and the position after it, or None if incomplete."""
        if len(buf) - pos < 8:
            return None
        length = int.from_bytes(buf[pos:pos + 8], "little")
        if length > limit:
            if tag:
                self._fail(pos, f"expected {_WANTED[self._state]}, got a string of {length} bytes")
            wanted = _WANTED[self._state]
            self._fail(pos, f"{wanted} of {length} bytes is too long (at most {limit})")
        start, pad = pos + 8, -length % 8
        if len(buf) - start < length + pad:
            return None
        if buf[start + length:start + length + pad] != _ZEROS[:pad]:
            self._fail(start + length, "non-zero padding after a string")
        return buf[start:start + length], start + length + pad

    def _check(self, check: Callable[[bytes], None], value: bytes, pos: int) -> None:
        try:
            check(value)
        except NarError as exc:
            self._fail(pos, str(exc))

    def _fail(self, pos: int, message: str) -> NoReturn:
        raise NarError(f"bad NAR at byte {self._base + pos}: {message}")


def parse(chunks: Iterable[bytes], allow_trailing: bool = False) -> Iterator[Event]:
    """All events of a NAR given as chunks; raises NarError (also if incomplete).
    With *allow_trailing*, stops taking chunks at the end of the NAR (see NarParser)."""
    parser = NarParser(allow_trailing=allow_trailing)
    for chunk in chunks:
        yield from parser.feed(chunk)
        if allow_trailing and parser.done:
            break
    parser.close()


N = TypeVar("N")
# What a tree walk learns of one node: its own events and, for a directory,
# its (name, child) entries in NAR order.
Visit = Callable[[bytes | None, N, int], tuple[list[Event], Iterable[tuple[bytes, N]] | None]]


def walk(root: N, visit: Visit[N]) -> Iterator[Event]:
    """The events of a tree of any representation, depth first and without
    recursion: *visit(name, node, depth)* gives each node's own events (and a
    directory's entries), DirEnd follows a directory's last entry."""
    stack: list[Iterator[tuple[bytes, N]]] = []
    name: bytes | None = None
    node = root
    while True:
        events, entries = visit(name, node, len(stack))
        yield from events
        if entries is not None:
            stack.append(iter(entries))
        while stack:
            item = next(stack[-1], None)
            if item is not None:
                name, node = item
                break
            stack.pop()
            yield DirEnd()
        else:
            return


# --- writer -----------------------------------------------------------------


class NarWriter:
    """Turns events into NAR bytes (``write(event) -> bytes``), checking that they
    form a valid NAR: names valid and sorted, sizes as declared."""

    def __init__(self) -> None:
        self._started = False
        self._finished = False
        self._previous: list[bytes] = []  # per open directory: its last entry name
        self._size = 0
        self._written = -1  # content bytes written, -1 outside a file

    def write(self, event: Event) -> bytes | memoryview:
        if self._written >= 0:
            return self._in_file(event)
        if isinstance(event, DirEnd):
            if not self._previous:
                raise NarError("NAR writer: directory end outside a directory")
            self._previous.pop()
            return _CLOSE + self._entry_end()
        if isinstance(event, FileStart):
            self._size, self._written = event.size, 0
            body = _TYPE_REGULAR + (_EXECUTABLE if event.executable else b"") + _CONTENTS
            return self._entry_start(event.name) + body + event.size.to_bytes(8, "little")
        if isinstance(event, Symlink):
            check_target(event.target)
            head = self._entry_start(event.name)
            return head + _TYPE_SYMLINK + _S(event.target) + _CLOSE + self._entry_end()
        if isinstance(event, DirStart):
            head = self._entry_start(event.name)
            self._previous.append(b"")
            return head + _TYPE_DIRECTORY
        raise NarError(f"NAR writer: unexpected {type(event).__name__} outside a file")

    def close(self) -> None:
        if not self._finished:
            raise NarError("NAR writer: the NAR is incomplete")

    def _in_file(self, event: Event) -> bytes | memoryview:
        if isinstance(event, FileData):
            self._written += len(event.data)
            if self._written > self._size:
                raise NarError(f"NAR writer: more than the declared {self._size} bytes of contents")
            return event.data
        if isinstance(event, FileEnd):
            if self._written != self._size:
                raise NarError(
                    f"NAR writer: {self._written} bytes of contents, {self._size} declared"
                )
            self._written = -1
            return _ZEROS[:-self._size % 8] + _CLOSE + self._entry_end()
        raise NarError(f"NAR writer: unexpected {type(event).__name__} inside a file")

    def _entry_start(self, name: bytes | None) -> bytes:
        if self._finished:
            raise NarError("NAR writer: event after the end of the NAR")
        if not self._started:
            if name is not None:
                raise NarError("NAR writer: the root node has a name")
            self._started = True
            return _MAGIC_STRING
        if not self._previous or name is None:
            raise NarError("NAR writer: an entry needs a name inside a directory")
        check_name(name)
        if name <= self._previous[-1]:
            raise NarError(f"NAR writer: entry {show(name)} is not sorted")
        self._previous[-1] = name
        return _ENTRY_START + _S(name) + _NODE

    def _entry_end(self) -> bytes:
        if self._previous:
            return _CLOSE
        self._finished = True
        return b""


def serialize(events: Iterable[Event]) -> Iterator[bytes | memoryview]:
    """NAR bytes, in pieces, for *events*."""
    writer = NarWriter()
    for event in events:
        yield writer.write(event)
    writer.close()


def nar_hash(chunks: Iterable[bytes]) -> tuple[bytes, int]:
    """(sha256 digest, size) of a NAR, validating it while hashing."""
    digest, size, parser = hashlib.sha256(), 0, NarParser()
    for chunk in chunks:
        parser.feed(chunk)
        digest.update(chunk)
        size += len(chunk)
    parser.close()
    return digest.digest(), size
