"""Chunks of an indexed cache's data file (see lazystore.nix.fileindex):
each an independent zstd frame, checked against the index before use."""

from __future__ import annotations

import hashlib
import threading

import zstandard

from lazystore.nix.fileindex import Chunk
from lazystore.substituter.errors import VerificationError

LEVEL = 3  # zstd level of the frames `lazystore cache index` writes
MAX_RUN = 16 << 20  # compressed bytes asked for in one range request at most
# Uncompressed bytes of a run decoded and hashed on the trio thread (well under
# a millisecond; a worker thread's hop took 1-2 ms of a small miss under load).
INLINE_DECODE = 64 << 10


SAMPLE = 4096  # bytes of each of the three samples that judge a chunk's compressibility
STORED = 0.97  # samples that zstd shrinks less than this: the chunk goes in raw blocks
RAW_BLOCK = 128 << 10  # the largest block a zstd frame may hold (RFC 8878, 3.1.1.2.3)


_local = threading.local()  # a thread's zstd contexts (not thread-safe; costly to make)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    made: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in made:
        made[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return made[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def encode(data: bytes | bytearray | memoryview, level: int = LEVEL) -> bytes:
    """One chunk as a zstd frame (with its size in the frame header): zstd
    *level*, or raw blocks when samples of it do not compress (random or
    already compressed bytes; see :func:`stored`)."""
    view = memoryview(data)
    if len(view) >= 4 * SAMPLE:
        middle = len(view) // 2
        samples = [view[:SAMPLE], view[middle:middle + SAMPLE], view[-SAMPLE:]]
        quick = _compressor(1)
        if sum(len(quick.compress(s)) for s in samples) >= STORED * 3 * SAMPLE:
            return stored(view)
    return _compressor(level).compress(view)


def stored(data: bytes | bytearray | memoryview) -> bytes:
    """*data* as a zstd frame of raw (uncompressed) blocks, which any zstd
    decoder reads (RFC 8878: magic; a frame header descriptor with
    Single_Segment set, no checksum and no dictionary, then the content size
    in 1, 2, 4 or 8 bytes; blocks of type Raw_Block of at most 128 KiB, each
    with a 3-byte header: last-block bit, type 0, size)."""
    size = len(data)
    if size < 256:
        flag, fcs = 0, size.to_bytes(1, "little")
    elif size < 65536 + 256:
        flag, fcs = 1, (size - 256).to_bytes(2, "little")
    elif size < 1 << 32:
        flag, fcs = 2, size.to_bytes(4, "little")
    else:
        flag, fcs = 3, size.to_bytes(8, "little")
    parts = [b"\x28\xb5\x2f\xfd", bytes([flag << 6 | 1 << 5]), fcs]
    view = memoryview(data)
    start = 0
    while True:
        block = view[start:start + RAW_BLOCK]
        start += len(block)
        last = start >= size
        parts += [(len(block) << 3 | int(last)).to_bytes(3, "little"), block]
        if last:
            return b"".join(parts)


def decode(chunk: Chunk, frame: bytes | memoryview, hashed: bool = True) -> bytes:
    """The verified uncompressed bytes of *chunk* from its frame: a
    zstd frame of ``chunk.length`` bytes declaring and holding ``chunk.size``
    bytes that hash to ``chunk.sha256`` (unless not *hashed*: a caller that
    checks a hash over them itself); VerificationError otherwise."""
    if len(frame) != chunk.length:
        raise VerificationError(f"chunk at data offset {chunk.offset} has {len(frame)} bytes, "
                                f"the index says {chunk.length}")
    try:
        # The declared size bounds what one-shot decompression allocates.
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != chunk.size:
            raise VerificationError(f"chunk at data offset {chunk.offset} declares "
                                    f"{declared} bytes, the index says {chunk.size}")
        data = _decompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        raise VerificationError(f"chunk at data offset {chunk.offset}: corrupt zstd: {exc}"
                                ) from None
    if len(data) != chunk.size or hashed and hashlib.sha256(data).digest() != chunk.sha256:
        raise VerificationError(f"chunk at data offset {chunk.offset} does not match its hash")
    return data


def decode_run(run: list[Chunk], data: bytes) -> list[bytes]:
    """The verified bytes of each chunk of *run* (adjacent chunks, as
    :func:`coalesce` makes them) from the data file's bytes *data* of them."""
    base = run[0].offset
    view = memoryview(data)
    return [decode(c, view[c.offset - base:c.offset - base + c.length]) for c in run]


def coalesce(wanted: list[Chunk], max_bytes: int = MAX_RUN) -> list[list[Chunk]]:
    """*wanted* as runs of chunks adjacent in the data file (one range each),
    each of at most *max_bytes* unless one chunk alone is larger."""
    runs: list[list[Chunk]] = []
    for chunk in sorted(set(wanted), key=lambda c: c.offset):
        last = runs[-1][-1] if runs else None
        if (last is not None and last.offset + last.length == chunk.offset
                and chunk.offset + chunk.length - runs[-1][0].offset <= max_bytes):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs
