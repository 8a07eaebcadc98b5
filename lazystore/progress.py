"""The progress line of long-running commands (on a terminal only)."""

from __future__ import annotations

import sys
import time

WIDTH = 30


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


class Progress:
    """``[####------] done/total what, N MiB, R MiB/s`` redrawn on stderr."""

    def __init__(self, total: int, what: str = "paths", started: float | None = None) -> None:
        self.total, self.what = total, what
        self.started = time.monotonic() if started is None else started

    def line(self, done: int, nbytes: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        filled = WIDTH * done // self.total if self.total else WIDTH
        bar = "#" * filled + "-" * (WIDTH - filled)
        return (f"[{bar}] {done}/{self.total} {self.what}, {mib(nbytes)} MiB, "
                f"{mib(nbytes / elapsed)} MiB/s")

    def draw(self, done: int, nbytes: int, final: bool = False) -> None:
        sys.stderr.write("\r" + self.line(done, nbytes) + ("\n" if final else "\x1b[K"))
        sys.stderr.flush()
