"""A small blocking CRI client for tests (runtime.v1, from lazystore's own .proto).

``CriClient(socket)`` talks to one endpoint: ``images`` is its ImageService,
``runtime`` its RuntimeService. ``Pod`` runs host-network pods (no CNI needed)
and containers in them, and reads a container's log.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lazystore.cri.proto import api_pb2 as api
from lazystore.cri.proto import api_pb2_grpc as api_grpc


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
