"""containerd's Snapshots gRPC service (grpc.aio) over :class:`Snapshotter`.

Snapshotter errors become the gRPC status codes containerd's proxy client
turns back into its errdefs (NotFound, AlreadyExists, FailedPrecondition,
InvalidArgument, Unavailable); this is the one place they are mapped.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from lazystore import grpcunix
from lazystore.errors import LazystoreError
from lazystore.snapshotter import errors
from lazystore.snapshotter.metadata import Kind, Snapshot
from lazystore.snapshotter.overlay import Mount
from lazystore.snapshotter.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from lazystore.snapshotter.snapshots import Snapshotter

log = logging.getLogger(__name__)

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]
LIST_BATCH = 100

R = TypeVar("R")


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for *exc*: its errdefs class, or UNKNOWN for anything else."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _mapped(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: SnapshotsService, request: Any, context: Any) -> R:
        started = time.monotonic()
        try:
            return await method(self, request, context)
        except LazystoreError as exc:
            code = status_code(exc)
            level = logging.INFO if code != grpc.StatusCode.UNKNOWN else logging.ERROR
            log.log(level, "%s: %s", method.__name__, exc)
            await context.abort(code, str(exc))
        except OSError as exc:
            log.error("%s: %s", method.__name__, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {exc}")
        finally:
            log.debug("%s: %.3f s", method.__name__, time.monotonic() - started)
        raise AssertionError("unreachable")

    return wrapper


def _mount(m: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=m.type, source=m.source, options=m.options)


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _info(self, snap: Snapshot) -> snapshots_pb2.Info:
        return snapshots_pb2.Info(
            name=snap.key,
            parent=self.sn.parent_key(snap),
            kind=int(snap.kind),
            created_at=_timestamp(snap.created_ns),
            updated_at=_timestamp(snap.updated_ns),
            labels=snap.labels,
        )

    @_mapped
    async def Prepare(self, request: Any, context: Any) -> Any:
        mounts = await self.sn.prepare(request.key, request.parent, request.labels, Kind.ACTIVE)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=[_mount(m) for m in mounts])

    @_mapped
    async def View(self, request: Any, context: Any) -> Any:
        mounts = await self.sn.prepare(request.key, request.parent, request.labels, Kind.VIEW)
        return snapshots_pb2.ViewSnapshotResponse(mounts=[_mount(m) for m in mounts])

    @_mapped
    async def Mounts(self, request: Any, context: Any) -> Any:
        mounts = await self.sn.mounts(request.key)
        return snapshots_pb2.MountsResponse(mounts=[_mount(m) for m in mounts])

    @_mapped
    async def Commit(self, request: Any, context: Any) -> Any:
        await self.sn.commit(request.name, request.key, request.labels)
        return empty_pb2.Empty()

    @_mapped
    async def Remove(self, request: Any, context: Any) -> Any:
        await self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_mapped
    async def Stat(self, request: Any, context: Any) -> Any:
        return snapshots_pb2.StatSnapshotResponse(info=self._info(self.sn.stat(request.key)))

    @_mapped
    async def Update(self, request: Any, context: Any) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snap = await self.sn.update(request.info.name, request.info.labels, paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=self._info(snap))

    async def List(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            snaps = self.sn.list(list(request.filters))
        except LazystoreError as exc:
            log.info("List: %s", exc)
            await context.abort(status_code(exc), str(exc))
            return
        for start in range(0, len(snaps), LIST_BATCH):
            batch = snaps[start : start + LIST_BATCH]
            yield snapshots_pb2.ListSnapshotsResponse(info=[self._info(s) for s in batch])

    @_mapped
    async def Usage(self, request: Any, context: Any) -> Any:
        size, inodes = await self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    @_mapped
    async def Cleanup(self, request: Any, context: Any) -> Any:
        await self.sn.cleanup()
        return empty_pb2.Empty()


async def start_server(snapshotter: Snapshotter, address: str,
                       interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                       ) -> grpc.aio.Server:
    """Serve on the unix socket *address* (mode 0600, replacing a stale socket)."""
    server = grpc.aio.server(interceptors=list(interceptors))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    await grpcunix.listen(server, address, errors.Unavailable, errors.InvalidArgument)
    return server
