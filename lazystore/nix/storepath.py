"""Store paths: ``<store dir>/<32 nix32 chars>-<name>``, validated as Nix does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazystore.errors import FormatError
from lazystore.nix import base32

DEFAULT_STORE_DIR = "/nix/store"
HASH_LENGTH = 32
MAX_NAME_LENGTH = 211

_HASH_RE = re.compile(f"[{base32.ALPHABET}]{{{HASH_LENGTH}}}")
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")


def check_name(name: str) -> None:
    """Raise FormatError unless *name* is a valid store path name."""
    if not name:
        raise FormatError("store path name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise FormatError(f"store path name {name[:40]!r}... is longer than {MAX_NAME_LENGTH}")
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise FormatError(f"store path name {name!r} contains the invalid character {bad!r}")
    if name.startswith("."):
        raise FormatError(f"store path name {name!r} starts with '.'")


def check_store_dir(store_dir: str) -> str:
    """Return *store_dir* if it is an absolute, canonical directory path."""
    if not store_dir.startswith("/") or store_dir != "/" and store_dir.endswith("/"):
        raise FormatError(f"store directory {store_dir!r} is not a canonical absolute path")
    if "//" in store_dir or any(p in (".", "..") for p in store_dir.split("/")):
        raise FormatError(f"store directory {store_dir!r} is not a canonical absolute path")
    return store_dir


@dataclass(frozen=True, order=True)
class StorePath:
    hash_part: str
    name: str

    def __post_init__(self) -> None:
        if not _HASH_RE.fullmatch(self.hash_part):
            raise FormatError(f"invalid store path hash part {self.hash_part!r}")
        check_name(self.name)

    @classmethod
    def from_basename(cls, base: str) -> StorePath:
        """Parse ``<hash>-<name>`` (no directory)."""
        if len(base) <= HASH_LENGTH or base[HASH_LENGTH] != "-":
            raise FormatError(f"{base!r} is not a store path base name")
        try:
            return cls(base[:HASH_LENGTH], base[HASH_LENGTH + 1 :])
        except FormatError as exc:
            raise FormatError(f"invalid store path {base!r}: {exc}") from None

    @classmethod
    def parse(cls, path: str, store_dir: str = DEFAULT_STORE_DIR) -> StorePath:
        """Parse a full store path directly under *store_dir* (a trailing '/' is allowed)."""
        prefix = check_store_dir(store_dir).rstrip("/") + "/"
        if not path.startswith(prefix):
            raise FormatError(f"path {path!r} is not in the store {store_dir!r}")
        base = path[len(prefix) :]
        if base.endswith("/"):
            base = base[:-1]
        if "/" in base:
            raise FormatError(f"path {path!r} is not a store path (it has a sub-path)")
        return cls.from_basename(base)

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def path(self, store_dir: str = DEFAULT_STORE_DIR) -> str:
        return f"{store_dir.rstrip('/')}/{self.basename}"

    def __str__(self) -> str:
        return self.basename


def is_valid_basename(base: str) -> bool:
    try:
        StorePath.from_basename(base)
    except FormatError:
        return False
    return True
