"""Cryptographic hashes as Nix writes them.

Nix accepts a digest in three encodings after an ``algo:`` prefix (base16,
nix32 or base64, told apart by length) and SRI (``algo-<base64>``). We print
``algo:<nix32>``, as Nix does in narinfos.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from lazystore.errors import FormatError
from lazystore.nix import base32

#: digest size in bytes of each algorithm Nix knows
DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def _base64_length(n_bytes: int) -> int:
    return (n_bytes + 2) // 3 * 4


@dataclass(frozen=True, order=True)
class Hash:
    algo: str
    digest: bytes

    def __post_init__(self) -> None:
        size = DIGEST_SIZES.get(self.algo)
        if size is None:
            raise FormatError(f"unknown hash algorithm {self.algo!r}")
        if len(self.digest) != size:
            raise FormatError(
                f"{self.algo} digest has {len(self.digest)} bytes, expected {size}"
            )

    @classmethod
    def compute(cls, data: bytes, algo: str = "sha256") -> Hash:
        """The hash of *data* (small inputs; stream with hashlib otherwise)."""
        if algo not in DIGEST_SIZES:
            raise FormatError(f"unknown hash algorithm {algo!r}")
        return cls(algo, hashlib.new(algo, data).digest())

    @classmethod
    def parse(cls, text: str, algo: str | None = None) -> Hash:
        """Parse ``algo:<digest>``, SRI ``algo-<base64>``, or a bare digest when
        *algo* is given. A prefix must agree with *algo* when both are present."""
        prefix, sep, rest = text.partition(":")
        if sep and prefix in DIGEST_SIZES:
            return cls._from_encoded(text, _check_algo(prefix, algo, text), rest, sri=False)
        prefix, sep, rest = text.partition("-")
        if sep and prefix in DIGEST_SIZES:
            return cls._from_encoded(text, _check_algo(prefix, algo, text), rest, sri=True)
        if algo is None:
            raise FormatError(f"hash {text!r} has no known algorithm prefix")
        if algo not in DIGEST_SIZES:
            raise FormatError(f"unknown hash algorithm {algo!r}")
        return cls._from_encoded(text, algo, text, sri=False)

    @classmethod
    def _from_encoded(cls, text: str, algo: str, encoded: str, *, sri: bool) -> Hash:
        size = DIGEST_SIZES[algo]
        if sri or len(encoded) == _base64_length(size):
            return cls(algo, _decode_base64(text, encoded, size))
        if len(encoded) == 2 * size:
            try:
                return cls(algo, bytes.fromhex(encoded))
            except ValueError:
                raise FormatError(f"invalid base16 in hash {text!r}") from None
        if len(encoded) == base32.encoded_length(size):
            try:
                return cls(algo, base32.decode(encoded))
            except FormatError as exc:
                raise FormatError(f"invalid hash {text!r}: {exc}") from None
        raise FormatError(f"hash {text!r} has the wrong length for {algo}")

    def nix32(self) -> str:
        return base32.encode(self.digest)

    def base16(self) -> str:
        return self.digest.hex()

    def base64(self) -> str:
        return base64.b64encode(self.digest).decode("ascii")

    def sri(self) -> str:
        return f"{self.algo}-{self.base64()}"

    def __str__(self) -> str:
        return f"{self.algo}:{self.nix32()}"


def _check_algo(prefix: str, algo: str | None, text: str) -> str:
    if algo is not None and algo != prefix:
        raise FormatError(f"hash {text!r} is not a {algo} hash")
    return prefix


def _decode_base64(text: str, encoded: str, size: int) -> bytes:
    try:
        digest = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError(f"invalid base64 in hash {text!r}") from None
    if len(digest) != size:
        raise FormatError(f"hash {text!r} has {len(digest)} bytes, expected {size}")
    return digest
