"""ed25519 keys and signatures in Nix's formats.

Keys are ``name:base64(...)``: a public key holds the 32-byte ed25519 key, a
secret key libsodium's 64 bytes (seed || public key). A signature is
``name:base64(64-byte signature)`` over a narinfo's fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from lazystore.errors import SignatureError
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.storepath import DEFAULT_STORE_DIR

log = logging.getLogger(__name__)

PUBLIC_KEY_SIZE = 32
SECRET_KEY_SIZE = 64
SIGNATURE_SIZE = 64


def split_named(text: str, what: str, size: int) -> tuple[str, bytes]:
    """Split ``name:base64`` and decode it to exactly *size* bytes."""
    name, sep, encoded = text.strip().partition(":")
    if not sep or not name:
        raise SignatureError(f"{what} is not 'name:base64': {text[:60]!r}")
    try:
        raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SignatureError(f"{what} {name!r} is not valid base64") from None
    if len(raw) != size:
        raise SignatureError(f"{what} {name!r} has {len(raw)} bytes, expected {size}")
    return name, raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, raw = split_named(text, "public key", PUBLIC_KEY_SIZE)
        return cls(name, raw)

    def verify(self, message: bytes, signature: str) -> bool:
        """True if *signature* (``name:base64``) is this key's signature of *message*."""
        try:
            name, raw = split_named(signature, "signature", SIGNATURE_SIZE)
        except SignatureError as exc:
            log.debug("ignoring malformed signature: %s", exc)
            return False
        if name != self.name:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(raw, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}:{_b64(self.key)}"


@dataclass(frozen=True)
class SecretKey:
    name: str
    seed: bytes

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = split_named(text, "secret key", SECRET_KEY_SIZE)
        secret = cls(name, raw[:32])
        if secret.public_key.key != raw[32:]:
            raise SignatureError(f"secret key {name!r} does not match its public half")
        return secret

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        if not name or ":" in name:
            raise SignatureError(f"invalid key name {name!r}")
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(name, seed)

    @property
    def public_key(self) -> PublicKey:
        public = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return PublicKey(self.name, public.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, message: bytes) -> str:
        raw = Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)
        return f"{self.name}:{_b64(raw)}"

    def __str__(self) -> str:
        return f"{self.name}:{_b64(self.seed + self.public_key.key)}"

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r}, seed=<hidden>)"


def verify_narinfo(
    info: NarInfo, keys: Iterable[PublicKey], store_dir: str = DEFAULT_STORE_DIR
) -> str | None:
    """The name of the first trusted key with a valid signature on *info*, or None."""
    by_name: dict[str, list[PublicKey]] = {}
    for key in keys:
        by_name.setdefault(key.name, []).append(key)
    fingerprint = info.fingerprint(store_dir)
    for sig in info.sigs:
        name = sig.partition(":")[0]
        for key in by_name.get(name, ()):
            if key.verify(fingerprint, sig):
                return name
    return None


def sign_narinfo(info: NarInfo, secret: SecretKey, store_dir: str = DEFAULT_STORE_DIR) -> None:
    """Append *secret*'s signature to ``info.sigs`` (unless it is already there)."""
    sig = secret.sign(info.fingerprint(store_dir))
    if sig not in info.sigs:
        info.sigs.append(sig)
