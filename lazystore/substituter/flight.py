"""Single flight: concurrent calls for the same key share one execution."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class _Call(Generic[T]):
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: T | None = None
        self.error: Exception | None = None
        self.cancelled = False


class SingleFlight(Generic[T]):
    """``await flight.run(key, fn)``: the first caller for *key* runs ``fn()``;
    callers arriving while it runs wait for and share its result or error. If
    the running caller is cancelled, one of the waiters runs ``fn()`` itself."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, _Call[T]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._calls

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        while (call := self._calls.get(key)) is not None:
            await call.done.wait()
            if call.error is not None:
                raise call.error
            if not call.cancelled:
                return call.result  # type: ignore[return-value]
        call = self._calls[key] = _Call()
        try:
            call.result = await fn()
            return call.result
        except Exception as exc:
            call.error = exc
            raise
        except BaseException:
            call.cancelled = True
            raise
        finally:
            del self._calls[key]
            call.done.set()
