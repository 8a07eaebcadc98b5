"""CLI: ``lazystore fetch`` — materialise store paths (and their closures)
from binary caches into a folder, verified. Also the substituter options the
daemon's CLI shares (``add_substituter_arguments``, ``config_from_args``)."""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from lazystore.cli import add_substituter_arguments, config_from_args
from lazystore.errors import FormatError, LazystoreError, UnpackError
from lazystore.nix import fsio
from lazystore.nix.fsio import NarUnpacker
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.storepath import StorePath
from lazystore.nurseries import first_error
from lazystore.progress import Progress, mib
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig
from lazystore.substituter.download import OpenSink
from lazystore.substituter.errors import SubstituterError

T = TypeVar("T")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to *sub*."""
    parser = sub.add_parser(
        "fetch", help="fetch store paths from binary caches into a folder",
        description="Download, verify and unpack store paths (by default with their "
        "closures) as DEST/<hash>-<name>. Paths already in DEST are not fetched again.")
    parser.add_argument("paths", nargs="+", metavar="STOREPATH",
                        help="a store path (/nix/store/<hash>-<name>) or its base name")
    parser.add_argument("--dest", required=True, type=Path, metavar="DIR",
                        help="folder to unpack into (created if missing)")
    parser.add_argument("--no-closure", dest="closure", action="store_false",
                        help="fetch only the paths named, not what they reference")
    add_substituter_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    roots = [_parse_path(p, config.store_dir) for p in args.paths]
    dest: Path = args.dest
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LazystoreError(f"cannot create {dest}: {exc.strerror}") from None
    job = _Job(config, roots, dest, args.closure, sys.stderr.isatty())
    try:
        trio.run(job.run)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    if job.terminated:
        print(f"lazystore: error: terminated (SIGTERM); {job.summary()}", file=sys.stderr)
        return 128 + signal.SIGTERM
    for message in job.failures.values():
        print(f"lazystore: error: {message}", file=sys.stderr)
    print(job.summary(), file=sys.stderr)
    return 1 if job.failures else 0


def _parse_path(text: str, store_dir: str) -> StorePath:
    try:
        if "/" in text:
            return StorePath.parse(text, store_dir)
        return StorePath.from_basename(text)
    except FormatError as exc:
        raise LazystoreError(str(exc)) from None


TMP_PREFIX = ".lazystore-tmp-"


def clear_stale_tmp(dest: Path, ours: Path) -> None:
    """Remove the temporary folders of earlier runs into *dest* that were killed
    (a run holds a lock on its own folder while it lives; a kill -9 releases it)."""
    for old in dest.glob(TMP_PREFIX + "*"):
        if old == ours or not old.is_dir():
            continue
        try:
            fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a run that is still going
        finally:
            os.close(fd)
        fsio.remove_tree(old, ignore_errors=True)


@dataclass
class _Job:
    config: SubstituterConfig
    roots: list[StorePath]
    dest: Path
    closure: bool
    tty: bool
    failures: dict[StorePath, str] = field(default_factory=dict)
    wanted: dict[StorePath, NarInfo] = field(default_factory=dict)
    present: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    subs: Substituters | None = None
    terminated: bool = False
    _bar: Progress | None = None

    async def run(self) -> None:
        try:
            tmp_dir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.dest))
        except OSError as exc:
            raise LazystoreError(f"cannot write in {self.dest}: {exc.strerror}") from None
        lock = os.open(tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(lock, fcntl.LOCK_EX)  # ours while this run lives
        try:
            clear_stale_tmp(self.dest, tmp_dir)
            # SIGTERM cancels the work like Ctrl-C does, so nothing partial stays.
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stop_on, signals, nursery.cancel_scope)
                    await self._work(tmp_dir)
                    nursery.cancel_scope.cancel()
        finally:
            fsio.remove_tree(tmp_dir, ignore_errors=True)
            os.close(lock)

    async def _work(self, tmp_dir: Path) -> None:
        async with Substituters(self.config) as subs:
            self.subs = subs
            async with trio.open_nursery() as nursery:
                for root in self.roots:
                    nursery.start_soon(self._resolve, root)
            await self._fetch_all(tmp_dir)

    async def _stop_on(self, signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        async for _ in signals:
            self.terminated = True
            scope.cancel()
            return

    async def _resolve(self, root: StorePath) -> None:
        assert self.subs is not None
        full = root.path(self.config.store_dir)
        try:
            if self.closure:
                infos = await self.subs.closure([root])
            else:
                info = await self.subs.query(root)
                if info is None:
                    raise SubstituterError(f"no substituter has {full}")
                infos = [info]
        except SubstituterError as exc:
            self.failures[root] = f"{full}: {exc}" if full not in str(exc) else str(exc)
            return
        for info in infos:
            self.wanted.setdefault(info.path, info)

    async def _fetch_all(self, tmp_dir: Path) -> None:
        todo = [p for p in self.wanted if not _exists(self.dest / p.basename)]
        self.present = len(self.wanted) - len(todo)
        limiter = trio.CapacityLimiter(self.config.max_parallel_fetches)
        async with trio.open_nursery() as nursery:
            if self.tty:
                nursery.start_soon(self._progress, len(todo))
            async with trio.open_nursery() as fetches:
                for path in todo:
                    fetches.start_soon(self._fetch_one, path, tmp_dir, limiter)
            nursery.cancel_scope.cancel()
        if self.tty:
            self._draw(len(todo), final=True)

    async def _fetch_one(self, path: StorePath, tmp_dir: Path,
                         limiter: trio.CapacityLimiter) -> None:
        assert self.subs is not None
        async with limiter:
            try:
                await self.subs.fetch(self.wanted[path],
                                      unpack_into(self.dest / path.basename, tmp_dir))
            except LazystoreError as exc:  # the substituter's, or DirSink's (local)
                self.failures[path] = str(exc)
                return
        self.done += 1

    async def _progress(self, total: int) -> None:
        while True:
            self._draw(total)
            await trio.sleep(0.25)

    def _draw(self, total: int, final: bool = False) -> None:
        assert self.subs is not None
        if self._bar is None:
            self._bar = Progress(total, started=self.started)
        self._bar.draw(self.done, self.subs.stats.bytes_downloaded, final)

    def summary(self) -> str:
        got = self.subs.stats.bytes_downloaded if self.subs else 0
        elapsed = time.monotonic() - self.started
        parts = [f"fetched {self.done} paths"]
        if self.present:
            parts.append(f"{self.present} already present")
        if self.failures:
            parts.append(f"{len(self.failures)} failed")
        return f"{', '.join(parts)}; {mib(got)} MiB downloaded in {elapsed:.1f} s"


def unpack_into(dest: Path, tmp_dir: Path) -> OpenSink:
    """Sinks for ``Substituters.fetch`` that unpack to *dest* via *tmp_dir*."""
    return lambda _: DirSink(dest, tmp_dir)


class DirSink:
    """``lazystore fetch``'s end of a fetch (see substituter.download.NarSink):
    unpack under a fresh name in this run's ``.lazystore-tmp-*`` folder and
    rename to *dest* once the substituter verified the NAR."""

    def __init__(self, dest: Path, tmp_dir: Path) -> None:
        self.dest = dest
        self._unpacker = self._local(
            lambda: NarUnpacker(tmp_dir / f"{dest.name}.{secrets.token_hex(6)}"))

    def feed(self, data: bytes) -> None:
        self._local(lambda: self._unpacker.feed(data))

    def finish(self) -> None:
        self._local(self._unpacker.finish)
        tmp = self._unpacker.dest
        if _exists(self.dest):
            fsio.remove_tree(tmp, ignore_errors=True)
            raise LazystoreError(f"{self.dest} already exists")
        try:
            os.rename(tmp, self.dest)
        except OSError as exc:
            fsio.remove_tree(tmp, ignore_errors=True)
            raise LazystoreError(f"cannot move {self.dest} into place: {exc.strerror}"
                                 ) from None

    def abort(self) -> None:
        self._unpacker.abort()

    def _local(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except (UnpackError, OSError) as exc:
            raise LazystoreError(f"cannot write {self.dest}: {fsio.reason(exc)}") from None


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


