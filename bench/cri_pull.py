"""Pull and first run through containerd 1.6's CRI, as the kubelet drives it:
a nix image named ``nix:0/<store path>`` (buildImage of the ``wide`` closure,
~320 paths, the program reads 5) through ``lazystore image-service`` vs. the
same closure as a layered image (``--layered 100``) from a local registry,
forwarded by it. Each run: RemoveImage, the daemon's cache evicted, then
PullImage (timed) and one host-network pod whose container runs the
program to its exit (RunPodSandbox to the container's exit, timed).
MB: what crossed the network (the daemon's downloads; the registry's layers).

Run as root::

    .venv/bin/python bench/cri_pull.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lazymount import WORKLOADS, load_note  # noqa: E402
from lazystore.cri import archive  # noqa: E402
from lazystore.testing import cri, nixcache  # noqa: E402
from lazystore.testing.httpserver import serve_directory  # noqa: E402


def one_run(node: cri.Node, ref: str, command: list[str],
            log_dir: Path) -> tuple[float, float, int]:
    """(pull seconds, pod seconds, bytes the daemon downloaded) of one cold run."""
    node.service.remove(ref)
    node.daemon.call("evict", paths=[])
    before = int(node.daemon.status()["bytes_downloaded"])
    start = time.monotonic()
    image_ref = node.service.pull(ref)
    pulled = time.monotonic()
    pod = cri.Pod(node.containerd, log_dir)
    try:
        code, out = pod.run(image_ref, command)
    finally:
        pod.remove()
    ran = time.monotonic()
    if (code, out) != (0, "wide ready\n"):
        raise RuntimeError(f"the container failed ({code}): {out!r}\n{node.logs()}")
    return pulled - start, ran - pulled, int(node.daemon.status()["bytes_downloaded"]) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    image = nixcache.build(WORKLOADS / "wide-image.nix")
    closure = nixcache.closure(image)
    busybox = next(p for p in closure if p.endswith("-bench-busybox"))
    wide = next(p for p in closure if p.endswith("-wide"))
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        key = nixcache.KeyPair.generate(work / "keys")
        cache = nixcache.make_cache(image, work / "cache", key)
        layered = work / "layered.tar"
        cri.lazystore("image", "build", wide, "-o", str(layered), "--name", "wide:1",
                      "--layered", "100")
        layer_bytes = sum(d.size for d in archive.inspect(layered).layers)
        with serve_directory(cache.root) as server, \
                cri.node([server.url], key.public_key, busybox, work,  # type: ignore[attr-defined]
                         verbose=False) as node:
            ref = f"{node.registry.host}/bench/wide:1"
            cri.lazystore("image", "push", str(layered), ref, "--plain-http")
            results: dict[str, list[tuple[float, float, int]]] = {"nix:0": [], "layered": []}
            for i in range(args.runs):
                results["nix:0"].append(
                    one_run(node, f"nix:0{image}", [], work / f"pods-n{i}"))  # its entrypoint
                pull, run, _ = one_run(node, ref, [f"{wide}/bin/wide"], work / f"pods-l{i}")
                results["layered"].append((pull, run, layer_bytes))
    print(f"wide: {len(closure) - 2} store paths; {args.runs} runs each, cold "
          f"(image removed, cache evicted; narinfos known after the first run)")
    for kind, runs in results.items():
        pulls, pods = [r[0] for r in runs], [r[1] for r in runs]
        mb = [r[2] / 1e6 for r in runs]
        print(f"{kind:8} pull median {statistics.median(pulls):.2f} s {fmt(pulls)}; "
              f"pod to exit median {statistics.median(pods):.2f} s {fmt(pods)}; "
              f"MB {fmt(mb)}")
    print(load_note())


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


if __name__ == "__main__":
    main()
