"""Kubernetes' side for tests and benchmarks: a small blocking CRI client
(runtime.v1, from lazystore's own .proto) and the whole node stack.

``CriClient(socket)`` talks to one endpoint: ``images`` is its ImageService,
``runtime`` its RuntimeService. ``Pod`` runs host-network pods (no CNI needed)
and containers in them, and reads a container's log. ``node(...)`` starts
what a Kubernetes node with lazystore runs: ``lazystore mount`` over given
caches, ``lazystore snapshotter``, a private containerd whose CRI plugin uses
it (its sandbox image a busybox ``sleep`` pause image built with
``--layered`` and pushed to a private docker-registry), and ``lazystore
image-service`` in front of it (as its unit runs it: ``setpriv``, no
capability, no_new_privs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lazystore.cri.proto import api_pb2 as api
from lazystore.cri.proto import api_pb2_grpc as api_grpc
from lazystore.testing import registry
from lazystore.testing.containerd import (
    CRI_NAMESPACE,
    Containerd,
    Cri,
    lazystore_process,
    snapshotter_process,
)
from lazystore.testing.daemon import LAZYSTORE, Daemon

SN = "lazystore"
UNIT_PRIVILEGES = ["setpriv", "--no-new-privs", "--bounding-set=-all", "--"]


class CriClient:
    def __init__(self, address: str | Path, timeout: float = 300) -> None:
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.images = api_grpc.ImageServiceStub(self.channel)
        self.runtime = api_grpc.RuntimeServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def pull(self, ref: str) -> str:
        req = api.PullImageRequest(image=api.ImageSpec(image=ref))
        return self.images.PullImage(req, timeout=self.timeout).image_ref  # type: ignore[no-any-return]

    def image_status(self, ref: str) -> api.Image | None:
        resp = self.images.ImageStatus(
            api.ImageStatusRequest(image=api.ImageSpec(image=ref)), timeout=self.timeout)
        return resp.image if resp.HasField("image") else None

    def remove(self, ref: str) -> None:
        self.images.RemoveImage(api.RemoveImageRequest(image=api.ImageSpec(image=ref)),
                                timeout=self.timeout)

    def list_images(self) -> list[api.Image]:
        return list(self.images.ListImages(api.ListImagesRequest(), timeout=self.timeout).images)


@dataclass
class Pod:
    """A host-network pod on *runtime* (a CriClient of containerd's socket)."""

    cri: CriClient
    log_dir: Path
    name: str = field(default_factory=lambda: f"lz-{uuid.uuid4().hex[:10]}")
    id: str = ""

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=self.name, uid=uuid.uuid4().hex,
                                            namespace="default"),
            log_directory=str(self.log_dir),
            linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
                namespace_options=api.NamespaceOption(network=api.NODE))),
        )
        self.id = self.cri.runtime.RunPodSandbox(
            api.RunPodSandboxRequest(config=self.config), timeout=self.cri.timeout
        ).pod_sandbox_id

    def run(self, image: str, command: list[str], timeout: float = 120) -> tuple[int, str]:
        """Create and start a container; wait until it exits; (exit code, log text)."""
        name = f"c{uuid.uuid4().hex[:8]}"
        config = api.ContainerConfig(metadata=api.ContainerMetadata(name=name),
                                     image=api.ImageSpec(image=image), command=command,
                                     log_path=f"{name}.log")
        rt = self.cri.runtime
        cid = rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=self.id, config=config, sandbox_config=self.config),
            timeout=self.cri.timeout).container_id
        rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=self.cri.timeout)
        deadline = time.monotonic() + timeout
        while True:
            status = rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid),
                                        timeout=self.cri.timeout).status
            if status.state == api.CONTAINER_EXITED:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {cid} still {status.state} after {timeout}s")
            time.sleep(0.1)
        return status.exit_code, _log_text(self.log_dir / f"{name}.log")

    def remove(self) -> None:
        rt = self.cri.runtime
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=self.id),
                          timeout=self.cri.timeout)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=self.id),
                            timeout=self.cri.timeout)


def _log_text(path: Path) -> str:
    """The output lines of a CRI log file (``<time> <stream> <tag> <line>`` each)."""
    lines = []
    for line in path.read_text().splitlines():
        parts = line.split(" ", 3)
        lines.append(parts[3] if len(parts) == 4 else "")
    return "\n".join(lines) + ("\n" if lines else "")


def lazystore(*args: str) -> str:
    """Run the lazystore CLI; its stdout (RuntimeError with stderr on failure)."""
    proc = subprocess.run([LAZYSTORE, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"lazystore {args[0]} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


@dataclass
class Node:
    base: Path
    daemon: Daemon
    ctd: Containerd
    registry: registry.Registry
    service: CriClient  # lazystore's image service
    containerd: CriClient  # containerd's own CRI (images and runtime)
    service_pid: int

    def materialized(self) -> set[str]:
        return set(self.daemon.status()["paths_materialized"])

    def cri_images(self) -> set[str]:
        out = self.ctd.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout
        return set(out.split())

    def logs(self) -> str:
        parts = []
        for name in ("image-service.log", "snapshotter.log", "daemon.log"):
            p = self.base / name
            if p.exists():
                parts.append(f"--- {name}\n" + p.read_text(errors="replace")[-3000:])
        parts.append("--- containerd\n" + self.ctd.log_tail())
        return "\n".join(parts)


@contextmanager
def node(urls: Sequence[str], key: str, busybox: str, work: Path,
         verbose: bool = True) -> Iterator[Node]:
    """The node stack over binary caches *urls* (signed by *key*); *busybox* is
    a store path with ``bin/sleep`` (the pause image), *work* a scratch dir."""
    base = Path(tempfile.mkdtemp(prefix="lzk-", dir="/tmp"))  # short socket paths
    os.chmod(base, 0o755)
    try:
        with registry.running(base / "reg") as reg:
            pause = work / "pause.tar"
            lazystore("image", "build", busybox, "-o", str(pause), "--name", "pause:1",
                      "--layered", "1", "--entrypoint", f"{busybox}/bin/sleep 1000000")
            lazystore("image", "push", str(pause), f"{reg.host}/pause:1", "--plain-http")
            daemon = Daemon(base, list(urls), key, "--allow-other", verbose=verbose,
                            call_timeout=600)
            daemon.start()
            ctd = Containerd(base / "ctd", {SN: str(base / "sn.sock")},
                             cri=Cri(f"{reg.host}/pause:1", SN, (reg.host,)))
            try:
                with snapshotter_process(base / "sn", base / "sn.sock", daemon.sock,
                                         daemon.mnt, log_file=base / "snapshotter.log"):
                    ctd.start()
                    args = ["image-service", "--address", str(base / "img.sock"),
                            "--runtime-endpoint", str(ctd.address),
                            "--control-socket", str(daemon.sock),
                            "--mount-point", str(daemon.mnt)]
                    wrapper = UNIT_PRIVILEGES if shutil.which("setpriv") else []
                    with lazystore_process(args, base, base / "image-service.log",
                                           wrapper=wrapper) as proc, \
                            CriClient(base / "img.sock") as service, \
                            CriClient(ctd.address) as direct:
                        yield Node(base, daemon, ctd, reg, service, direct, proc.pid)
            finally:
                ctd.stop()
                daemon.stop()
    finally:
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


def _unmount_below(path: Path) -> None:
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f if line.split()[1].startswith(str(path) + "/")]
    for t in sorted(targets, reverse=True):
        subprocess.run(["umount", "-l", t], capture_output=True)
