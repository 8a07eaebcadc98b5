"""The FUSE session: a fresh mount, or the live one an earlier daemon left.

A daemon that mounts opens /dev/fuse itself, mounts with mount(2) (``fd=N``),
reads the kernel's FUSE_INIT request and keeps its bytes in the session file
next to the cache, then hands libfuse (under pyfuse3) the session through a
socket pair whose first message is that INIT: libfuse answers every request
with EIO until it has seen one. While libfuse handles the INIT, the socket's
descriptor number is pointed at the /dev/fuse descriptor (dup2), so the INIT
reply and everything after go to the kernel; libfuse only ever knew the number.

The daemon hands the /dev/fuse descriptor to the service manager's file
descriptor store. A later daemon started with it (``LISTEN_FDS``) does the same
with the saved INIT, so libfuse negotiates what the kernel already agreed to;
the reply to that old request is refused by the kernel (ENOENT, which libfuse
ignores), and FUSE_NOTIFY_RESEND asks the kernel to send again every request
the dead daemon read and never answered. The mount never goes away.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pyfuse3

from lazystore import sdnotify
from lazystore.daemon.mountpoint import FSNAME
from lazystore.errors import StoreError
from lazystore.nix import fsio

log = logging.getLogger(__name__)

FDNAME = "fuse"
FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7  # include/uapi/linux/fuse.h, protocol 7.40 (Linux 6.9)
FUSE_DEVICE = (10, 229)  # /dev/fuse: misc character device 10:229
IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error (the notify code), unique (0)
READ_SIZE = (256 + 2) * 4096  # what libfuse reads with: max pages plus headers
STATE_VERSION = 1
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class SessionState:
    """What a later daemon needs to serve the same mount: the mount's device
    (major:minor, to tell it is the same mount), the kernel's INIT, the views."""

    device: str
    init: bytes
    views: dict[str, list[str]] = field(default_factory=dict)

    def dumps(self) -> bytes:
        doc = {"version": STATE_VERSION, "device": self.device, "init": self.init,
               "views": self.views}
        return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]

    @classmethod
    def loads(cls, data: bytes) -> SessionState:
        try:
            doc = msgpack.unpackb(data, raw=False)
            if doc["version"] != STATE_VERSION:
                raise ValueError(f"version {doc['version']}")
            views = {str(k): [str(b) for b in v] for k, v in doc["views"].items()}
            return cls(str(doc["device"]), bytes(doc["init"]), views)
        except (ValueError, KeyError, TypeError, AttributeError,
                msgpack.UnpackException) as exc:
            raise StoreError(f"unreadable FUSE session state: {exc}") from None


def mount_device(mountpoint: str) -> str | None:
    """major:minor of the lazystore FUSE mount at *mountpoint* (from
    /proc/self/mountinfo, so no request goes to the file system)."""
    # realpath of the mountpoint itself would stat it: a request to the mount
    # that nobody answers yet
    parent, name = os.path.split(os.path.abspath(mountpoint))
    real = os.path.join(os.path.realpath(parent), name)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if (fields[4].encode().decode("unicode_escape") == real
                    and fields[sep + 1].startswith("fuse") and fields[sep + 2] == FSNAME):
                found = fields[2]
    return found


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unmount(mountpoint: str) -> None:
    """Detach the mount (as libfuse does: processes still inside keep it)."""
    _check(_libc.umount2(os.fsencode(mountpoint), MNT_DETACH), f"umount {mountpoint}")


def abort_connection(device: str) -> None:
    """End the kernel's FUSE connection of the mount with *device*: every waiting
    request fails with ENOTCONN, so the stale mount can be cleared."""
    minor = device.split(":")[1]
    try:
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    except OSError as exc:
        log.warning("cannot abort FUSE connection %s: %s", minor, exc.strerror)


def _is_fuse_device(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == FUSE_DEVICE


def _read_init(fd: int) -> bytes:
    data = os.read(fd, READ_SIZE)
    if len(data) < IN_HEADER.size or IN_HEADER.unpack_from(data)[1] != FUSE_INIT:
        raise StoreError("the kernel's first FUSE request was not INIT")
    return data


class FuseSession:
    """One FUSE connection served through pyfuse3 (see the module docstring)."""

    def __init__(
        self, fuse_fd: int, mountpoint: str, state: SessionState, state_file: Path,
        taken_over: bool,
    ) -> None:
        self.fuse_fd = fuse_fd
        self.mountpoint = mountpoint
        self.state = state
        self.state_file = state_file
        self.taken_over = taken_over
        self._session_fd = -1
        self._peer: socket.socket | None = None
        self._started = False
        # Store paths whose inodes the kernel got, one a line, appended before it
        # gets them: a daemon killed before its index save lost their records.
        # Opened for each line, not held: a file held open for writing would keep
        # the cache's file system from being remounted read-only (EBUSY).
        self.journal_file = journal = state_file.with_name(state_file.name + ".paths")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if taken_over else os.O_TRUNC)
        fd = os.open(journal, flags, 0o600)
        try:
            self.handed_out = _read_lines(fd) if taken_over else []
        finally:
            os.close(fd)
        self._journal_failed = False  # said once until a line is written again

    # -- getting a session ---------------------------------------------------

    @classmethod
    def mount(
        cls, mountpoint: str, allow_other: bool, state_file: Path
    ) -> FuseSession:
        """Mount a new lazystore file system at *mountpoint* (root only)."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
            if allow_other:
                opts += ",allow_other"
            res = _libc.mount(
                FSNAME.encode(), os.fsencode(mountpoint), f"fuse.{FSNAME}".encode(),
                ctypes.c_ulong(MS_RDONLY | MS_NOSUID | MS_NODEV), opts.encode(),
            )
            _check(res, f"mount {mountpoint}")
            try:
                device = mount_device(mountpoint)
                if device is None:
                    raise StoreError(f"{mountpoint} is not in the mount table after mount(2)")
                state = SessionState(device, _read_init(fd))
            except BaseException:
                unmount(mountpoint)
                raise
        except BaseException:
            os.close(fd)
            raise
        session = cls(fd, mountpoint, state, state_file, taken_over=False)
        session.save()
        return session

    @classmethod
    def take_over(cls, fd: int, mountpoint: str, state_file: Path) -> FuseSession | None:
        """The session of passed descriptor *fd*, or None (logged, the descriptor
        closed, a dead or unknown mount at *mountpoint* cleared) when it cannot
        be served: then the caller mounts afresh."""
        why = None
        device = mount_device(mountpoint)
        state = None
        try:
            state = SessionState.loads(state_file.read_bytes())
        except OSError as exc:
            why = f"no session state ({exc.strerror})"
        except StoreError as exc:
            why = str(exc)
        if why is None and not _is_fuse_device(fd):
            why = "the descriptor is not /dev/fuse"
        elif why is None and device is None:
            why = f"nothing of ours is mounted at {mountpoint}"
        elif why is None and state is not None and device != state.device:
            why = f"the session state is of mount {state.device}, not {device}"
        if why is None and state is not None:
            log.info("taking over the FUSE session of %s (mount %s)", mountpoint, device)
            return cls(fd, mountpoint, state, state_file, taken_over=True)
        log.warning("cannot take over the passed FUSE descriptor: %s; mounting afresh", why)
        os.close(fd)
        sdnotify.notify(f"FDSTOREREMOVE=1\nFDNAME={FDNAME}")
        if device is not None:  # alive while the manager holds its descriptor
            abort_connection(device)
        return None

    # -- serving -------------------------------------------------------------

    def start(self, ops: Any, options: set[str]) -> None:
        """pyfuse3.init on this session; ``ops.on_init`` is set to the switch."""
        here, self._peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._peer.send(self.state.init)
        self._session_fd = here.detach()
        ops.on_init = self._switch
        try:
            pyfuse3.init(ops, f"/dev/fd/{self._session_fd}", options)
        except RuntimeError as exc:
            raise StoreError(f"cannot serve {self.mountpoint}: {exc}") from None
        self._started = True

    def _switch(self) -> None:
        """Called by libfuse while it handles the INIT: from now on the session's
        descriptor number is /dev/fuse; a taken-over one gets its lost requests."""
        os.dup2(self.fuse_fd, self._session_fd, inheritable=False)
        if self._peer is not None:
            self._peer.close()
            self._peer = None
        if self.taken_over:
            try:
                os.write(self.fuse_fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
            except OSError as exc:  # EINVAL: a kernel before 6.9
                log.warning("the kernel cannot resend lost FUSE requests: %s", exc.strerror)
            log.info("serving %s again; requests the last daemon left were resent",
                     self.mountpoint)

    def hand_over(self) -> bool:
        """Put the descriptor in the manager's store (a fresh mount only: a
        taken-over one is there already)."""
        if self.taken_over:
            return True
        return sdnotify.store_fd(FDNAME, self.fuse_fd)

    def save(self) -> None:
        """Write the session state atomically (small; no fsync: it matters only
        while the mount lives, and a machine crash ends the mount)."""
        for stale in self.state_file.parent.glob(f".{self.state_file.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # of a daemon killed while saving
        fsio.write_atomic(self.state_file, self.state.dumps(), sync=False)

    def note_path(self, base: str) -> None:
        try:
            fd = os.open(self.journal_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                         | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, base.encode("utf-8", "surrogateescape") + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._journal_failed:
                log.warning("cannot note store paths in %s (%s): a daemon that takes this "
                            "mount over may not find them again; said once until it can",
                            self.journal_file, exc.strerror)
            self._journal_failed = True
            return
        if self._journal_failed:
            log.info("noting store paths in %s again", self.journal_file)
            self._journal_failed = False

    def set_views(self, views: dict[str, list[str]]) -> None:
        self.state.views = views
        try:
            self.save()
        except OSError as exc:
            log.warning("cannot save the FUSE session state %s: %s", self.state_file,
                        exc.strerror)

    def close(self, unmount_it: bool) -> None:
        if self._started:
            pyfuse3.close(unmount=False)  # libfuse did not mount: it cannot unmount
        elif self._session_fd >= 0:
            os.close(self._session_fd)
        if unmount_it:
            try:
                unmount(self.mountpoint)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):
                    log.warning("%s", exc)
            self.state_file.unlink(missing_ok=True)
            self.journal_file.unlink(missing_ok=True)
        os.close(self.fuse_fd)


def _read_lines(fd: int) -> list[str]:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    text = b"".join(chunks).decode("utf-8", "surrogateescape")
    return list(dict.fromkeys(line for line in text.split("\n") if line))
