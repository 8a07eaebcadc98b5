"""Single flight: one run of a piece of work per key, shared by every caller.

The one implementation in lazystore (the store's fetches, lookups and
listings; the registry's images). The rule for cancellation: a flight runs
as a task of its owner's nursery, not of any caller, so a caller that is
cancelled (an interrupted read, a closed connection) only stops waiting; the
flight goes on for the others and finishes even with no caller left. A
flight ends early only when its owner's nursery is cancelled (the owner
closing); its callers then get the owner's *cancelled* error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from lazystore.errors import LazystoreError


def _cancelled(key: Hashable) -> Exception:
    return LazystoreError(f"{key} was cancelled")


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: Exception | None = None


class Flights:
    """``await flights.run(key, fn)`` runs ``fn()`` once for concurrent callers
    of *key*, as a task of *nursery*; every caller gets its result or its
    exception. Errors are the owner's to map: *fn* raises what callers should
    see (an exception that is not an Exception, e.g. KeyboardInterrupt, ends
    the owner's nursery as usual)."""

    def __init__(self, nursery: trio.Nursery,
                 cancelled: Callable[[Hashable], Exception] = _cancelled) -> None:
        self._nursery = nursery
        self._cancelled = cancelled
        self._flights: dict[Hashable, _Flight] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    def keys(self) -> list[Hashable]:
        return list(self._flights)

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[Any]]) -> Any:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            self._nursery.start_soon(self._fly, key, fn, flight)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.result

    async def _fly(self, key: Hashable, fn: Callable[[], Awaitable[Any]],
                   flight: _Flight) -> None:
        flight.error = self._cancelled(key)  # unless it ends otherwise
        try:
            flight.result = await fn()
            flight.error = None
        except Exception as exc:  # every caller gets it; the owner's task goes on
            flight.error = exc
        finally:
            del self._flights[key]
            flight.done.set()
