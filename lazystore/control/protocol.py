"""The control protocol, free of I/O.

A connection carries frames, each a 4-byte big-endian length followed by one
msgpack map. The client sends ``{"op": NAME, "args": {...}}``; the daemon
answers ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": MESSAGE}``.
Several requests may be sent one after another on one connection.

Operations (arguments -> result):

``status`` () -> map with at least ``mount_point``, ``substituters`` (list of
    URLs), ``cache_dir``, ``cache_bytes`` (int), ``cache_limit`` (int or nil),
    ``paths_known`` (int), ``paths_materialized`` (list of store path
    basenames), ``in_flight`` (int), ``bytes_downloaded`` (int), ``hits``,
    ``misses`` (int), ``views`` (list of view ids).
``prefetch`` (``paths``: list of store paths, ``closure``: bool) -> ``{"fetched": [basenames]}``
    once every path is materialised.
``view_create`` (``id``: str, ``paths``: list of store paths, and/or
    ``closure_info``: a store path whose ``store-paths`` file lists them)
    -> ``{"path": "<mount>/.views/<id>", "paths": [basenames]}``.
``view_remove`` (``id``) -> ``{}`` (also when no such view exists).
``evict`` (``paths``: list of store paths; empty = everything evictable)
    -> ``{"evicted": [basenames]}``.
``closure`` (``paths``: list of store paths) -> ``{"paths": [basenames]}``, the
    closure through the substituters' References, fetching no NAR.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from lazystore.errors import ControlError

MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
OPS = ("status", "prefetch", "view_create", "view_remove", "evict", "closure")


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ControlError(f"control message too large ({len(body)} bytes)")
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """Length of the body announced by a 4-byte *header*; refuses absurd lengths."""
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ControlError(f"control frame too large ({length} bytes)")
    return length


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ControlError(f"malformed control message: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("malformed control message: not a map")
    return message


def request(op: str, **args: Any) -> dict[str, Any]:
    return {"op": op, "args": args}


def ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def parse_request(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    op, args = message.get("op"), message.get("args", {})
    if op not in OPS:
        raise ControlError(f"unknown control operation {op!r}")
    if not isinstance(args, dict):
        raise ControlError(f"arguments of {op} are not a map")
    return op, args


def parse_response(message: dict[str, Any]) -> Any:
    if message.get("ok") is True:
        return message.get("result")
    raise ControlError(str(message.get("error", "malformed response from the daemon")))
