"""nix32: byte tables from the conformance README, rejections, and a property
against a slow transcription of Nix's printHash32 loop."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazystore.errors import FormatError
from lazystore.nix import base32

VECTORS = [
    ("", ""),
    ("1f", "0z"),
    ("8a12321522fd91efbd60ebb2481af88580f61600", "00bgd045z0d4icpbc2yyz4gx48ak44la"),
    (
        "b3a24de97a8fdbc835b9833169501030b8977031bcb54b3b3ac13740f846ab30",
        "0c5b8vw40dy178xlpddw65q9gf1h2186jcc3p4swinwggbllv8mk",
    ),
    (
        "d86b3392c1202e8ff5a423b302e6284db7f8f435ea9f39b5b1b20fd3ac36dfcb",
        "1jyz6snd63xjn6skk7za6psgidsd53k05cr3lksqybi0q6936syq",
    ),
    (
        "13a8cf7ca57f68a9f1752acee36a72a55187d3a954443c112818926f26109d91",
        "14cx20k6z4hq508kqi2lm79qfld5f9mf7kiafpqsjs3zlmycza0k",
    ),
    (hashlib.sha256(b"").hexdigest(), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),
    (hashlib.sha256(b"abc").hexdigest(), "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"),
]


@pytest.mark.parametrize(("hex_bytes", "text"), VECTORS)
def test_encode_vectors(hex_bytes: str, text: str) -> None:
    assert base32.encode(bytes.fromhex(hex_bytes)) == text


@pytest.mark.parametrize(("hex_bytes", "text"), VECTORS)
def test_decode_vectors(hex_bytes: str, text: str) -> None:
    assert base32.decode(text) == bytes.fromhex(hex_bytes)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("zz", "overflow"),
        ("c0", "overflow"),
        ("0", "length"),
        ("0zz", "length"),
        ("0t", "character"),
        ("0e", "character"),
        ("0o", "character"),
        ("0u", "character"),
        ("0Z", "character"),
        ("e", "length"),
        ("o", "length"),
        ("u", "length"),
        ("t", "length"),
    ],
)
def test_decode_rejects(text: str, reason: str) -> None:
    with pytest.raises(FormatError, match=reason) as info:
        base32.decode(text)
    assert "\n" not in str(info.value)


def test_lengths() -> None:
    assert [base32.encoded_length(n) for n in (0, 1, 16, 20, 32, 64)] == [0, 2, 26, 32, 52, 103]
    assert base32.decoded_length(52) == 32
    assert base32.decoded_length(54) is None


def reference_encode(data: bytes) -> str:
    """Nix's printHash32, transcribed bit by bit (slow on purpose)."""
    length = (len(data) * 8 - 1) // 5 + 1 if data else 0
    out = []
    for n in range(length - 1, -1, -1):
        b = n * 5
        i, j = b // 8, b % 8
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(base32.ALPHABET[c & 0x1F])
    return "".join(out)


@settings(deadline=None)
@given(st.binary(max_size=80))
def test_round_trip_and_reference(data: bytes) -> None:
    text = base32.encode(data)
    assert text == reference_encode(data)
    assert base32.decode(text) == data


@settings(deadline=None)
@given(st.text(alphabet=base32.ALPHABET + "etou", max_size=60))
def test_decode_never_fails_unexpectedly(text: str) -> None:
    try:
        data = base32.decode(text)
    except FormatError:
        return
    assert base32.encode(data) == text
