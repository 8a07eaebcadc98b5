"""Nix's base-32 ("nix32"): alphabet without e, o, u, t; bytes read little-endian
from the end, so the first character carries the most significant bits."""

from __future__ import annotations

from lazystore.errors import FormatError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(n_bytes: int) -> int:
    return (n_bytes * 8 - 1) // 5 + 1 if n_bytes else 0


def decoded_length(n_chars: int) -> int | None:
    """The byte length whose encoding has *n_chars* characters, or None."""
    n_bytes = n_chars * 5 // 8
    return n_bytes if encoded_length(n_bytes) == n_chars else None


def encode(data: bytes) -> str:
    value = int.from_bytes(data, "little")
    return "".join(
        ALPHABET[(value >> (5 * n)) & 0x1F] for n in range(encoded_length(len(data)) - 1, -1, -1)
    )


def decode(text: str) -> bytes:
    n_bytes = decoded_length(len(text))
    if n_bytes is None:
        raise FormatError(f"invalid nix32 string {text!r}: bad length {len(text)}")
    value = 0
    for c in text:
        digit = _VALUE.get(c)
        if digit is None:
            raise FormatError(f"invalid nix32 string {text!r}: bad character {c!r}")
        value = (value << 5) | digit
    if value >> (8 * n_bytes):
        raise FormatError(f"invalid nix32 string {text!r}: non-zero overflow bits")
    return value.to_bytes(n_bytes, "little")
