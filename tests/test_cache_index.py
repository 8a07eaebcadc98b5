"""``lazystore cache index`` on caches written by real Nix: every path gets a
signed index whose chunks rebuild its NAR, nothing Nix reads changes (real
``nix copy --from`` and ``nix store verify`` still work), runs are
incremental, and a NAR that fails verification gets no index."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lazystore import cacheindex
from lazystore.nix import fileindex, nar
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import PublicKey, SecretKey
from lazystore.substituter import chunks
from lazystore.testing import nixcache

pytestmark = pytest.mark.usefixtures("nix")


def run(*argv: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazystore", *map(str, argv)],
                          capture_output=True, text=True)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file of a cache folder, but ours: (sha256, mtime_ns)."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        ours = rel.parts[0] in (fileindex.DATA_DIR, fileindex.MARKER) or path.suffix == ".lzindex"
        if path.is_file() and not ours:
            out[str(rel)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def copy_cache(cache: nixcache.BinaryCache, dest: Path) -> Path:
    shutil.copytree(cache.root, dest)
    return dest


def index(cache: Path, key: nixcache.KeyPair, *extra: object) -> subprocess.CompletedProcess[str]:
    return run("cache", "index", cache, "--secret-key-file", key.secret_file, *extra)


def rebuilt_nar(cache: Path, index: fileindex.FileIndex) -> bytes:
    with open(cache / index.data, "rb") as data:
        def contents(entry: fileindex.FileEntry) -> list[bytes]:
            return [chunks.decode(c, os.pread(data.fileno(), c.length, c.offset))
                    for c in entry.chunks]
        return b"".join(nar.serialize(index.nar_events(contents)))


@pytest.mark.parametrize("which", ["binary_cache", "roots_cache"])
def test_every_path_gets_an_index_rebuilding_its_nar(
        which: str, request: pytest.FixtureRequest, tmp_path: Path,
        test_key: nixcache.KeyPair) -> None:
    source: nixcache.BinaryCache = request.getfixturevalue(which)
    cache = copy_cache(source, tmp_path / "cache")
    before = snapshot(cache)
    res = index(cache, test_key, "--chunk-size", "4KiB", "--jobs", "2")
    assert res.returncode == 0, res.stderr
    assert f"indexed {len(source.paths)} paths, 0 already indexed, 0 failed" in res.stderr
    assert snapshot(cache) == before  # nothing Nix reads changed
    assert fileindex.offered((cache / fileindex.MARKER).read_bytes())
    key = PublicKey.parse(test_key.public_key)
    for store_path in source.paths:
        narinfo = cache / source.narinfo_path(store_path).name
        info = NarInfo.parse(narinfo.read_text())
        parsed = fileindex.parse(narinfo.with_suffix(".lzindex").read_bytes())
        assert fileindex.check(parsed, info, [key]) == nixcache.KEY_NAME
        assert parsed.chunk_size == 4096
        nar_bytes = rebuilt_nar(cache, parsed)
        dumped = nixcache.run_nix("nix-store", "--dump", store_path)
        assert nar_bytes == dumped
        assert all(c.size <= 4096 for f in parsed.files for c in f.chunks)


def test_nix_still_reads_the_indexed_cache(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    cache = copy_cache(binary_cache, tmp_path / "cache")
    assert index(cache, test_key).returncode == 0
    env = nixcache.nixtool.nix_env({"trusted-public-keys": test_key.public_key,
                                   "require-sigs": "true"})
    verify = subprocess.run(
        ["nix", "store", "verify", "--store", f"file://{cache}", "-r", binary_cache.top],
        capture_output=True, env=env)
    assert verify.returncode == 0, verify.stderr
    root = tmp_path / "root"
    copied = subprocess.run(["nix", "copy", "--from", f"file://{cache}", "--to", str(root),
                             binary_cache.top], capture_output=True, env=env)
    assert copied.returncode == 0, copied.stderr
    checked = subprocess.run(["nix-store", "--store", str(root), "--verify", "--check-contents"],
                             capture_output=True, env=env)
    assert checked.returncode == 0, checked.stderr
    for path in binary_cache.paths:
        assert (root / path.lstrip("/")).exists()


def test_second_run_skips_what_is_indexed_and_redoes_what_is_damaged(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    cache = copy_cache(binary_cache, tmp_path / "cache")
    assert index(cache, test_key).returncode == 0
    indexes = sorted(cache.glob("*.lzindex"))
    stamps = {p: p.stat().st_mtime_ns for p in indexes}
    again = index(cache, test_key)
    assert again.returncode == 0, again.stderr
    n = len(binary_cache.paths)
    assert f"indexed 0 paths, {n} already indexed" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in indexes} == stamps
    # A truncated data file, and an index by another key, are indexed again.
    first = fileindex.parse(indexes[0].read_bytes())
    with open(cache / first.data, "r+b") as data:
        data.truncate(first.data_size - 1)
    other = nixcache.KeyPair.generate(tmp_path / "keys", name="other-1")
    signed_by_other = index(cache, other)
    assert signed_by_other.returncode == 0
    assert f"indexed {n} paths, 0 already indexed" in signed_by_other.stderr
    redo = index(cache, test_key)
    assert f"indexed {n} paths, 0 already indexed" in redo.stderr


def test_a_nar_failing_its_hash_gets_no_index(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    cache = copy_cache(binary_cache, tmp_path / "cache")
    victim = cache / binary_cache.narinfo_path(binary_cache.top).name
    info = NarInfo.parse(victim.read_text())
    nar_file = cache / info.url
    nar_file.chmod(0o644)
    raw = bytearray(subprocess.run(["zstd", "-dc", nar_file], capture_output=True,
                                   check=True).stdout)
    raw[-20] ^= 1  # inside the last file's contents or padding: still a NAR
    nar_file.write_bytes(subprocess.run(["zstd", "-c"], input=bytes(raw), capture_output=True,
                                        check=True).stdout)
    res = index(cache, test_key)
    assert res.returncode == 1
    assert f"lazystore: error: {info.store_path}: " in res.stderr
    assert not victim.with_suffix(".lzindex").exists()
    others = len(binary_cache.paths) - 1
    assert f"indexed {others} paths, 0 already indexed, 1 failed" in res.stderr
    assert not [p for p in (cache / fileindex.DATA_DIR).iterdir() if p.name.startswith(".")]


def test_bad_arguments_are_one_line_errors(tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    res = index(tmp_path / "missing", test_key)
    assert res.returncode == 1 and res.stderr == f"lazystore: error: {tmp_path / 'missing'} " \
        "is not a folder\n"
    res = run("cache", "index", tmp_path, "--secret-key-file", tmp_path / "nokey")
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    res = index(tmp_path, test_key, "--chunk-size", "1GiB")
    assert res.returncode == 2 and "not a size" in res.stderr
    res = index(tmp_path, test_key, "--level", "20")
    assert res.returncode == 2 and "not a zstd level from 1 to 19" in res.stderr
    with pytest.raises(cacheindex.CacheIndexError, match="chunk size"):
        cacheindex.index_cache(tmp_path, SecretKey.generate("k"), 128 << 20)


MIXED_NIX = """
derivation {
  name = "cache-index-mixed-2";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "mkdir $out && head -c 3000000 /dev/urandom > $out/random &&
                 seq 1 300000 | head -c 2000000 > $out/text" ];
  PATH = "/usr/bin:/bin";
}
"""


def test_large_chunks_rebuild_the_nar_and_random_ones_are_raw_blocks_zstd_reads(
        tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    expr = tmp_path / "mixed.nix"
    expr.write_text(MIXED_NIX)
    top = nixcache.build(expr)
    cache = nixcache.make_cache(top, tmp_path / "cache", test_key).root
    res = index(cache, test_key, "--chunk-size", "256KiB", "--jobs", "2")
    assert res.returncode == 0, res.stderr
    [index_file] = [p for p in cache.glob("*.lzindex") if Path(top).name[:32] in p.name]
    parsed = fileindex.parse(index_file.read_bytes())
    assert rebuilt_nar(cache, parsed) == nixcache.run_nix("nix-store", "--dump", top)
    frames = {}
    with open(cache / parsed.data, "rb") as data:
        for entry in parsed.files:
            frames[b"/".join(entry.path).decode()] = [
                (c, os.pread(data.fileno(), c.length, c.offset)) for c in entry.chunks]
    random_chunks, text_chunks = frames["random"], frames["text"]
    assert len(random_chunks) == 12 and len(text_chunks) == 8
    for chunk, frame in random_chunks:
        # magic, Single_Segment with a 4-byte content size, then raw blocks of <= 128 KiB
        assert frame[:5] == b"\x28\xb5\x2f\xfd\xa0"
        blocks = -(-chunk.size // (128 << 10))
        assert chunk.length == chunk.size + 4 + 1 + 4 + 3 * blocks
    assert all(c.length < c.size // 2 for c, _ in text_chunks)
    shutil.rmtree(cache / fileindex.DATA_DIR)
    for old in cache.glob("*.lzindex"):
        old.unlink()
    assert index(cache, test_key, "--chunk-size", "256KiB", "--level", "1").returncode == 0
    fast = fileindex.parse(index_file.read_bytes())
    assert fast.data_size > parsed.data_size  # level 1 compresses the text less than 3
    assert rebuilt_nar(cache, fast) == nixcache.run_nix("nix-store", "--dump", top)
    # an independent decoder (the zstd command) reads every frame of the data file
    out = subprocess.run(["zstd", "-dc", cache / parsed.data], capture_output=True, check=True)
    assert out.stdout == b"".join(Path(top, name).read_bytes()
                                  for name in sorted(frames, key=lambda n: frames[n][0][0].offset))
