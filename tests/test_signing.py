"""ed25519 keys and narinfo signatures: Nix key formats, the conformance
narinfos with their expected outcomes, and both directions with real Nix."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from lazystore.errors import SignatureError
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import PublicKey, SecretKey, sign_narinfo, verify_narinfo
from lazystore.testing import nixcache

CACHE_NIXOS = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
TEST1_PUBLIC = "test1:tLAEn+EeaBUJYqEpTd2yeerr7Ic6+0vWe+aXL/vYUpE="
TEST1_SECRET = (
    "test1:jbX9NxZp8WB/coK8k7yLf0gNYmBbIbCrOFwgJgI7OV+0sASf4R5oFQlioSlN3bJ56uvshzr7S9Z75pcv+9hSkQ=="
)
EXAMPLE_PUBLIC = "cache.example.com-1:yKUSiqP9yaMSduDmGtw8U9iVVd/Coyv9csB1rjHtiRM="
EXAMPLE_SECRET = (
    "cache.example.com-1:cCta2MEsRNuYCgWYyeRXLyfoFpKhQJKn8gLMeXWAb7vIpRKKo/3JoxJ24OYa3DxT2JVV38KjK"
    "/1ywHWuMe2JEw=="
)
TRUSTED = [PublicKey.parse(CACHE_NIXOS), PublicKey.parse(TEST1_PUBLIC)]


@pytest.mark.parametrize(("secret", "public"), [(TEST1_SECRET, TEST1_PUBLIC),
                                                 (EXAMPLE_SECRET, EXAMPLE_PUBLIC)])
def test_key_pairs(secret: str, public: str) -> None:
    sk = SecretKey.parse(secret)
    assert str(sk.public_key) == public
    assert str(sk) == secret
    assert str(PublicKey.parse(public)) == public
    assert sk.seed.hex() not in repr(sk) and secret.split(":")[1][:20] not in repr(sk)


def test_parse_tolerates_surrounding_whitespace() -> None:
    assert str(PublicKey.parse(f"  {TEST1_PUBLIC}\n")) == TEST1_PUBLIC
    assert str(SecretKey.parse(f"{TEST1_SECRET}\n")) == TEST1_SECRET


_TEST1_RAW = base64.b64decode(TEST1_SECRET.split(":")[1])
_MISMATCHED = "test1:" + base64.b64encode(_TEST1_RAW[:32] + bytes(32)).decode()


@pytest.mark.parametrize(
    ("parse", "text", "match"),
    [
        (PublicKey.parse, "nocolon", "not 'name:base64'"),
        (PublicKey.parse, ":tLAEn+EeaBUJYqEpTd2yeerr7Ic6+0vWe+aXL/vYUpE=", "not 'name:base64'"),
        (PublicKey.parse, "k:tLAEn+EeaBUJYqEpTd2yeerr7Ic6+0vWe+aXL/vYUpE", "not valid base64"),
        (PublicKey.parse, "k:!!!!", "not valid base64"),
        (PublicKey.parse, "k:" + base64.b64encode(bytes(31)).decode(), "31 bytes, expected 32"),
        (PublicKey.parse, TEST1_SECRET, "64 bytes, expected 32"),
        (SecretKey.parse, TEST1_PUBLIC, "32 bytes, expected 64"),
        (SecretKey.parse, _MISMATCHED, "does not match its public half"),
        (SecretKey.parse, "", "not 'name:base64'"),
    ],
)
def test_key_parse_errors(parse, text: str, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SignatureError, match=match) as info:
        parse(text)
    assert "\n" not in str(info.value)
    assert _TEST1_RAW[:32].hex() not in str(info.value)


def test_generate() -> None:
    sk = SecretKey.generate("gen-1")
    again = SecretKey.parse(str(sk))
    assert again == sk and again.public_key == sk.public_key
    assert sk.public_key.verify(b"message", sk.sign(b"message"))
    assert not sk.public_key.verify(b"messagE", sk.sign(b"message"))
    assert SecretKey.generate("gen-1").seed != sk.seed
    with pytest.raises(SignatureError):
        SecretKey.generate("bad:name")


def sample(conformance: Path, name: str) -> NarInfo:
    return NarInfo.parse((conformance / name).read_text())


GO = "go-nix/narinfo-samples/"
SNIX = "snix/narinfo-samples/"


@pytest.mark.parametrize(
    ("name", "signer"),
    [
        (GO + "strNarinfoSample.narinfo", "cache.nixos.org-1"),
        (GO + "strNarinfoSampleWithBase16Hash.narinfo", "cache.nixos.org-1"),
        (GO + "strNarinfoSampleWithUnknownDeriver.narinfo", "cache.nixos.org-1"),
        (GO + "strNarinfoSampleWithoutDeriverFields.narinfo", "cache.nixos.org-1"),
        (GO + "strNarinfoSampleWithoutFileFields.narinfo", "cache.nixos.org-1"),
        (GO + "strNarinfoSample2Multirefs.narinfo", "cache.nixos.org-1"),
        (GO + "strNarinfoSampleUncompressed.narinfo", None),
        (GO + "strNarinfoSampleUncompressedNoFileHashOrSize.narinfo", None),
        ("go-nix/big.narinfo", "cache.nixos.org-1"),
        (SNIX + "references_out_of_order.narinfo", "cache.nixos.org-1"),
        (SNIX + "nar_hash_hex.narinfo", "cache.nixos.org-1"),
        (SNIX + "references_missing.narinfo", "cache.nixos.org-1"),
        (SNIX + "compression_default.narinfo", "cache.nixos.org-1"),
        (SNIX + "compression_none.narinfo", "cache.nixos.org-1"),
        (SNIX + "explicit_unknown_deriver.narinfo", "cache.nixos.org-1"),
        (SNIX + "ca_nar_hash_sha1.narinfo", "cache.nixos.org-1"),
    ],
)
def test_conformance_outcomes(conformance: Path, name: str, signer: str | None) -> None:
    assert verify_narinfo(sample(conformance, name), TRUSTED) == signer


def test_multirefs_both_signatures_valid(conformance: Path) -> None:
    info = sample(conformance, GO + "strNarinfoSample2Multirefs.narinfo")
    assert verify_narinfo(info, [PublicKey.parse(TEST1_PUBLIC)]) == "test1"
    assert verify_narinfo(info, [PublicKey.parse(CACHE_NIXOS)]) == "cache.nixos.org-1"


def test_signing_is_deterministic_like_nix(conformance: Path) -> None:
    """ed25519 is deterministic: re-signing with test1 reproduces the test1 Sig."""
    info = sample(conformance, GO + "strNarinfoSample2Multirefs.narinfo")
    expected = next(s for s in info.sigs if s.startswith("test1:"))
    assert SecretKey.parse(TEST1_SECRET).sign(info.fingerprint()) == expected


def test_unknown_key_is_not_trusted(conformance: Path) -> None:
    info = sample(conformance, GO + "strNarinfoSample.narinfo")
    assert any(s.startswith("hydra.other.net-1:") for s in info.sigs)
    assert verify_narinfo(info, [PublicKey.parse(TEST1_PUBLIC)]) is None
    assert verify_narinfo(info, []) is None


def test_every_real_cache_narinfo_verifies(conformance: Path) -> None:
    raw = zstandard.ZstdDecompressor().stream_reader(
        (conformance / "snix/narinfo.zst").open("rb")
    ).read()
    docs = [doc for doc in raw.decode().split("\n\n") if doc.strip()]
    assert len(docs) == 978
    signers = [verify_narinfo(NarInfo.parse(doc), TRUSTED) for doc in docs]
    assert signers == ["cache.nixos.org-1"] * 978


def _tamper(info: NarInfo, field: str) -> NarInfo:
    text = info.to_text()
    changes = {
        "nar_size": ("NarSize: 464152", "NarSize: 464153"),
        "nar_hash": ("NarHash: sha256:0l", "NarHash: sha256:1l"),
        "store_path": ("-net-tools-1.60_p20170221182432\n", "-net-tools-1.61\n"),
        "references": ("glibc-2.27", "glibc-2.28"),
        "url": ("URL: nar/", "URL: elsewhere/"),
        "file_hash": ("FileHash: sha256:1", "FileHash: sha256:0"),
        "deriver": ("Deriver: 10d", "Deriver: 11d"),
        "compression": ("Compression: xz", "Compression: zstd"),
    }
    old, new = changes[field]
    assert old in text
    return NarInfo.parse(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("field", "still_valid"),
    [
        ("nar_size", False),
        ("nar_hash", False),
        ("store_path", False),
        ("references", False),
        ("url", True),
        ("file_hash", True),
        ("deriver", True),
        ("compression", True),
    ],
)
def test_what_the_signature_covers(conformance: Path, field: str, still_valid: bool) -> None:
    info = _tamper(sample(conformance, GO + "strNarinfoSample.narinfo"), field)
    expected = "cache.nixos.org-1" if still_valid else None
    assert verify_narinfo(info, TRUSTED) == expected


def test_malformed_signatures_are_skipped(conformance: Path) -> None:
    info = sample(conformance, GO + "strNarinfoSample.narinfo")
    good = info.sigs[0]
    info.sigs = ["cache.nixos.org-1:not base64!", "cache.nixos.org-1:" + "A" * 88, "junk", good]
    assert verify_narinfo(info, TRUSTED) == "cache.nixos.org-1"
    info.sigs = info.sigs[:3]
    assert verify_narinfo(info, TRUSTED) is None


def test_same_name_different_keys(conformance: Path) -> None:
    info = sample(conformance, GO + "strNarinfoSample2Multirefs.narinfo")
    impostor = PublicKey("test1", SecretKey.generate("test1").public_key.key)
    assert verify_narinfo(info, [impostor]) is None
    assert verify_narinfo(info, [impostor, PublicKey.parse(TEST1_PUBLIC)]) == "test1"


def test_sign_narinfo_appends_once(conformance: Path) -> None:
    info = sample(conformance, GO + "strNarinfoSampleUncompressed.narinfo")
    secret = SecretKey.parse(EXAMPLE_SECRET)
    before = list(info.sigs)
    sign_narinfo(info, secret)
    sign_narinfo(info, secret)
    assert info.sigs[:-1] == before and len(info.sigs) == len(before) + 1
    assert verify_narinfo(info, [PublicKey.parse(EXAMPLE_PUBLIC)]) == "cache.example.com-1"
    assert verify_narinfo(NarInfo.parse(info.to_text()), [secret.public_key]) is not None


# --- against real Nix --------------------------------------------------------


def test_nix_generated_key_loads(test_key: nixcache.KeyPair) -> None:
    secret = SecretKey.parse(test_key.secret_file.read_text())
    assert str(secret.public_key) == test_key.public_key


def test_narinfos_signed_by_nix_verify(binary_cache: nixcache.BinaryCache) -> None:
    trusted = [PublicKey.parse(binary_cache.key.public_key)]
    for path in binary_cache.paths:
        info = NarInfo.parse(binary_cache.narinfo_path(path).read_text())
        assert verify_narinfo(info, trusted) == nixcache.KEY_NAME
        assert verify_narinfo(info, [SecretKey.generate(nixcache.KEY_NAME).public_key]) is None


def _unsigned_copy(cache: nixcache.BinaryCache, dest: Path) -> Path:
    shutil.copytree(cache.root, dest)
    for path in cache.paths:
        narinfo = cache.narinfo_path(path)
        text = "".join(x for x in narinfo.read_text().splitlines(True) if not x.startswith("Sig:"))
        (dest / narinfo.name).write_text(text)
    return dest


def test_same_signature_as_nix(
    binary_cache: nixcache.BinaryCache, tmp_path: Path
) -> None:
    """`nix store sign` on an unsigned copy writes exactly the Sig we compute."""
    copy = _unsigned_copy(binary_cache, tmp_path / "cache")
    secret = SecretKey.generate("lazystore-ours-1")
    key_file = tmp_path / "ours.sec"
    key_file.write_text(str(secret))
    nixcache.run_nix(
        "nix", "store", "sign", "--store", f"file://{copy}", "--key-file", key_file,
        "-r", binary_cache.top,
    )
    for path in binary_cache.paths:
        signed_by_nix = NarInfo.parse((copy / binary_cache.narinfo_path(path).name).read_text())
        ours = NarInfo.parse(binary_cache.narinfo_path(path).read_text())
        ours.sigs = []
        sign_narinfo(ours, secret)
        assert signed_by_nix.sigs == ours.sigs


def _nix_verify(store_url: str, top: str, public_key: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["nix", "store", "verify", "--no-contents", "--store", store_url,
         "--trusted-public-keys", public_key, "-r", top],
        capture_output=True, env=nixcache.nix_env(),
    )


def test_nix_verifies_our_signatures(binary_cache: nixcache.BinaryCache, tmp_path: Path) -> None:
    copy = _unsigned_copy(binary_cache, tmp_path / "cache")
    secret = SecretKey.generate("lazystore-ours-1")
    for path in binary_cache.paths:
        narinfo = copy / binary_cache.narinfo_path(path).name
        info = NarInfo.parse(narinfo.read_text())
        sign_narinfo(info, secret)
        narinfo.write_text(info.to_text())
    ok = _nix_verify(f"file://{copy}", binary_cache.top, str(secret.public_key))
    assert ok.returncode == 0, ok.stderr.decode()
    other = SecretKey.generate("lazystore-ours-1").public_key
    bad = _nix_verify(f"file://{copy}", binary_cache.top, str(other))
    assert bad.returncode != 0
    assert b"untrusted" in bad.stderr
