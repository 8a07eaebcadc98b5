"""The one place that retries: transient transport errors, exponential backoff
with full jitter, Retry-After honoured up to a cap. Callers never loop."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from lazystore.substituter.errors import TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff_base: float = 0.25
    backoff_max: float = 30.0
    retry_after_max: float = 60.0

    def delay(self, attempt: int, exc: TransportError, rng: random.Random) -> float:
        """Seconds to wait after failed *attempt* (1-based)."""
        if exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), self.retry_after_max)
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return rng.uniform(0.0, ceiling)


_rng = random.Random()


async def call(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    *,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Await ``operation()``, again after each transient TransportError, up to
    ``policy.attempts`` times; the last error propagates."""
    attempt = 1
    while True:
        try:
            return await operation()
        except TransportError as exc:
            if not exc.transient or attempt >= policy.attempts:
                raise
            delay = policy.delay(attempt, exc, _rng)
            log.info("%s: %s; retrying in %.2fs (attempt %d of %d)",
                     what, exc, delay, attempt + 1, policy.attempts)
            if on_retry is not None:
                on_retry()
            await trio.sleep(delay)
            attempt += 1


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
