"""NAR conformance corpus (../shared/conformance, see its README): valid NARs
round-trip through parser, writer, unpacker and dump; invalid ones are rejected
with Nix's reason; listings in the corpus match where they describe a NAR we
can rebuild."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.errors import NarError
from lazystore.nix import base32, fsio, listing, nar
from lazystore.testing import nartree

GO_NIX_NAR = "go-nix/nar_1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d.nar"

# file -> NarHash where the corpus gives one, else None
VALID = {
    "nix/nars/regular-one-byte-zero-padding.nar": None,
    "nix/functional/case.nar": None,
    "nix/functional/case-collision.nar": None,
    "nix/functional/unnormalized.nar": None,
    "nix/fuzz-nars/simple.nar": None,
    "nix/fuzz-nars/empty-dir.nar": None,
    "nix/fuzz-nars/empty-subdir.nar": None,
    "nix/fuzz-nars/case.nar": None,
    "nix/fuzz-nars/case-collision.nar": None,
    "snix/helloworld.nar": "0h40zg6hakjv951nyhdad7mv9za56m3za5gnpiw5s1hbwcxzdrq3",
    "snix/symlink.nar": "1wcwacrb5q36hpsx1shk0dkm26hwbmqmgi0nm973h9jqkdz3jz89",
    "snix/complicated.nar": "06li2smqgskxxr291x1cgzf61rzm7c8f93bisnglq0nzm1wj5mgb",
    GO_NIX_NAR: "0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6",
}

INVALID = {
    "nix/nars/regular-one-byte-non-zero-padding.nar": "non-zero padding",
    "nix/nars/regular-truncated-large-contents.nar": "truncated",
    "nix/nars/regular-truncated-padding.nar": "truncated",
    "nix/nars/invalid-tag-instead-of-contents.nar": "expected tag 'contents', got 'AAAAAAAA'",
    "nix/nars/executable-after-contents.nar": "expected tag ')', got 'executable'",
    "nix/nars/name-after-node.nar": "expected tag 'name'",
    "nix/nars/nul-character.nar": "NAR contains invalid file name 'f",
    "nix/nars/dot.nar": "NAR contains invalid file name '.'",
    "nix/nars/dotdot.nar": "NAR contains invalid file name '..'",
    "nix/nars/slash.nar": "NAR contains invalid file name 'x/y'",
    "nix/nars/empty.nar": "NAR contains invalid file name ''",
    "nix/functional/duplicate.nar": "NAR directory is not sorted",
}


def test_the_tables_cover_every_nar_in_the_corpus(conformance: Path) -> None:
    corpus = {str(p.relative_to(conformance)) for p in conformance.rglob("*.nar")}
    assert corpus == set(VALID) | set(INVALID)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_nar_round_trips(conformance: Path, name: str, tmp_path: Path) -> None:
    data = (conformance / name).read_bytes()
    assert nartree.pack(nartree.read_tree([data])) == data
    events = list(nar.parse(data[i:i + 5] for i in range(0, len(data), 5)))
    assert b"".join(bytes(p) for p in nar.serialize(events)) == data
    fsio.unpack(io.BytesIO(data), tmp_path / "out", chunk_size=4096)
    assert b"".join(bytes(p) for p in fsio.dump(tmp_path / "out")) == data
    fsio.remove_tree(tmp_path / "out")


@pytest.mark.parametrize("name", sorted(n for n, h in VALID.items() if h))
def test_valid_nar_hash(conformance: Path, name: str) -> None:
    digest, size = nar.nar_hash([(conformance / name).read_bytes()])
    assert base32.encode(digest) == VALID[name]


def test_regular_one_byte_consumes_exactly_120_bytes(conformance: Path) -> None:
    data = (conformance / "nix/nars/regular-one-byte-zero-padding.nar").read_bytes()
    parser = nar.NarParser()
    parser.feed(data)
    assert parser.done and parser.offset == 120 == len(data)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_nar_is_rejected(conformance: Path, name: str, tmp_path: Path) -> None:
    data = (conformance / name).read_bytes()
    with pytest.raises(NarError, match=INVALID[name].replace("(", r"\(").replace(")", r"\)")):
        list(nar.parse([data]))
    with pytest.raises(NarError, match="NAR"):
        fsio.unpack(io.BytesIO(data), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_go_nix_nar_listing_and_contents(conformance: Path) -> None:
    data = (conformance / GO_NIX_NAR).read_bytes()
    arp = listing.from_nar([data])["root"]["entries"]["bin"]["entries"]["arp"]
    assert arp == {"type": "regular", "size": 55288, "executable": True, "narOffset": 400}
    expected = (conformance / (GO_NIX_NAR + "_bin_arp")).read_bytes()
    assert data[400:400 + 55288] == expected
    tree = nartree.read_tree([data])
    assert tree.entries[b"bin"].entries[b"arp"] == nartree.TreeFile(expected, True)  # type: ignore


def _zeros(size: int) -> Iterator[nar.Event]:
    block = bytes(1 << 20)
    for start in range(0, size, len(block)):
        yield nar.FileData(memoryview(block)[: min(len(block), size - start)])


def _listing_of(spec: dict) -> dict:
    """The listing of a NAR rebuilt from a listing: same shape and sizes, zeros inside."""

    def events() -> Iterator[nar.Event]:
        for event in listing.events(spec):
            yield event
            if isinstance(event, nar.FileStart):
                yield from _zeros(event.size)

    return listing.from_nar(nar.serialize(events()))


@pytest.mark.parametrize("name", ["go-nix/curl-fixture.ls", "snix/nixos-release.ls"])
def test_listing_offsets_match_real_ls_files(conformance: Path, name: str) -> None:
    """narOffset depends only on the shape and sizes, so a NAR of zeros with the
    same shape must list exactly as the real one did (1 GB streamed for Hydra's)."""
    expected = json.loads((conformance / name).read_text())
    assert _listing_of(expected) == expected


def test_listing_matches_nix_nar_listing_json(conformance: Path) -> None:
    """Nix's own NarListing tests (no narOffset, "executable" always present)."""
    deep = json.loads((conformance / "nix/nar-listing/deep.json").read_text())
    tree = nartree.TreeDir({
        b"bar": nartree.TreeDir({
            b"baz": nartree.TreeFile(b"x" * 19, True), b"quux": nartree.TreeSymlink(b"/over/there"),
        }),
        b"foo": nartree.TreeFile(b"y" * 15),
    })
    ours = listing.from_nar([nartree.pack(tree)])["root"]
    for node in (ours["entries"]["foo"], ours["entries"]["bar"]["entries"]["baz"]):
        node.pop("narOffset")
        node.setdefault("executable", False)
    assert ours == deep
