"""narinfo and nix-cache-info: text <-> value tables, every error, the
conformance corpus, and narinfos written by real Nix (`nix copy`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lazystore.errors import NarInfoError
from lazystore.nix.cacheinfo import CacheInfo
from lazystore.nix.hashes import Hash
from lazystore.nix.narinfo import NarInfo
from lazystore.testing import nixcache

SAMPLE = (
    "StorePath: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432\n"
    "URL: nar/1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d.nar.xz\n"
    "Compression: xz\n"
    "FileHash: sha256:1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d\n"
    "FileSize: 114980\n"
    "NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6\n"
    "NarSize: 464152\n"
    "References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27\n"
    "Deriver: 10dx1q4ivjb115y3h90mipaaz533nr0d-net-tools-1.60_p20170221182432.drv\n"
    "Sig: cache.nixos.org-1:sn5s/RrqEI+YG6/PjwdbPjcAC7rcta7sJU4mFOawGvJBLsW"
    "kyLtBrT2EuFt/LJjWkTZ+ZWOI9NTtjo/woMdvAg==\n"
    "Sig: hydra.other.net-1:JXQ3Z/PXf0EZSFkFioa4FbyYpbbTbHlFBtZf4VqU0tuMTWz"
    "hMD7p9Q7acJjLn3jofOtilAAwRILKIfVuyrbjAA==\n"
)

SAMPLE_VALUE = NarInfo(
    store_path="/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432",
    url="nar/1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d.nar.xz",
    compression="xz",
    file_hash=Hash.parse("sha256:1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d"),
    file_size=114980,
    nar_hash=Hash.parse("sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6"),
    nar_size=464152,
    references=["7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27"],
    deriver="10dx1q4ivjb115y3h90mipaaz533nr0d-net-tools-1.60_p20170221182432.drv",
    sigs=[
        "cache.nixos.org-1:sn5s/RrqEI+YG6/PjwdbPjcAC7rcta7sJU4mFOawGvJBLsWkyLtBrT2EuFt/"
        "LJjWkTZ+ZWOI9NTtjo/woMdvAg==",
        "hydra.other.net-1:JXQ3Z/PXf0EZSFkFioa4FbyYpbbTbHlFBtZf4VqU0tuMTWzhMD7p9Q7acJjLn3jofOti"
        "lAAwRILKIfVuyrbjAA==",
    ],
)

MINIMAL = """\
StorePath: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x
URL: nar/a.nar
NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6
NarSize: 1
"""

MINIMAL_VALUE = NarInfo(
    store_path="/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x",
    url="nar/a.nar",
    nar_hash=Hash.parse("sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6"),
    nar_size=1,
)

MINIMAL_SERIALIZED = MINIMAL.replace("NarSize: 1\n", "NarSize: 1\nReferences: \n").replace(
    "URL: nar/a.nar\n", "URL: nar/a.nar\nCompression: bzip2\n"
)


def test_parse_sample() -> None:
    assert NarInfo.parse(SAMPLE) == SAMPLE_VALUE


def test_serialize_sample() -> None:
    assert SAMPLE_VALUE.to_text() == SAMPLE


def test_parse_minimal_defaults() -> None:
    info = NarInfo.parse(MINIMAL)
    assert info == MINIMAL_VALUE
    assert info.compression == "bzip2"
    assert info.references == []
    assert info.file_hash is None and info.file_size is None and info.deriver is None
    assert info.system is None and info.ca is None and info.sigs == []


def test_serialize_minimal() -> None:
    assert MINIMAL_VALUE.to_text() == MINIMAL_SERIALIZED
    assert NarInfo.parse(MINIMAL_SERIALIZED) == MINIMAL_VALUE


@pytest.mark.parametrize(
    ("extra", "attr", "value"),
    [
        ("System: x86_64-linux\n", "system", "x86_64-linux"),
        (
            "CA: fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw\n",
            "ca",
            "fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
        ),
        (
            "CA: text:sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6\n",
            "ca",
            "text:sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6",
        ),
        ("Deriver: unknown-deriver\n", "deriver", None),
        ("Compression: zstd\n", "compression", "zstd"),
        ("Compression: \n", "compression", "bzip2"),
        ("References: \n", "references", []),
        ("References:\n", "references", []),
        (
            "References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-b 00bgd045z0d4icpbc2yyz4gx48ak44la-a\n",
            "references",
            ["7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-b", "00bgd045z0d4icpbc2yyz4gx48ak44la-a"],
        ),
        ("FileSize: 0\n", "file_size", 0),
        ("FileHash: sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=\n", "file_hash",
         Hash.compute(b"abc")),
        ("Unknown: whatever: it is\n", "url", "nar/a.nar"),
        ("X-Future-Field:\n", "url", "nar/a.nar"),
    ],
)
def test_parse_fields(extra: str, attr: str, value: object) -> None:
    info = NarInfo.parse(MINIMAL + extra)
    assert getattr(info, attr) == value
    assert NarInfo.parse(info.to_text()) == info


def test_nar_hash_in_every_form() -> None:
    b16 = "60adfd293a4d81ad7cd7e47263cbb3fc846309ef91b154a08ba672b558f94ff3"
    h = Hash("sha256", bytes.fromhex(b16))
    for form in (f"sha256:{b16}", f"sha256:{h.nix32()}", f"sha256:{h.base64()}", h.sri()):
        info = NarInfo.parse(MINIMAL.replace(str(MINIMAL_VALUE.nar_hash), form))
        assert info.nar_hash == h
        assert f"NarHash: sha256:{h.nix32()}\n" in info.to_text()


def _without(key: str) -> str:
    return "".join(line for line in MINIMAL.splitlines(True) if not line.startswith(key + ":"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_without("StorePath"), "no StorePath field"),
        (_without("URL"), "no URL field"),
        (_without("NarHash"), "no NarHash field"),
        (_without("NarSize"), "no NarSize field"),
        (MINIMAL.replace("URL: nar/a.nar", "URL: "), "empty URL"),
        (MINIMAL + "garbage\n", "line 5 is not 'Key: value'"),
        (MINIMAL + "\n\nFoo: bar\n", "line 5 is not 'Key: value'"),
        (MINIMAL + ": value\n", "line 5 is not 'Key: value'"),
        (MINIMAL + "System:x86_64-linux\n", "line 5 has no space after ':'"),
        (MINIMAL.replace("NarSize: 1", "NarSize: abc"), "NarSize is not a valid number"),
        (MINIMAL.replace("NarSize: 1", "NarSize: -1"), "NarSize is not a valid number"),
        (MINIMAL.replace("NarSize: 1", "NarSize: 1.5"), "NarSize is not a valid number"),
        (MINIMAL.replace("NarSize: 1", "NarSize: 18446744073709551616"), "NarSize is not a valid"),
        (MINIMAL.replace("NarSize: 1", "NarSize:  1"), "NarSize is not a valid number"),
        (MINIMAL.replace("NarSize: 1", "NarSize: 0"), "NarSize is 0"),
        (MINIMAL + "FileSize: 12k\n", "FileSize is not a valid number"),
        (MINIMAL.replace("sha256:0lx", "sha256:elx"), "NarHash: invalid hash"),
        (MINIMAL.replace("sha256:0lx", "sha256:0lxx"), "NarHash: .*wrong length"),
        (MINIMAL.replace("sha256:0lx", "0lx"), "NarHash: .*no known algorithm"),
        (
            MINIMAL.replace(
                "NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6",
                "NarHash: sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
            ),
            "NarHash is sha1, expected sha256",
        ),
        (MINIMAL + "FileHash: sha256:zzz\n", "FileHash"),
        (MINIMAL.replace("-x\n", "-x y\n"), "invalid character ' '"),
        (MINIMAL.replace("/nix/store/", "/gnu/store/"), "not in the store"),
        (MINIMAL + "References: 00bgd045z0d4icpbc2yyz4gx48ak44la-ok bad\n", "'bad'"),
        (MINIMAL + "References: 00bgd045z0d4icpbc2yyz4gx48ak44la-.x\n", "starts with '.'"),
        (MINIMAL + "Deriver: nope.drv\n", "'nope.drv'"),
        (MINIMAL + "CA: sha256:abc\n", "not a content address"),
        (MINIMAL + "CA: fixed:r:sha256:abc\n", "wrong length"),
        (MINIMAL + "CA: text:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw\n", "use sha256"),
        (MINIMAL + "NarSize: 2\n", "repeated field 'NarSize'"),
        (MINIMAL + "References: \nReferences: \n", "repeated field 'References'"),
        ("", "line 1 is not 'Key: value'"),
    ],
)
def test_parse_errors(text: str, match: str) -> None:
    with pytest.raises(NarInfoError, match=match) as info:
        NarInfo.parse(text)
    assert "\n" not in str(info.value)


def test_fingerprint_keeps_reference_order_and_full_paths() -> None:
    info = NarInfo.parse(
        MINIMAL
        + "References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-b 00bgd045z0d4icpbc2yyz4gx48ak44la-a\n"
    )
    assert info.fingerprint() == (
        b"1;/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x;"
        b"sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6;1;"
        b"/nix/store/7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-b,/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-a"
    )


def test_fingerprint_multirefs(conformance: Path) -> None:
    text = (conformance / "go-nix/narinfo-samples/strNarinfoSample2Multirefs.narinfo").read_text()
    assert NarInfo.parse(text).fingerprint() == (
        b"1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;"
        b"sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;"
        b"/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,"
        b"/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,"
        b"/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,"
        b"/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n"
    )


def test_fingerprint_reencodes_base16_nar_hash(conformance: Path) -> None:
    info = NarInfo.parse((conformance / "snix/narinfo-samples/nar_hash_hex.narinfo").read_text())
    nix32 = Hash("sha256", bytes.fromhex(
        "60adfd293a4d81ad7cd7e47263cbb3fc846309ef91b154a08ba672b558f94ff3"
    )).nix32()
    assert f";sha256:{nix32};45840;".encode() in info.fingerprint()


def test_fingerprint_other_store_dir() -> None:
    text = MINIMAL.replace("/nix/store/", "/gnu/store/") + (
        "References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-b\n"
    )
    info = NarInfo.parse(text, store_dir="/gnu/store")
    assert info.fingerprint("/gnu/store").startswith(b"1;/gnu/store/00bgd045")
    assert info.fingerprint("/gnu/store").endswith(
        b";1;/gnu/store/7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-b"
    )


def corpus(conformance: Path) -> list[str]:
    raw = zstandard.ZstdDecompressor().stream_reader(
        (conformance / "snix/narinfo.zst").open("rb")
    ).read()
    return [doc for doc in raw.decode().split("\n\n") if doc.strip()]


def test_corpus_parses_and_round_trips(conformance: Path) -> None:
    docs = corpus(conformance)
    assert len(docs) == 978
    infos = [NarInfo.parse(doc) for doc in docs]
    assert all(NarInfo.parse(info.to_text()) == info for info in infos)
    assert sum(info.system is not None for info in infos) == 8
    assert sum(info.ca is not None for info in infos) == 8
    assert sum(info.compression == "bzip2" for info in infos) == 1
    assert all(info.sigs for info in infos)


def samples(conformance: Path) -> list[Path]:
    return sorted(conformance.glob("*/narinfo-samples/*.narinfo")) + [
        conformance / "go-nix/big.narinfo"
    ]


def test_conformance_samples_round_trip(conformance: Path) -> None:
    for path in samples(conformance):
        info = NarInfo.parse(path.read_text())
        assert NarInfo.parse(info.to_text()) == info, path.name


@pytest.mark.parametrize(
    ("name", "attr", "value"),
    [
        ("snix/narinfo-samples/compression_default.narinfo", "compression", "bzip2"),
        ("snix/narinfo-samples/compression_none.narinfo", "compression", "none"),
        ("snix/narinfo-samples/references_missing.narinfo", "references", []),
        ("snix/narinfo-samples/explicit_unknown_deriver.narinfo", "deriver", None),
        ("go-nix/narinfo-samples/strNarinfoSampleWithUnknownDeriver.narinfo", "deriver", None),
        ("go-nix/narinfo-samples/strNarinfoSampleWithoutFileFields.narinfo", "file_size", None),
        (
            "snix/narinfo-samples/ca_nar_hash_sha1.narinfo",
            "ca",
            "fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
        ),
    ],
)
def test_conformance_sample_fields(conformance: Path, name: str, attr: str, value: object) -> None:
    assert getattr(NarInfo.parse((conformance / name).read_text()), attr) == value


def test_references_out_of_order_kept(conformance: Path) -> None:
    path = conformance / "snix/narinfo-samples/references_out_of_order.narinfo"
    info = NarInfo.parse(path.read_text())
    line = next(x for x in path.read_text().splitlines() if x.startswith("References: "))
    assert info.references == line.split()[1:]
    assert info.references != sorted(info.references)


def test_big_narinfo(conformance: Path) -> None:
    text = (conformance / "go-nix/big.narinfo").read_text()
    assert max(len(line) for line in text.splitlines()) > 64 * 1024
    info = NarInfo.parse(text)
    assert len(info.references) == 3691
    assert info.to_text() == text


def test_narinfos_written_by_nix(binary_cache: nixcache.BinaryCache) -> None:
    """Every narinfo `nix copy` wrote parses to what `nix path-info --json` says,
    and serialises back to the same bytes."""
    out = nixcache.run_nix(
        "nix", "path-info", "--json", "--store", binary_cache.url, "-r", binary_cache.top
    )
    by_path = {entry["path"]: entry for entry in json.loads(out)}
    assert sorted(by_path) == sorted(binary_cache.paths)
    for path, entry in by_path.items():
        text = binary_cache.narinfo_path(path).read_text()
        info = NarInfo.parse(text)
        assert info.to_text() == text
        assert info.store_path == path
        assert info.nar_hash == Hash.parse(entry["narHash"])
        assert info.nar_size == entry["narSize"]
        assert [f"/nix/store/{r}" for r in info.references] == entry["references"]
        assert f"/nix/store/{info.deriver}" == entry["deriver"]
        assert info.sigs == entry["signatures"]
        assert info.url == entry["url"]
        assert info.compression == "zstd"
        assert info.file_hash == Hash.parse(entry["downloadHash"])
        assert info.file_size == entry["downloadSize"]


CACHE_INFO = [
    ("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n", CacheInfo("/nix/store", True, 40)),
    ("StoreDir: /gnu/store\n", CacheInfo("/gnu/store", False, 50)),
    ("", CacheInfo("/nix/store", False, 50)),
    ("Priority: 10\nWantMassQuery: 0\nFoo: bar\n\n", CacheInfo("/nix/store", False, 10)),
]


@pytest.mark.parametrize(("text", "value"), CACHE_INFO)
def test_cache_info(text: str, value: CacheInfo) -> None:
    assert CacheInfo.parse(text) == value


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("StoreDir: nix/store\n", "StoreDir"),
        ("Priority: high\n", "Priority is not an integer"),
        ("WantMassQuery: yes\n", "WantMassQuery is not 0 or 1"),
        ("just words\n", "line 1 is not 'Key: value'"),
    ],
)
def test_cache_info_errors(text: str, match: str) -> None:
    with pytest.raises(NarInfoError, match=match):
        CacheInfo.parse(text)


def test_cache_info_written_by_nix(binary_cache: nixcache.BinaryCache) -> None:
    info = CacheInfo.parse((binary_cache.root / "nix-cache-info").read_text())
    assert info.store_dir == "/nix/store"


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_mutated_narinfo_parses_or_fails_cleanly(data: st.DataObject) -> None:
    text = SAMPLE + "System: x86_64-linux\nCA: fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw\n"
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 3))
        insert = data.draw(st.text(max_size=3))
        text = text[:at] + insert + text[at + cut :]
    try:
        info = NarInfo.parse(text)
    except NarInfoError as exc:
        assert "\n" not in str(exc)
        return
    assert NarInfo.parse(info.to_text()) == info
    assert info.fingerprint().startswith(b"1;/nix/store/")


@settings(deadline=None)
@given(st.text(max_size=120))
def test_random_cache_info_parses_or_fails_cleanly(text: str) -> None:
    try:
        CacheInfo.parse(text)
    except NarInfoError as exc:
        assert "\n" not in str(exc)
