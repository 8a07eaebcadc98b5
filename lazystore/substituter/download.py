"""One NAR download: stream → decompress → hash/size check → unpack → rename.

The blocking half (``_Pipeline``) runs in worker threads under a shared
CapacityLimiter; the network half reads ahead into a small bounded channel so
downloading and unpacking overlap while memory stays bounded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import trio

from lazystore.errors import LazystoreError, NarError, UnpackError
from lazystore.nix import fsio
from lazystore.nix.fsio import NarUnpacker
from lazystore.nix.narinfo import NarInfo
from lazystore.substituter import decompress
from lazystore.substituter.errors import LocalError, VerificationError
from lazystore.substituter.transport import Reader, Transport

log = logging.getLogger(__name__)

READ_AHEAD = 16  # network chunks buffered between the reader and the unpacker
BATCH = 1 << 20  # bytes handed to a worker thread at once


class _Pipeline:
    """Blocking: decompress, count and hash the NAR, feed the unpacker."""

    def __init__(self, info: NarInfo, tmp: Path, origin: str) -> None:
        self.info, self.tmp, self.origin = info, tmp, origin
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
        try:
            self._unpacker = NarUnpacker(tmp)
        except (UnpackError, OSError) as exc:
            raise LocalError(f"cannot unpack {info.store_path}: {exc}") from None

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
        self._unpacker.feed(piece)

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
        self._guard(self._unpacker.finish)

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
        """Map the unpacker's errors once: bad NAR data vs. local trouble."""
        try:
            fn(*args)
        except NarError as exc:
            raise VerificationError(
                f"invalid NAR for {self.info.store_path} from {self.origin}: {exc}") from None
        except (UnpackError, OSError) as exc:
            raise LocalError(f"cannot unpack {self.info.store_path}: {exc}") from None

    def abort(self) -> None:
        try:
            self._unpacker.abort()
        except (LazystoreError, OSError) as exc:
            log.debug("abort of %s: %s", self.tmp, exc)
        remove_tree(self.tmp)


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a nursery's group: the first that is not a
    cancellation (the sibling tasks of a failed task end Cancelled)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return leaves[0] if leaves else group


def remove_tree(path: Path) -> None:
    """Remove *path* (a tree, file or symlink) if it exists; best effort."""
    try:
        fsio.remove_tree(path)  # any depth, read-only directories included
    except OSError as exc:
        log.debug("cannot remove %s: %s", path, exc)


async def download(
    transport: Transport,
    info: NarInfo,
    dest: Path,
    tmp_dir: Path,
    limiter: trio.CapacityLimiter,
    count_bytes: Callable[[int], None],
) -> None:
    """Download, verify and unpack the NAR of *info* from *transport* into *dest*.

    *dest* appears (by rename from *tmp_dir*) only after every check passed;
    on any error or cancellation nothing is left at *dest* or in *tmp_dir*.
    """
    tmp = tmp_dir / f".{dest.name}.{secrets.token_hex(6)}.tmp"
    # Created here, not in a thread: a cancelled thread call would leak it.
    # It only opens the parent directory.
    pipeline = _Pipeline(info, tmp, transport.url)
    try:
        async with transport.stream(info.url) as reader:
            send, receive = trio.open_memory_channel[bytes](READ_AHEAD)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_into, reader, send, count_bytes)
                    await _drain(receive, pipeline, limiter)
            except BaseExceptionGroup as group:
                raise single_error(group) from None
        await trio.to_thread.run_sync(pipeline.finish, limiter=limiter)
        _rename(tmp, dest)
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


def _rename(tmp: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise LocalError(f"{dest} already exists")
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        raise LocalError(f"cannot move {dest.name} into place: {exc.strerror}") from None
