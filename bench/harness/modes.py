"""The modes: each starts from a cold state, runs the workload's program once
and returns a run record. A mode that cannot run here raises Skip (with the
reason); one that runs but fails raises RunFailed."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.harness.measure import (
    RunFailed,
    Skip,
    check,
    drop_caches,
    in_store_namespace,
    proc_peak_rss_kib,
    run_until_exit,
)
from bench.harness.workloads import Workload
from bench.proxy import Profile, ShapingProxy, Stats
from lazystore import nixtool
from lazystore.errors import LazystoreError
from lazystore.testing.daemon import LAZYSTORE, Daemon

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

Record = dict[str, Any]


@dataclass
class Context:
    """Everything a mode needs for one (workload, profile, compression)."""

    workload: Workload
    profile: Profile
    compression: str
    cache_proxy: ShapingProxy  # in front of the HTTP binary cache (with file indexes)
    public_key: str
    workdir: Path
    timeout: float = 300.0
    extra: dict[str, Any] = field(default_factory=dict)  # container modes' shared state
    unindexed_proxy: ShapingProxy | None = None  # the same cache without file indexes

    def unindexed(self) -> Context:
        """This context on the cache without file indexes (the *-noindex modes)."""
        if self.unindexed_proxy is None:
            raise Skip("no cache without file indexes in this run")
        return replace(self, cache_proxy=self.unindexed_proxy)

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


def paths_fetched(status: dict[str, Any], stats: Stats, before: Collection[str] = ()) -> int:
    """Store paths whose bytes came over the link: materialised (whole NARs) or
    read by chunks from their data file (``/lzdata/<hash>.lzdata``); paths
    materialised already (*before*, base names) are not counted."""
    hashes = {base.split("-", 1)[0] for base in status.get("paths_materialized", [])
              if base not in before}
    hashes |= {Path(t.split("?", 1)[0]).stem for t in stats.targets("/lzdata/")}
    return len(hashes)


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


@contextmanager
def fresh_daemon(ctx: Context, name: str = "fuse", allow_other: bool = False) -> Iterator[Daemon]:
    """A quiet ``lazystore mount`` (lazystore.testing's Daemon) on an empty cache
    dir under *name*, serving once yielded, always stopped; RunFailed if it
    does not come up."""
    extra = ["--allow-other"] if allow_other else []
    daemon = Daemon(ctx.fresh_dir(name), ctx.cache_url, ctx.public_key, *extra,
                    verbose=False, call_timeout=ctx.timeout)
    try:
        try:
            daemon.start(timeout=60)
        except AssertionError as exc:  # the shared helper's way of saying so
            raise RunFailed(f"lazystore mount: {exc}") from None
        yield daemon
    finally:
        daemon.stop()


def lazystore_fuse(ctx: Context) -> Record:
    """A fresh lazystore mount (empty cache); the program runs through it. The
    cache offers file indexes, so files are fetched by chunks (issue 15)."""
    if not cli_has("mount") or not cli_has("status"):
        raise Skip("`lazystore mount`/`lazystore status` have not landed yet (issue 4)")
    return _fuse_run(ctx)


def lazystore_fuse_noindex(ctx: Context) -> Record:
    """As lazystore-fuse from the same cache without file indexes (whole NARs)."""
    return lazystore_fuse(ctx.unindexed())


def lazystore_fuse_profile(ctx: Context) -> Record:
    """As lazystore-fuse on a node that has the access profile of an earlier run
    of the program (recorded once per workload and link, untimed): the
    daemon's prefetch_profile (what `lazystore prefetch --profile` sends)
    starts with the program, which does not wait for it."""
    return _fuse_run(ctx, recorded_profile(ctx))


def recorded_profile(ctx: Context) -> Path:
    """The access profile of one untimed run of the workload's program through
    a fresh root mount (recorded once per workload and link)."""
    if not cli_has("profile", "save"):
        raise Skip("access profiles have not landed yet (issue 14)")
    saved = ctx.workdir / "profile.json"
    if not saved.exists():
        with fresh_daemon(ctx, "fuse-record") as daemon:
            prog = run_until_exit(in_store_namespace(daemon.mnt, ctx.workload.argv),
                                  time.monotonic(), ctx.timeout)
            check(prog, ctx.workload.expect, "the profile's recording")
            _lazystore("profile", "save", str(saved), "--control-socket", str(daemon.sock))
        if not json.loads(saved.read_text()).get("reads"):
            # else the profile modes' image, cached, would carry no profile: the plain mode
            saved.unlink()
            raise RunFailed("the profile's recording saw no read through the mount")
    return saved


def _lazystore(*args: str) -> None:
    proc = subprocess.run([LAZYSTORE, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RunFailed(f"lazystore {args[0]} failed: {proc.stderr.strip()}")


def _send_profile(daemon: Daemon, text: str, failed: list[BaseException]) -> None:
    try:
        daemon.call("prefetch_profile", profile=text)
    except Exception as exc:  # reported by the run
        failed.append(exc)


def _fuse_run(ctx: Context, profile: Path | None = None) -> Record:
    dropped = drop_caches()
    ctx.cache_proxy.reset()
    started = time.monotonic()
    with fresh_daemon(ctx) as daemon:
        start, start_wall = time.monotonic(), time.time()
        start_seconds = start - started
        # The profile goes to the daemon as a node's agent would send it (one
        # control request from a thread of this process, no CLI start-up).
        ahead: list[BaseException] = []
        sender = None if profile is None else threading.Thread(
            target=_send_profile, args=(daemon, profile.read_text(), ahead), daemon=True)
        if sender is not None:
            sender.start()
        prog = run_until_exit(in_store_namespace(daemon.mnt, ctx.workload.argv),
                              start, ctx.timeout)
        if sender is not None:
            sender.join(ctx.timeout)
            if ahead:
                raise RunFailed(f"prefetch_profile failed: {ahead[0]}")
        check(prog, ctx.workload.expect, "lazystore-fuse program")
        status = lazystore_status(daemon.sock)
        rss = proc_peak_rss_kib(daemon.proc)
        timeline = event_timeline(daemon, start_wall)
    stats = ctx.cache_proxy.reset()
    return {
        "time_to_first_output": prog.first_output,
        "split": {"daemon_start": start_seconds, "run": prog.first_output},
        "bytes": stats.bytes_down,
        "requests": len(stats.requests),
        "store_paths_fetched": paths_fetched(status, stats),
        "store_paths_materialized": len(status.get("paths_materialized", [])),
        "nar_requests": nar_fetches(stats),
        "chunk_requests": len(stats.targets("/lzdata/")),
        "daemon_bytes_downloaded": status.get("bytes_downloaded"),
        "daemon_chunk_bytes": status.get("chunk_bytes"),  # from indexed caches (issue 15)
        "daemon_chunk_bytes_read": status.get("chunk_bytes_read"),
        "fuse_requests": status.get("fuse_requests"),
        "daemon_peak_rss_kib": rss,
        "output": prog.first_line,
        "page_cache_dropped": dropped,
        "timeline": timeline,
        "link_log": [[round(t - start, 4), line] for t, line in stats.log],
    }


def event_timeline(daemon: Daemon, start_wall: float) -> list[dict[str, Any]]:
    """The daemon's event log (narinfos, listings, NARs, first reads), times in
    seconds from the program's start; empty from a daemon without one."""
    try:
        events = daemon.call("events", since=0)["events"]
    except LazystoreError:  # a daemon from before the event log
        return []
    return [{**e, "time": round(e["time"] - start_wall, 6)} for e in events]


HOST_MODES: dict[str, Callable[[Context], Record]] = {
    "nix-eager": nix_eager,
    "lazystore-fuse": lazystore_fuse,
    "lazystore-fuse-noindex": lazystore_fuse_noindex,
    "lazystore-fuse-profile": lazystore_fuse_profile,
}
