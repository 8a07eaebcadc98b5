"""The daemon's event log: when each narinfo, listing and NAR was asked for
and arrived, and when each file was first read.

Free of I/O and of trio. The store records the fetch events, the Vfs the first
reads; the control operation ``events`` hands them out (the bench's time-line
plot, tests that assert an order without timing). Bounded: the oldest events
go first; ``seq`` numbers keep counting, so a reader asking ``since`` a number
sees what it missed only as a gap in them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

EVENTS_KEPT = 100_000

# kind -> what it means (path: a store path's basename)
KINDS = {
    "narinfo": "a narinfo is asked of the substituters",
    "narinfo-done": "its answer arrived (size: NarSize, -1 when no substituter has it)",
    "listing": "a .ls listing is asked for",
    "listing-done": "it arrived (or the path has none)",
    "nar": "a NAR download starts",
    "nar-done": "it verified and the path is in the cache (size: NarSize)",
    "nar-failed": "it failed",
    "assembled": "a path put into the cache from its file index's chunks, NarHash verified",
    "read": "a file is opened for the first time since the daemon started (file, size)",
    "profile": "a path is asked for ahead of use: a profile's, or --background-fetch's (view)",
}


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    time: float  # wall clock, seconds since the epoch
    kind: str
    path: str
    file: str = ""
    size: int = 0
    view: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    def __init__(self, kept: int = EVENTS_KEPT) -> None:
        self._events: deque[Event] = deque(maxlen=kept)
        self._next = 0

    def record(self, kind: str, path: str, file: str = "", size: int = 0,
               view: str = "") -> Event:
        assert kind in KINDS, kind
        event = Event(self._next, time.time(), kind, path, file, size, view)
        self._next += 1
        self._events.append(event)
        return event

    @property
    def next_seq(self) -> int:
        return self._next

    def since(self, seq: int, limit: int) -> list[Event]:
        """At most *limit* events numbered *seq* or later, oldest first."""
        first = self._events[0].seq if self._events else self._next
        start = max(seq - first, 0)
        return [self._events[i] for i in range(start, min(start + limit, len(self._events)))]
