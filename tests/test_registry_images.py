"""Images made in process from a real-Nix binary cache (file://): what is
fetched to make them, single flight, and the pure parts (names, media types)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from lazystore.registry import manifest as media
from lazystore.registry.blobs import BlobStore
from lazystore.registry.errors import DigestInvalid, NameInvalid, TagInvalid
from lazystore.registry.images import Images
from lazystore.registry.names import parse_digest, parse_name, parse_reference
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig
from lazystore.testing import nixcache


def _subs(cache: nixcache.BinaryCache, key: nixcache.KeyPair) -> Substituters:
    return Substituters(SubstituterConfig(urls=[cache.url], trusted_public_keys=[key.public_key],
                                          netrc_file=None))


def _name(top: str):  # type: ignore[no-untyped-def]
    return parse_name(Path(top).name[:32])


async def test_latest_needs_no_nar_when_the_cache_has_listings(
    binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair, tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path)
    store.open()
    async with _subs(binary_cache, test_key) as subs:
        async with Images(subs, store) as images:
            found = await images.manifest(_name(binary_cache.top), "latest")
        assert subs.stats.nars_fetched == 0
        assert subs.stats.narinfo_requests == len(binary_cache.paths)
    assert len(json.loads(found.data)["layers"]) == 1


async def test_without_listings_the_root_kinds_come_from_the_nars_and_the_image_is_the_same(
    binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair, tmp_path: Path,
) -> None:
    bare = nixcache.make_cache(binary_cache.top, tmp_path / "bare", test_key, listing=False)
    digests = []
    for cache in (binary_cache, bare):
        store = BlobStore(tmp_path / f"store-{len(digests)}")
        store.open()
        async with _subs(cache, test_key) as subs:
            async with Images(subs, store) as images:
                digests.append((await images.manifest(_name(cache.top), "latest")).digest)
            fetched = subs.stats.nars_fetched
    assert fetched == len(binary_cache.paths)
    assert digests[0] == digests[1]
    assert list((tmp_path / "store-1" / "tmp").iterdir()) == []  # the NARs' trees are gone


async def test_concurrent_requests_for_a_new_image_share_one_making(
    binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair, tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path)
    store.open()
    results: list[str] = []
    async with _subs(binary_cache, test_key) as subs, Images(subs, store) as images:

        async def pull(tag: str) -> None:
            results.append((await images.manifest(_name(binary_cache.top), tag)).digest)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                for tag in ("latest", "layered"):
                    nursery.start_soon(pull, tag)
        assert images.closure_walks == 2  # one per tag
        assert subs.stats.narinfo_requests == len(binary_cache.paths)
        assert subs.stats.nars_fetched == len(binary_cache.paths)  # each NAR once
        assert images.layers_built == len(binary_cache.paths)  # 4 paths, 4 layers
    assert len(set(results)) == 2 and len(results) == 20


async def test_built_layers_are_reused_from_the_cache_dir(
    binary_cache: nixcache.BinaryCache, test_key: nixcache.KeyPair, tmp_path: Path,
) -> None:
    digests = []
    for _ in range(2):
        store = BlobStore(tmp_path)
        store.open()
        async with _subs(binary_cache, test_key) as subs, Images(subs, store) as images:
            digests.append((await images.manifest(_name(binary_cache.top), "layered")).digest)
            built, fetched = images.layers_built, subs.stats.nars_fetched
    assert digests[0] == digests[1]
    assert (built, fetched) == (0, 0)  # the second run found every layer


@pytest.mark.parametrize("text, kind", [
    ("fprfv7jn480jqs0aaw76ps3grwj202ng", "hash"),
    ("fprfv7jn480jqs0aaw76ps3grwj202ng-prog", "base"),
    ("python3/hello", "attrs"),
    ("hello", "attrs"),
])
def test_names(text: str, kind: str) -> None:
    name = parse_name(text)
    assert {"hash": name.is_store_path and name.basename is None,
            "base": name.basename == text,
            "attrs": name.attrs == tuple(text.split("/"))}[kind]


@pytest.mark.parametrize("text", ["..", "a/../b", "Upper", "a" * 256, "a//b", "-a", "a-",
                                  "", "/a", "a/", "fprfv7jn480jqs0aaw76ps3grwj202ng-"])
def test_invalid_names(text: str) -> None:
    with pytest.raises(NameInvalid):
        parse_name(text)


def test_references() -> None:
    assert parse_reference("latest").tag == "latest"
    digest = "sha256:" + "a" * 64
    assert parse_reference(digest).digest == digest
    for bad, error in [("sha512:" + "0" * 128, DigestInvalid), ("sha256:ABC", DigestInvalid),
                       ("md5:x", DigestInvalid), (".tag", TagInvalid), ("t" * 129, TagInvalid)]:
        with pytest.raises(error):
            parse_reference(bad)
    with pytest.raises(DigestInvalid):
        parse_digest("sha256:" + "0" * 63)


def test_media_type_by_accept() -> None:
    assert not media.wants_docker("")
    assert not media.wants_docker(f"{media.DOCKER_MANIFEST}, */*")
    assert not media.wants_docker(f"{media.DOCKER_MANIFEST}, application/vnd.oci.image"
                                  ".manifest.v1+json")
    assert media.wants_docker(f"{media.DOCKER_MANIFEST}; q=0.9")
