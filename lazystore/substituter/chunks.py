"""Chunks of an indexed cache's data file (see lazystore.nix.fileindex):
each an independent zstd frame, checked against the index before use."""

from __future__ import annotations

import hashlib

import zstandard

from lazystore.nix.fileindex import Chunk
from lazystore.substituter.errors import VerificationError

LEVEL = 3  # zstd level of the frames `lazystore cache index` writes
MAX_RUN = 16 << 20  # compressed bytes asked for in one range request at most


def encode(data: bytes | memoryview) -> bytes:
    """One chunk as a zstd frame (with its size in the frame header)."""
    return zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(data)


def decode(chunk: Chunk, frame: bytes | memoryview) -> bytes:
    """The verified uncompressed bytes of *chunk* from its frame: a
    zstd frame of ``chunk.length`` bytes declaring and holding ``chunk.size``
    bytes that hash to ``chunk.sha256``; VerificationError otherwise."""
    if len(frame) != chunk.length:
        raise VerificationError(f"chunk at data offset {chunk.offset} has {len(frame)} bytes, "
                                f"the index says {chunk.length}")
    try:
        # The declared size bounds what one-shot decompression allocates.
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != chunk.size:
            raise VerificationError(f"chunk at data offset {chunk.offset} declares "
                                    f"{declared} bytes, the index says {chunk.size}")
        data = zstandard.ZstdDecompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        raise VerificationError(f"chunk at data offset {chunk.offset}: corrupt zstd: {exc}"
                                ) from None
    if len(data) != chunk.size or hashlib.sha256(data).digest() != chunk.sha256:
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
