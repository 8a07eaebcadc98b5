"""Serving a grpc.aio server on a unix socket (the snapshotter, the image service)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from lazystore import unixsocket
from lazystore.errors import LazystoreError


async def listen(
    server: grpc.aio.Server, address: str, error: type[LazystoreError],
    invalid: type[LazystoreError],
) -> None:
    """Start *server* on the unix socket *address* (mode 0600, replacing a stale
    socket); failures raise *error*, an unusable path *invalid*."""
    if len(os.fsencode(address)) > 107:
        raise invalid(f"socket path {address} is too long for a unix socket")
    parent = os.path.dirname(os.path.abspath(address))
    if not os.path.isdir(parent):
        raise error(f"cannot listen on {address}: no directory {parent}")
    unixsocket.claim(address, error, "another process already serves")
    old = os.umask(0o177)
    try:
        try:
            port = server.add_insecure_port(f"unix:{address}")
        except RuntimeError:  # grpcio >= 1.50 raises instead of returning 0
            port = 0
        if port == 0:
            raise error(f"cannot listen on {address}")
        await server.start()
    finally:
        os.umask(old)
    os.chmod(address, 0o600)


class RpcCounter(grpc.aio.ServerInterceptor):
    """Calls ``count(method, code)`` once per finished RPC (code: the gRPC status
    name, e.g. ``OK``, ``NOT_FOUND``; ``CANCELLED`` when the client went away)."""

    def __init__(self, count: Callable[[str, str], None]) -> None:
        self._count = count

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream), **codec)
        return handler  # no streaming requests are served here

    def _unary(self, method: str, behaviour: Any) -> Any:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                response = await behaviour(request, context)
            except BaseException as exc:
                self._count(method, _code(context, exc))
                raise
            self._count(method, _code(context, None))
            return response
        return counted

    def _stream(self, method: str, behaviour: Any) -> Any:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as exc:
                self._count(method, _code(context, exc))
                raise
            self._count(method, _code(context, None))
        return counted


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if exc is None:
        return "OK"
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"
