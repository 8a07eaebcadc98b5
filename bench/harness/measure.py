"""Measuring one cold start: cold state, time to first output, peak RSS."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STORE_DIR = "/nix/store"
# Run argv with *store* bound over /nix/store in a private mount namespace, so
# the program runs from its real store path without touching the host's store.
_BIND_AND_EXEC = 'mount --bind "$0" /nix/store && exec "$@"'


class Skip(Exception):
    """A mode cannot run here; ``str()`` says why (reported, never a number)."""


class RunFailed(Exception):
    """A mode ran but did not produce the expected output."""


@dataclass
class Output:
    first_output: float  # seconds from *start* to the first byte on stdout
    finished: float  # seconds from *start* to exit
    first_line: str
    returncode: int
    stderr: str
    max_rss_kib: int  # of the process itself (rusage), not of a daemon


def drop_caches() -> bool:
    """Write dirty data back and drop the page cache (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        log.info("cannot drop the page cache: %s", exc)
        return False
    return True


def in_store_namespace(store: str | Path, argv: Sequence[str]) -> list[str]:
    """argv running with *store* bound over /nix/store (private mount namespace)."""
    return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", _BIND_AND_EXEC,
            str(store), *argv]


def run_until_exit(
    argv: Sequence[str], start: float, timeout: float, env: dict[str, str] | None = None
) -> Output:
    """Run *argv*, noting when its first stdout byte arrives (relative to *start*,
    a ``time.monotonic()`` value) and when it exits."""
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first: float | None = None
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    deadline = time.monotonic() + timeout
    while streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            proc.wait()
            raise RunFailed(f"{argv[0]} timed out after {timeout:.0f} s: {bytes(err)[-300:]!r}")
        ready, _, _ = select.select(list(streams), [], [], remaining)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                del streams[fd]
                continue
            if fd == proc.stdout.fileno() and first is None:
                first = time.monotonic() - start
            streams[fd].extend(chunk)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    finished = time.monotonic() - start
    proc.stdout.close()
    proc.stderr.close()
    return Output(
        first if first is not None else finished,
        finished,
        out.decode(errors="replace").partition("\n")[0],
        proc.returncode,
        err.decode(errors="replace")[-2000:],
        int(rusage.ru_maxrss),
    )


def check(output: Output, expect: str, what: str) -> None:
    if output.returncode != 0 or not output.first_line.startswith(expect):
        raise RunFailed(
            f"{what}: exit {output.returncode}, first line {output.first_line!r} "
            f"(expected {expect!r}); stderr: {output.stderr.strip()[-500:]}"
        )


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM of a live process (its peak resident set), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_peak_rss_kib(proc: subprocess.Popen[bytes] | None) -> int | None:
    """:func:`peak_rss_kib` of a started process (None when it never started)."""
    return None if proc is None else peak_rss_kib(proc.pid)


SETTLE_QUIET_S = 1.0  # nothing crossed the link for this long: the node is idle
SETTLE_TIMEOUT_S = 30.0


def wait_quiet(proxies: Sequence[Any], quiet: float = SETTLE_QUIET_S,
               timeout: float = SETTLE_TIMEOUT_S) -> tuple[float, bool]:
    """Wait until nothing has crossed *proxies* (bench.proxy.ShapingProxy) for
    *quiet* seconds, at most *timeout*: the background work a first image left
    (a daemon still learning its paths ahead, a peer's background fetch) then
    goes uncounted in the next pull, on every side alike. The seconds waited,
    and whether the link went quiet."""
    start = time.monotonic()

    def seen() -> list[tuple[int, int, int, int]]:
        return [(len(p.stats.requests), p.stats.bytes_down, p.stats.bytes_up,
                 p.stats.connections) for p in proxies]

    last, since = seen(), start
    while True:
        time.sleep(0.05)
        now, current = time.monotonic(), seen()
        if current != last:
            last, since = current, now
        elif now - since >= quiet:
            return now - start, True
        if now - start >= timeout:
            return now - start, False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll *predicate* until true; fail early if *proc* exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RunFailed(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.02)
    raise RunFailed(f"{what}: not ready after {timeout:.0f} s")
