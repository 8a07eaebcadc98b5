"""NAR format, pure: byte tables for the writer and parser, the rejection table
with its messages, truncation at every byte, listings and their JSON."""

from __future__ import annotations

import pytest

from lazystore.errors import NarError
from lazystore.nix import listing, nar
from lazystore.nix.nar import (
    DirEnd,
    DirStart,
    FileData,
    FileEnd,
    FileStart,
    Symlink,
)
from lazystore.testing import nartree
from lazystore.testing.nartree import TreeDir, TreeFile, TreeSymlink


def s(value: bytes | str) -> bytes:
    """A NAR string, written out independently of the code under test."""
    raw = value.encode() if isinstance(value, str) else value
    padding = (8 - len(raw) % 8) % 8
    return len(raw).to_bytes(8, "little") + raw + b"\0" * padding


def tokens(*items: bytes | str | int) -> bytes:
    """Strings for str/bytes items; an int is a raw 8-byte little-endian number."""
    return b"".join(i.to_bytes(8, "little") if isinstance(i, int) else s(i) for i in items)


HEAD = ("nix-archive-1", "(", "type")


def regular(contents: bytes, executable: bool = False) -> tuple:
    exe = ("executable", "") if executable else ()
    return ("(", "type", "regular", *exe, "contents", contents, ")")


# --- byte tables ------------------------------------------------------------

BYTE_TABLE = [
    ("empty file", TreeFile(b""), tokens("nix-archive-1", *regular(b""))),
    ("one byte", TreeFile(b"x"), tokens("nix-archive-1", *regular(b"x"))),
    ("eight bytes", TreeFile(b"12345678"), tokens("nix-archive-1", *regular(b"12345678"))),
    ("executable", TreeFile(b"#!", True), tokens("nix-archive-1", *regular(b"#!", True))),
    ("symlink", TreeSymlink(b"../t"),
     tokens("nix-archive-1", "(", "type", "symlink", "target", "../t", ")")),
    ("empty dir", TreeDir(), tokens("nix-archive-1", "(", "type", "directory", ")")),
    (
        "dir, sorted by bytes",
        TreeDir({b"b": TreeFile(b"B"), b"a": TreeSymlink(b"b"), b"C": TreeDir()}),
        tokens(
            "nix-archive-1", "(", "type", "directory",
            "entry", "(", "name", "C", "node", "(", "type", "directory", ")", ")",
            "entry", "(", "name", "a", "node", "(", "type", "symlink", "target", "b", ")", ")",
            "entry", "(", "name", "b", "node", *regular(b"B"), ")",
            ")",
        ),
    ),
]


def test_string_encoding_table() -> None:
    assert nar.encode_string(b"") == bytes(8)
    assert nar.encode_string(b"a") == b"\x01" + bytes(7) + b"a" + bytes(7)
    assert nar.encode_string(b"12345678") == b"\x08" + bytes(7) + b"12345678"
    assert nar.encode_string(b"123456789") == b"\x09" + bytes(7) + b"123456789" + bytes(7)


@pytest.mark.parametrize("label,tree,expected", BYTE_TABLE, ids=[c[0] for c in BYTE_TABLE])
def test_pack_writes_the_table_bytes(label: str, tree: nartree.Tree, expected: bytes) -> None:
    assert nartree.pack(tree) == expected


@pytest.mark.parametrize("label,tree,expected", BYTE_TABLE, ids=[c[0] for c in BYTE_TABLE])
def test_read_tree_parses_the_table_bytes(label: str, tree: nartree.Tree, expected: bytes) -> None:
    assert nartree.read_tree([expected]) == tree


def _events(data: bytes, chunk: int) -> list:
    parser = nar.NarParser()
    out = []
    for i in range(0, len(data), chunk):
        for event in parser.feed(data[i:i + chunk]):
            if isinstance(event, FileData):
                event = FileData(bytes(event.data))
            out.append(event)
    parser.close()
    # Contents may come in pieces: join adjacent data events.
    joined: list = []
    for event in out:
        if isinstance(event, FileData) and joined and isinstance(joined[-1], FileData):
            joined[-1] = FileData(joined[-1].data + event.data)
        else:
            joined.append(event)
    return joined


@pytest.mark.parametrize("chunk", [1, 3, 8, 64, 1 << 20])
def test_events_and_offsets_whatever_the_chunking(chunk: int) -> None:
    data = BYTE_TABLE[-1][2]
    # narOffset of "B": everything before it, plus its 8-byte length.
    offset_b = data.index(s("contents") + (1).to_bytes(8, "little") + b"B") + 24
    assert data[offset_b:offset_b + 1] == b"B"
    assert _events(data, chunk) == [
        DirStart(None),
        DirStart(b"C"), DirEnd(),
        Symlink(b"a", b"b"),
        FileStart(b"b", False, 1, offset_b), FileData(b"B"), FileEnd(),
        DirEnd(),
    ]


def test_large_contents_come_as_views_of_the_fed_chunk() -> None:
    body = bytes(range(256)) * 4096
    data = nartree.pack(TreeFile(body))
    events = nar.NarParser().feed(data)
    views = [e.data for e in events if isinstance(e, FileData)]
    assert len(views) == 1 and isinstance(views[0], memoryview)
    assert views[0].obj is data and bytes(views[0]) == body


def test_writer_round_trips_parser_events() -> None:
    data = BYTE_TABLE[-1][2]
    assert b"".join(bytes(p) for p in nar.serialize(nar.parse([data]))) == data


# --- rejections -------------------------------------------------------------

DIR = ("nix-archive-1", "(", "type", "directory")


def entry(name: bytes | str, *node: bytes | str | int) -> tuple:
    return ("entry", "(", "name", name, "node", *node, ")")


SYM = ("(", "type", "symlink", "target", "t", ")")

REJECTIONS = [
    ("bad magic", tokens("nix-archive-2", *regular(b"")), "bad magic"),
    ("not a NAR at all", b"#!/bin/sh\necho hello world\n", "bad magic"),
    ("missing open paren", tokens("nix-archive-1", "type", "regular"), "expected tag '('"),
    ("missing type", tokens("nix-archive-1", "(", "regular"), "expected tag 'type', got 'regular'"),
    ("unknown type", tokens(*HEAD, "fifo", ")"), "unknown file type 'fifo'"),
    ("no contents tag", tokens(*HEAD, "regular", ")"), "expected tag 'contents', got ')'"),
    ("tag instead of contents", tokens(*HEAD, "regular", "AAAAAAAA", 0, ")"),
     "expected tag 'contents', got 'AAAAAAAA'"),
    ("non-empty executable", tokens(*HEAD, "regular", "executable", "1", "contents", "", ")"),
     "executable marker has non-empty value '1'"),
    ("executable after contents",
     tokens(*HEAD, "regular", "contents", "x", "executable", "", ")"),
     "expected tag ')', got 'executable'"),
    ("type given twice", tokens(*HEAD, "regular", "type", "regular"),
     "expected tag 'contents', got 'type'"),
    ("non-zero contents padding",
     tokens(*HEAD, "regular", "contents")[:-0 or None] + (1).to_bytes(8, "little") + b"x\1"
     + bytes(6) + s(")"), "non-zero padding after file contents"),
    ("non-zero string padding", s("nix-archive-1")[:-1] + b"\1", "bad magic"),
    ("non-zero tag padding", tokens("nix-archive-1") + (1).to_bytes(8, "little") + b"(\0\0\1"
     + bytes(4), "non-zero padding"),
    ("symlink without target", tokens(*HEAD, "symlink", ")"), "expected tag 'target', got ')'"),
    ("empty symlink target", tokens(*HEAD, "symlink", "target", "", ")"), "empty target"),
    ("NUL in symlink target", tokens(*HEAD, "symlink", "target", "a\0b", ")"), "NUL byte"),
    ("symlink target too long", tokens(*HEAD, "symlink", "target", "a" * 4096, ")"),
     "of 4096 bytes is too long"),
    ("bad directory field", tokens(*DIR, "entri"), "expected tag 'entry' or ')', got 'entri'"),
    ("name after node", tokens(*DIR, "entry", "(", "node", *SYM, "name", "a", ")", ")"),
     "expected tag 'name', got 'node'"),
    ("missing node tag", tokens(*DIR, "entry", "(", "name", "a", *SYM, ")", ")"),
     "expected tag 'node', got '('"),
    ("entry not closed", tokens(*DIR, "entry", "(", "name", "a", "node", *SYM, "entry"),
     "expected tag ')', got 'entry'"),
    ("empty name", tokens(*DIR, *entry("", *SYM), ")"), "invalid file name ''"),
    ("dot", tokens(*DIR, *entry(".", *SYM), ")"), "invalid file name '.'"),
    ("dot dot", tokens(*DIR, *entry("..", *SYM), ")"), "invalid file name '..'"),
    ("slash", tokens(*DIR, *entry("a/b", *SYM), ")"), "invalid file name 'a/b'"),
    ("NUL in name", tokens(*DIR, *entry("a\0b", *SYM), ")"), "invalid file name 'a\\x00b'"),
    ("name too long", tokens(*DIR, *entry("n" * 256, *SYM), ")"), "of 256 bytes is too long"),
    ("unsorted names", tokens(*DIR, *entry("b", *SYM), *entry("a", *SYM), ")"),
     "NAR directory is not sorted: entry 'a' after 'b'"),
    ("duplicate names", tokens(*DIR, *entry("a", *SYM), *entry("a", *SYM), ")"),
     "NAR directory is not sorted: duplicate entry 'a'"),
    ("sorted by bytes, not by text", tokens(*DIR, *entry("\xe9", *SYM), *entry("z", *SYM), ")"),
     "not sorted"),
    ("absurd magic length", tokens(1 << 63), "bad magic"),
    ("absurd tag length", tokens("nix-archive-1", 1 << 63),
     "expected '(', got a string of 9223372036854775808 bytes"),
    ("absurd tag length in a node", tokens("nix-archive-1", "(", (1 << 64) - 1),
     "expected 'type', got a string of 18446744073709551615 bytes"),
    ("absurd name length", tokens(*DIR, "entry", "(", "name", (1 << 64) - 1),
     "a file name of 18446744073709551615 bytes is too long"),
    ("trailing data", tokens("nix-archive-1", *regular(b"x")) + b"\0", "trailing data"),
]


def _parse_all(data: bytes, chunk: int) -> None:
    parser = nar.NarParser()
    for i in range(0, len(data), chunk):
        parser.feed(data[i:i + chunk])
    parser.close()


@pytest.mark.parametrize("chunk", [1, 1 << 20])
@pytest.mark.parametrize("label,data,message", REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_rejected_with_a_clear_message(label: str, data: bytes, message: str, chunk: int) -> None:
    with pytest.raises(NarError) as info:
        _parse_all(data, chunk)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_absurd_lengths_fail_before_their_data_arrives() -> None:
    # Only the 8-byte length is fed: the parser must not wait for (or allocate) the data.
    parser = nar.NarParser()
    parser.feed(tokens(*DIR, "entry", "(", "name"))
    with pytest.raises(NarError, match="too long"):
        parser.feed((1 << 62).to_bytes(8, "little"))


def test_a_huge_declared_file_is_just_truncated() -> None:
    # Contents are streamed, so a huge size only means the NAR ends too early.
    data = tokens(*HEAD, "regular", "contents", (1 << 64) - 1) + b"x"
    parser = nar.NarParser()
    events = parser.feed(data)
    assert events[0] == FileStart(None, False, (1 << 64) - 1, len(data) - 1)
    with pytest.raises(NarError, match="truncated.*18446744073709551614 bytes of file contents"):
        parser.close()


def test_every_proper_prefix_is_truncated() -> None:
    data = BYTE_TABLE[-1][2]
    for n in range(len(data)):
        with pytest.raises(NarError, match="truncated"):
            _parse_all(data[:n], 7)
    _parse_all(data, 7)


def _nested(depth: int) -> bytes:
    tree = TreeDir()
    node = tree
    for _ in range(depth - 1):
        node.entries[b"d"] = node = TreeDir()
    return nartree.pack(tree)


def test_deep_nesting_parses_without_recursion() -> None:
    events = list(nar.parse([_nested(nar.MAX_DEPTH)]))
    assert sum(isinstance(e, DirStart) for e in events) == nar.MAX_DEPTH


def test_too_deep_nesting_is_rejected_cleanly() -> None:
    with pytest.raises(NarError, match=f"deeper than {nar.MAX_DEPTH} levels"):
        list(nar.parse([_nested(nar.MAX_DEPTH + 1)]))


# --- writer -----------------------------------------------------------------

WRITER_REJECTIONS = [
    ("unsorted", [DirStart(None), Symlink(b"b", b"t"), Symlink(b"a", b"t")], "not sorted"),
    ("bad name", [DirStart(None), Symlink(b"a/b", b"t")], "invalid file name"),
    ("empty target", [Symlink(None, b"")], "empty target"),
    ("short file", [FileStart(None, False, 2), FileData(b"x"), FileEnd()], "1 bytes of contents"),
    ("long file", [FileStart(None, False, 1), FileData(b"xy")], "more than the declared"),
    ("named root", [DirStart(b"a")], "root node has a name"),
    ("unnamed entry", [DirStart(None), DirStart(None)], "needs a name"),
    ("two roots", [Symlink(None, b"t"), Symlink(None, b"t")], "after the end"),
    ("incomplete", [DirStart(None)], "incomplete"),
]


@pytest.mark.parametrize("label,events,message", WRITER_REJECTIONS,
                         ids=[c[0] for c in WRITER_REJECTIONS])
def test_writer_refuses_invalid_nars(label: str, events: list, message: str) -> None:
    with pytest.raises(NarError, match=message):
        list(nar.serialize(events))


def test_nar_hash_validates_and_hashes() -> None:
    data = BYTE_TABLE[-1][2]
    import hashlib

    assert nar.nar_hash([data[:10], data[10:]]) == (hashlib.sha256(data).digest(), len(data))
    with pytest.raises(NarError):
        nar.nar_hash([data[:-8]])


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_trailing_bytes_allowed_only_when_asked(chunk: int) -> None:
    """Strict by default (the substituter); with allow_trailing, as nix-store
    --restore: the NAR's events and size exactly, whatever follows ignored."""
    data = BYTE_TABLE[-1][2]
    junk = b"\x01not a NAR" * 5
    with pytest.raises(NarError, match="trailing data"):
        _parse_all(data + junk, chunk)
    parser = nar.NarParser(allow_trailing=True)
    events = []
    whole = data + junk
    for i in range(0, len(whole), chunk):
        events.extend(parser.feed(whole[i:i + chunk]))
    parser.close()
    assert b"".join(nar.serialize(events)) == data
    assert parser.done and parser.offset == len(data)
    assert listing.from_nar([whole], allow_trailing=True) == listing.from_nar([data])
    with pytest.raises(NarError, match="trailing data"):
        listing.from_nar([whole])


def test_allow_trailing_still_rejects_a_truncated_nar() -> None:
    data = BYTE_TABLE[-1][2]
    with pytest.raises(NarError, match="truncated"):
        list(nar.parse([data[:-1]], allow_trailing=True))
