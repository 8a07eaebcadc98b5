"""The ``.ls`` listing (lazystore.nix.listing): written from a NAR byte for
byte as Nix writes it, and read back as the NAR parser's events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lazystore.nix import listing, nar
from lazystore.nix.listing import ListingError
from lazystore.nix.nar import (
    DirEnd,
    DirStart,
    FileEnd,
    FileStart,
    Symlink,
)
from lazystore.testing import nartree
from lazystore.testing.nartree import TreeDir, TreeFile, TreeSymlink

# --- writing ----------------------------------------------------------------


def test_listing_of_a_tree() -> None:
    tree = TreeDir({
        b"bin": TreeDir({b"prog": TreeFile(b"#!/bin/sh\n", True)}),
        b"empty": TreeFile(b""),
        b"link": TreeSymlink(b"bin/prog"),
    })
    data = nartree.pack(tree)
    doc = listing.from_nar([data])
    prog_offset = doc["root"]["entries"]["bin"]["entries"]["prog"]["narOffset"]
    assert data[prog_offset:prog_offset + 10] == b"#!/bin/sh\n"
    assert doc == {
        "version": 1,
        "root": {"type": "directory", "entries": {
            "bin": {"type": "directory", "entries": {
                "prog": {"type": "regular", "size": 10, "executable": True,
                         "narOffset": prog_offset},
            }},
            "empty": {"type": "regular", "size": 0, "narOffset": doc["root"]["entries"]["empty"]
                      ["narOffset"]},
            "link": {"type": "symlink", "target": "bin/prog"},
        }},
    }
    # Key order is part of the format (Nix writes type, size, executable, narOffset).
    assert list(doc["root"]["entries"]["bin"]["entries"]["prog"]) == [
        "type", "size", "executable", "narOffset"
    ]


def test_listing_json_is_written_like_nix() -> None:
    doc = {"version": 1, "root": {"type": "directory", "entries": {
        'q"uote\\': {"type": "symlink", "target": "t\tab\nnl\rcr\x01\x08\x0c\x7f"},
        "ünï": {"type": "regular", "size": 3, "executable": True, "narOffset": 96},
        "\udcff": {"type": "directory", "entries": {}},
    }}}
    out = listing.to_json(doc)
    assert out == (
        b'{"version":1,"root":{"type":"directory","entries":{'
        b'"q\\"uote\\\\":{"type":"symlink","target":"t\\tab\\nnl\\rcr\\u0001\\u0008\\u000c\x7f"},'
        b'"\xc3\xbcn\xc3\xaf":{"type":"regular","size":3,"executable":true,"narOffset":96},'
        b'"\xff":{"type":"directory","entries":{}}}}}'
    )
    assert json.loads(listing.to_json({"a": {"b": "c"}})) == {"a": {"b": "c"}}


# --- reading ----------------------------------------------------------------


def test_events_of_a_listing_are_those_of_its_nar_without_contents() -> None:
    tree = TreeDir({
        b"z": TreeFile(b"last"),
        b"bin": TreeDir({b"prog": TreeFile(b"#!/bin/sh\n", True)}),
        b"link": TreeSymlink(b"bin/prog"),
        b"\xff": TreeDir(),
    })
    data = nartree.pack(tree)
    from_nar = [e for e in nar.parse([data]) if not isinstance(e, nar.FileData)]
    assert list(listing.events(listing.from_nar([data]))) == from_nar
    assert from_nar[:3] == [DirStart(None), DirStart(b"bin"), FileStart(b"prog", True, 10,
                                                                         from_nar[2].offset)]


def test_parse_reads_a_document_and_events_walk_any_depth() -> None:
    depth = 5000  # far deeper than recursion allows
    node: dict[str, Any] = {"type": "symlink", "target": "t"}
    for _ in range(depth):
        node = {"type": "directory", "entries": {"d": node}}
    events = list(listing.events({"version": 1, "root": node}))
    assert events.count(DirEnd()) == depth and events[depth] == Symlink(b"d", b"t")
    doc = listing.parse(b'{"version":1,"root":{"type":"regular","size":3}}')
    assert list(listing.events(doc)) == [FileStart(None, False, 3), FileEnd()]
    with pytest.raises(ListingError, match="deeper than 100 directories"):
        list(listing.events({"root": node}, max_depth=100))


def test_names_and_targets_that_are_not_utf8_are_read_back_as_their_bytes() -> None:
    # Nix (2.8) writes them raw into the JSON, as to_json does; a symlink root included.
    for tree in (TreeSymlink(b"\x87\xd0"),
                 TreeDir({b"caf\xe9": TreeFile(b"x"), b"l": TreeSymlink(b"\xff\xfe")})):
        data = nartree.pack(tree)
        written = listing.to_json(listing.from_nar([data]))
        from_nar = [e for e in nar.parse([data]) if not isinstance(e, nar.FileData)]
        assert list(listing.events(listing.parse(written))) == from_nar


@pytest.mark.parametrize(("data", "message"), [
    (b"not json", "malformed listing: "),
    (b"[]", "no 'root' object"),
    (b'{"version":1}', "no 'root' object"),
    (b'{"version":2,"root":{"type":"symlink","target":"t"}}', "version 2"),
    (b'{"root":' * 100_000, "malformed listing: "),
])
def test_parse_refuses_what_is_not_a_listing(data: bytes, message: str) -> None:
    with pytest.raises(ListingError, match=message) as info:
        listing.parse(data)
    assert "\n" not in str(info.value)


def _dir(**entries: Any) -> dict[str, Any]:
    return {"root": {"type": "directory", "entries": entries}}


@pytest.mark.parametrize(("document", "message"), [
    ({"root": {"type": "fifo"}}, "unknown node type 'fifo'"),
    ({"root": {"size": 1}}, "unknown node type"),
    ({"root": {"type": "regular", "size": -1}}, "bad file size"),
    ({"root": {"type": "regular", "size": "1"}}, "bad file size"),
    ({"root": {"type": "regular", "size": True}}, "bad file size"),
    ({"root": {"type": "regular", "size": 1, "narOffset": -8}}, "offset"),
    ({"root": {"type": "regular", "size": 1, "executable": "yes"}}, "'executable'"),
    ({"root": {"type": "symlink"}}, "without a target"),
    ({"root": {"type": "symlink", "target": ""}}, "bad symlink target"),
    ({"root": {"type": "symlink", "target": "a\0b"}}, "bad symlink target"),
    ({"root": {"type": "symlink", "target": "x" * 4096}}, "bad symlink target"),
    ({"root": {"type": "directory", "entries": []}}, "entries are not an object"),
    (_dir(**{"..": {"type": "regular", "size": 1}}), "invalid file name '..'"),
    (_dir(**{"a/b": {"type": "regular", "size": 1}}), "invalid file name 'a/b'"),
    (_dir(**{"": {"type": "regular", "size": 1}}), "invalid file name ''"),
    (_dir(**{"n" * 256: {"type": "regular", "size": 1}}), "invalid file name"),
    (_dir(a=[]), "not an object"),
])
def test_malformed_nodes_are_listing_errors(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ListingError, match=message) as info:
        list(listing.events(document))
    assert "\n" not in str(info.value)
