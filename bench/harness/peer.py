"""The lazy peer: stargz-snapshotter (eStargz), built by bench/peers/build from
Debian's packages, as a containerd proxy snapshotter.

The workload's layered image is converted once with ``ctr-remote image
convert --estargz --oci`` (and, for ``stargz-prefetch``, with ``ctr-remote
image optimize``, which runs the workload and records the files it opens so
that the snapshotter prefetches them at mount), cached as an OCI archive in
bench/.cache/images and pushed into each run's registry. A run is a fresh
peer and containerd, ``ctr-remote image rpull --plain-http`` through the
shaping proxy, then create and start as in the other container modes.

The peer runs with its own defaults: background fetch on (after mounting,
every layer is fetched whole at a low rate) and prefetch on (a layer's files
before its prefetch landmark are fetched at mount: none for a plain
conversion, the recorded ones for an optimized image)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.harness.containers import (
    Images,
    RemotePull,
    images_for,
    new_nar_bytes,
    paths_in_layers,
    push_archive,
    record_of,
    run_first,
)
from bench.harness.measure import (
    RunFailed,
    Skip,
    drop_caches,
    peak_rss_kib,
    proc_peak_rss_kib,
    wait_for,
)
from bench.harness.modes import Context, Record
from bench.harness.workloads import BENCH, CACHE_DIR, Workload
from lazystore.testing import containerd

log = logging.getLogger(__name__)

BUILD = BENCH / "peers" / "build"
PEER = CACHE_DIR / "peers" / "bin" / "stargz-peer"
SNAPSHOTTER = "stargz"
SETTINGS = {"background_fetch": True, "prefetch": True}  # the peer's defaults, unchanged
OPTIMIZE_PERIOD_S = 5  # how long `optimize` watches the workload's file accesses


def peer_binary() -> Path:
    """The built peer (built now if needed); Skip with the build's reason."""
    proc = subprocess.run([str(BUILD)], capture_output=True, text=True)
    if not PEER.exists():
        reason = proc.stderr.strip().splitlines()[-1:] or [f"{BUILD} exited {proc.returncode}"]
        raise Skip(f"stargz peer: {reason[0]}")
    return PEER


@contextmanager
def peer_process(root: Path, address: Path, log_file: Path) -> Any:
    """Run the peer snapshotter on *address* until the context exits."""
    with open(log_file, "ab") as out:
        proc = subprocess.Popen([str(peer_binary()), "-root", str(root), "-address", str(address)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(address.exists, 30, "stargz peer", proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ctr_remote(ctd: containerd.Containerd, *args: str, timeout: float = 600) -> str:
    argv = ["ctr-remote", "--address", str(ctd.address), "--namespace", ctd.namespace, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(argv[5:8])} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _archive(ctx: Context, images: Images, wl: Workload, variant: str, optimized: bool) -> Path:
    """The eStargz OCI archive of *wl*'s layered image (converted once, cached)."""
    kind = "estargz-optimized" if optimized else "estargz"
    dest = CACHE_DIR / "images" / f"{Path(wl.top).name}-{kind}.tar"
    if dest.exists():
        return dest
    src = f"{images.registry_host}/{images.repo('layered', variant)}"
    dst = f"{images.registry_host}/converted/{wl.name}-{kind}:{variant}"
    log.info("converting %s to %s", src, kind)
    with containerd.Containerd(ctx.fresh_dir("containerd-convert")) as ctd:
        _ctr_remote(ctd, "images", "pull", "--plain-http", src)
        if optimized:
            _ctr_remote(ctd, "images", "optimize", "--oci", "--period", str(OPTIMIZE_PERIOD_S),
                        "--entrypoint", json.dumps(wl.argv), src, dst)
        else:
            _ctr_remote(ctd, "images", "convert", "--estargz", "--oci", src, dst)
        tmp = dest.with_suffix(f".tmp-{os.getpid()}")  # concurrent runs: each its own
        _ctr_remote(ctd, "images", "export", str(tmp), dst)
    tmp.rename(dest)
    return dest


def _stargz_ref(ctx: Context, images: Images, wl: Workload, variant: str,
                optimized: bool) -> str:
    """The eStargz image in this context's registry (pushed on first use)."""
    key = ("stargz-optimized" if optimized else "stargz", variant)
    if key not in images.refs:
        repo = f"bench/{wl.name}-{key[0]}:{variant}"
        push_archive(_archive(ctx, images, wl, variant, optimized), images.registry_host, repo)
        images.refs[key] = f"{images.proxy.address}/{repo}"
    return images.refs[key]


def stargz(ctx: Context, delta: bool = False, optimized: bool = False) -> Record:
    """The layered image as eStargz, lazily pulled by a fresh peer and containerd."""
    if not containerd.have_containerd():
        raise Skip("containerd, ctr and runc (and root) are needed")
    peer_binary()
    images = images_for(ctx)
    second: Workload = ctx.extra["delta"]
    first_ref = _stargz_ref(ctx, images, ctx.workload, "v1", optimized)
    ref = _stargz_ref(ctx, images, second, "v2", optimized) if delta else first_ref
    base = ctx.fresh_dir("stargz-peer")
    address = base / "stargz.sock"
    with ExitStack() as stack:
        peer = stack.enter_context(peer_process(base / "root", address, base / "peer.log"))
        # Started after the peer listens: containerd's proxy connection never backs off.
        ctd = stack.enter_context(containerd.Containerd(
            ctx.fresh_dir("containerd-stargz"), proxy_plugins={SNAPSHOTTER: str(address)}))
        _wait_for_proxy(ctd)
        puller = RemotePull(ctd, SNAPSHOTTER, ctx.timeout)
        settled: Record = {}
        if delta:
            settled = run_first(puller, first_ref, ctx.workload.expect,
                                [images.proxy, ctx.cache_proxy])
        dropped = drop_caches()
        for p in (images.proxy, ctx.cache_proxy):
            p.reset()
        started = time.monotonic()
        prog, split = puller.run(ref, "bench", second.expect if delta else ctx.workload.expect)
        record = record_of(prog, split, [images.proxy, ctx.cache_proxy])
        record.update({
            "remote_layers_mounted": _fuse_mounts_below(base / "root"),
            # stargz fetches by chunk: like oci-overlayfs, the paths the (new) layers hold
            "store_paths_fetched": paths_in_layers(ctx, delta),
            "peer_settings": {**SETTINGS, "optimized_image": optimized},
            "bytes_counted_after_s": round(time.monotonic() - started, 2),
            "daemon_peak_rss_kib": peak_rss_kib(peer.pid),
            "containerd_peak_rss_kib": proc_peak_rss_kib(ctd.proc),
            "page_cache_dropped": dropped,
            **settled,
        })
        if delta:
            record["new_nar_bytes"] = new_nar_bytes(ctx)
    return record


def _fuse_mounts_below(root: Path) -> int:
    """The peer's lazily mounted layers (one FUSE mount each; a layer it could
    not mount remotely was downloaded and unpacked instead)."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f if line.split()[1].startswith(prefix)
                   and line.split()[2].startswith("fuse"))


def _wait_for_proxy(ctd: containerd.Containerd, timeout: float = 30) -> None:
    """Until containerd reaches the peer (its proxy connection may be in gRPC
    backoff, and a pull would then fail once): not part of the measured time."""
    deadline = time.monotonic() + timeout
    while True:
        proc = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RunFailed(f"containerd does not reach the stargz peer: {proc.stderr.strip()}")
        time.sleep(0.5)


def stargz_prefetch(ctx: Context) -> Record:
    return stargz(ctx, optimized=True)


def delta_stargz(ctx: Context) -> Record:
    return stargz(ctx, delta=True)


PEER_MODES = {
    "stargz": stargz,
    "stargz-prefetch": stargz_prefetch,
    "delta-stargz": delta_stargz,
}
