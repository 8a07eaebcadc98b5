"""Claiming the path of a unix socket a lazystore process is about to listen on."""

from __future__ import annotations

import errno
import os
import socket
import stat

from lazystore.errors import LazystoreError


def claim(path: str, error: type[LazystoreError], busy: str) -> None:
    """Make *path* free for a new socket: a stale socket (nothing accepts on
    it, its process died) is removed; a live one is *error* ``"<busy> <path>"``,
    and so is anything at *path* that is not a socket (it is never removed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise error(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise error(f"socket {path}: {exc.strerror}") from None
            os.unlink(path)
            return
    raise error(f"{busy} {path}")
