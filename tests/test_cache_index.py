"""``lazystore cache index`` on caches written by real Nix: every path gets a
signed index whose chunks rebuild its NAR, nothing Nix reads changes (real
``nix copy --from`` and ``nix store verify`` still work), runs are
incremental, and a NAR that fails verification gets no index."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lazystore import cacheindex
from lazystore.nix import fileindex, nar
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import PublicKey, SecretKey
from lazystore.substituter import chunks
from lazystore.testing import nixcache
from tests.support.terminal import run_on_terminal

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


def test_a_rerun_keeps_only_an_index_signed_for_exactly_its_nar(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    """The skip checks the signature, not the tree: an index of another NAR
    (signed by the same key) and one edited since it was signed are redone."""
    cache = copy_cache(binary_cache, tmp_path / "cache")
    assert index(cache, test_key).returncode == 0
    first, second, third = sorted(cache.glob("*.lzindex"))[:3]
    second.write_bytes(first.read_bytes())  # the index of another path's NAR
    text = third.read_bytes()
    at = text.rindex(b'"size":') + len(b'"size":')
    third.write_bytes(text[:at] + b"1" + text[at:])  # a file's size, after signing
    again = index(cache, test_key)
    n = len(binary_cache.paths)
    assert f"indexed 2 paths, {n - 2} already indexed, 0 failed" in again.stderr
    key = PublicKey.parse(test_key.public_key)
    for index_file in (first, second, third):
        info = NarInfo.parse(index_file.with_suffix(".narinfo").read_text())
        parsed = fileindex.parse(index_file.read_bytes())
        assert fileindex.check(parsed, info, [key]) == nixcache.KEY_NAME
        assert rebuilt_nar(cache, parsed) == nixcache.run_nix("nix-store", "--dump",
                                                              info.store_path)


def test_the_data_file_is_on_disk_before_its_index_is_in_place(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As Nix puts a NAR before its narinfo: the data file is fsynced, renamed
    and its directory fsynced before the index is written, renamed and its
    directory fsynced, so a crash never leaves an index without its data."""
    cache = copy_cache(binary_cache, tmp_path / "cache")
    narinfo = cache / binary_cache.narinfo_path(binary_cache.top).name
    calls: list[tuple[str, str]] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def traced_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def traced(name: str, real: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def move(src: Any, dst: Any) -> None:
            calls.append((name, str(dst)))
            real(src, dst)
        return move

    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(os, "rename", traced("rename", rename))
    monkeypatch.setattr(os, "replace", traced("rename", replace))
    (cache / fileindex.DATA_DIR).mkdir()
    secret = SecretKey.parse(test_key.secret_file.read_text())
    assert cacheindex.index_path(cache, narinfo, secret, 4096).indexed
    monkeypatch.undo()
    hash_part = narinfo.name.removesuffix(".narinfo")
    data = cache / fileindex.DATA_DIR / f"{hash_part}.lzdata"
    index_file = narinfo.with_suffix(".lzindex")
    pid = os.getpid()
    assert calls == [
        ("fsync", str(data.with_name(f".{data.name}.{pid}.tmp"))),
        ("rename", str(data)),
        ("fsync", str(data.parent)),
        ("fsync", str(index_file.with_name(f".{index_file.name}.{pid}.tmp"))),
        ("rename", str(index_file)),
        ("fsync", str(cache)),
    ]


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


def tree_of(cache: Path) -> dict[str, bytes]:
    """Every file we wrote into a cache folder, by name (temporaries too)."""
    ours = [*cache.glob("*.lzindex"), *cache.glob(".*"), *(cache / fileindex.DATA_DIR).iterdir()]
    return {str(p.relative_to(cache)): p.read_bytes() for p in ours}


def test_worker_processes_write_what_threads_write(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    secret = SecretKey.parse(test_key.secret_file.read_text())
    written = []
    for processes in (True, False):
        cache = copy_cache(binary_cache, tmp_path / f"cache-{processes}")
        seen: list[object] = []
        results = cacheindex.index_cache(cache, secret, 4096, jobs=2, on_done=seen.append,
                                         processes=processes)
        assert all(isinstance(r, cacheindex.Result) and r.indexed for r in results)
        assert sorted(map(id, seen)) == sorted(map(id, results))  # each one reported once
        assert [r.path for r in results] == [  # in narinfo order, whatever order they came in
            NarInfo.parse(p.read_text()).store_path for p in cacheindex.narinfos(cache)]
        written.append(tree_of(cache))
    assert written[0] == written[1] and len(written[0]) == 2 * len(binary_cache.paths)
    assert not multiprocessing.active_children()


def sabotaged(cache_of: nixcache.BinaryCache, cache: Path, monkeypatch: pytest.MonkeyPatch,
              act: Callable[[Path], None]) -> NarInfo:
    """Make the top path's worker run *act(cache)* before it reads its NAR (the
    forked workers inherit the patch); the top path's narinfo."""
    victim = NarInfo.parse(cache_of.narinfo_path(cache_of.top).read_text())
    read_nar = cacheindex._read_nar

    def patched(cache: Path, info: NarInfo, sink: object) -> None:
        if info.store_path == victim.store_path:
            act(cache)
        read_nar(cache, info, sink)  # type: ignore[arg-type]

    monkeypatch.setattr(cacheindex, "_read_nar", patched)
    return victim


def test_a_worker_that_dies_fails_its_path_and_the_others_go_on(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = copy_cache(binary_cache, tmp_path / "cache")

    def die(cache: Path) -> None:
        # the data file's temporary is open and written to when the worker dies
        assert list((cache / fileindex.DATA_DIR).glob(".*.tmp"))
        os.kill(os.getpid(), signal.SIGKILL)

    victim = sabotaged(binary_cache, cache, monkeypatch, die)
    secret = SecretKey.parse(test_key.secret_file.read_text())
    results = cacheindex.index_cache(cache, secret, jobs=2, processes=True)
    failed = [r for r in results if isinstance(r, cacheindex.CacheIndexError)]
    assert [str(r) for r in failed] == [
        f"{victim.store_path}: the process indexing it died (killed by SIGKILL)"]
    assert sum(isinstance(r, cacheindex.Result) for r in results) == len(results) - 1
    assert not [p for p in (cache / fileindex.DATA_DIR).iterdir() if p.name.startswith(".")]
    assert not list(cache.glob(".*"))
    assert not multiprocessing.active_children()
    monkeypatch.undo()
    again = cacheindex.index_cache(cache, secret, jobs=2, processes=True)
    assert [r.indexed for r in again if isinstance(r, cacheindex.Result)].count(True) == 1
    assert len(again) == len(results) and all(isinstance(r, cacheindex.Result) for r in again)


def test_a_bug_in_a_worker_fails_that_path_only(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = copy_cache(binary_cache, tmp_path / "cache")

    def bug(cache: Path) -> None:
        raise ZeroDivisionError("a bug")

    victim = sabotaged(binary_cache, cache, monkeypatch, bug)
    secret = SecretKey.parse(test_key.secret_file.read_text())
    results = cacheindex.index_cache(cache, secret, jobs=2, processes=True)
    failed = [str(r) for r in results if isinstance(r, cacheindex.CacheIndexError)]
    assert failed == [f"{victim.store_path}: internal error: ZeroDivisionError('a bug')"]
    assert not [p for p in (cache / fileindex.DATA_DIR).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("processes", [True, False])
def test_the_read_back_catches_a_frame_that_is_not_its_chunk(
        processes: bool, binary_cache: nixcache.BinaryCache, tmp_path: Path,
        test_key: nixcache.KeyPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NAR file is not hashed on the way in: the read-back alone stands
    between a bad frame and an index."""
    cache = copy_cache(binary_cache, tmp_path / "cache")
    encode = chunks.encode

    def flipped(data: bytes | bytearray | memoryview, level: int = chunks.LEVEL) -> bytes:
        wrong = bytearray(data)
        if wrong[:64] == b"d" * 64:  # the docs path's manual.txt only
            wrong[len(wrong) // 2] ^= 1
        return encode(wrong, level)

    monkeypatch.setattr(chunks, "encode", flipped)
    secret = SecretKey.parse(test_key.secret_file.read_text())
    results = cacheindex.index_cache(cache, secret, 64 << 10, jobs=2, processes=processes)
    failed = [str(r) for r in results if isinstance(r, cacheindex.CacheIndexError)]
    assert len(failed) == 1 and failed[0].endswith(": the chunks do not reproduce its NarHash")
    store_path = failed[0].split(":")[0]
    [narinfo] = [p for p in cacheindex.narinfos(cache)
                 if NarInfo.parse(p.read_text()).store_path == store_path]
    assert not narinfo.with_suffix(".lzindex").exists()
    assert not (cache / fileindex.DATA_DIR / narinfo.with_suffix(".lzdata").name).exists()
    assert not [p for p in (cache / fileindex.DATA_DIR).iterdir() if p.name.startswith(".")]


def test_a_frame_declaring_another_size_does_not_read_back(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = copy_cache(binary_cache, tmp_path / "cache")
    encode = chunks.encode
    monkeypatch.setattr(chunks, "encode", lambda data, level=3: encode(bytes(data) + b"x", level))
    secret = SecretKey.parse(test_key.secret_file.read_text())
    results = cacheindex.index_cache(cache, secret, jobs=2, processes=False)
    assert all(isinstance(r, cacheindex.CacheIndexError) and "data file does not read back"
               in str(r) and "declares" in str(r) for r in results)
    assert not list(cache.glob("*.lzindex"))


def test_progress_bar_on_a_terminal(
        binary_cache: nixcache.BinaryCache, tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    cache = copy_cache(binary_cache, tmp_path / "cache")
    code, text = run_on_terminal([sys.executable, "-m", "lazystore", "cache", "index", cache,
                                  "--secret-key-file", test_key.secret_file, "--jobs", "2"])
    assert code == 0
    n = len(binary_cache.paths)
    assert f"] 1/{n} paths, " in text and f"[{'#' * 30}] {n}/{n} paths, " in text
    assert text.count("\r") >= n and f"indexed {n} paths, 0 already indexed" in text


@contextlib.contextmanager
def indexing_big_cache(tmp_path: Path, key: nixcache.KeyPair
                       ) -> Iterator[tuple[subprocess.Popen[bytes], Path, list[int]]]:
    """`cache index --jobs 2` of two 100 MB paths in a session of its own,
    once a worker is writing a data file: (the process, the cache, its
    workers' pids). Killed on the way out if still running."""
    expr = tmp_path / "big.nix"
    expr.write_text(BIG_TEXT_NIX)
    cache = nixcache.make_cache(nixcache.build(expr), tmp_path / "cache", key).root
    proc = subprocess.Popen([sys.executable, "-m", "lazystore", "cache", "index", cache,
                             "--secret-key-file", key.secret_file, "--jobs", "2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        data = cache / fileindex.DATA_DIR
        deadline = time.monotonic() + 60
        while not (data.is_dir() and list(data.glob(".*.tmp"))):  # a worker is writing
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        workers = children(proc.pid)
        assert workers
        yield proc, cache, workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_ctrl_c_stops_the_workers_and_leaves_no_temporary_files(
        tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    with indexing_big_cache(tmp_path, test_key) as (proc, cache, workers):
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not [p for p in (cache / fileindex.DATA_DIR).iterdir() if p.name.startswith(".")]
    assert not list(cache.glob(".*"))


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


BIG_TEXT_NIX = """
let
  text = name: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "mkdir $out && seq 1 20000000 | head -c 100000000 > $out/text" ];
    PATH = "/usr/bin:/bin";
  };
  other = text "cache-index-big-text-2";
in derivation {
  name = "cache-index-big-text-1";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "mkdir $out && echo ${other} > $out/ref &&
                 seq 1 20000000 | head -c 100000000 > $out/text" ];
  PATH = "/usr/bin:/bin";
}
"""


def test_workers_of_a_killed_parent_finish_their_path_and_exit_leaving_no_temporary(
        tmp_path: Path, test_key: nixcache.KeyPair) -> None:
    with indexing_big_cache(tmp_path, test_key) as (proc, cache, workers):
        proc.kill()
        _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text()
              for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.05)
    assert b"Traceback" not in err
    assert not [p for p in (cache / fileindex.DATA_DIR).iterdir() if p.name.startswith(".")]
    assert not list(cache.glob(".*"))
