"""The substituter's errors, and the one place lower-layer errors become them.

Everything leaving this package is a :class:`SubstituterError`. Transport
failures carry ``transient`` (retrying may help) and ``retry_after`` (what the
server asked for), which is all :mod:`lazystore.substituter.retry` looks at.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from lazystore.errors import SubstituterError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "SubstituterError",
    "TransportError",
    "ConnectionFailed",
    "TimedOut",
    "StalledError",
    "LowSpeedError",
    "HTTPStatusError",
    "ProtocolError",
    "RequestError",
    "NotFoundError",
    "CacheInfoError",
    "VerificationError",
    "RangeError",
    "NotAvailableError",
    "map_httpx_error",
    "httpx_errors",
]

# Nix retries 5xx except these (and 408/429): they will not get better by retrying.
_PERMANENT_5XX = frozenset({501, 505, 511})


class TransportError(SubstituterError):
    """Talking to a binary cache failed."""

    transient = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConnectionFailed(TransportError):
    """Connecting failed or the connection broke (reset, closed early)."""

    transient = True


class TimedOut(TransportError):
    """Connecting, sending or waiting for a free connection took too long."""

    transient = True


class StalledError(TimedOut):
    """No bytes arrived for ``stall_timeout`` seconds."""


class LowSpeedError(TimedOut):
    """Bytes arrived, but slower than the low-speed limit for its whole window."""


class ProtocolError(TransportError):
    """The server broke HTTP (e.g. a body shorter than its Content-Length)."""

    transient = True


class RequestError(TransportError):
    """A request we cannot make (bad URL, unsupported scheme, redirect loop...)."""


class HTTPStatusError(TransportError):
    """The server answered with an error status."""

    def __init__(self, message: str, status: int, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status

    @property
    def transient(self) -> bool:  # type: ignore[override]
        status = self.status
        return status in (408, 429) or (500 <= status <= 599 and status not in _PERMANENT_5XX)


class NotFoundError(TransportError):
    """A file the narinfo points at is not there (404/403/410)."""


class CacheInfoError(SubstituterError):
    """A binary cache's nix-cache-info is unusable (e.g. another store directory)."""


class VerificationError(SubstituterError):
    """Downloaded data does not match its narinfo (hash, size, NAR syntax)."""


class RangeError(VerificationError):
    """A part of a file asked for did not arrive as asked (a server ignoring
    Range, a reply of the wrong length): not the bytes wanted, never used."""


class NotAvailableError(SubstituterError):
    """No substituter could provide the path."""


# httpx is imported by the functions below, not at the top: the classes above
# are raised by code that makes no HTTP request (cache index, the chunk codec),
# and a command that makes none (cache index, status) does not pay its import.


@cache
def _httpx_map() -> tuple[tuple[type[Exception], type[TransportError], str], ...]:
    """httpx's exceptions and theirs, most specific class first: the first
    isinstance match wins."""
    import httpx

    return (
        (httpx.ConnectTimeout, TimedOut, "connection timed out"),
        (httpx.ReadTimeout, StalledError, "no data received in time"),
        (httpx.WriteTimeout, TimedOut, "sending timed out"),
        (httpx.PoolTimeout, TimedOut, "no free connection in time"),
        (httpx.TimeoutException, TimedOut, "timed out"),
        (httpx.ConnectError, ConnectionFailed, "cannot connect"),
        (httpx.ReadError, ConnectionFailed, "connection broken while reading"),
        (httpx.WriteError, ConnectionFailed, "connection broken while sending"),
        (httpx.CloseError, ConnectionFailed, "error closing the connection"),
        (httpx.NetworkError, ConnectionFailed, "network error"),
        (httpx.ProxyError, ConnectionFailed, "proxy error"),
        (httpx.RemoteProtocolError, ProtocolError, "server broke the HTTP protocol"),
        (httpx.LocalProtocolError, RequestError, "invalid request"),
        (httpx.ProtocolError, ProtocolError, "HTTP protocol error"),
        (httpx.UnsupportedProtocol, RequestError, "unsupported URL scheme"),
        (httpx.DecodingError, ProtocolError, "cannot decode the response's Content-Encoding"),
        (httpx.TooManyRedirects, RequestError, "too many redirects"),
        (httpx.TransportError, ConnectionFailed, "transport error"),
        (httpx.HTTPStatusError, RequestError, "unexpected HTTP status"),
        (httpx.RequestError, RequestError, "request failed"),
        (httpx.InvalidURL, RequestError, "invalid URL"),
        (httpx.CookieConflict, RequestError, "cookie conflict"),
        (httpx.StreamError, RequestError, "response stream misused"),
        (httpx.HTTPError, RequestError, "HTTP error"),
    )


@cache
def httpx_errors() -> tuple[type[httpx.HTTPError | httpx.InvalidURL | httpx.CookieConflict
                                  | httpx.StreamError], ...]:
    """Every httpx exception the transport catches (see transport.py)."""
    import httpx

    return (httpx.HTTPError, httpx.InvalidURL, httpx.CookieConflict, httpx.StreamError)


def map_httpx_error(exc: Exception, url: str) -> TransportError:
    """The SubstituterError for an httpx exception raised while fetching *url*."""
    for cls, mapped, what in _httpx_map():
        if isinstance(exc, cls):
            return mapped(f"{url}: {what} ({_detail(exc)})")
    raise TypeError(f"not an httpx exception: {exc!r}")


def _detail(exc: BaseException) -> str:
    """The first line of the first non-empty message along the exception chain
    (httpx's own message is sometimes empty, e.g. for TLS failures under trio)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        text = str(seen).strip()
        if text:
            return text.splitlines()[0][:300]
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__
