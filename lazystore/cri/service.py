"""The CRI ImageService (grpc.aio): ``nix:0`` pulls here, the rest forwarded.

Every ImageService call is forwarded as its request bytes, unchanged (auth,
fields newer than our .proto), to the CRI endpoint behind (containerd's CRI
plugin, or another CRI proxy), and its answer or status comes back unchanged;
containerd normalises a ``nix:0/…`` name itself, so ImageStatus, ListImages
and RemoveImage of nix images answer from containerd too. Three calls do more:

- PullImage of ``nix:0/<store path>``: the archive is read through the
  lazystore mount (fetched and verified by the daemon like any store path),
  checked (:mod:`lazystore.cri.archive`), imported into containerd and
  unpacked on the lazystore snapshotter; a view of the image's store paths in
  the daemon (``cri-<image id>-<i>``) keeps them from eviction while the
  image exists. The answer is containerd's image id. A present image is not
  pulled again (only its pins made again if the daemon lost them); at start
  the pins of every nix image containerd has are made again.
- RemoveImage also removes that view, so the paths may be evicted once no
  container's snapshot uses them.
- ImageFsInfo adds the lazystore cache's bytes and inodes to containerd's.

Errors are mapped to gRPC codes here only (:func:`status_code`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from lazystore import grpcunix
from lazystore.control.aio import RESTART_WAIT, AsyncControl
from lazystore.cri import archive, errors, reference
from lazystore.cri.containerd import Ctr
from lazystore.cri.proto import api_pb2 as api
from lazystore.errors import ControlError, LazystoreError

log = logging.getLogger(__name__)

SERVICE = "runtime.v1.ImageService"
VIEW_PREFIX = "cri-"
VISIBLE_TIMEOUT = 30.0  # for containerd's CRI to adopt an imported image
INODES_TTL = 60.0  # the kubelet asks ImageFsInfo every few seconds

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidReference, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ArchiveNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.BadArchive, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ControlError, grpc.StatusCode.UNAVAILABLE),
]

Raw = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def status_code(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class UpstreamError(Exception):
    """The CRI endpoint behind answered with an error status (passed on as is)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    return tuple(
        (k, v) for k, v in (context.invocation_metadata() or ())
        if not k.startswith(":") and not k.startswith("grpc-") and k != "user-agent"
    )


class Upstream:
    """The CRI ImageService behind this one."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    async def call(self, method: str, request: bytes,
                   context: grpc.aio.ServicerContext | None = None) -> bytes:
        stub = self.channel.unary_unary(f"/{SERVICE}/{method}")
        timeout = context.time_remaining() if context is not None else None
        metadata = _metadata(context) if context is not None else None
        try:
            return await stub(request, timeout=timeout, metadata=metadata)  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as exc:
            raise UpstreamError(exc.code(), exc.details() or "") from None

    async def image_id(self, ref: str) -> str | None:
        """The id of the image *ref* names in containerd's CRI, None if absent."""
        req = api.ImageStatusRequest(image=api.ImageSpec(image=ref))
        resp = api.ImageStatusResponse.FromString(
            await self.call("ImageStatus", req.SerializeToString()))
        return resp.image.id if resp.HasField("image") and resp.image.id else None


class Daemon:
    """The lazystore daemon: its control socket and mount. A pull's calls
    (``status``, ``view_create``: idempotent) ride out a daemon restart for
    up to *restart_wait* seconds, well inside kubelet's two-minute request
    deadline; ImageFsInfo's and a removal's are asked once."""

    def __init__(self, control_socket: str, mount_point: str,
                 restart_wait: float = RESTART_WAIT) -> None:
        self.control_socket, self.mount_point = control_socket, mount_point
        self.restart_wait = restart_wait
        self._control = AsyncControl(control_socket)

    async def call(self, op: str, **args: Any) -> Any:
        """Asked once."""
        return await self._control.call(op, args)

    async def call_again(self, op: str, **args: Any) -> Any:
        """Asked again while the daemon is away (for calls safe to repeat)."""
        return await self._control.call(op, args, self.restart_wait)


def _view_id(image_id: str, i: int) -> str:
    return f"{VIEW_PREFIX}{image_id.removeprefix('sha256:')}-{i}"


def _count_entries(root: Path) -> int:
    count, stack = 0, [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    count += 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except OSError:
            continue
    return count


class ImageService:
    def __init__(self, upstream: Upstream, ctr: Ctr, daemon: Daemon,
                 nix_only: bool = False) -> None:
        self.upstream, self.ctr, self.daemon, self.nix_only = upstream, ctr, daemon, nix_only
        self._pulls: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # name -> lock, users
        self._inodes: tuple[float, int] | None = None

    # -- PullImage ------------------------------------------------------------

    async def pull(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ref = api.PullImageRequest.FromString(raw).image.image
        if not reference.is_nix(ref):
            return await self.upstream.call("PullImage", raw, context)
        image_id = await self.pull_nix(reference.parse(ref))
        return api.PullImageResponse(image_ref=image_id).SerializeToString()

    @contextlib.asynccontextmanager
    async def _pulling(self, name: str) -> AsyncIterator[None]:
        """One pull of *name* at a time; the lock lives while someone holds or waits."""
        lock, users = self._pulls.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._pulls[name]

    async def pull_nix(self, ref: reference.NixReference) -> str:
        async with self._pulling(ref.image_name):
            present = await self.upstream.image_id(ref.image_name)
            if present is not None:
                log.info("%s is present (%s)", ref.image_name, present)
                if not await self._pinned(present):
                    await self._pin(await self._read(ref))
                return present
            image = await self._read(ref)
            source = self._source(ref)
            with tempfile.TemporaryDirectory(prefix="lazystore-import-") as tmp:
                layout = Path(tmp) / "image.tar"
                await asyncio.to_thread(archive.write_import, source, image, ref.image_name,
                                        layout)
                await self.ctr.import_layout(layout)
            await self._pin(image)
            found = await self._visible(ref.image_name)
            log.info("pulled %s as %s", ref.image_name, found)
            return found

    async def _read(self, ref: reference.NixReference) -> archive.Image:
        """The checked archive *ref* names, read through the mount."""
        await self.daemon.call_again("status")  # a clear UNAVAILABLE when it is not running
        return await asyncio.to_thread(self._inspect, self._source(ref))

    def _source(self, ref: reference.NixReference) -> Path:
        return Path(self.daemon.mount_point) / ref.store_path.basename

    async def restore_pins(self) -> None:
        """Pin the store paths of the nix images containerd has (at start: the
        daemon forgets views when it restarts, this service when it does)."""
        try:
            listed = api.ListImagesResponse.FromString(
                await self.upstream.call("ListImages", b"")).images
        except UpstreamError as exc:
            log.warning("cannot list containerd's images to pin nix images: %s", exc.details)
            return
        if any(reference.is_nix(tag) for image in listed for tag in image.repo_tags):
            try:  # a daemon that is starting too is waited for once, not per image
                await self.daemon.call_again("status")
            except LazystoreError as exc:
                log.warning("cannot pin the store paths of nix images: %s", exc)
                return
        for image in listed:
            for tag in image.repo_tags:
                if reference.is_nix(tag):
                    await self._restore_pin(tag, image.id)

    async def _restore_pin(self, tag: str, image_id: str) -> None:
        try:
            if not await self._pinned(image_id):
                await self._pin(await self._read(reference.parse(tag)))
                log.info("pinned the store paths of %s again", tag)
        except LazystoreError as exc:
            log.warning("cannot pin the store paths of %s: %s", tag, exc)

    async def _pinned(self, image_id: str) -> bool:
        prefix = _view_id(image_id, 0)[:-1]
        views = (await self.daemon.call_again("status"))["views"]
        return any(v.startswith(prefix) for v in views)

    def _inspect(self, source: Path) -> archive.Image:
        try:
            return archive.inspect(source, nix_only=self.nix_only)
        except FileNotFoundError:
            raise errors.ArchiveNotFound(
                f"store path {source.name} is not in any substituter") from None
        except OSError as exc:
            raise errors.Unavailable(
                f"cannot read {source.name} through the lazystore mount: "
                f"{exc.strerror or exc}") from None

    async def _pin(self, image: archive.Image) -> None:
        # View 0 always exists (empty for an image without nix layers): it marks
        # the image as pinned, so a later pull need not read the archive again.
        await self.daemon.call_again("view_create", id=_view_id(image.id, 0),
                                     paths=image.store_paths)
        for i, closure in enumerate(image.closures, 1):
            await self.daemon.call_again("view_create", id=_view_id(image.id, i), paths=[],
                                   closure_info=closure)

    async def _visible(self, name: str) -> str:
        deadline = time.monotonic() + VISIBLE_TIMEOUT
        while (found := await self.upstream.image_id(name)) is None:
            if time.monotonic() > deadline:
                raise errors.Unavailable(f"containerd's CRI did not list {name} after import")
            await asyncio.sleep(0.1)
        return found

    # -- RemoveImage ----------------------------------------------------------

    async def remove(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ref = api.RemoveImageRequest.FromString(raw).image.image
        try:
            image_id = await self.upstream.image_id(ref) if ref else None
        except UpstreamError:
            image_id = None  # RemoveImage itself will say what is wrong
        answer = await self.upstream.call("RemoveImage", raw, context)
        if image_id is not None:
            await self._unpin(image_id)
        return answer

    async def _unpin(self, image_id: str) -> None:
        prefix = _view_id(image_id, 0)[:-1]
        try:
            views = (await self.daemon.call("status"))["views"]
            for view in views:
                if view.startswith(prefix):
                    await self.daemon.call("view_remove", id=view)
                    log.info("unpinned %s (view %s)", image_id, view)
        except LazystoreError as exc:
            log.warning("image %s removed, but its store paths stay pinned: %s", image_id, exc)

    # -- ImageFsInfo ----------------------------------------------------------

    async def fs_info(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer = await self.upstream.call("ImageFsInfo", raw, context)
        try:
            status = await self.daemon.call("status")
        except LazystoreError as exc:
            log.warning("ImageFsInfo without the lazystore cache: %s", exc)
            return answer
        resp = api.ImageFsInfoResponse.FromString(answer)
        store = Path(status["cache_dir"]) / "store"
        resp.image_filesystems.append(api.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api.FilesystemIdentifier(mountpoint=str(status["cache_dir"])),
            used_bytes=api.UInt64Value(value=int(status["cache_bytes"])),
            inodes_used=api.UInt64Value(value=await self._cache_inodes(store)),
        ))
        return resp.SerializeToString()

    async def _cache_inodes(self, store: Path) -> int:
        now = time.monotonic()
        if self._inodes is None or now - self._inodes[0] > INODES_TTL:
            self._inodes = (now, await asyncio.to_thread(_count_entries, store))
        return self._inodes[1]


class _Handler(grpc.GenericRpcHandler):
    """Our three methods; every other ImageService method forwarded as bytes."""

    def __init__(self, service: ImageService) -> None:
        self.own: dict[str, Raw] = {
            "PullImage": service.pull, "RemoveImage": service.remove,
            "ImageFsInfo": service.fs_info,
        }
        self.upstream = service.upstream

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service, _, method = details.method.lstrip("/").partition("/")  # type: ignore[attr-defined]
        if service != SERVICE or not method:
            return None
        own = self.own.get(method)
        if own is None:
            async def forward(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await self.upstream.call(method, raw, context)
            own = forward
        return grpc.unary_unary_rpc_method_handler(_mapped(method, own))


def _mapped(method: str, handler: Raw) -> Raw:
    async def wrapper(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await handler(raw, context)
        except UpstreamError as exc:
            await context.abort(exc.code, exc.details)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: bad request: {exc}")
        except LazystoreError as exc:
            code = status_code(exc)
            log.info("%s: %s", method, exc)
            await context.abort(code, str(exc))
        except OSError as exc:
            log.error("%s: %s", method, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method}: {exc}")
        raise AssertionError("unreachable")
    return wrapper


async def start_server(service: ImageService, address: str,
                       interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                       ) -> grpc.aio.Server:
    """Serve *service* on the unix socket *address* (mode 0600)."""
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((_Handler(service),))
    await grpcunix.listen(server, address, errors.Unavailable, errors.InvalidReference)
    return server
