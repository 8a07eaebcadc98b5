"""Hashes in every form Nix accepts: tables of (text, algo, digest), rejections,
and a cross-check of our encodings with real Nix (`nix hash to-*`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazystore.errors import FormatError
from lazystore.nix.hashes import Hash
from lazystore.testing import nixcache

# digest of b"abc" per algorithm: (base16, nix32, base64)
ABC = {
    "md5": (
        "900150983cd24fb0d6963f7d28e17f72",
        "3jgzhjhz9zjvbb0kyj7jc500ch",
        "kAFQmDzST7DWlj99KOF/cg==",
    ),
    "sha1": (
        "a9993e364706816aba3e25717850c26c9cd0d89d",
        "kpcd173cq987hw957sx6m0868wv3x6d9",
        "qZk+NkcGgWq6PiVxeFDCbJzQ2J0=",
    ),
    "sha256": (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=",
    ),
    "sha512": (
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1ai"
        "7xac99vxfc4ii84hawjbk876blyk1jfhkbbyx",
        "3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw==",
    ),
}

FORMS = [
    (form.format(algo=algo, b16=b16, b32=b32, b64=b64), algo, b16)
    for algo, (b16, b32, b64) in ABC.items()
    for form in (
        "{algo}:{b16}",
        "{algo}:{b32}",
        "{algo}:{b64}",
        "{algo}-{b64}",
    )
] + [("sha256:" + ABC["sha256"][0].upper(), "sha256", ABC["sha256"][0])]


@pytest.mark.parametrize(("text", "algo", "hex_digest"), FORMS)
def test_parse_prefixed_and_sri(text: str, algo: str, hex_digest: str) -> None:
    h = Hash.parse(text)
    assert (h.algo, h.digest) == (algo, bytes.fromhex(hex_digest))
    assert Hash.parse(text, algo) == h


@pytest.mark.parametrize("algo", sorted(ABC))
def test_parse_bare_digest_needs_algo(algo: str) -> None:
    b16, b32, b64 = ABC[algo]
    for bare in (b16, b32, b64):
        assert Hash.parse(bare, algo).digest == bytes.fromhex(b16)
    with pytest.raises(FormatError, match="no known algorithm"):
        Hash.parse(b32)


@pytest.mark.parametrize("algo", sorted(ABC))
def test_printing(algo: str) -> None:
    b16, b32, b64 = ABC[algo]
    h = Hash(algo, bytes.fromhex(b16))
    assert str(h) == f"{algo}:{b32}"
    assert h.nix32() == b32
    assert h.base16() == b16
    assert h.base64() == b64
    assert h.sri() == f"{algo}-{b64}"


def test_compute() -> None:
    assert Hash.compute(b"abc").base16() == ABC["sha256"][0]
    assert Hash.compute(b"abc", "sha1").base16() == ABC["sha1"][0]


B16, B32, B64 = ABC["sha256"]


@pytest.mark.parametrize(
    ("text", "algo", "match"),
    [
        ("sha256:" + B16[:-2], None, "wrong length"),
        ("sha256:" + B32 + "0", None, "wrong length"),
        ("sha256:" + B32[:-1] + "e", None, "bad character"),
        ("sha256:z" + B32[1:], None, "overflow"),
        ("sha256:" + B16[:-1] + "g", None, "base16"),
        ("sha256:" + B64[:-2] + "!=", None, "base64"),
        ("sha256-" + ABC["sha1"][2], None, "20 bytes, expected 32"),
        ("sha256-", None, "0 bytes"),
        ("sha1:" + B32, None, "wrong length"),
        ("blake3:" + B32, None, "no known algorithm"),
        ("sha256:" + B32, "sha1", "not a sha1 hash"),
        ("sha256-" + B64, "sha512", "not a sha512 hash"),
        (B32, "crc32", "unknown hash algorithm"),
        ("", None, "no known algorithm"),
        ("sha256:", None, "wrong length"),
    ],
)
def test_parse_rejects(text: str, algo: str | None, match: str) -> None:
    with pytest.raises(FormatError, match=match) as info:
        Hash.parse(text, algo)
    assert "\n" not in str(info.value)


def test_constructor_checks_size() -> None:
    with pytest.raises(FormatError, match="expected 32"):
        Hash("sha256", b"\0" * 20)
    with pytest.raises(FormatError, match="unknown hash algorithm"):
        Hash("sha3", b"\0" * 32)


@pytest.mark.parametrize("algo", sorted(ABC))
def test_encodings_match_real_nix(nix: None, algo: str) -> None:
    b16, b32, b64 = ABC[algo]
    h = Hash(algo, bytes.fromhex(b16))
    for command, ours in (("to-base32", h.nix32()), ("to-sri", h.sri()), ("to-base16", b16)):
        out = nixcache.run_nix("nix", "hash", command, "--type", algo, b64).decode().strip()
        assert out == ours
        assert Hash.parse(out, algo) == h


@settings(deadline=None)
@given(
    st.sampled_from(["", "sha256:", "sha256-", "sha1:", "md5-", "sha512:"]),
    st.text(max_size=130),
    st.sampled_from([None, "sha256", "sha1"]),
)
def test_random_text_parses_or_fails_cleanly(prefix: str, body: str, algo: str | None) -> None:
    try:
        h = Hash.parse(prefix + body, algo)
    except FormatError as exc:
        assert "\n" not in str(exc)
        return
    assert Hash.parse(str(h)) == Hash.parse(h.sri()) == h
