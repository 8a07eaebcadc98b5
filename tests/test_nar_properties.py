"""Property tests: random trees round-trip (pack/parse, and dump -> unpack -> dump
on disk); random mutations of valid NARs raise only NarError/UnpackError and
never write outside the destination."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazystore.errors import NarError, UnpackError
from lazystore.nix import fsio, nar
from lazystore.testing import nartree
from lazystore.testing.nartree import TreeDir, TreeFile, TreeSymlink

SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FS_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

names = st.binary(min_size=1, max_size=24).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
targets = st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)
leaves = st.one_of(
    st.builds(TreeFile, st.binary(max_size=300), st.booleans()),
    st.builds(TreeSymlink, targets),
)
trees = st.recursive(
    leaves, lambda children: st.builds(TreeDir, st.dictionaries(names, children, max_size=6)),
    max_leaves=30,
)


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in points:
        yield data[start:point]
        start = point
    yield data[start:]


@SETTINGS
@given(trees, st.lists(st.integers(min_value=0), max_size=8))
def test_random_trees_round_trip_through_the_parser(tree: nartree.Tree, cuts: list[int]) -> None:
    data = nartree.pack(tree)
    assert nartree.read_tree(split(data, cuts)) == tree
    assert b"".join(bytes(p) for p in nar.serialize(nar.parse(split(data, cuts)))) == data


@FS_SETTINGS
@given(trees)
def test_random_trees_round_trip_on_disk(tree: nartree.Tree) -> None:
    data = nartree.pack(tree)
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp, "first"), Path(tmp, "second")
        with fsio.NarUnpacker(first) as unpacker:
            unpacker.feed(data)
        dumped = b"".join(bytes(p) for p in fsio.dump(first))
        assert dumped == data
        with fsio.NarUnpacker(second) as unpacker:
            for piece in fsio.dump(first):
                unpacker.feed(piece)
        assert b"".join(bytes(p) for p in fsio.dump(second)) == data
        fsio.remove_tree(first)
        fsio.remove_tree(second)


# NARs to mutate: symlinks that point out of the destination, nested
# directories, executables, empty files.
SEEDS = [
    nartree.pack(TreeDir({
        b"a": TreeSymlink(b"../canary"),
        b"b": TreeDir({b"c": TreeFile(b"hello\n", True), b"d": TreeSymlink(b"/tmp")}),
        b"e": TreeFile(b""),
        b"f": TreeSymlink(b".."),
        b"g": TreeDir({b"h": TreeDir()}),
    })),
    nartree.pack(TreeFile(b"x" * 20, False)),
    nartree.pack(TreeSymlink(b"../canary/file")),
    nartree.pack(TreeDir({
        b"x%d" % i: TreeFile(b"z" * (i * 3), i % 2 == 1) for i in range(6)
    })),
]

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]),
        st.integers(min_value=0), st.integers(min_value=0, max_value=255),
    ),
    min_size=1, max_size=4,
)


def mutate(data: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in steps:
        at = where % (len(buf) + 1)
        if kind == "flip" and at < len(buf):
            buf[at] ^= 1 << (value % 8)
        elif kind == "set" and at < len(buf):
            buf[at] = value
        elif kind == "insert":
            buf[at:at] = bytes([value]) * (1 + value % 9)
        elif kind == "delete":
            del buf[at:at + 1 + value % 16]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "length":  # overwrite an aligned 8-byte word with a big number
            at -= at % 8
            buf[at:at + 8] = ((1 << (value % 64)) + value).to_bytes(8, "little")
    return bytes(buf)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path below *root* with its mode and (for files/links) contents."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st_ = os.lstat(path)
            if path.is_symlink():
                body = os.fsencode(os.readlink(path))
            elif path.is_file():
                body = path.read_bytes()
            else:
                body = b""
            seen[str(path.relative_to(root))] = (st_.st_mode, body)
    return seen


@FS_SETTINGS
@given(st.sampled_from(SEEDS), mutations, st.lists(st.integers(min_value=0), max_size=4))
def test_mutated_nars_fail_cleanly_and_stay_inside(
    seed: bytes, steps: list[tuple[str, int, int]], cuts: list[int]
) -> None:
    data = mutate(seed, steps)
    try:
        list(nar.parse(split(data, cuts)))
        valid = True
    except NarError:
        valid = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "box").mkdir()
        (work / "canary").mkdir()
        (work / "canary" / "file").write_bytes(b"canary")
        before = snapshot(work)
        dest = work / "box" / "dest"
        try:
            with fsio.NarUnpacker(dest) as unpacker:
                for piece in split(data, cuts):
                    unpacker.feed(piece)
        except (NarError, UnpackError):
            assert not valid or not os.path.lexists(dest)
            assert snapshot(work) == before
        else:
            assert valid
            assert b"".join(bytes(p) for p in fsio.dump(dest)) == data
            outside = {
                path: entry for path, entry in snapshot(work).items()
                if path != "box/dest" and not path.startswith("box/dest/")
            }
            assert outside == before
            fsio.remove_tree(dest)


def verdict(data: bytes | memoryview, chunk: int) -> tuple[str, list]:
    """("ok", events) or ("error", message) for *data* fed in pieces of *chunk*."""
    parser = nar.NarParser()
    events: list = []
    try:
        for i in range(0, len(data), chunk):
            for event in parser.feed(data[i:i + chunk]):
                events.append(bytes(event.data) if isinstance(event, nar.FileData) else event)
        parser.close()
    except NarError as exc:
        return "error", [str(exc)]
    return "ok", [e for e in events if e != b""]


@SETTINGS
@given(st.sampled_from(SEEDS), mutations, st.integers(min_value=1, max_value=64))
def test_chunking_never_changes_the_verdict(
    seed: bytes, steps: list[tuple[str, int, int]], chunk: int
) -> None:
    """Whole-buffer parsing takes shortcuts that byte-sized feeds never can: both
    must accept the same NARs with the same events and reject the rest alike."""
    data = mutate(seed, steps)
    # The pieces are views of a mutable buffer, as fsio.unpack feeds them.
    whole, pieces = verdict(data, len(data) or 1), verdict(memoryview(bytearray(data)), chunk)
    if whole[0] == "ok":
        # Contents may arrive split differently: compare them joined per file.
        assert pieces[0] == "ok"
        assert _joined(whole[1]) == _joined(pieces[1])
    else:
        assert pieces == whole


def _joined(events: list) -> list:
    out: list = []
    for event in events:
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        else:
            out.append(event)
    return out
