"""A command whose stderr is a terminal (a pseudo-terminal), for progress bars."""

from __future__ import annotations

import os
import pty
import subprocess
from typing import Any


def run_on_terminal(argv: list[Any], timeout: float = 120, **popen: Any) -> tuple[int, str]:
    """Run *argv* with stderr on a new pseudo-terminal and stdin, stdout on
    /dev/null (unless *popen* says otherwise): its exit status and everything
    it wrote to the terminal."""
    leader, follower = pty.openpty()
    popen = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, **popen}
    proc = subprocess.Popen(argv, stderr=follower, **popen)
    os.close(follower)
    out = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(leader)
    return proc.wait(timeout=timeout), out.decode()
