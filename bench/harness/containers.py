"""Container modes: the workload as images in a real local registry (behind
the shaping proxy), pulled and run by a fresh private containerd 1.6 with the
stock overlayfs snapshotter or with lazystore's snapshotter.

Timing per run, from the start of the pull: ``pull`` (``ctr image pull``),
``create`` (``ctr container create``: the rootfs snapshot), ``run`` (``ctr
task start`` until the program's first output). Bytes are what crossed the
proxies (registry + binary cache)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.measure import (
    Output,
    RunFailed,
    Skip,
    check,
    drop_caches,
    peak_rss_kib,
    proc_peak_rss_kib,
    run_until_exit,
    wait_quiet,
)
from bench.harness.modes import (
    LAZYSTORE,
    Context,
    cli_has,
    event_timeline,
    fresh_daemon,
    lazystore_status,
    nar_fetches,
    paths_fetched,
    recorded_profile,
)
from bench.harness.workloads import CACHE_DIR, Workload
from bench.proxy import ShapingProxy, shaping_proxy
from lazystore.testing import containerd, lazyregistry, registry

log = logging.getLogger(__name__)

LAYERS = 100  # --layered N: containerd 1.6 overlay mounts stay well below their limits
Record = dict[str, Any]


@dataclass
class Images:
    """References (through the registry proxy) of the workload's four images."""

    proxy: ShapingProxy  # in front of the registry
    refs: dict[tuple[str, str], str]  # (kind, variant) -> HOST:PORT/REPO:TAG
    registry_host: str  # the registry itself, unshaped (for setting up, not measuring)

    def repo(self, kind: str, variant: str) -> str:
        """REPO:TAG of an image (without the host)."""
        return self.refs[(kind, variant)].split("/", 1)[1]


def _image_archive(wl: Workload, kind: str, profile: Path | None = None) -> Path:
    """Build (once, cached in bench/.cache/images) the workload's nix or layered
    image, or its nix image annotated with the access profile *profile*."""
    dest = CACHE_DIR / "images" / f"{Path(wl.top).name}-{kind}.tar"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    argv = [LAZYSTORE, "image", "build", wl.top, "-o", str(tmp),
            "--name", f"bench/{wl.name}:{kind}", "--entrypoint", json.dumps(wl.argv)]
    if kind == "layered":
        argv += ["--layered", str(LAYERS)]
    if profile is not None:
        argv += ["--profile", str(profile)]
    log.info("building %s image of %s", kind, wl.top)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed(f"lazystore image build failed: {proc.stderr.strip()[-500:]}")
    tmp.rename(dest)
    return dest


def start_registry(stack: ExitStack, workdir: Path, first: Workload, second: Workload,
                   profile: Any) -> Images:
    """A real registry with the four images pushed (unshaped), and a shaping
    proxy in front of it for the pulls; owned by *stack*."""
    if not containerd.have_containerd():
        raise Skip("containerd, ctr and runc (and root) are needed")
    if not registry.available():
        raise Skip("docker-registry is not installed")
    if not cli_has("image", "build") or not cli_has("image", "push"):
        raise Skip("`lazystore image build/push` have not landed yet (issue 5)")
    reg = stack.enter_context(registry.running(workdir / "registry"))
    proxy = stack.enter_context(shaping_proxy(reg.url, profile))
    refs = {}
    for variant, wl in (("v1", first), ("v2", second)):
        for kind in ("nix", "layered"):
            repo = f"bench/{wl.name}-{kind}:{variant}"
            push_archive(_image_archive(wl, kind), reg.host, repo)
            refs[(kind, variant)] = f"{proxy.address}/{repo}"
    return Images(proxy, refs, reg.host)


def push_archive(archive: Path, host: str, repo: str) -> None:
    """Push an OCI archive into the registry at *host* as *repo* (REPO:TAG)."""
    proc = subprocess.run([LAZYSTORE, "image", "push", str(archive), f"{host}/{repo}",
                           "--plain-http"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed(f"lazystore image push failed: {proc.stderr.strip()[-500:]}")


def images_for(ctx: Context) -> Images:
    """The registry for this context, started on first use (Skip is remembered)."""
    if "images" not in ctx.extra:
        try:
            ctx.extra["images"] = start_registry(
                ctx.extra["stack"], ctx.fresh_dir("registry"), ctx.workload,
                ctx.extra["delta"], ctx.profile)
        except (Skip, RunFailed) as exc:
            ctx.extra["images"] = exc
    found = ctx.extra["images"]
    if isinstance(found, Exception):
        raise found
    return found


class Pull:
    """pull + create + start of one image in a running containerd."""

    def __init__(self, ctd: Any, snapshotter: str, timeout: float) -> None:
        self.ctd = ctd
        self.snapshotter = snapshotter
        self.timeout = timeout
        self.started = 0.0  # time.monotonic() and time.time() at the last run's pull
        self.started_wall = 0.0

    def ctr_args(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.ctd.address), "--namespace", self.ctd.namespace,
                *args]

    def pull_argv(self, ref: str) -> list[str]:
        return self.ctr_args("images", "pull", "--plain-http", "--snapshotter",
                             self.snapshotter, ref)

    def run(self, ref: str, name: str, expect: str,
            argv: tuple[str, ...] = ()) -> tuple[Output, dict[str, float]]:
        start = self.started = time.monotonic()
        self.started_wall = time.time()
        pull = run_until_exit(self.pull_argv(ref), start, self.timeout)
        if pull.returncode != 0:
            raise RunFailed(f"ctr image pull failed: {pull.stderr.strip()[-500:]}")
        create = run_until_exit(self.ctr_args("containers", "create", "--snapshotter",
                                          self.snapshotter, ref, name, *argv), start,
                                self.timeout)
        if create.returncode != 0:
            raise RunFailed(f"ctr container create failed: {create.stderr.strip()[-500:]}")
        prog = run_until_exit(self.ctr_args("tasks", "start", name), start, self.timeout)
        check(prog, expect, f"container {name}")
        split = {"pull": pull.finished, "create": create.finished - pull.finished,
                 "run": prog.first_output - create.finished}
        self.ctd.ctr("tasks", "delete", name, check=False)
        self.ctd.ctr("containers", "delete", name, check=False)
        return prog, split


class RemotePull(Pull):
    """A pull by ``ctr-remote image rpull`` (stargz-snapshotter's, from Debian):
    containerd's client pull with unpacking, which hands each layer's
    ``containerd.io/snapshot/`` annotations to the snapshotter as labels (as CRI
    does with ``disable_snapshot_annotations = false``; ``ctr image pull``
    passes none) and adds the stargz peer's remote-snapshot labels."""

    def pull_argv(self, ref: str) -> list[str]:
        return ["ctr-remote", *self.ctr_args("images", "rpull", "--plain-http",
                                             "--snapshotter", self.snapshotter, ref)[1:]]


def run_first(puller: Pull, ref: str, expect: str, proxies: list[ShapingProxy]) -> Record:
    """A delta mode's first image, pulled and run (untimed), then until the link
    is quiet (:func:`wait_quiet`): what the node still does for the first image
    is not counted as the second's."""
    puller.run(ref, "first", expect)
    waited, quiet = wait_quiet(proxies)
    if not quiet:
        log.info("the link was still busy %.0f s after the first image", waited)
    return {"settle_seconds": round(waited, 2), "settled": quiet}


def record_of(prog: Output, split: dict[str, float], proxies: list[ShapingProxy],
            cache_stats: Any = None) -> Record:
    stats = [p.reset() for p in proxies]
    return {
        "time_to_first_output": prog.first_output,
        "split": split,
        "bytes": sum(s.bytes_down for s in stats),
        "requests": sum(len(s.requests) for s in stats),
        "output": prog.first_line,
        **({} if cache_stats is None else cache_stats),
    }


def oci_overlayfs(ctx: Context, delta: bool = False) -> Record:
    """The --layered image on containerd's own overlayfs snapshotter."""
    images = images_for(ctx)
    with containerd.Containerd(ctx.fresh_dir("containerd-oci")) as ctd:
        puller = Pull(ctd, "overlayfs", ctx.timeout)
        new_nar = None
        settled: Record = {}
        if delta:
            settled = run_first(puller, images.refs[("layered", "v1")], ctx.workload.expect,
                                [images.proxy, ctx.cache_proxy])
            new_nar = new_nar_bytes(ctx)
        dropped = drop_caches()
        for p in (images.proxy, ctx.cache_proxy):
            p.reset()
        prog, split = puller.run(images.refs[("layered", "v2" if delta else "v1")], "bench",
                                 ctx.extra["delta"].expect if delta else ctx.workload.expect)
        layers = len([t for t in images.proxy.stats.targets("/v2/") if "/blobs/" in t])
        record = record_of(prog, split, [images.proxy, ctx.cache_proxy])
        rss = proc_peak_rss_kib(ctd.proc)
    record.update({"store_paths_fetched": paths_in_layers(ctx, delta),
                   "blobs_fetched": layers, "daemon_peak_rss_kib": rss,
                   "page_cache_dropped": dropped, **settled})
    if new_nar is not None:
        record["new_nar_bytes"] = new_nar
    return record


def paths_in_layers(ctx: Context, delta: bool) -> int:
    """A layered pull brings every store path of the image (or of the new layers)."""
    first = set(ctx.workload.paths)
    second = set(ctx.extra["delta"].paths)
    return len(second - first) if delta else len(first)


def new_nar_bytes(ctx: Context) -> int:
    second: Workload = ctx.extra["delta"]
    new = set(second.paths) - set(ctx.workload.paths)
    return sum(second.nar_sizes[p] for p in new)


def lazystore_snapshotter(ctx: Context, delta: bool = False, kind: str = "nix",
                          labelled: bool = False) -> Record:
    """The nix image through lazystore's snapshotter (fresh daemon, snapshotter
    and containerd, empty caches); *labelled*: pulled so that the layer's
    annotations reach the snapshotter (:class:`RemotePull`)."""
    images = images_for(ctx)
    if not cli_has("snapshotter"):
        raise Skip("`lazystore snapshotter` has not landed yet (issue 5)")
    if labelled and shutil.which("ctr-remote") is None:
        raise Skip("ctr-remote (Debian's stargz-snapshotter) is not installed")
    with ExitStack() as stack:
        daemon, snap, ctd, base = _lazy_node(ctx, stack)
        puller = (RemotePull if labelled else Pull)(ctd, "lazystore", ctx.timeout)
        new_nar = None
        before: set[str] = set()
        settled: Record = {}
        if delta:
            settled = run_first(puller, images.refs[("nix", "v1")], ctx.workload.expect,
                                [images.proxy, ctx.cache_proxy])
            new_nar = new_nar_bytes(ctx)
            before = set(lazystore_status(daemon.sock).get("paths_materialized", []))
        dropped = drop_caches()
        for p in (images.proxy, ctx.cache_proxy):
            p.reset()
        prog, split = puller.run(images.refs[(kind, "v2" if delta else "v1")], "bench",
                                 ctx.extra["delta"].expect if delta else ctx.workload.expect)
        cache_stats = ctx.cache_proxy.stats
        record = record_of(prog, split, [images.proxy, ctx.cache_proxy])
        status = lazystore_status(daemon.sock)
        timeline = event_timeline(daemon, puller.started_wall)
        record.update({
            # times from the pull's start (the program's start is split's pull + create)
            "timeline": timeline,
            # the store paths an image's profile label had the daemon fetch ahead
            "paths_fetched_ahead": len({e["path"] for e in timeline if e["kind"] == "profile"}),
            "link_log": [[round(t - puller.started, 4), line] for t, line in cache_stats.log],
            "fuse_requests": status.get("fuse_requests"),
            "store_paths_fetched": paths_fetched(status, cache_stats, before),
            "nar_requests": nar_fetches(cache_stats),
            "chunk_requests": len(cache_stats.targets("/lzdata/")),
            "daemon_chunk_bytes": status.get("chunk_bytes"),
            "daemon_chunk_bytes_read": status.get("chunk_bytes_read"),
            "daemon_peak_rss_kib": proc_peak_rss_kib(daemon.proc),
            "snapshotter_peak_rss_kib": peak_rss_kib(snap.pid),
            "containerd_peak_rss_kib": proc_peak_rss_kib(ctd.proc),
            "page_cache_dropped": dropped,
            **settled,
        })
        if new_nar is not None:
            record["new_nar_bytes"] = new_nar
    shutil.rmtree(base, ignore_errors=True)
    return record


def _lazy_node(ctx: Context, stack: ExitStack) -> tuple[Any, Any, Any, Path]:
    """A fresh daemon, snapshotter and containerd using it, owned by *stack*."""
    daemon = stack.enter_context(fresh_daemon(ctx, "snap-daemon", allow_other=True))
    base = ctx.fresh_dir("snapshotter")
    address = base / "snapshotter.sock"
    snap = stack.enter_context(containerd.snapshotter_process(
        base / "root", address, daemon.sock, daemon.mnt, log_file=base / "snapshotter.log"))
    ctd = stack.enter_context(containerd.Containerd(
        ctx.fresh_dir("containerd-lazy"), proxy_plugins={"lazystore": str(address)}))
    return daemon, snap, ctd, base


_MADE = re.compile(r"made \S+:latest \((\d+) store paths, \d+ layers\) in ([0-9.]+) s")


def registry_lazystore_snapshotter(ctx: Context) -> Record:
    """The nix image made on request by a fresh ``lazystore registry`` (empty
    cache dir, so the first request walks the closure over the shaped binary
    cache link), pulled through a shaping proxy onto lazystore's snapshotter:
    the cost of generating the manifest, next to the pre-pushed image of
    ``lazystore-snapshotter``."""
    if not containerd.have_containerd():
        raise Skip("containerd, ctr and runc (and root) are needed")
    if not cli_has("registry") or not cli_has("snapshotter"):
        raise Skip("`lazystore registry` has not landed yet (issue 13)")
    with ExitStack() as stack:
        daemon, snap, ctd, base = _lazy_node(ctx, stack)
        reg = stack.enter_context(lazyregistry.running(
            ctx.fresh_dir("lazy-registry"), [ctx.cache_url], ctx.public_key))
        proxy = stack.enter_context(shaping_proxy(reg.url, ctx.profile))
        ref = f"{proxy.address}/{Path(ctx.workload.top).name[:32]}:latest"
        dropped = drop_caches()
        for p in (proxy, ctx.cache_proxy):
            p.reset()
        prog, split = Pull(ctd, "lazystore", ctx.timeout).run(
            ref, "bench", ctx.workload.expect, tuple(ctx.workload.argv))
        made = _MADE.search(reg.log())
        if made is None:
            raise RunFailed(f"the registry did not log making the image: {reg.log()[-500:]}")
        cache_stats = ctx.cache_proxy.stats
        record = record_of(prog, split, [proxy, ctx.cache_proxy])
        status = lazystore_status(daemon.sock)
        record.update({
            "manifest_seconds": float(made[2]),
            "closure_paths": int(made[1]),
            "store_paths_fetched": paths_fetched(status, cache_stats),
            "nar_requests": nar_fetches(cache_stats),
            "registry_peak_rss_kib": peak_rss_kib(reg.process.pid),
            "daemon_peak_rss_kib": proc_peak_rss_kib(daemon.proc),
            "snapshotter_peak_rss_kib": peak_rss_kib(snap.pid),
            "page_cache_dropped": dropped,
        })
    shutil.rmtree(base, ignore_errors=True)
    return record


def lazystore_snapshotter_profile(ctx: Context) -> Record:
    """As lazystore-snapshotter with the nix image built with an access profile
    (``lazystore image build --profile``; recorded by one untimed run of the
    program through a root mount): its layer's label names the files the
    program read first, in order, as many as the label takes, and the daemon
    fetches their chunks from the pull on. The pull is ``ctr-remote image
    rpull``, as for stargz (``ctr image pull`` hands the snapshotter no layer
    annotations). Set against stargz-prefetch, whose image carries the files
    an earlier run opened too."""
    images = images_for(ctx)
    if ("nix-profile", "v1") not in images.refs:
        archive = _image_archive(ctx.workload, "nix-profile", recorded_profile(ctx))
        repo = f"bench/{ctx.workload.name}-nix-profile:v1"
        push_archive(archive, images.registry_host, repo)
        images.refs[("nix-profile", "v1")] = f"{images.proxy.address}/{repo}"
    return lazystore_snapshotter(ctx, kind="nix-profile", labelled=True)


def lazystore_snapshotter_noindex(ctx: Context) -> Record:
    """As lazystore-snapshotter from the same cache without file indexes."""
    return lazystore_snapshotter(ctx.unindexed())


def delta_oci_overlayfs(ctx: Context) -> Record:
    return oci_overlayfs(ctx, delta=True)


def delta_lazystore_snapshotter(ctx: Context) -> Record:
    return lazystore_snapshotter(ctx, delta=True)


CONTAINER_MODES = {
    "oci-overlayfs": oci_overlayfs,
    "lazystore-snapshotter": lazystore_snapshotter,
    "lazystore-snapshotter-profile": lazystore_snapshotter_profile,
    "lazystore-snapshotter-noindex": lazystore_snapshotter_noindex,
    "delta-oci-overlayfs": delta_oci_overlayfs,
    "delta-lazystore-snapshotter": delta_lazystore_snapshotter,
    "registry-lazystore-snapshotter": registry_lazystore_snapshotter,
}
