"""NAR against real Nix: pack equals ``nix-store --dump``, unpack reproduces the
NAR, listings equal the ``.ls`` files ``nix copy`` writes, hashes equal
``nix hash path``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
import zstandard

from lazystore.nix import base32, fsio, listing, nar
from lazystore.testing import nixcache

BIG = 3 << 20
ODD_NAMES = [
    "héllo wörld ✓.txt", "日本語", "emoji-🙂", " leading space", "trailing space ", "-dash",
    "quote'\"", "back\\slash", "tab\tname", "new\nline", "bell\x07", ".hidden", "..dots..",
    "~tilde", "$dollar", "*star?", "Foo", "foo", "FOO", "n" * 255,
]


def make_tree(root: Path) -> Path:
    """A tree with every kind of entry Nix stores (see module docstring)."""
    rng = random.Random(7)
    root.mkdir()
    (root / "bin").mkdir()
    prog = root / "bin" / "prog"
    prog.write_bytes(b"#!/bin/sh\necho hi\n")
    prog.chmod(0o755)
    os.symlink("prog", root / "bin" / "tool")
    os.symlink("/etc/hostname", root / "absolute")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("../" * 3 + "x", root / "updir")
    (root / "empty-file").touch()
    (root / "empty-dir").mkdir()
    (root / "big.bin").write_bytes(rng.randbytes(BIG))
    for name in ODD_NAMES:
        (root / name).write_text(f"content of {name}\n")
    os.close(os.open(os.fsencode(root) + b"/latin1-\xe9\xff", os.O_CREAT | os.O_WRONLY, 0o644))
    many = root / "many"
    many.mkdir()
    for i in range(300):
        path = many / f"f{i:03d}"
        if i % 7 == 0:
            os.symlink(f"f{(i + 1) % 300:03d}", path)
        else:
            path.write_bytes(rng.randbytes(i * 13))
            path.chmod(0o700 if i % 5 == 0 else 0o600)
    deep = root.joinpath(*"abcdefgh")
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, nix: None) -> Path:
    return make_tree(tmp_path_factory.mktemp("nar-nix") / "tree")


@pytest.fixture(scope="module")
def stored_tree(tree: Path) -> str:
    """The tree added to the Nix store (store paths are canonicalised: 0444/0555)."""
    return nixcache.run_nix("nix-store", "--add", tree).decode().strip()


@pytest.fixture(scope="module")
def nix_listing_cache(tmp_path_factory: pytest.TempPathFactory, stored_tree: str) -> Path:
    dest = tmp_path_factory.mktemp("ls-cache")
    url = f"file://{dest}?compression=none&write-nar-listing=true"
    nixcache.run_nix("nix", "copy", "--to", url, stored_tree)
    return dest


def nix_dump(path: str | Path) -> bytes:
    return nixcache.run_nix("nix-store", "--dump", path)


def our_dump(path: str | Path) -> bytes:
    return b"".join(bytes(p) for p in fsio.dump(path))


def test_pack_equals_nix_store_dump(tree: Path, stored_tree: str) -> None:
    for path in (tree, stored_tree, tree / "bin" / "prog", tree / "big.bin", tree / "dangling"):
        assert our_dump(path) == nix_dump(path), path


def test_pack_equals_nix_store_dump_for_the_sample_closure(sample_closure: str) -> None:
    for path in nixcache.closure(sample_closure):
        assert our_dump(path) == nix_dump(path), path


def test_unpack_then_nix_dump_reproduces_the_nar(tree: Path, tmp_path: Path) -> None:
    data = nix_dump(tree)
    fsio.unpack(io.BytesIO(data), tmp_path / "out", chunk_size=65536)
    assert nix_dump(tmp_path / "out") == data
    fsio.remove_tree(tmp_path / "out")


def test_unpack_of_single_files_and_symlinks(tree: Path, tmp_path: Path) -> None:
    for i, path in enumerate((tree / "bin" / "prog", tree / "empty-file", tree / "dangling")):
        data = nix_dump(path)
        fsio.unpack(io.BytesIO(data), tmp_path / f"out{i}")
        assert nix_dump(tmp_path / f"out{i}") == data


def test_unpacked_tree_has_store_modes(tree: Path, tmp_path: Path) -> None:
    fsio.unpack(io.BytesIO(nix_dump(tree)), tmp_path / "out")
    out = tmp_path / "out"
    seen = set()
    for dirpath, dirnames, filenames in os.walk(out):
        for name in [*dirnames, *filenames]:
            st = os.lstat(Path(dirpath) / name)
            if stat.S_ISLNK(st.st_mode):
                seen.add("symlink")
                continue
            mode = stat.S_IMODE(st.st_mode)
            original = os.lstat(tree / Path(dirpath).relative_to(out) / name)
            if stat.S_ISDIR(st.st_mode):
                assert mode == 0o555
            elif original.st_mode & stat.S_IXUSR:
                assert mode == 0o555
                seen.add("exec")
            else:
                assert mode == 0o444
                seen.add("file")
    assert seen == {"symlink", "exec", "file"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o555
    fsio.remove_tree(out)
    assert not out.exists()


def test_unpack_accepts_what_nix_restore_accepts(tree: Path, tmp_path: Path) -> None:
    """Our NAR restored by Nix, and Nix's NAR restored by us, give the same tree."""
    with subprocess.Popen(
        ["nix-store", "--restore", str(tmp_path / "by-nix")], stdin=subprocess.PIPE,
        env=nixcache.nix_env(),
    ) as proc:
        assert proc.stdin is not None
        for piece in fsio.dump(tree):
            proc.stdin.write(piece)
        proc.stdin.close()
    assert proc.returncode == 0
    assert nix_dump(tmp_path / "by-nix") == nix_dump(tree)


def test_listing_matches_the_ls_nix_copy_writes(
    stored_tree: str, nix_listing_cache: Path
) -> None:
    hash_part = Path(stored_tree).name[:32]
    expected = (nix_listing_cache / f"{hash_part}.ls").read_bytes()
    ours = listing.to_json(listing.from_nar(fsio.dump(stored_tree)))
    assert ours == expected
    # Sanity: the listing really covers the odd entries.
    entries = json.loads(expected.decode("utf-8", "surrogateescape"))["root"]["entries"]
    assert {"new\nline", "many", "big.bin", "n" * 255, "latin1-\udce9\udcff"} <= set(entries)


def _narinfo_fields(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)


def test_listing_matches_the_binary_cache_ls_files(binary_cache: nixcache.BinaryCache) -> None:
    listings = sorted(binary_cache.root.glob("*.ls"))
    assert len(listings) == len(binary_cache.paths)
    for ls_file in listings:
        info = _narinfo_fields(ls_file.with_suffix(".narinfo"))
        compressed = (binary_cache.root / info["URL"]).read_bytes()
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed)).read()
        assert listing.to_json(listing.from_nar([data])) == ls_file.read_bytes(), ls_file


def test_nar_hash_matches_nix_hash_path(tree: Path, stored_tree: str, sample_closure: str) -> None:
    for path in (tree, stored_tree, tree / "big.bin", sample_closure):
        digest, size = nar.nar_hash(bytes(p) for p in fsio.dump(path))
        by_nix = nixcache.nar_hash(str(path))  # Nix 2.8 prints the bare nix32 digest
        assert base32.encode(digest) == by_nix.removeprefix("sha256:")
        assert size == len(nix_dump(path))
        assert digest == hashlib.sha256(nix_dump(path)).digest()
