"""Serving a grpc.aio server on a unix socket (the snapshotter, the image service)."""

from __future__ import annotations

import os

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
