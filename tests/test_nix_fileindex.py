"""The signed file index (lazystore.nix.fileindex): its bytes, its
fingerprint, and every hostile index refused with a FileIndexError."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from lazystore.nix import fileindex, nar
from lazystore.nix.fileindex import FileIndexError
from lazystore.nix.hashes import Hash
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey
from lazystore.testing import nartree
from lazystore.testing.nartree import Tree, TreeDir, TreeFile, TreeSymlink

KEY = SecretKey("test-1", bytes(range(32)))
OTHER = SecretKey("other-1", bytes(range(1, 33)))
STORE_PATH = "/nix/store/" + "a" * 32 + "-demo"
TREE = TreeDir({
    b"bin": TreeDir({b"prog": TreeFile(b"#!/bin/sh\necho hi\n", True)}),
    b"big": TreeFile(bytes(range(256)) * 10),  # 2560 bytes: 3 chunks of 1024
    b"empty": TreeFile(b""),
    b"link": TreeSymlink(b"bin/prog"),
})
CHUNK = 1024


def info_of(tree: Tree, store_path: str = STORE_PATH) -> NarInfo:
    data = nartree.pack(tree)
    return NarInfo(store_path, "nar/x.nar", Hash.compute(data), len(data), compression="none")


def root_of(tree: Tree, chunk_size: int = CHUNK) -> tuple[dict[str, Any], int]:
    """The index tree of *tree* with made-up frames: each chunk's 'frame' is
    its bytes as they are (the format does not care what a frame holds)."""
    offset = 0

    def node(t: Tree) -> dict[str, Any]:
        nonlocal offset
        if isinstance(t, TreeDir):
            return {"type": "directory",
                    "entries": {k.decode(): node(v) for k, v in sorted(t.entries.items())}}
        if isinstance(t, TreeSymlink):
            return {"type": "symlink", "target": t.target.decode()}
        chunks = []
        for start, size in fileindex.chunk_ranges(len(t.contents), chunk_size):
            piece = t.contents[start:start + size]
            chunks.append((offset, size, hashlib.sha256(piece).digest()))
            offset += size
        return fileindex.regular_node(len(t.contents), t.executable, chunks)

    root = node(tree)
    return root, offset


def make(tree: Tree = TREE, secret: SecretKey = KEY) -> bytes:
    root, size = root_of(tree)
    return fileindex.write(info_of(tree), CHUNK, "lzdata/x.lzdata", size, root, secret)


def rewrite(text: bytes, change: Callable[[dict[str, Any]], None],
            secret: SecretKey = KEY) -> bytes:
    """*text* with its body changed by *change* and signed again (a hostile
    index made by someone holding the key: only consistency checks catch it)."""
    body = json.loads(text.partition(b"\n\n")[2])
    change(body)
    raw = json.dumps(body, separators=(",", ":")).encode()
    sig = secret.sign(fileindex.fingerprint(body["storePath"], Hash.parse(body["narHash"]),
                                            int(body["narSize"]), raw))
    return fileindex.MAGIC + f"Sig: {sig}\n\n".encode() + raw


# --- bytes ------------------------------------------------------------------


def test_index_bytes() -> None:
    tree = TreeDir({b"a": TreeFile(b"hello", True), b"l": TreeSymlink(b"a")})
    text = make(tree)
    info = info_of(tree)
    head, _, body = text.partition(b"\n\n")
    sig = KEY.sign(fileindex.fingerprint(STORE_PATH, info.nar_hash, info.nar_size, body))
    assert head == b"LazystoreFileIndex: 1\nSig: " + sig.encode()
    digest = hashlib.sha256(b"hello").hexdigest()
    assert body == (
        b'{"storePath":"' + STORE_PATH.encode() + b'","narHash":"' + str(info.nar_hash).encode()
        + b'","narSize":' + str(info.nar_size).encode() + b',"chunkSize":1024,'
        b'"data":"lzdata/x.lzdata","dataSize":5,"root":{"type":"directory","entries":{'
        b'"a":{"type":"regular","size":5,"executable":true,"chunks":[[0,5,"'
        + digest.encode() + b'"]]},"l":{"type":"symlink","target":"a"}}}}'
    )


def test_fingerprint_bytes_and_prefix() -> None:
    nar_hash = Hash("sha256", bytes(32))
    body = b"{}"
    got = fileindex.fingerprint(STORE_PATH, nar_hash, 120, body)
    body_hash = Hash("sha256", hashlib.sha256(body).digest())
    assert got == (f"lazystore-file-index;1;{STORE_PATH};{nar_hash};120;{body_hash}").encode()
    # A narinfo fingerprint of the same path starts "1;/nix/store/": never equal.
    narinfo = NarInfo(STORE_PATH, "nar/x", nar_hash, 120).fingerprint()
    assert narinfo.startswith(b"1;/") and not got.startswith(b"1;")


def test_parse_gives_files_in_nar_order_with_chunks() -> None:
    index = fileindex.parse(make())
    assert [f.path for f in index.files] == [(b"big",), (b"bin", b"prog"), (b"empty",)]
    big = index.files[0]
    assert [(c.start, c.size) for c in big.chunks] == [(0, 1024), (1024, 1024), (2048, 512)]
    assert index.files[2].chunks == ()
    assert fileindex.check(index, info_of(TREE), [KEY.public_key]) == "test-1"


def test_nar_rebuilt_from_the_index_has_the_nar_hash() -> None:
    index = fileindex.parse(make())
    contents = {f.path: f for f in index.files}
    flat = {(b"big",): bytes(range(256)) * 10, (b"bin", b"prog"): b"#!/bin/sh\necho hi\n",
            (b"empty",): b""}
    assert set(contents) == set(flat)
    rebuilt = b"".join(nar.serialize(index.nar_events(lambda f: [flat[f.path]])))
    assert rebuilt == nartree.pack(TREE)


@pytest.mark.parametrize("tree", [
    TreeFile(b"x" * 3000, True),
    TreeSymlink(b"somewhere"),
    TreeDir({}),
    TreeDir({b"d": TreeDir({b"e": TreeDir({b"f": TreeFile(b"1234567")})}), b"z": TreeFile()}),
    TREE,
])
def test_nar_size_of_a_tree_is_its_nar_length(tree: Tree) -> None:
    assert fileindex.nar_size(nar.parse([nartree.pack(tree)])) == len(nartree.pack(tree))
    index = fileindex.parse(make(tree))  # a root file or symlink is indexed too
    assert index.nar_size == len(nartree.pack(tree))


# --- hostile indexes --------------------------------------------------------


def refused(text: bytes, match: str) -> None:
    with pytest.raises(FileIndexError, match=match):
        index = fileindex.parse(text)
        fileindex.check(index, info_of(TREE), [KEY.public_key])


def test_bad_magic_and_version() -> None:
    good = make()
    refused(b"LazystoreFileIndex: 2" + good[21:], "unsupported file index version")
    refused(b"Nope" + good, "bad magic")
    refused(good.replace(b"\n\n", b"\n"), "unexpected header line|no blank line")


def test_untrusted_key() -> None:
    refused(make(secret=OTHER), "no valid signature by a trusted key")


def test_tampered_body_breaks_the_signature() -> None:
    good = make()
    refused(good.replace(b'"chunkSize":1024', b'"chunkSize":1025'),
            "no valid signature")
    refused(good.replace(b'"target":"bin/prog"', b'"target":"bin/evil"'),
            "no valid signature")


def test_index_for_another_store_path() -> None:
    refused(rewrite(make(), lambda b: b.update(storePath="/nix/store/" + "b" * 32 + "-demo")),
            "index is for /nix/store/b")


def test_index_for_another_nar_hash() -> None:
    refused(rewrite(make(), lambda b: b.update(narHash=str(Hash("sha256", bytes(32))))),
            "another NAR")


@pytest.mark.parametrize("case", ["another NAR", "another store path", "another key",
                                  "edited", "re-signed for another NAR hash", "bad magic"])
def test_check_signed_refuses_all_but_this_keys_index_of_exactly_this_nar(case: str) -> None:
    good = make()
    text, info = {
        "another NAR": (good, info_of(TreeDir({b"x": TreeFile(b"other")}))),
        "another store path": (good, info_of(TREE, "/nix/store/" + "b" * 32 + "-demo")),
        "another key": (make(secret=OTHER), info_of(TREE)),
        "edited": (good.replace(b'"target":"bin/prog"', b'"target":"bin/evil"'),
                   info_of(TREE)),
        "re-signed for another NAR hash": (
            rewrite(good, lambda b: b.update(narHash=str(Hash("sha256", bytes(32))))),
            info_of(TREE)),
        "bad magic": (b"Nope" + good, info_of(TREE)),
    }[case]
    with pytest.raises(FileIndexError, match="no valid signature" if case != "bad magic"
                       else "bad magic"):
        fileindex.check_signed(text, info, [KEY.public_key])


def test_check_signed_gives_the_data_file_of_this_keys_index() -> None:
    """The writer's cheap check (the tree is not walked) of its own index."""
    assert fileindex.check_signed(make(), info_of(TREE), [KEY.public_key]) == (
        "lzdata/x.lzdata", root_of(TREE)[1])


def test_offsets_past_the_data_file() -> None:
    refused(rewrite(make(), lambda b: b.update(dataSize=b["dataSize"] - 1)),
            "past the data file")


def test_overlapping_chunks() -> None:
    def overlap(body: dict[str, Any]) -> None:
        body["root"]["entries"]["big"]["chunks"][1][0] -= 1
    refused(rewrite(make(), overlap), "chunks overlap")


def test_file_size_disagreeing_with_nar_size() -> None:
    def grow(body: dict[str, Any]) -> None:
        body["root"]["entries"]["bin"]["entries"]["prog"]["size"] += 8
    refused(rewrite(make(), grow), "NAR of .* bytes, not narSize")


def test_chunk_count_disagreeing_with_size() -> None:
    def drop(body: dict[str, Any]) -> None:
        body["root"]["entries"]["big"]["chunks"].pop()
    refused(rewrite(make(), drop), "chunks disagree with its size")


@pytest.mark.parametrize("chunk", [
    [0, 0, "00" * 32], [-1, 5, "00" * 32], [0, 5, "zz" * 32], [0, 5, "00"], [0, 5], "x",
])
def test_malformed_chunk(chunk: Any) -> None:
    def bad(body: dict[str, Any]) -> None:
        body["root"]["entries"]["bin"]["entries"]["prog"]["chunks"][0] = chunk
    refused(rewrite(make(), bad), "bad chunk")


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "lzdata/../../x", "", "a//b"])
def test_data_file_outside_the_cache(name: str) -> None:
    refused(rewrite(make(), lambda b: b.update(data=name)), "data file name")


def test_malformed_tree() -> None:
    refused(rewrite(make(), lambda b: b["root"]["entries"].update({"a/b": {"type": "symlink",
                                                                          "target": "x"}})),
            "malformed index: invalid file name")
    refused(rewrite(make(), lambda b: b["root"].update(type="fifo")), "unknown node type")
    refused(b"LazystoreFileIndex: 1\n\n{", "malformed index")
    refused(rewrite(make(), lambda b: b.update(narSize="12")), "narSize")
