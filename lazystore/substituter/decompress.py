"""Streaming decompression of NAR files (xz, zstd, bzip2, none; br if the
``brotli`` module is installed), with bounded output pieces.

Decompressors are blocking and push their output into a *sink* callable in
pieces of at most ``PIECE`` bytes, so a highly compressible NAR never sits in
memory whole. Run them in a worker thread.
"""

from __future__ import annotations

import bz2
import lzma
from collections.abc import Callable
from typing import Any, Protocol

import zstandard

from lazystore.substituter.errors import VerificationError

try:  # Nix can write br-compressed caches; bounded output needs brotli >= 1.2
    import brotli  # type: ignore[import-not-found, import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None
if brotli is not None and not hasattr(brotli.Decompressor, "can_accept_more_data"):
    brotli = None  # pragma: no cover - an older brotli could not bound its output

PIECE = 1 << 20

Sink = Callable[[bytes], None]


class Decompressor(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None:
        """Flush; VerificationError if the compressed stream ended early."""


def supported() -> frozenset[str]:
    names = {"none", "xz", "zstd", "bzip2"}
    if brotli is not None:
        names.add("br")
    return frozenset(names)


def make(compression: str, sink: Sink) -> Decompressor:
    """A decompressor for a narinfo ``Compression`` value writing into *sink*."""
    if compression in ("none", ""):
        return _Identity(sink)
    if compression == "xz":
        return _Chunked(sink, lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), lzma.LZMAError, "xz")
    if compression == "bzip2":
        return _Chunked(sink, bz2.BZ2Decompressor, OSError, "bzip2")
    if compression == "zstd":
        return _Zstd(sink)
    if compression == "br" and brotli is not None:
        return _Brotli(sink)
    raise VerificationError(f"unsupported NAR compression {compression!r}")


class _Identity:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def feed(self, data: bytes) -> None:
        for start in range(0, len(data), PIECE):
            self._sink(data[start : start + PIECE])

    def finish(self) -> None:
        pass


class _Chunked:
    """lzma/bz2 style decompressors (``max_length``, ``needs_input``, ``eof``);
    concatenated streams are accepted, as by xz(1)."""

    def __init__(self, sink: Sink, factory: Callable[[], Any], error: type[Exception],
                 name: str) -> None:
        self._sink, self._factory, self._error, self._name = sink, factory, error, name
        self._dec = factory()
        self._started = False

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except self._error as exc:
            raise VerificationError(f"corrupt {self._name} data: {exc}") from None

    def _feed(self, data: bytes) -> None:
        while True:
            if self._dec.eof:
                data = self._dec.unused_data + data
                if not data:
                    return
                self._dec = self._factory()
            self._started = True
            out = self._dec.decompress(data, max_length=PIECE)
            data = b""
            if out:
                self._sink(out)
            if not self._dec.eof and self._dec.needs_input:
                return

    def finish(self) -> None:
        self.feed(b"")
        if not self._dec.eof:
            raise VerificationError(f"{self._name} data ends before the end of its stream")


class _Zstd:
    """zstandard's stream writer splits its output into ``write_size`` pieces."""

    def __init__(self, sink: Sink) -> None:
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            _SinkFile(sink), write_size=PIECE, write_return_read=True
        )

    def feed(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise VerificationError(f"corrupt zstd data: {exc}") from None

    def finish(self) -> None:
        try:
            self._writer.flush()
        except zstandard.ZstdError as exc:
            raise VerificationError(f"corrupt zstd data: {exc}") from None


class _SinkFile:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink(bytes(data))
        return len(data)


class _Brotli:
    """brotli ≥ 1.2: ``output_buffer_limit`` keeps each piece bounded (a few
    hundred bytes of br can stand for gigabytes)."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._dec = brotli.Decompressor()

    def feed(self, data: bytes) -> None:
        try:
            out = self._dec.process(data, output_buffer_limit=PIECE)
            while True:
                self._emit(out)
                if self._dec.can_accept_more_data() or self._dec.is_finished():
                    return
                out = self._dec.process(b"", output_buffer_limit=PIECE)
        except brotli.error as exc:
            raise VerificationError(f"corrupt br data: {exc}") from None

    def _emit(self, out: bytes) -> None:
        # The limit stops the buffer growing, not at exactly PIECE bytes.
        for start in range(0, len(out), PIECE):
            self._sink(out[start : start + PIECE])

    def finish(self) -> None:
        try:
            while not self._dec.is_finished():
                out = self._dec.process(b"", output_buffer_limit=PIECE)
                if not out:
                    break
                self._emit(out)
        except brotli.error as exc:
            raise VerificationError(f"corrupt br data: {exc}") from None
        if not self._dec.is_finished():
            raise VerificationError("br data ends before the end of its stream")
