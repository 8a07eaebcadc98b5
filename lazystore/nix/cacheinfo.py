"""A binary cache's ``nix-cache-info`` document."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazystore.errors import FormatError, NarInfoError
from lazystore.nix.storepath import DEFAULT_STORE_DIR, check_store_dir

DEFAULT_PRIORITY = 50
_INT_RE = re.compile(r"-?[0-9]{1,18}")


@dataclass(frozen=True)
class CacheInfo:
    store_dir: str = DEFAULT_STORE_DIR
    want_mass_query: bool = False
    priority: int = DEFAULT_PRIORITY

    @classmethod
    def parse(cls, text: str) -> CacheInfo:
        """Parse ``Key: value`` lines; unknown keys are ignored, as by Nix."""
        fields: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise NarInfoError(f"nix-cache-info line {lineno} is not 'Key: value'")
            fields[key.strip()] = value.strip()
        return cls(
            store_dir=_store_dir(fields.get("StoreDir", DEFAULT_STORE_DIR)),
            want_mass_query=_flag(fields.get("WantMassQuery", "0")),
            priority=_int(fields.get("Priority", str(DEFAULT_PRIORITY)), "Priority"),
        )


def _store_dir(value: str) -> str:
    try:
        return check_store_dir(value)
    except FormatError as exc:
        raise NarInfoError(f"nix-cache-info StoreDir: {exc}") from None


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise NarInfoError(f"nix-cache-info WantMassQuery is not 0 or 1: {value[:40]!r}")
    return value == "1"


def _int(value: str, key: str) -> int:
    if not _INT_RE.fullmatch(value):
        raise NarInfoError(f"nix-cache-info {key} is not an integer: {value[:40]!r}")
    return int(value)
