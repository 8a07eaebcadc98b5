"""The control protocol, free of I/O.

A connection carries frames, each a 4-byte big-endian length followed by one
msgpack map. The client sends ``{"op": NAME, "args": {...}}``; the daemon
answers ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": MESSAGE}``
(one line). Several requests may be sent one after another on one connection;
they are answered in order.

The operations are :data:`OPERATIONS`: each declares its arguments and their
types, and :func:`parse_request` refuses a request that does not fit (unknown
operation, missing, unknown or ill-typed argument) with a one-line
ControlError before any handler runs. An optional argument is left out, never
sent as nil. Store paths may be given in full (``/nix/store/<hash>-<name>``)
or as base names; results name them by base name.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from lazystore.errors import ControlError

MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True)
class ArgType:
    """What an argument's value must be, with the words an error uses for it."""

    description: str
    check: Callable[[Any], bool]


STRING = ArgType("a string", lambda v: isinstance(v, str))
BOOLEAN = ArgType("true or false", lambda v: isinstance(v, bool))
COUNT = ArgType("a whole number from 0",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
STORE_PATHS = ArgType(
    "a list of store paths", lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v)
)
REQUIRED: Any = object()
# A view whose id ends so is for an overlay that has the daemon's data_dir (see
# status) as a data-only lower layer: its files carry overlay data redirects
# into it once their path is materialised (lazystore.fs.vfs.REDIRECTS_SUFFIX).
DATA_VIEW_SUFFIX = ".data"


@dataclass(frozen=True)
class Arg:
    name: str
    type: ArgType
    default: Any = REQUIRED  # optional arguments have one (never shared mutable state)


@dataclass(frozen=True)
class Operation:
    """One control operation: its arguments and what it answers (for the docs)."""

    name: str
    args: tuple[Arg, ...]
    result: str
    needs_one_of: tuple[str, ...] = ()  # at least one of these arguments is given
    arg_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arg_names", tuple(a.name for a in self.args))


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("status", (), (
        "map: mount_point, substituters (URLs), cache_dir, cache_bytes, cache_limit "
        "(nil: none), paths_known, paths_materialized (base names), in_flight, "
        "bytes_downloaded, nars_fetched, hits, misses, pinned (base names), views (ids), "
        "inodes, open_files, requests (operation -> requests served since start), "
        "bytes_served (read through the mount), fuse_requests (FUSE request kind -> "
        "requests answered since start), data_dir (the verified data of "
        "materialised paths, <cache>/store), evictions, retries, requests_by_cache "
        "([kind narinfo|nar, substituter URL, outcome, count]), fetch_seconds and "
        "wait_seconds (histograms: bounds, counts per bucket and one for +Inf, sum, count)"
    )),
    Operation(
        "prefetch",
        (Arg("paths", STORE_PATHS), Arg("closure", BOOLEAN, False)),
        "{fetched: [base names]} once every path (with closure: of their closures) is "
        "materialised; the daemon fetches them in parallel, a bounded number at once",
    ),
    Operation(
        "closure", (Arg("paths", STORE_PATHS),),
        "{paths: [base names]}: the closure through the narinfos' References; no NAR",
    ),
    Operation(
        "view_create",
        (Arg("id", STRING), Arg("paths", STORE_PATHS, ()), Arg("closure_info", STRING, None),
         Arg("prefetch", STORE_PATHS, ())),
        "{path: <mount>/.views/<id>, paths: [base names]}, at once (the paths' narinfos "
        "are learnt in the background); closure_info is a store path "
        "whose store-paths file lists more paths; the paths stay pinned while the view "
        "exists; the same view again is a no-op, the same id with other paths an error; "
        "prefetch (an access profile's paths, README's Access profiles): those of the "
        "view fetched in the background in this order, any other ignored; an entry "
        "<path>/<file> fetches only that file (its chunks where the cache has a file "
        "index, else the whole path); "
        "an id ending in .data: a view whose files an overlay with data_dir as a "
        "data-only layer reads from there once materialised (no other overlay may use it)",
        needs_one_of=("paths", "closure_info"),
    ),
    Operation(
        "prefetch_profile", (Arg("profile", STRING),),
        "{fetched: [base names], ignored: []} once the profile's store paths are "
        "materialised (in the profile's order, a bounded number at once)",
    ),
    Operation(
        "profile", (Arg("view", STRING, None),),
        "{profile: the access profile} of the view, or without view of the root "
        "(README's Access profiles)",
    ),
    Operation(
        "events", (Arg("since", COUNT, 0),),
        "{events: [{seq, time, kind, path, file, size, view}], next: seq}: the event "
        "log from seq *since* on (at most 10000 a call; lazystore.store.events.KINDS)",
    ),
    Operation("view_remove", (Arg("id", STRING),), "{} (also when there is no such view)"),
    Operation(
        "evict", (Arg("paths", STORE_PATHS, ()),),
        "{evicted: [base names]}; no paths: everything not pinned",
    ),
)}


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
    """(operation, arguments with defaults filled in) of a request that fits
    :data:`OPERATIONS`; ControlError with one line saying what does not."""
    name, args = message.get("op"), message.get("args", {})
    op = OPERATIONS.get(name) if isinstance(name, str) else None
    if op is None:
        raise ControlError(
            f"unknown control operation {name!r} (known: {', '.join(OPERATIONS)})"
        )
    if not isinstance(args, dict):
        raise ControlError(f"{op.name}: the arguments are not a map")
    unknown = [k for k in args if k not in op.arg_names]
    if unknown:
        takes = ", ".join(op.arg_names) or "no arguments"
        raise ControlError(f"{op.name}: unknown argument {unknown[0]!r} (takes {takes})")
    checked = {}
    for arg in op.args:
        if arg.name in args:
            value = args[arg.name]
            if not arg.type.check(value):
                raise ControlError(
                    f"{op.name}: {arg.name} must be {arg.type.description},"
                    f" not {'nil' if value is None else type(value).__name__}"
                )
            checked[arg.name] = value
        elif arg.default is REQUIRED:
            raise ControlError(f"{op.name}: missing argument {arg.name!r}")
        else:
            checked[arg.name] = arg.default
    if op.needs_one_of and not any(k in args for k in op.needs_one_of):
        raise ControlError(f"{op.name}: needs {' or '.join(op.needs_one_of)}")
    return op.name, checked


def parse_response(message: dict[str, Any]) -> Any:
    if message.get("ok") is True:
        return message.get("result")
    raise ControlError(str(message.get("error", "malformed response from the daemon")))
