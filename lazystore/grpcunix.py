"""Serving a grpc.aio server on a unix socket (the snapshotter, the image service)."""

from __future__ import annotations

import os
import socket

import grpc

from lazystore.errors import LazystoreError


def _claim(address: str, error: type[LazystoreError]) -> None:
    """Remove a stale socket at *address*; refuse one that a live process serves."""
    if not os.path.exists(address):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            os.unlink(address)
            return
    raise error(f"another process already serves {address}")


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
    _claim(address, error)
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
