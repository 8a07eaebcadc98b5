"""NarUnpacker and dump on the filesystem: the destination rules, cleanup on
every kind of failure, deep trees with a bounded number of open descriptors."""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.errors import NarError, UnpackError
from lazystore.nix import fsio, nar
from lazystore.testing import nartree
from lazystore.testing.nartree import TreeDir, TreeFile, TreeSymlink

TREE = TreeDir({
    b"bin": TreeDir({b"prog": TreeFile(b"#!/bin/sh\n", True)}),
    b"data": TreeFile(b"x" * 100_000),
    b"empty": TreeDir(),
    b"link": TreeSymlink(b"bin/prog"),
})
DATA = nartree.pack(TREE)


def dumped(path: Path) -> bytes:
    return b"".join(bytes(p) for p in fsio.dump(path))


def open_fds(under: Path) -> int:
    """Descriptors of this process open on *under* or below (other threads' fds
    elsewhere do not count)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(under) or target.startswith(f"{under}/"):
            count += 1
    return count


def test_unpack_in_small_chunks(tmp_path: Path) -> None:
    unpacker = fsio.NarUnpacker(tmp_path / "out")
    for i in range(0, len(DATA), 1000):
        unpacker.feed(DATA[i:i + 1000])
    unpacker.finish()
    assert dumped(tmp_path / "out") == DATA


@pytest.mark.parametrize("kind", ["dir", "file", "dangling symlink", "symlink to a dir"])
def test_an_existing_destination_is_refused_and_untouched(tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "dest"
    (tmp_path / "target").mkdir()
    if kind == "dir":
        dest.mkdir()
    elif kind == "file":
        dest.write_text("mine")
    elif kind == "dangling symlink":
        dest.symlink_to("nowhere")
    else:
        dest.symlink_to("target")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UnpackError, match="already exists"):
        fsio.unpack(io.BytesIO(DATA), dest)
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / "target") == []


def test_a_missing_parent_is_an_unpack_error(tmp_path: Path) -> None:
    with pytest.raises(UnpackError, match="No such file"):
        fsio.NarUnpacker(tmp_path / "missing" / "dest")


def test_a_destination_created_meanwhile_is_not_removed(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    unpacker = fsio.NarUnpacker(dest)
    dest.mkdir()
    (dest / "theirs").write_text("keep")
    with pytest.raises(UnpackError, match="File exists"):
        unpacker.feed(DATA)
    assert (dest / "theirs").read_text() == "keep"


@pytest.mark.parametrize("cut", [1, 200, len(DATA) // 2, len(DATA) - 8])
def test_an_incomplete_nar_leaves_nothing(tmp_path: Path, cut: int) -> None:
    unpacker = fsio.NarUnpacker(tmp_path / "dest")
    unpacker.feed(DATA[:cut])
    with pytest.raises(NarError, match="truncated"):
        unpacker.finish()
    assert os.listdir(tmp_path) == []


def test_a_bad_nar_late_in_the_stream_removes_completed_read_only_dirs(tmp_path: Path) -> None:
    good = nartree.pack(TreeDir({b"a": TREE, b"b": TreeSymlink(b"t")}))
    bad = good.replace(nar.encode_string(b"b"), nar.encode_string(b"0"))
    assert bad != good
    with pytest.raises(NarError, match="not sorted"):
        fsio.unpack(io.BytesIO(bad), tmp_path / "dest", chunk_size=64)
    assert os.listdir(tmp_path) == []


def test_feed_after_finish_or_abort_is_refused(tmp_path: Path) -> None:
    unpacker = fsio.NarUnpacker(tmp_path / "a")
    unpacker.feed(DATA)
    unpacker.finish()
    with pytest.raises(UnpackError, match="already finished"):
        unpacker.feed(b"")
    other = fsio.NarUnpacker(tmp_path / "b")
    other.feed(DATA[:500])
    other.abort()
    other.abort()
    assert not (tmp_path / "b").exists()
    with pytest.raises(UnpackError, match="already finished or aborted"):
        other.feed(DATA[500:])


def test_context_manager_aborts_on_an_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), fsio.NarUnpacker(tmp_path / "dest") as unpacker:
        unpacker.feed(DATA[:1000])
        raise RuntimeError("caller failed")
    assert os.listdir(tmp_path) == []


def test_nothing_is_left_open(tmp_path: Path) -> None:
    fsio.unpack(io.BytesIO(DATA), tmp_path / "ok")
    with pytest.raises(NarError):
        fsio.unpack(io.BytesIO(DATA[:-9]), tmp_path / "bad")
    pieces = fsio.dump(tmp_path / "ok")
    next(pieces)
    assert open_fds(tmp_path) > 0  # the walk holds its directory open...
    pieces.close()
    assert open_fds(tmp_path) == 0  # ...and closes it when abandoned
    dumped(tmp_path / "ok")
    fsio.remove_tree(tmp_path / "ok")
    assert open_fds(tmp_path) == 0


@pytest.fixture
def shm_path(tmp_path: Path) -> Iterator[Path]:
    """A private directory on tmpfs when there is one: deep trees are about depth,
    not about the disk, whose block frees (with discard) cost ~1 ms per directory."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="lazystore-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        fsio.remove_tree(path)


def deep_tree(depth: int) -> TreeDir:
    root = node = TreeDir()
    for i in range(depth):
        child = TreeDir({b"f": TreeFile(b"%d" % i, i % 2 == 0)})
        node.entries[b"d"] = child
        node = child
    return root


def test_deep_nesting_unpacks_dumps_and_removes(shm_path: Path) -> None:
    """5000 levels: far beyond PATH_MAX and the usual limit of open files."""
    data = nartree.pack(deep_tree(5000))
    unpacker = fsio.NarUnpacker(shm_path / "deep")
    peak = 0
    for i in range(0, len(data), 4096):
        unpacker.feed(data[i:i + 4096])
        peak = max(peak, open_fds(shm_path))
    unpacker.finish()
    assert fsio.FD_WINDOW <= peak <= fsio.FD_WINDOW + 2  # the window, a file, the parent
    assert dumped(shm_path / "deep") == data
    fsio.remove_tree(shm_path / "deep")
    assert os.listdir(shm_path) == [] and open_fds(shm_path) == 0


def test_deep_nesting_failure_cleans_up(shm_path: Path) -> None:
    data = nartree.pack(deep_tree(3000))
    with pytest.raises(NarError):
        fsio.unpack(io.BytesIO(data[:-30]), shm_path / "deep")
    assert os.listdir(shm_path) == []


def test_remove_tree_handles_read_only_dirs_and_does_not_follow_links(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "file").write_text("keep")
    fsio.unpack(io.BytesIO(nartree.pack(TREE)), tmp_path / "t")
    assert stat.S_IMODE((tmp_path / "t" / "bin").stat().st_mode) == 0o555
    (tmp_path / "t" / "empty").chmod(0o755)
    os.symlink(tmp_path / "keep", tmp_path / "t" / "empty" / "escape")
    (tmp_path / "t" / "empty").chmod(0o555)
    fsio.remove_tree(tmp_path / "t")
    fsio.remove_tree(tmp_path / "t")  # missing is fine
    assert os.listdir(tmp_path) == ["keep"]
    (tmp_path / "link").symlink_to("keep")
    fsio.remove_tree(tmp_path / "link")
    assert (tmp_path / "keep" / "file").read_text() == "keep"


def test_dump_refuses_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(fsio.DumpError, match="not a regular file"):
        dumped(tmp_path)


def test_max_depth_is_a_clean_rejection(tmp_path: Path) -> None:
    data = nartree.pack(deep_tree(40))
    unpacker = fsio.NarUnpacker(tmp_path / "deep", max_depth=30)
    with pytest.raises(NarError, match="deeper than 30 levels"):
        unpacker.feed(data)
    assert os.listdir(tmp_path) == []
