"""The ``.narinfo`` document of a binary cache: parse, serialise, fingerprint.

Parsing follows Nix (``NarInfo::NarInfo`` in libstore): ``Key: value`` lines,
unknown keys ignored, ``Compression`` defaulting to bzip2, ``References`` in
file order (signatures cover that order), ``Deriver: unknown-deriver`` meaning
none. Where Nix silently keeps the last of a repeated key we reject the file:
a narinfo that says two things is not one we want to trust.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from lazystore.errors import FormatError, NarInfoError
from lazystore.nix.hashes import Hash
from lazystore.nix.storepath import DEFAULT_STORE_DIR, StorePath

_NUMBER_RE = re.compile(r"[0-9]{1,20}")
_UNKNOWN_DERIVER = "unknown-deriver"
T = TypeVar("T")


@dataclass
class NarInfo:
    store_path: str
    url: str
    nar_hash: Hash
    nar_size: int
    compression: str = "bzip2"
    file_hash: Hash | None = None
    file_size: int | None = None
    references: list[str] = field(default_factory=list)
    deriver: str | None = None
    system: str | None = None
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None

    @classmethod
    def parse(cls, text: str, store_dir: str = DEFAULT_STORE_DIR) -> NarInfo:
        """Parse a narinfo document; NarInfoError names the offending line."""
        fields: dict[str, str] = {}
        sigs: list[str] = []
        for lineno, line in enumerate(text.rstrip("\n").split("\n"), 1):
            key, value = _split_line(line, lineno)
            if key == "Sig":
                sigs.append(value)
            elif key in fields:
                raise NarInfoError(f"narinfo line {lineno}: repeated field {key!r}")
            else:
                fields[key] = value
        try:
            info = cls._from_fields(fields, store_dir)
        except FormatError as exc:
            if isinstance(exc, NarInfoError):
                raise
            raise NarInfoError(f"narinfo: {exc}") from None
        info.sigs = sigs
        return info

    @classmethod
    def _from_fields(cls, fields: dict[str, str], store_dir: str) -> NarInfo:
        for key in ("StorePath", "URL", "NarHash", "NarSize"):
            if key not in fields:
                raise NarInfoError(f"narinfo has no {key} field")
        path = StorePath.parse(fields["StorePath"], store_dir).path(store_dir)
        if not fields["URL"]:
            raise NarInfoError("narinfo has an empty URL field")
        nar_hash = _parse_hash(fields["NarHash"], "NarHash")
        if nar_hash.algo != "sha256":
            raise NarInfoError(f"narinfo NarHash is {nar_hash.algo}, expected sha256")
        nar_size = _parse_number(fields["NarSize"], "NarSize")
        if nar_size == 0:
            raise NarInfoError("narinfo NarSize is 0")
        return cls(
            store_path=path,
            url=fields["URL"],
            nar_hash=nar_hash,
            nar_size=nar_size,
            compression=fields.get("Compression") or "bzip2",
            file_hash=_optional(fields, "FileHash", lambda v: _parse_hash(v, "FileHash")),
            file_size=_optional(fields, "FileSize", lambda v: _parse_number(v, "FileSize")),
            references=_parse_references(fields.get("References", "")),
            deriver=_parse_deriver(fields.get("Deriver")),
            system=fields.get("System") or None,
            ca=_optional(fields, "CA", check_content_address),
        )

    def to_text(self) -> str:
        """Serialise as Nix does (hashes in nix32, field order of ``NarInfo::to_string``)."""
        lines = [f"StorePath: {self.store_path}", f"URL: {self.url}"]
        lines.append(f"Compression: {self.compression}")
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines += [f"NarHash: {self.nar_hash}", f"NarSize: {self.nar_size}"]
        lines.append("References: " + " ".join(self.references))
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver}")
        if self.system:
            lines.append(f"System: {self.system}")
        lines += [f"Sig: {sig}" for sig in self.sigs]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"

    def fingerprint(self, store_dir: str = DEFAULT_STORE_DIR) -> bytes:
        """What a narinfo signature signs: ``1;path;sha256:<nix32>;size;refs``."""
        if self.nar_hash.algo != "sha256":
            raise NarInfoError(f"narinfo NarHash is {self.nar_hash.algo}, expected sha256")
        refs = ",".join(StorePath.from_basename(r).path(store_dir) for r in self.references)
        return f"1;{self.store_path};{self.nar_hash};{self.nar_size};{refs}".encode()

    @property
    def path(self) -> StorePath:
        """``store_path`` as a StorePath (whatever its store directory)."""
        return StorePath.from_basename(self.store_path.rsplit("/", 1)[-1])


def _split_line(line: str, lineno: int) -> tuple[str, str]:
    key, sep, value = line.partition(":")
    if not sep or not key:
        raise NarInfoError(f"narinfo line {lineno} is not 'Key: value': {line[:80]!r}")
    if value and not value.startswith(" "):
        raise NarInfoError(f"narinfo line {lineno} has no space after ':': {line[:80]!r}")
    return key, value[1:]


def _optional(fields: dict[str, str], key: str, parse: Callable[[str], T]) -> T | None:
    value = fields.get(key)
    return None if value is None else parse(value)


def _parse_number(value: str, key: str) -> int:
    if not _NUMBER_RE.fullmatch(value) or int(value) >= 2**64:
        raise NarInfoError(f"narinfo {key} is not a valid number: {value[:40]!r}")
    return int(value)


def _parse_hash(value: str, key: str) -> Hash:
    try:
        return Hash.parse(value)
    except FormatError as exc:
        raise NarInfoError(f"narinfo {key}: {exc}") from None


def _parse_references(value: str) -> list[str]:
    refs = [r for r in value.split(" ") if r]
    for ref in refs:
        StorePath.from_basename(ref)
    return refs


def _parse_deriver(value: str | None) -> str | None:
    if not value or value == _UNKNOWN_DERIVER:
        return None
    return StorePath.from_basename(value).basename


def check_content_address(value: str) -> str:
    """Validate a CA field (``text:sha256:…``, ``fixed:[r:]<algo>:…``); return it."""
    method, sep, rest = value.partition(":")
    if sep and method == "text":
        if Hash.parse(rest).algo == "sha256":
            return value
        raise NarInfoError(f"narinfo CA {value!r}: text content addresses use sha256")
    if sep and method == "fixed":
        Hash.parse(rest[2:] if rest.startswith("r:") else rest)
        return value
    raise NarInfoError(f"narinfo CA {value!r} is not a content address")
