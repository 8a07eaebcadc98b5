"""The image service over gRPC against a fake CRI upstream (no containerd):
forwarding is byte for byte, errors come back as they were, refusals are
mapped once. The real thing end to end is tests/test_cri_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from lazystore.control import protocol
from lazystore.cri.containerd import Ctr
from lazystore.cri.proto import api_pb2 as api
from lazystore.cri.service import Daemon, ImageService, Upstream, start_server
from tests.support.standin import stand_in

IMAGES = "/runtime.v1.ImageService/"
RESTART_WAIT = 0.5  # how long the service under test waits for an absent daemon
UNKNOWN_FIELD = b"\xf8\x06\x2a"  # field 111, varint 42: no .proto of ours knows it


class FakeCri(grpc.GenericRpcHandler):
    """Records every call's method, request bytes and metadata; answers from *replies*."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self.replies: dict[str, bytes | tuple[grpc.StatusCode, str]] = {}
        self.under_test: ImageService | None = None  # the service under test, for its state

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method  # type: ignore[attr-defined]

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls.append((method, raw, dict(context.invocation_metadata() or ())))
            reply = self.replies.get(method, b"")
            if isinstance(reply, tuple):
                await context.abort(*reply)
            return reply  # type: ignore[return-value]
        return grpc.unary_unary_rpc_method_handler(handle)


Body = Callable[[grpc.aio.Channel, FakeCri], Awaitable[None]]


def serve(tmp_path: Path, body: Body, daemon_socket: Path | None = None,
          restart_wait: float = RESTART_WAIT) -> None:
    """*body* against the service, whose daemon (at *daemon_socket*; by default
    none at all) is waited for up to *restart_wait* seconds while it is away."""
    async def main() -> None:
        fake = FakeCri()
        upstream_server = grpc.aio.server()
        upstream_server.add_generic_rpc_handlers((fake,))
        upstream_server.add_insecure_port(f"unix:{tmp_path}/cri.sock")
        await upstream_server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path}/cri.sock") as up:
                service = ImageService(
                    Upstream(up), Ctr(str(tmp_path / "cri.sock"), "k8s.io", "x"),
                    Daemon(str(daemon_socket or tmp_path / "no-daemon.sock"), str(tmp_path),
                           restart_wait=restart_wait))
                fake.under_test = service
                server = await start_server(service, str(tmp_path / "img.sock"))
                try:
                    async with grpc.aio.insecure_channel(f"unix:{tmp_path}/img.sock") as ch:
                        await body(ch, fake)
                finally:
                    await server.stop(None)
        finally:
            await upstream_server.stop(None)
    asyncio.run(main())


def call(ch: grpc.aio.Channel, method: str, raw: bytes, **kw: Any) -> Awaitable[bytes]:
    return ch.unary_unary(IMAGES + method)(raw, **kw)  # type: ignore[no-any-return]


def test_forwarded_calls_arrive_byte_for_byte_with_auth_and_metadata(tmp_path: Path) -> None:
    request = api.PullImageRequest(
        image=api.ImageSpec(image="registry.example/app:1"),
        auth=api.AuthConfig(username="u", password="secret"),
    ).SerializeToString() + UNKNOWN_FIELD
    reply = api.PullImageResponse(image_ref="sha256:" + "a" * 64).SerializeToString()

    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        fake.replies[IMAGES + "PullImage"] = reply + UNKNOWN_FIELD
        got = await call(ch, "PullImage", request, metadata=(("x-trace", "t1"),))
        assert got == reply + UNKNOWN_FIELD
        [(method, raw, metadata)] = fake.calls
        assert (method, raw) == (IMAGES + "PullImage", request)
        assert metadata["x-trace"] == "t1"
    serve(tmp_path, body)


def test_every_other_image_service_call_is_forwarded(tmp_path: Path) -> None:
    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        for method in ("ListImages", "ImageStatus", "StreamingSomethingNewer"):
            await call(ch, method, b"\x0a\x00" + UNKNOWN_FIELD)
        assert [(m, r) for m, r, _ in fake.calls] == [
            (IMAGES + m, b"\x0a\x00" + UNKNOWN_FIELD)
            for m in ("ListImages", "ImageStatus", "StreamingSomethingNewer")]
    serve(tmp_path, body)


def test_upstream_errors_come_back_unchanged(tmp_path: Path) -> None:
    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        fake.replies[IMAGES + "PullImage"] = (grpc.StatusCode.PERMISSION_DENIED, "no: bad token")
        req = api.PullImageRequest(image=api.ImageSpec(image="r.example/a:1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(ch, "PullImage", req.SerializeToString())
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.PERMISSION_DENIED, "no: bad token")
    serve(tmp_path, body)


def test_other_services_are_not_served(tmp_path: Path) -> None:
    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/runtime.v1.RuntimeService/Version")(b"")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert fake.calls == []
    serve(tmp_path, body)


def test_nix_pull_without_the_daemon_is_unavailable(tmp_path: Path) -> None:
    ref = "nix:0/nix/store/" + "1" * 32 + "-image.tar"

    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        req = api.PullImageRequest(image=api.ImageSpec(image=ref))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(ch, "PullImage", req.SerializeToString())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot reach the lazystore daemon" in (info.value.details() or "")
        # containerd was asked whether it has the image, and nothing else
        assert [m for m, _, _ in fake.calls] == [IMAGES + "ImageStatus"]
        status = api.ImageStatusRequest.FromString(fake.calls[0][1])
        assert status.image.image == ref + ":latest"
    serve(tmp_path, body)


def test_a_nix_pull_rides_out_a_daemon_restart(tmp_path: Path) -> None:
    # The daemon's socket refuses connections at first, then a daemon reads the
    # status request and goes away without an answer (stopping), then the next
    # one answers: the pull goes on to read the archive through the mount
    # (absent here, so NOT_FOUND), where without the retry it was UNAVAILABLE.
    ref = "nix:0/nix/store/" + "1" * 32 + "-image.tar"
    sock = tmp_path / "daemon.sock"
    thread, asked = stand_in(sock, [None, protocol.ok({"views": []})], delay=0.2)

    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        req = api.PullImageRequest(image=api.ImageSpec(image=ref))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(ch, "PullImage", req.SerializeToString())
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        assert "is not in any substituter" in (info.value.details() or "")
    serve(tmp_path, body, daemon_socket=sock, restart_wait=10.0)
    thread.join(10)
    assert asked == ["status", "status"]


def test_a_request_that_does_not_parse_is_invalid_argument(tmp_path: Path) -> None:
    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(ch, "PullImage", b"\x0a\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fake.calls == []
    serve(tmp_path, body)


@pytest.mark.allow_log("ImageFsInfo without the lazystore cache")
@pytest.mark.parametrize("daemon_later", [False, True])
def test_image_fs_info_without_the_daemon_is_containerds_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, daemon_later: bool,
) -> None:
    # kubelet asks ImageFsInfo every few seconds: it gets containerd's answer at
    # once, even from a service that would wait 30 s for a pull's calls and a
    # daemon that comes up after 1 s (never asked)
    sock = tmp_path / "daemon.sock"
    asked: list[str] = []
    if daemon_later:
        _, asked = stand_in(sock, [protocol.ok({})], delay=1.0)
    usage = api.ImageFsInfoResponse(image_filesystems=[api.FilesystemUsage(
        fs_id=api.FilesystemIdentifier(mountpoint="/var/lib/containerd"),
        used_bytes=api.UInt64Value(value=123))]).SerializeToString()

    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        fake.replies[IMAGES + "ImageFsInfo"] = usage
        assert await call(ch, "ImageFsInfo", b"") == usage
        assert asked == []
    serve(tmp_path, body, daemon_socket=sock, restart_wait=30.0)
    assert any("ImageFsInfo without the lazystore cache" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")


def test_remove_image_is_forwarded_when_its_status_fails(tmp_path: Path) -> None:
    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        fake.replies[IMAGES + "ImageStatus"] = (grpc.StatusCode.INTERNAL, "status broken")
        req = api.RemoveImageRequest(image=api.ImageSpec(image="r.example/a:1"))
        await call(ch, "RemoveImage", req.SerializeToString())
        assert [m for m, _, _ in fake.calls] == [IMAGES + "ImageStatus", IMAGES + "RemoveImage"]
    serve(tmp_path, body)


def test_concurrent_nix_pulls_of_one_image_all_answer_and_leave_no_lock_behind(
    tmp_path: Path,
) -> None:
    ref = "nix:0/nix/store/" + "1" * 32 + "-image.tar"

    async def body(ch: grpc.aio.Channel, fake: FakeCri) -> None:
        req = api.PullImageRequest(image=api.ImageSpec(image=ref)).SerializeToString()
        results = await asyncio.gather(*(call(ch, "PullImage", req) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, grpc.aio.AioRpcError) and
                   r.code() == grpc.StatusCode.UNAVAILABLE for r in results)
        assert [m for m, _, _ in fake.calls] == [IMAGES + "ImageStatus"] * 3
        assert fake.under_test is not None and fake.under_test._pulls == {}
    serve(tmp_path, body)
