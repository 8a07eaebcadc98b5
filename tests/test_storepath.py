"""Store paths: tables of valid and invalid base names and full paths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazystore.errors import FormatError
from lazystore.nix.storepath import StorePath, check_store_dir, is_valid_basename
from lazystore.testing import nixcache

H = "00bgd045z0d4icpbc2yyz4gx48ak44la"

VALID = [
    (f"{H}-net-tools-1.60_p20170221182432", "net-tools-1.60_p20170221182432"),
    (f"{H}-a", "a"),
    (f"{H}-foo+bar-1.0?x=y", "foo+bar-1.0?x=y"),
    (f"{H}-x.drv", "x.drv"),
    (f"{H}--", "-"),
    (f"{H}-" + "n" * 211, "n" * 211),
    (f"{H}-A_Z.a+b=c?d", "A_Z.a+b=c?d"),
]

INVALID = [
    (f"{H}-", "empty"),
    (H, "not a store path base name"),
    (f"{H}_name", "not a store path base name"),
    (f"{H}-" + "n" * 212, "longer than 211"),
    (f"{H}-.hidden", "starts with '.'"),
    (f"{H}-..", "starts with '.'"),
    (f"{H}-a b", "invalid character ' '"),
    (f"{H}-a/b", "invalid character '/'"),
    (f"{H}-caf\u00e9", "invalid character"),
    (f"{H}-a\0b", "invalid character"),
    (f"{H}-a:b", "invalid character ':'"),
    ("e0bgd045z0d4icpbc2yyz4gx48ak44la-x", "hash part"),
    ("00BGD045Z0D4ICPBC2YYZ4GX48AK44LA-x", "hash part"),
    ("0bgd045z0d4icpbc2yyz4gx48ak44la-xy", "not a store path base name"),
    ("", "not a store path base name"),
]


@pytest.mark.parametrize(("base", "name"), VALID)
def test_valid_basenames(base: str, name: str) -> None:
    sp = StorePath.from_basename(base)
    assert (sp.hash_part, sp.name) == (H, name)
    assert sp.basename == base == str(sp)
    assert is_valid_basename(base)
    assert StorePath.parse(f"/nix/store/{base}") == sp
    assert sp.path() == f"/nix/store/{base}"


@pytest.mark.parametrize(("base", "match"), INVALID)
def test_invalid_basenames(base: str, match: str) -> None:
    with pytest.raises(FormatError, match=match) as info:
        StorePath.from_basename(base)
    assert "\n" not in str(info.value)
    assert not is_valid_basename(base)


@pytest.mark.parametrize(
    ("path", "store_dir", "expected"),
    [
        (f"/nix/store/{H}-x", "/nix/store", f"{H}-x"),
        (f"/nix/store/{H}-x/", "/nix/store", f"{H}-x"),
        (f"/gnu/store/{H}-x", "/gnu/store", f"{H}-x"),
        (f"/{H}-x", "/", f"{H}-x"),
    ],
)
def test_parse_full_path(path: str, store_dir: str, expected: str) -> None:
    sp = StorePath.parse(path, store_dir)
    assert sp.basename == expected
    assert StorePath.parse(sp.path(store_dir), store_dir) == sp


@pytest.mark.parametrize(
    ("path", "store_dir", "match"),
    [
        (f"/gnu/store/{H}-x", "/nix/store", "not in the store"),
        (f"nix/store/{H}-x", "/nix/store", "not in the store"),
        (f"/nix/store/{H}-x/bin/sh", "/nix/store", "sub-path"),
        (f"/nix/store//{H}-x", "/nix/store", "sub-path|not a store path"),
        ("/nix/store/", "/nix/store", "not a store path base name"),
        (f"/nix/storeX/{H}-x", "/nix/store", "not in the store"),
        (f"/nix/store/{H}-x", "nix/store", "not a canonical"),
        (f"/nix/store/{H}-x", "/nix/store/", "not a canonical"),
        (f"/nix/./store/{H}-x", "/nix/./store", "not a canonical"),
    ],
)
def test_parse_full_path_rejects(path: str, store_dir: str, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        StorePath.parse(path, store_dir)


def test_store_dir_check() -> None:
    assert check_store_dir("/nix/store") == "/nix/store"
    for bad in ("", "relative", "/a//b", "/a/../b", "/a/"):
        with pytest.raises(FormatError):
            check_store_dir(bad)


def test_ordering_and_hashing() -> None:
    a, b = StorePath.from_basename(f"{H}-a"), StorePath.from_basename(f"{H}-b")
    assert sorted([b, a]) == [a, b]
    assert len({a, StorePath(H, "a")}) == 1


def test_paths_built_by_nix_parse(sample_closure: str) -> None:
    for path in nixcache.closure(sample_closure):
        assert StorePath.parse(path).path() == path


@settings(deadline=None)
@given(st.one_of(st.text(max_size=50), st.text(alphabet="ab.-+?=_Z9 /", max_size=230)))
def test_random_names_agree_with_the_rules(name: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
    expected = 0 < len(name) <= 211 and set(name) <= allowed and not name.startswith(".")
    assert is_valid_basename(f"{H}-{name}") == expected
