"""The mountpoint and the process limits a serving daemon needs."""

from __future__ import annotations

import errno
import logging
import os
import resource
import subprocess

from lazystore.errors import StoreError

log = logging.getLogger(__name__)

FSNAME = "lazystore"


def _mount_entry(path: str) -> tuple[str, str] | None:
    """(fstype, source) of the mount at *path*, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == real:
                sep = fields.index("-")
                found = (fields[sep + 1], fields[sep + 2])
    return found


def _lazy_unmount(path: str) -> None:
    for argv in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        try:
            if subprocess.run(argv, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue
    raise StoreError(f"cannot clear the stale mount at {path}")


def prepare_mountpoint(path: str) -> None:
    """Clear a stale mount of a killed daemon; refuse a live one."""
    try:
        os.statvfs(path)  # never answered from the kernel's attribute cache
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise StoreError(f"mountpoint {path}: {exc.strerror}") from None
        log.info("clearing the stale mount at %s left by a daemon that died", path)
        _lazy_unmount(path)
        return
    entry = _mount_entry(path)
    if entry is not None and entry[0].startswith("fuse") and entry[1] == FSNAME:
        raise StoreError(f"another lazystore daemon is serving {path}")
    if not os.path.isdir(path):
        raise StoreError(f"mountpoint {path} is not a directory")


def mount_options(allow_other: bool) -> set[str]:
    opts = {f"fsname={FSNAME}", "subtype=lazystore", "ro", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    return opts


def raise_fd_limit() -> None:
    """Lift the soft limit on open files to the hard one: every file open through
    the mount holds a descriptor of the daemon (for as long as a process maps or
    reads it), and systemd's default soft limit of 1024 would turn the next open
    into EMFILE, which the mount can only answer with EIO."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    want = hard
    if hard == resource.RLIM_INFINITY:  # above fs.nr_open setrlimit fails
        with open("/proc/sys/fs/nr_open") as f:
            want = int(f.read())
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit from %d: %s", soft, exc)
        return
    log.info("open files limit raised from %d to %d", soft, want)
