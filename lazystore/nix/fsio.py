"""NARs to and from the filesystem: the one module of lazystore.nix doing I/O.

Everything here works relative to open directory descriptors (``dir_fd``), never
through paths it built, so it never follows a symlink it created or found and
handles trees deeper than PATH_MAX. At most :data:`FD_WINDOW` directories are
held open along the current path; deeper ones are reopened through ``..``.

Unpacked trees get store modes: files 0444, executables 0555, directories
0555 (each directory once it is complete). Note that renaming a 0555
directory to another parent needs root (rename updates its ``..``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lazystore.errors import LazystoreError, NarError, UnpackError
from lazystore.nix.nar import (
    MAX_DEPTH,
    DirEnd,
    DirStart,
    Event,
    FileData,
    FileEnd,
    FileStart,
    NarParser,
    NarWriter,
    Symlink,
)

log = logging.getLogger(__name__)

FD_WINDOW = 64
CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class DumpError(LazystoreError):
    """A path could not be serialised as a NAR."""


class _DirFds:
    """Descriptors of the directories along the current path, at most FD_WINDOW
    of them open; one that fell out of the window is reopened through ``..``
    of its child when the walk comes back up."""

    def __init__(self) -> None:
        self._fds: list[int | None] = []

    def __len__(self) -> int:
        return len(self._fds)

    def push(self, fd: int) -> None:
        self._fds.append(fd)
        old = len(self._fds) - FD_WINDOW - 1
        if old >= 0 and self._fds[old] is not None:
            os.close(self._fds[old])  # type: ignore[arg-type]
            self._fds[old] = None

    def top(self) -> int:
        fd = self._fds[-1]
        assert fd is not None
        return fd

    def pop(self) -> int:
        """Remove the top descriptor and return it (the caller closes it)."""
        fd = self._fds.pop()
        assert fd is not None
        if self._fds and self._fds[-1] is None:
            try:
                self._fds[-1] = os.open("..", _DIR_FLAGS, dir_fd=fd)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def close(self) -> None:
        while self._fds:
            fd = self._fds.pop()
            if fd is not None:
                os.close(fd)


def _split(path: Path) -> tuple[int, bytes]:
    """An open descriptor of *path*'s parent directory, and *path*'s name."""
    name = os.fsencode(path.name)
    if not name or name in (b".", b".."):
        raise UnpackError(f"invalid destination {path}")
    return os.open(path.parent, _DIR_FLAGS), name


# --- dump -------------------------------------------------------------------


def dump(path: str | os.PathLike[str]) -> Iterator[bytes | memoryview]:
    """The NAR serialisation of *path*, in pieces, byte-identical to
    ``nix-store --dump``. Raises DumpError."""
    path = Path(path)
    writer = NarWriter()
    try:
        with contextlib.closing(_dump_events(path)) as events:  # closes fds if abandoned
            for event in events:
                yield writer.write(event)
    except OSError as exc:
        raise DumpError(f"cannot dump {path}: {exc.strerror or exc}") from exc
    writer.close()


def _dump_events(path: Path) -> Iterator[Event]:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        parent, name = _split(path.absolute())
        try:
            yield from _leaf_events(parent, name, None, st, path)
        finally:
            os.close(parent)
        return
    dirs = _DirFds()
    pending: list[list[bytes]] = []
    try:
        dirs.push(os.open(path, _DIR_FLAGS))
        pending.append(_sorted_names(dirs.top()))
        yield DirStart(None)
        while pending:
            names = pending[-1]
            if not names:
                pending.pop()
                os.close(dirs.pop())
                yield DirEnd()
                continue
            name = names.pop()
            st = os.stat(name, dir_fd=dirs.top(), follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                dirs.push(os.open(name, _DIR_FLAGS, dir_fd=dirs.top()))
                pending.append(_sorted_names(dirs.top()))
                yield DirStart(name)
            else:
                yield from _leaf_events(dirs.top(), name, name, st, path)
    finally:
        dirs.close()


def _sorted_names(dir_fd: int) -> list[bytes]:
    """Entry names, largest first (the walk pops the smallest off the end)."""
    return sorted((os.fsencode(n) for n in os.listdir(dir_fd)), reverse=True)


def _leaf_events(
    dir_fd: int, name: bytes, event_name: bytes | None, st: os.stat_result, root: Path
) -> Iterator[Event]:
    if stat.S_ISLNK(st.st_mode):
        yield Symlink(event_name, os.readlink(name, dir_fd=dir_fd))
        return
    if not stat.S_ISREG(st.st_mode):
        raise DumpError(f"cannot dump {root}: {os.fsdecode(name)!r} is not a regular file, "
                        "directory or symlink")
    yield FileStart(event_name, bool(st.st_mode & stat.S_IXUSR), st.st_size)
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    try:
        left = st.st_size
        while left:
            data = os.read(fd, min(left, CHUNK))
            if not data:
                raise DumpError(f"cannot dump {root}: {os.fsdecode(name)!r} shrank while read")
            left -= len(data)
            yield FileData(data)
    finally:
        os.close(fd)
    yield FileEnd()


# --- unpack -----------------------------------------------------------------


# Every file, directory and symlink of a store path has mtime 1 (Nix's
# canonical time), as the mount shows them: binds of the cache show the same.
NIX_TIMES = (1, 1)


class NarUnpacker:
    """Unpacks a NAR fed chunk by chunk into *dest* (which must not exist).

    ``feed(chunk)`` as the bytes arrive, then ``finish()``; ``abort()`` gives up.
    On any error (NarError for a bad NAR, UnpackError for the filesystem)
    everything written is removed and *dest* is left absent. Not thread-safe:
    one thread at a time, but any thread. Also a context manager that aborts
    on an exception and finishes otherwise. *max_depth* limits directory
    nesting (NarError beyond it); the default accepts far more than any real
    store path has. *allow_trailing*: bytes fed after the end of the NAR are
    ignored (as ``nix-store --restore``) instead of being an error.
    *on_events* is called with the parser's events of each chunk once they
    are written (e.g. to build a metadata tree without reading it back); what
    it raises aborts the unpack.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        max_depth: int = MAX_DEPTH,
        allow_trailing: bool = False,
        on_events: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.dest = Path(dest)
        self._parser = NarParser(max_depth, allow_trailing)
        self._on_events = on_events
        self._dirs = _DirFds()
        self._file = -1
        self._created = False
        self._closed = False
        try:
            self._parent, self._name = _split(self.dest)
        except OSError as exc:
            raise UnpackError(f"cannot unpack into {self.dest}: {exc.strerror}") from exc
        try:
            os.stat(self._name, dir_fd=self._parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._release()
            raise UnpackError(f"cannot unpack into {self.dest}: {exc.strerror}") from exc
        else:
            self._release()
            raise UnpackError(f"cannot unpack into {self.dest}: it already exists")
        self._handlers: dict[type, Callable] = {
            FileData: self._data, FileStart: self._file_start, FileEnd: self._file_end,
            DirStart: self._dir_start, DirEnd: self._dir_end, Symlink: self._symlink,
        }

    def __enter__(self) -> NarUnpacker:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    @property
    def done(self) -> bool:
        """True once the whole NAR has been fed (``finish()`` still to call)."""
        return self._parser.done

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        self._guard(lambda: self._apply(self._parser.feed(chunk)))

    def _apply(self, events: list[Event]) -> None:
        handlers = self._handlers
        for event in events:
            handlers[type(event)](event)
        if self._on_events is not None:
            self._on_events(events)

    def finish(self) -> None:
        """Raise NarError (and remove everything) if the NAR was incomplete."""
        self._guard(self._parser.close)
        self._release()

    def abort(self) -> None:
        """Stop and remove whatever was written. Never raises for cleanup trouble."""
        if self._closed:
            return
        try:
            self._close_fds()
            if self._created:
                _remove(self._parent, self._name)
        except OSError as exc:
            log.error("cannot remove partial unpack at %s: %s", self.dest, exc)
        finally:
            self._release()

    def _guard(self, step: Callable[[], None]) -> None:
        if self._closed:
            raise UnpackError(f"unpacking into {self.dest} is already finished or aborted")
        try:
            step()
        except NarError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
            raise UnpackError(f"cannot unpack into {self.dest}: {exc.strerror}{where}") from exc
        except BaseException:
            self.abort()
            raise

    def _where(self, name: bytes | None) -> tuple[int, bytes]:
        if name is None:
            return self._parent, self._name
        return self._dirs.top(), name

    def _file_start(self, event: FileStart) -> None:
        dir_fd, name = self._where(event.name)
        mode = 0o555 if event.executable else 0o444
        self._file = os.open(name, _CREATE_FLAGS, mode, dir_fd=dir_fd)
        self._created = True

    def _data(self, event: FileData) -> None:
        data = event.data
        while data:
            written = os.write(self._file, data)
            data = data[written:]

    def _file_end(self, event: FileEnd) -> None:
        fd, self._file = self._file, -1
        try:
            os.utime(fd, NIX_TIMES)
        finally:
            os.close(fd)

    def _symlink(self, event: Symlink) -> None:
        dir_fd, name = self._where(event.name)
        os.symlink(event.target, name, dir_fd=dir_fd)
        self._created = True
        os.utime(name, NIX_TIMES, dir_fd=dir_fd, follow_symlinks=False)

    def _dir_start(self, event: DirStart) -> None:
        dir_fd, name = self._where(event.name)
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        self._created = True
        self._dirs.push(os.open(name, _DIR_FLAGS, dir_fd=dir_fd))

    def _dir_end(self, event: DirEnd) -> None:
        fd = self._dirs.pop()
        try:
            os.fchmod(fd, 0o555)
            os.utime(fd, NIX_TIMES)  # after its entries, which set it
        finally:
            os.close(fd)

    def _close_fds(self) -> None:
        if self._file >= 0:
            fd, self._file = self._file, -1
            os.close(fd)
        self._dirs.close()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._close_fds()
            os.close(self._parent)


def unpack(
    fileobj: BinaryIO,
    dest: str | os.PathLike[str],
    chunk_size: int = CHUNK,
    allow_trailing: bool = False,
) -> None:
    """Unpack the NAR read from *fileobj* into *dest* (see NarUnpacker). With
    *allow_trailing*, reading stops at the end of the NAR, the rest is left."""
    unpacker = NarUnpacker(dest, allow_trailing=allow_trailing)
    buffer = bytearray(chunk_size)  # reused: the unpacker is done with it after feed
    view = memoryview(buffer)
    try:
        while not unpacker.done and (size := fileobj.readinto(buffer)):
            unpacker.feed(view[:size])
    except OSError as exc:
        unpacker.abort()
        raise UnpackError(f"cannot read the NAR for {dest}: {exc.strerror or exc}") from exc
    except BaseException:
        unpacker.abort()
        raise
    unpacker.finish()


def write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace *path* with *data* all at once: a temporary ``.<name>.<pid>.tmp``
    beside it (the name a start's clean-up looks for), renamed over *path*; with
    *sync*, the file and its directory are fsynced so a crash keeps old or new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync *directory*: the renames into it so far survive a crash."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def reason(exc: BaseException) -> str:
    """What went wrong writing, in the OS's words when an OSError is behind
    *exc* (an UnpackError names the temporary, which a user has no use for)."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc)


# --- removal ----------------------------------------------------------------


def remove_tree(path: str | os.PathLike[str], ignore_errors: bool = False) -> None:
    """Remove *path* (a tree of any depth, read-only directories too, a file or
    a symlink) without following symlinks. Missing *path* is fine. Raises
    OSError, unless *ignore_errors* (then as much as can go goes)."""
    try:
        parent, name = _split(Path(path).absolute())
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        _remove(parent, name)
    except FileNotFoundError:
        pass
    except OSError:
        if not ignore_errors:
            raise
    finally:
        os.close(parent)


def _remove(parent: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=parent)
        return
    except IsADirectoryError:
        pass
    dirs = _DirFds()
    stack: list[tuple[bytes, list[bytes]]] = []

    def enter(dir_fd: int, entry: bytes) -> None:
        fd = os.open(entry, _DIR_FLAGS, dir_fd=dir_fd)
        dirs.push(fd)
        with contextlib.suppress(OSError):  # not ours: root can delete anyway
            os.fchmod(fd, 0o700)
        stack.append((entry, _sorted_names(fd)))

    try:
        enter(parent, name)
        while stack:
            entry, names = stack[-1]
            if names:
                child = names.pop()
                try:
                    os.unlink(child, dir_fd=dirs.top())
                except IsADirectoryError:
                    enter(dirs.top(), child)
                continue
            stack.pop()
            os.close(dirs.pop())
            os.rmdir(entry, dir_fd=dirs.top() if len(dirs) else parent)
    finally:
        dirs.close()
