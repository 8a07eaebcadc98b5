"""containerd's filter syntax, as far as snapshot listing needs it (no I/O).

A filter is selectors joined by ``,`` (all must match); a selector is a field
path, optionally followed by an operator (``==``, ``!=``, ``~=``) and a value.
Field path components are separated by ``.``; a component or a value may be
double-quoted (Go string escapes) so that it can hold ``.``, ``,`` or ``=``.
Examples::

    labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/x"
    kind==committed
    labels.foo            (label present)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lazystore.errors import LazystoreError


class FilterError(LazystoreError):
    """A filter expression that cannot be parsed."""


_OPERATORS = ("==", "!=", "~=")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "/": "/"}

# field path -> value (None when the field is absent)
Adaptor = Callable[[tuple[str, ...]], str | None]


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None
    value: str = ""

    def matches(self, adaptor: Adaptor) -> bool:
        actual = adaptor(self.path)
        if self.op is None:
            return actual is not None and actual != ""
        if self.op == "==":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        if actual is None:
            return False
        try:
            return re.search(self.value, actual) is not None
        except re.error as exc:
            raise FilterError(f"invalid regular expression {self.value!r}: {exc}") from None


@dataclass(frozen=True)
class Filter:
    selectors: tuple[Selector, ...]

    def matches(self, adaptor: Adaptor) -> bool:
        return all(s.matches(adaptor) for s in self.selectors)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def done(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, token: str) -> bool:
        self.skip_space()
        return self.text.startswith(token, self.pos)

    def take(self, token: str) -> bool:
        if self.peek(token):
            self.pos += len(token)
            return True
        return False

    def quoted(self) -> str:
        # self.text[self.pos] == '"'
        out: list[str] = []
        i = self.pos + 1
        while i < len(self.text):
            c = self.text[i]
            if c == '"':
                self.pos = i + 1
                return "".join(out)
            if c == "\\":
                i += 1
                if i >= len(self.text) or self.text[i] not in _ESCAPES:
                    raise FilterError(f"bad escape in quoted string of filter {self.text!r}")
                c = _ESCAPES[self.text[i]]
            out.append(c)
            i += 1
        raise FilterError(f"unterminated quoted string in filter {self.text!r}")

    def field(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted()
        m = re.compile(r"[A-Za-z0-9_\-/]+").match(self.text, self.pos)
        if not m:
            raise FilterError(f"expected a field name at offset {self.pos} of filter {self.text!r}")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted()
        end = self.text.find(",", self.pos)
        end = len(self.text) if end < 0 else end
        value = self.text[self.pos : end].strip()
        self.pos = end
        if not value:
            raise FilterError(f"missing value in filter {self.text!r}")
        return value


def _selector(scanner: _Scanner) -> Selector:
    path = [scanner.field()]
    while scanner.take("."):
        path.append(scanner.field())
    for op in _OPERATORS:
        if scanner.take(op):
            return Selector(tuple(path), op, scanner.value())
    return Selector(tuple(path))


def parse(text: str) -> Filter:
    """Parse one filter expression; FilterError on malformed input."""
    scanner = _Scanner(text)
    selectors = [_selector(scanner)]
    while not scanner.done():
        if not scanner.take(","):
            raise FilterError(f"unexpected {scanner.text[scanner.pos:]!r} in filter {text!r}")
        selectors.append(_selector(scanner))
    return Filter(tuple(selectors))


def parse_any(texts: list[str]) -> list[Filter]:
    """Parse containerd's list of filters (OR-ed); empty means match everything."""
    return [parse(t) for t in texts if t.strip()]


def match_any(filters: list[Filter], adaptor: Adaptor) -> bool:
    return not filters or any(f.matches(adaptor) for f in filters)


def snapshot_adaptor(
    name: str, parent: str, kind: str, labels: Mapping[str, str]
) -> Adaptor:
    """Fields of a snapshot as containerd names them in filters."""

    def get(path: tuple[str, ...]) -> str | None:
        head, rest = path[0], path[1:]
        if head == "labels" and rest:
            return labels.get(".".join(rest))
        if rest:
            return None
        return {"name": name, "parent": parent, "kind": kind}.get(head)

    return get
