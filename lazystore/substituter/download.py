"""One NAR download: stream → decompress → hash/size check → the caller's sink.

The blocking half (``_Pipeline``) runs in worker threads under a shared
CapacityLimiter; the network half reads ahead into a small bounded channel so
downloading and unpacking overlap while memory stays bounded. Where the bytes
go (a temporary name, the rename into place) is the sink's owner's business.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Protocol

import trio

from lazystore.errors import NarError
from lazystore.nix.narinfo import NarInfo
from lazystore.nurseries import first_error
from lazystore.substituter import decompress
from lazystore.substituter.errors import VerificationError
from lazystore.substituter.transport import Reader, Transport

log = logging.getLogger(__name__)

READ_AHEAD = 16  # network chunks buffered between the reader and the unpacker
BATCH = 1 << 20  # bytes handed to a worker thread at once


class NarSink(Protocol):
    """Where a fetch puts the NAR: given by the caller (the store, ``lazystore
    fetch``), a fresh one per attempt. Blocking, called from one worker thread
    at a time. Nothing fed may become visible before ``finish()``, which is
    called only after the NAR's size and NarHash (and FileSize/FileHash)
    verified. ``feed``/``finish`` raise NarError for NAR data the sink cannot
    accept (the substituter's verification error: the next cache is tried) and
    the sink owner's own error for local trouble (passed through unchanged:
    another cache would not help). ``abort()`` removes what was fed, never raises.
    """

    def feed(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


OpenSink = Callable[[NarInfo], NarSink]


class _Pipeline:
    """Blocking: decompress, count and hash the NAR, feed the sink."""

    def __init__(self, info: NarInfo, sink: NarSink, origin: str) -> None:
        self.info, self.sink, self.origin = info, sink, origin
        self.size = 0
        self._hash = hashlib.new(info.nar_hash.algo)
        # The file as sent: FileSize/FileHash when the narinfo has them (they are
        # not signed, so only a bound and a consistency check, never trust).
        self.file_size = 0
        self._file_limit = (info.file_size if info.file_size is not None
                            else info.nar_size + info.nar_size // 16 + (1 << 20))
        self._file_hash = (hashlib.new(info.file_hash.algo) if info.file_hash is not None
                           else None)
        self._decompressor = decompress.make(info.compression, self._consume)

    def feed(self, data: bytes) -> None:
        self.file_size += len(data)
        if self.file_size > self._file_limit:
            what = "FileSize" if self.info.file_size is not None else "NarSize allows"
            raise VerificationError(
                f"NAR file of {self.info.store_path} from {self.origin} is larger than "
                f"its {what} ({self._file_limit} bytes)")
        if self._file_hash is not None:
            self._file_hash.update(data)
        self._guard(self._decompressor.feed, data)

    def _consume(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self.info.nar_size:
            raise VerificationError(
                f"NAR of {self.info.store_path} from {self.origin} is larger than "
                f"its NarSize {self.info.nar_size}")
        self._hash.update(piece)
        self.sink.feed(piece)

    def finish(self) -> None:
        self._guard(self._decompressor.finish)
        if self.size != self.info.nar_size:
            raise VerificationError(
                f"NAR of {self.info.store_path} from {self.origin} has {self.size} bytes, "
                f"NarSize says {self.info.nar_size}")
        if self._hash.digest() != self.info.nar_hash.digest:
            raise VerificationError(
                f"NAR of {self.info.store_path} from {self.origin} does not match its NarHash")
        self._check_file()
        self._guard(self.sink.finish)  # verified: now it may become visible

    def _check_file(self) -> None:
        info = self.info
        if info.file_size is not None and self.file_size != info.file_size:
            raise VerificationError(
                f"NAR file of {info.store_path} from {self.origin} has {self.file_size} "
                f"bytes, FileSize says {info.file_size}")
        if (self._file_hash is not None and info.file_hash is not None
                and self._file_hash.digest() != info.file_hash.digest):
            raise VerificationError(
                f"NAR file of {info.store_path} from {self.origin} does not match its FileHash")

    def _guard(self, fn: Callable[..., None], *args: bytes) -> None:
        """Map bad NAR data once; the sink's own errors pass through unchanged."""
        try:
            fn(*args)
        except NarError as exc:
            raise VerificationError(
                f"invalid NAR for {self.info.store_path} from {self.origin}: {exc}") from None

    def abort(self) -> None:
        self.sink.abort()


NarPipeline = _Pipeline  # what `lazystore cache index` reads a cache's NARs through


async def download(
    transport: Transport,
    info: NarInfo,
    open_sink: OpenSink,
    limiter: trio.CapacityLimiter,
    count_bytes: Callable[[int], None],
) -> None:
    """Download and verify the NAR of *info* from *transport* into a fresh sink.

    The sink's ``finish()`` runs only after every check passed; on any error
    or cancellation it is aborted.
    """
    # Opened here, not in a thread: a cancelled thread call would leak it.
    pipeline = _Pipeline(info, open_sink(info), transport.url)
    try:
        async with transport.stream(info.url) as reader:
            send, receive = trio.open_memory_channel[bytes](READ_AHEAD)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_into, reader, send, count_bytes)
                    await _drain(receive, pipeline, limiter)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
        await trio.to_thread.run_sync(pipeline.finish, limiter=limiter)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pipeline.abort)
        raise


async def _read_into(reader: Reader, send: trio.MemorySendChannel[bytes],
                     count_bytes: Callable[[int], None]) -> None:
    async with send:
        while chunk := await reader.read():
            count_bytes(len(chunk))
            try:
                await send.send(chunk)
            except trio.BrokenResourceError:
                return  # the unpacker failed and closed its end: its error is the one


async def _drain(receive: trio.MemoryReceiveChannel[bytes], pipeline: _Pipeline,
                 limiter: trio.CapacityLimiter) -> None:
    async with receive:
        async for chunk in receive:
            batch = [chunk]
            size = len(chunk)
            while size < BATCH:  # take what is already buffered: fewer thread hops
                try:
                    more = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                batch.append(more)
                size += len(more)
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            await trio.to_thread.run_sync(pipeline.feed, data, limiter=limiter)
