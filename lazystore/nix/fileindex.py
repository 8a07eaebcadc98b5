"""The signed file index of a store path (``<hash>.lzindex``); free of I/O.

A binary cache indexed by ``lazystore cache index`` offers, next to a NAR, the
contents of the NAR's regular files in a data file of independent zstd frames
(one per chunk of at most ``chunkSize`` uncompressed bytes), and this index of
them, so a reader can fetch and verify one chunk at a time. The file::

    LazystoreFileIndex: 1\\n           magic and format version
    Sig: <name>:<base64>\\n            ed25519 signatures (any number)
    \\n
    <body>                            compact JSON, up to the end of the file

The body is ``{"storePath", "narHash", "narSize", "chunkSize", "data",
"dataSize", "root"}``: ``data`` is the data file's path relative to the cache,
``dataSize`` its length; ``root`` a tree as in the ``.ls`` listing
(``directory``/``entries``, ``symlink``/``target``, ``regular``/``size``/
``executable``) whose regular nodes carry ``chunks``: ``[offset, length,
sha256]`` per chunk, in file order: where the zstd frame lies in the data file
and the base16 sha256 of its uncompressed bytes. Chunk *i* of a file holds its
bytes ``[i*chunkSize, min(size, (i+1)*chunkSize))``.

A signature is over :func:`fingerprint`::

    lazystore-file-index;1;<store path>;<narHash>;<narSize>;sha256:<nix32 of body>

Nix's narinfo fingerprint starts ``1;/``, so neither can be taken for the
other. :func:`parse` checks the framing and that the body is self-consistent
(every node valid, chunk counts agree with sizes, chunks inside the data file
and not overlapping, the NAR size the tree implies equal to ``narSize``);
:func:`check` that it belongs to a narinfo and is signed by a trusted key.
Every failure is a :class:`FileIndexError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lazystore.errors import FormatError
from lazystore.nix import listing, nar
from lazystore.nix.hashes import Hash
from lazystore.nix.nar import DirEnd, DirStart, Event, FileData, FileEnd, FileStart, Symlink
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import PublicKey, SecretKey

VERSION = 1
MAGIC = f"LazystoreFileIndex: {VERSION}\n".encode()
FINGERPRINT_PREFIX = b"lazystore-file-index;1;"
MAX_CHUNK_SIZE = 64 << 20
SUFFIX = ".lzindex"  # next to <hash>.narinfo
DATA_DIR = "lzdata"  # data files: lzdata/<hash>.lzdata
MARKER = "lzindex-info"  # at the cache's root: the cache offers indexes (MAGIC)


def offered(marker: bytes) -> bool:
    """Whether a cache's MARKER file says it offers indexes of this version."""
    return marker.startswith(MAGIC)


class FileIndexError(FormatError):
    """A file index that is malformed, inconsistent or not trusted."""


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int  # of the zstd frame in the data file
    length: int  # of the zstd frame
    start: int  # of its uncompressed bytes in the file
    size: int  # uncompressed bytes
    sha256: bytes


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: tuple[bytes, ...]  # names from the store path's root; () for a file root
    executable: bool
    size: int
    chunks: tuple[Chunk, ...]


@dataclass
class FileIndex:
    store_path: str
    nar_hash: Hash
    nar_size: int
    chunk_size: int
    data: str
    data_size: int
    root: dict[str, Any]
    sigs: list[str] = field(default_factory=list)
    body: bytes = b""  # as parsed or written: what the fingerprint hashes
    files: list[FileEntry] = field(default_factory=list)  # in NAR order

    def fingerprint(self) -> bytes:
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, self.body)

    def events(self) -> Iterator[Event]:
        """The NAR parser's events of this tree, without contents."""
        return listing.events({"root": self.root})

    def nar_events(self, contents: Callable[[FileEntry], Iterable[bytes]]) -> Iterator[Event]:
        """The events of the whole NAR, each file's bytes from *contents*."""
        files = iter(self.files)
        for event in self.events():
            yield event
            if isinstance(event, FileStart):
                for piece in contents(next(files)):
                    yield FileData(piece)


def fingerprint(store_path: str, nar_hash: Hash, nar_size: int, body: bytes) -> bytes:
    """What an index's signature signs (see the module docstring)."""
    body_hash = Hash("sha256", hashlib.sha256(body).digest())
    return FINGERPRINT_PREFIX + f"{store_path};{nar_hash};{nar_size};{body_hash}".encode()


# --- writing ----------------------------------------------------------------


def chunk_ranges(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, size) of the chunks of a file of *size* bytes."""
    return [(s, min(chunk_size, size - s)) for s in range(0, size, chunk_size)]


def regular_node(size: int, executable: bool, chunks: Iterable[tuple[int, int, bytes]]
                 ) -> dict[str, Any]:
    """A regular node of the body; *chunks* are (offset, length, sha256 digest)."""
    node: dict[str, Any] = {"type": "regular", "size": size}
    if executable:
        node["executable"] = True
    node["chunks"] = [[offset, length, digest.hex()] for offset, length, digest in chunks]
    return node


def write(info: NarInfo, chunk_size: int, data: str, data_size: int, root: dict[str, Any],
          secret: SecretKey) -> bytes:
    """The signed index file of *info*'s NAR with tree *root* (regular nodes
    from :func:`regular_node`), checked as :func:`parse` checks it."""
    return write_parsed(info, chunk_size, data, data_size, root, secret)[0]


def write_parsed(info: NarInfo, chunk_size: int, data: str, data_size: int,
                 root: dict[str, Any], secret: SecretKey) -> tuple[bytes, FileIndex]:
    """:func:`write`, and the file as :func:`parse` reads it."""
    body = json.dumps({
        "storePath": info.store_path, "narHash": str(info.nar_hash), "narSize": info.nar_size,
        "chunkSize": chunk_size, "data": data, "dataSize": data_size, "root": root,
    }, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
    sig = secret.sign(fingerprint(info.store_path, info.nar_hash, info.nar_size, body))
    text = MAGIC + f"Sig: {sig}\n\n".encode() + body
    return text, parse(text)


# --- reading ----------------------------------------------------------------


def parse(text: bytes) -> FileIndex:
    """An index file, checked for consistency (not for trust: :func:`check`)."""
    sigs, body = _frame(text)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise FileIndexError(f"malformed index: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("root"), dict):
        raise FileIndexError("malformed index: no 'root' object")
    index = FileIndex(
        store_path=_field(doc, "storePath", str),
        nar_hash=_hash(doc),
        nar_size=_count(doc, "narSize"),
        chunk_size=_count(doc, "chunkSize"),
        data=_data_name(doc),
        data_size=_count(doc, "dataSize"),
        root=doc["root"], sigs=sigs, body=body,
    )
    if not 0 < index.chunk_size <= MAX_CHUNK_SIZE:
        raise FileIndexError(f"malformed index: chunk size {index.chunk_size}")
    try:
        events = list(index.events())  # walked twice below, built once (the costly part)
    except listing.ListingError as exc:
        raise FileIndexError(str(exc).replace("malformed listing", "malformed index")) from None
    index.files = _files(index, events)
    _check_layout(index, events)
    return index


def check(index: FileIndex, info: NarInfo, keys: Iterable[PublicKey]) -> str:
    """The name of the trusted key that signed *index* for exactly *info*'s
    store path, NarHash and NarSize; FileIndexError otherwise."""
    if index.store_path != info.store_path:
        raise FileIndexError(f"index is for {index.store_path[:200]}, not {info.store_path}")
    if index.nar_hash != info.nar_hash or index.nar_size != info.nar_size:
        raise FileIndexError(f"index is for another NAR than {info.store_path}'s "
                             f"({index.nar_hash}, not {info.nar_hash})")
    message = index.fingerprint()
    for key in keys:
        for sig in index.sigs:
            if key.verify(message, sig):
                return key.name
    raise FileIndexError(f"index of {info.store_path} has no valid signature by a trusted key")


def check_signed(text: bytes, info: NarInfo, keys: Iterable[PublicKey]) -> tuple[str, int]:
    """The data file name and size of index file *text* if a trusted key
    signed it for exactly *info*'s store path, NarHash and NarSize (the
    fingerprint is made from the narinfo); FileIndexError otherwise. The tree
    is not walked, which is most of :func:`parse`'s time: this is for a writer
    asking whether its own index is in place, as its key signs only indexes
    that :func:`parse` accepted (:func:`write`); a reader parses and checks."""
    sigs, body = _frame(text)
    message = fingerprint(info.store_path, info.nar_hash, info.nar_size, body)
    if not any(key.verify(message, sig) for key in keys for sig in sigs):
        raise FileIndexError(f"index of {info.store_path} has no valid signature by a "
                             "trusted key for its NAR")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise FileIndexError(f"malformed index: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise FileIndexError("malformed index: not an object")
    return _data_name(doc), _count(doc, "dataSize")


def _frame(text: bytes) -> tuple[list[str], bytes]:
    head, sep, body = text.partition(b"\n\n")
    lines = head.split(b"\n")
    if not text.startswith(b"LazystoreFileIndex: "):
        raise FileIndexError("not a lazystore file index (bad magic)")
    if lines[0] + b"\n" != MAGIC:
        raise FileIndexError(f"unsupported file index version {nar.show(lines[0][20:])}")
    if not sep:
        raise FileIndexError("malformed index: no blank line before the body")
    sigs = []
    for line in lines[1:]:
        if not line.startswith(b"Sig: "):
            raise FileIndexError(f"malformed index: unexpected header line {nar.show(line)}")
        sigs.append(line[5:].decode("ascii", "replace"))
    return sigs, body


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if type(value) is not kind:
        raise FileIndexError(f"malformed index: bad or missing {key!r}")
    return value


def _count(doc: dict[str, Any], key: str) -> int:
    value: int = _field(doc, key, int)
    if value < 0:
        raise FileIndexError(f"malformed index: negative {key!r}")
    return value


def _hash(doc: dict[str, Any]) -> Hash:
    try:
        return Hash.parse(_field(doc, "narHash", str))
    except FormatError as exc:
        raise FileIndexError(f"malformed index: narHash: {exc}") from None


def _data_name(doc: dict[str, Any]) -> str:
    name: str = _field(doc, "data", str)
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise FileIndexError(f"malformed index: data file name {name[:100]!r}")
    return name


def _files(index: FileIndex, events: list[Event]) -> list[FileEntry]:
    """The regular files in NAR order with their chunks, walking the listing
    *events* of the index (which checked every node) beside the JSON tree."""
    files: list[FileEntry] = []
    path: list[bytes] = []
    dirs: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, DirStart):
            node = _node(index.root, dirs, event.name)
            if event.name is not None:
                path.append(event.name)
            dirs.append(node)
        elif isinstance(event, DirEnd):
            dirs.pop()
            if path:
                path.pop()
        elif isinstance(event, FileStart):
            node = _node(index.root, dirs, event.name)
            where = (*path, event.name) if event.name is not None else ()
            files.append(_file(index, where, event, node))
    return files


def _node(root: dict[str, Any], dirs: list[dict[str, Any]], name: bytes | None
          ) -> dict[str, Any]:
    if name is None:
        return root
    node: dict[str, Any] = dirs[-1]["entries"][listing.decode_name(name)]
    return node


def _file(index: FileIndex, path: tuple[bytes, ...], start: FileStart, node: dict[str, Any]
          ) -> FileEntry:
    raw = node.get("chunks")
    where = "/".join(listing.decode_name(p) for p in path) or "the root file"
    ranges = chunk_ranges(start.size, index.chunk_size)
    if not isinstance(raw, list) or len(raw) != len(ranges):
        raise FileIndexError(f"malformed index: {where[:200]}: chunks disagree with its size "
                             f"{start.size}")
    chunks = tuple(_chunk(item, begin, size, where)
                   for item, (begin, size) in zip(raw, ranges, strict=True))
    return FileEntry(path, start.executable, start.size, chunks)


def _chunk(item: Any, start: int, size: int, where: str) -> Chunk:
    if (not isinstance(item, list) or len(item) != 3 or type(item[0]) is not int
            or type(item[1]) is not int or not isinstance(item[2], str)
            or item[0] < 0 or item[1] <= 0 or len(item[2]) != 64):
        raise FileIndexError(f"malformed index: {where[:200]}: bad chunk {str(item)[:100]}")
    try:
        digest = bytes.fromhex(item[2])
    except ValueError:
        raise FileIndexError(f"malformed index: {where[:200]}: bad chunk hash") from None
    return Chunk(item[0], item[1], start, size, digest)


def _check_layout(index: FileIndex, events: list[Event]) -> None:
    chunks = sorted((c for f in index.files for c in f.chunks), key=lambda c: c.offset)
    end = 0
    for chunk in chunks:
        if chunk.offset < end:
            raise FileIndexError(f"malformed index: chunks overlap at data offset {chunk.offset}")
        end = chunk.offset + chunk.length
    if end > index.data_size:
        raise FileIndexError(f"malformed index: a chunk ends at {end}, past the data file's "
                             f"{index.data_size} bytes")
    implied = nar_size(events)
    if implied != index.nar_size:
        raise FileIndexError(f"malformed index: its tree makes a NAR of {implied} bytes, "
                             f"not narSize {index.nar_size}")


def nar_size(events: Iterable[Event]) -> int:
    """The size of the NAR of a tree given as events (contents, if any, ignored)."""
    s = nar.encode_string
    entry = len(s(b"entry")) + len(s(b"(")) + len(s(b"name")) + len(s(b"node"))
    close = len(s(b")"))
    node_head = len(s(b"(")) + len(s(b"type"))
    total, depth = len(s(nar.MAGIC)), 0
    for event in events:
        if isinstance(event, DirEnd):
            depth -= 1
            total += close + (close if depth else 0)
            continue
        if isinstance(event, (FileData, FileEnd)):
            continue
        assert isinstance(event, (DirStart, FileStart, Symlink))
        named = event.name is not None
        total += node_head + (entry + len(s(event.name)) if event.name is not None else 0)
        if isinstance(event, DirStart):
            total += len(s(b"directory"))
            depth += 1
            continue
        if isinstance(event, FileStart):
            total += len(s(b"regular")) + len(s(b"contents")) + 8 + event.size
            total += -event.size % 8 + (len(s(b"executable")) + 8 if event.executable else 0)
        else:
            total += len(s(b"symlink")) + len(s(b"target")) + len(s(event.target))
        total += close + (close if named else 0)
    return total
