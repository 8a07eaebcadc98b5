"""The modes: each starts from a cold state, runs the workload's program once
and returns a run record. A mode that cannot run here raises Skip (with the
reason); one that runs but fails raises RunFailed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.measure import (
    RunFailed,
    Skip,
    check,
    drop_caches,
    in_store_namespace,
    peak_rss_kib,
    run_until_exit,
    wait_for,
)
from bench.harness.workloads import Workload
from bench.proxy import Profile, ShapingProxy, Stats
from lazystore import nixtool

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LAZYSTORE = str(Path(sys.executable).with_name("lazystore"))

Record = dict[str, Any]


@dataclass
class Context:
    """Everything a mode needs for one (workload, profile, compression)."""

    workload: Workload
    profile: Profile
    compression: str
    cache_proxy: ShapingProxy  # in front of the HTTP binary cache
    public_key: str
    workdir: Path
    timeout: float = 300.0
    extra: dict[str, Any] = field(default_factory=dict)  # container modes' shared state

    @property
    def cache_url(self) -> str:
        return self.cache_proxy.url

    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def nar_fetches(stats: Stats) -> int:
    """Distinct NARs requested through the proxy (each is one store path)."""
    return len(set(stats.targets("/nar/")))


# -- 1. nix-eager ------------------------------------------------------------------


def nix_eager(ctx: Context) -> Record:
    """Real Nix substitutes the closure into a fresh chroot store, then the
    program runs from it (bound over /nix/store in a private namespace)."""
    if shutil.which("nix-store") is None:
        raise Skip("nix-store is not installed")
    root = ctx.fresh_dir("eager-root")
    env = nixtool.nix_env(nixtool.substituting(ctx.cache_url, ctx.public_key))
    env["XDG_CACHE_HOME"] = str(ctx.fresh_dir("eager-xdg"))  # no narinfo disk cache
    dropped = drop_caches()
    ctx.cache_proxy.reset()
    start = time.monotonic()
    sub = run_until_exit(
        ["nix-store", "--store", f"local?root={root}", "-r", ctx.workload.top],
        start, ctx.timeout, env,
    )
    if sub.returncode != 0:
        raise RunFailed(f"nix-store -r failed: {sub.stderr.strip()[-500:]}")
    prog = run_until_exit(
        in_store_namespace(root / "nix" / "store", ctx.workload.argv), start, ctx.timeout
    )
    check(prog, ctx.workload.expect, "nix-eager program")
    stats = ctx.cache_proxy.reset()
    shutil.rmtree(root)
    return {
        "time_to_first_output": prog.first_output,
        "split": {"substitute": sub.finished, "run": prog.first_output - sub.finished},
        "bytes": stats.bytes_down,
        "requests": len(stats.requests),
        "store_paths_fetched": nar_fetches(stats),
        "daemon_peak_rss_kib": sub.max_rss_kib,  # nix-store does the fetching here
        "output": prog.first_line,
        "page_cache_dropped": dropped,
    }


# -- 2. lazystore-fuse ---------------------------------------------------------------


def cli_has(*words: str) -> bool:
    """Whether ``lazystore WORDS --help`` exists (the part has landed)."""
    if not Path(LAZYSTORE).exists():
        return False
    proc = subprocess.run([LAZYSTORE, *words, "--help"], capture_output=True)
    return proc.returncode == 0


def lazystore_status(socket: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [LAZYSTORE, "status", "--json", "--control-socket", str(socket)],
        capture_output=True, text=True, timeout=30,
    )
    if proc.returncode != 0:
        raise RunFailed(f"lazystore status failed: {proc.stderr.strip()}")
    return dict(json.loads(proc.stdout))


class Daemon:
    """A fresh ``lazystore mount`` on an empty cache dir; stopped on exit."""

    def __init__(self, ctx: Context, name: str = "fuse", allow_other: bool = False) -> None:
        base = ctx.fresh_dir(name)
        self.mount_point = base / "mnt"
        self.cache_dir = base / "cache"
        self.socket = base / "control.sock"
        self.log_file = base / "daemon.log"
        self.mount_point.mkdir()
        self.argv = [
            LAZYSTORE, "mount", str(self.mount_point),
            "--substituter", ctx.cache_url,
            "--trusted-public-key", ctx.public_key,
            "--cache-dir", str(self.cache_dir),
            "--control-socket", str(self.socket),
        ] + (["--allow-other"] if allow_other else [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    def __enter__(self) -> Daemon:
        started = time.monotonic()
        with open(self.log_file, "wb") as log_out:
            self.proc = subprocess.Popen(
                self.argv, stdout=log_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            wait_for(
                lambda: os.path.ismount(self.mount_point) and self.socket.exists(),
                60, "lazystore mount", self.proc,
            )
        except RunFailed as exc:
            self.__exit__(None, None, None)
            raise RunFailed(f"{exc}; log: {self.log()[-800:]}") from None
        self.start_seconds = time.monotonic() - started
        return self

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def peak_rss_kib(self) -> int | None:
        return None if self.proc is None else peak_rss_kib(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mount_point):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount_point)], check=False)


def lazystore_fuse(ctx: Context) -> Record:
    """A fresh lazystore mount (empty cache); the program runs through it."""
    if not cli_has("mount") or not cli_has("status"):
        raise Skip("`lazystore mount`/`lazystore status` have not landed yet (issue 4)")
    dropped = drop_caches()
    ctx.cache_proxy.reset()
    with Daemon(ctx) as daemon:
        start = time.monotonic()
        prog = run_until_exit(in_store_namespace(daemon.mount_point, ctx.workload.argv),
                              start, ctx.timeout)
        check(prog, ctx.workload.expect, "lazystore-fuse program")
        status = lazystore_status(daemon.socket)
        rss = daemon.peak_rss_kib()
        start_seconds = daemon.start_seconds
    stats = ctx.cache_proxy.reset()
    return {
        "time_to_first_output": prog.first_output,
        "split": {"daemon_start": start_seconds, "run": prog.first_output},
        "bytes": stats.bytes_down,
        "requests": len(stats.requests),
        "store_paths_fetched": len(status.get("paths_materialized", [])),
        "nar_requests": nar_fetches(stats),
        "daemon_bytes_downloaded": status.get("bytes_downloaded"),
        "daemon_peak_rss_kib": rss,
        "output": prog.first_line,
        "page_cache_dropped": dropped,
    }


HOST_MODES: dict[str, Callable[[Context], Record]] = {
    "nix-eager": nix_eager,
    "lazystore-fuse": lazystore_fuse,
}
