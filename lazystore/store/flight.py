"""Single flight: one run of a piece of work per key, shared by every caller.

The one implementation in lazystore (the substituter has none: the store
calls it at most once per key at a time). The rule for cancellation: a
flight runs as a task of its owner's nursery, not of any caller, so a caller
that is cancelled (an interrupted read, a closed control connection) only
stops waiting; the flight goes on for the others and finishes even with no
caller left. A flight ends early only when its owner's nursery is cancelled
(the store closing); its callers then get a StoreError saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from lazystore.errors import LazystoreError, StoreError

log = logging.getLogger(__name__)


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: StoreError | None = None


class Flights:
    """``await flights.run((kind, key), fn)`` runs ``fn()`` once for concurrent callers.

    Every caller gets the result, or a fresh exception of the flight's error
    class with its message (one exception object is never raised in two
    tasks). Errors that are not StoreErrors are logged here and become one.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._flights: dict[tuple[str, Hashable], _Flight] = {}

    def __contains__(self, key: tuple[str, Hashable]) -> bool:
        return key in self._flights

    def count(self, kind: str) -> int:
        """Flights of *kind* running now."""
        return sum(1 for k, _ in self._flights if k == kind)

    async def run(self, key: tuple[str, Hashable], fn: Callable[[], Awaitable[Any]]) -> Any:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            self._nursery.start_soon(self._fly, key, fn, flight)
        await flight.done.wait()
        if flight.error is not None:
            raise type(flight.error)(str(flight.error))
        return flight.result

    async def _fly(self, key: tuple[str, Hashable], fn: Callable[[], Awaitable[Any]],
                   flight: _Flight) -> None:
        kind, name = key
        flight.error = StoreError(f"{kind} of {name} was cancelled")  # unless it ends otherwise
        try:
            flight.result = await fn()
            flight.error = None
        except StoreError as exc:  # reported by whoever waits on it (EIO, control)
            log.info("%s of %s failed: %s", kind, name, exc)
            flight.error = exc
        except LazystoreError as exc:
            log.info("%s of %s failed: %s", kind, name, exc)
            flight.error = StoreError(str(exc))
        except OSError as exc:
            log.warning("%s of %s failed: %s", kind, name, exc)
            flight.error = StoreError(f"{name}: {exc.strerror or exc}")
        except Exception as exc:  # a bug below must not end the daemon
            log.exception("%s of %s failed unexpectedly", kind, name)
            flight.error = StoreError(f"{kind} of {name} failed: {exc!r}")
        finally:
            del self._flights[key]
            flight.done.set()
