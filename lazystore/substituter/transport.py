"""Transports: get a small file, or stream a large one, from a binary cache.

``HttpTransport`` (http/https via one shared httpx.AsyncClient, HTTP/2 where
offered, a global connection cap) and ``FileTransport`` (a cache folder, as
``nix copy --to file://`` writes it). Both map every failure to a
TransportError here, once; retrying is the caller's business (retry.py).
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol

import httpx
import trio

from lazystore.substituter import decompress, retry
from lazystore.substituter.config import SpeedLimit
from lazystore.substituter.errors import (
    HTTPStatusError,
    LowSpeedError,
    NotFoundError,
    RangeError,
    RequestError,
    StalledError,
    SubstituterError,
    TransportError,
    VerificationError,
    httpx_errors,
    map_httpx_error,
)

log = logging.getLogger(__name__)

HTTPX_ERRORS = httpx_errors()  # every httpx exception, each mapped by map_httpx_error

# Nix treats these as "the cache does not have it".
NOT_FOUND_STATUSES = frozenset({403, 404, 410})
FILE_CHUNK = 256 * 1024
MAX_DOCUMENT = 16 << 20  # narinfo, nix-cache-info, .ls
# Content-Encodings of documents decoded here; httpx does gzip, deflate, br, zstd.
OWN_ENCODINGS = frozenset({"xz", "bzip2"})
# What httpx itself undoes on a streamed body (a NAR). Any other
# Content-Encoding on a NAR is refused: its bytes would only fail the checks.
HTTPX_ENCODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})
# Request headers are the same from every node, so a shared cache (nginx,
# Squid) holds one copy per file: nothing per client, no cache-busting. NARs
# are compressed already (or deliberately not): asking for them as they are
# keeps a proxy from compressing them again and from storing a variant per
# Accept-Encoding; small documents may be compressed on the way. Whatever
# Content-Encoding still arrives is undone before any check (NixOS/nix #10275).
DOCUMENT_ACCEPT_ENCODING = "gzip, deflate, br, zstd"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
NAR_ACCEPT_ENCODING = "identity"


class Reader(Protocol):
    async def read(self) -> bytes:
        """The next chunk; b"" at the end. StalledError when none comes in time."""


class Transport(Protocol):
    url: str

    async def get(self, name: str) -> bytes | None:
        """The file *name* relative to the cache, or None when it is not there."""

    def stream(self, name: str) -> AbstractAsyncContextManager[Reader]:
        """A Reader of *name*, as an async context manager (NotFoundError if absent)."""

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Exactly bytes [offset, offset+length) of *name*; RangeError if the
        server does not honour the range (NotFoundError if absent)."""

    async def get_prefix(self, name: str, length: int) -> tuple[bytes, int] | None:
        """The first bytes of *name* (at most *length*, or all of it from a
        server that ignores Range) and its whole size; None when absent."""


def make_client(
    max_connections: int, connect_timeout: float, stall_timeout: float,
    netrc_file: Path | None, ssl_cert_file: Path | None = None,
) -> httpx.AsyncClient:
    """The one HTTP client shared by every HTTP substituter (HTTP/2 when offered)."""
    timeout = httpx.Timeout(connect=connect_timeout, read=stall_timeout,
                            write=stall_timeout, pool=None)
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    auth, verify = _netrc_auth(netrc_file), _tls(ssl_cert_file)
    # hpack logs every HTTP/2 header block at DEBUG (Huffman coding hides
    # nothing): with -vv that would be the netrc credentials.
    logging.getLogger("hpack").setLevel(logging.INFO)
    try:
        # trust_env: http_proxy/https_proxy/all_proxy/no_proxy and SSL_CERT_FILE,
        # as Nix (through curl) honours them.
        return httpx.AsyncClient(http2=True, timeout=timeout, limits=limits, auth=auth,
                                 verify=verify, follow_redirects=True, trust_env=True,
                                 headers={"User-Agent": "lazystore"})
    except (ValueError, ImportError, OSError, ssl.SSLError) as exc:
        raise SubstituterError(f"cannot set up HTTP from the environment (proxy or "
                               f"SSL_CERT_FILE): {exc}") from None


def _tls(ssl_cert_file: Path | None) -> ssl.SSLContext | bool:
    """Certificate authorities: *ssl_cert_file* (Nix's ``ssl-cert-file``) or the defaults."""
    if ssl_cert_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ssl_cert_file))
    except (OSError, ssl.SSLError) as exc:
        raise SubstituterError(f"cannot load CA certificates from {ssl_cert_file}: {exc}"
                               ) from None


def _netrc_auth(path: Path | None) -> httpx.Auth | None:
    if path is None or not path.exists():
        return None
    try:
        return httpx.NetRCAuth(str(path))
    except netrc.NetrcParseError as exc:
        # Name the file and line only: the message could quote a credential.
        raise SubstituterError(f"cannot parse netrc file {path} (line {exc.lineno})") from None
    except OSError as exc:
        raise SubstituterError(f"cannot read netrc file {path}: {exc.strerror}") from None


class _Pace:
    """The bytes of one body that arrived in the last ``limit.seconds``."""

    def __init__(self, limit: SpeedLimit, now: float) -> None:
        self.limit, self.start = limit, now
        self._recent: deque[tuple[float, int]] = deque()
        self._bytes = 0

    def too_slow(self, n: int, now: float) -> int | None:
        """Count *n* bytes arrived at *now*; the bytes of the last window when
        that is below the limit (judged once a whole window has passed)."""
        self._recent.append((now, n))
        self._bytes += n
        while self._recent and self._recent[0][0] < now - self.limit.seconds:
            self._bytes -= self._recent.popleft()[1]
        if now - self.start < self.limit.seconds:
            return None
        return self._bytes if self._bytes < self.limit.bytes_per_second * self.limit.seconds \
            else None


def make_transport(url: str, client: httpx.AsyncClient, stall_timeout: float,
                   speed: SpeedLimit | None = None) -> Transport:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise RequestError(f"substituter {url}: invalid URL ({exc})") from None
    scheme = parts.scheme
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise RequestError(f"substituter {url}: no host name")
        if parts.username is not None or parts.password is not None:
            # URLs appear in every log line; credentials belong in the netrc file.
            shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
            raise RequestError(f"substituter {shown}: credentials in the URL are not "
                               "supported (they would be logged); use a netrc file")
        return HttpTransport(url, client, stall_timeout, speed)
    if scheme == "file":
        return FileTransport(url)
    raise RequestError(f"substituter {url}: unsupported URL scheme {scheme!r}")


class HttpTransport:
    def __init__(self, url: str, client: httpx.AsyncClient, stall_timeout: float,
                 speed: SpeedLimit | None = None) -> None:
        self.url = url.rstrip("/")
        self._client = client
        self._stall = stall_timeout
        self._speed = speed

    def _url(self, name: str) -> str:
        """*name* relative to the cache, or as is when absolute (as Nix allows for NARs)."""
        if name.startswith(("http://", "https://")):
            return name
        return f"{self.url}/{name.lstrip('/')}"

    async def get(self, name: str) -> bytes | None:
        url = self._url(name)
        async with self._open(url, DOCUMENT_ACCEPT_ENCODING) as response:
            if response.status_code in NOT_FOUND_STATUSES:
                return None
            _check_status(response, url)
            body = bytearray()
            reader = _HttpReader(response, url, self._stall, self._speed)
            while chunk := await reader.read():
                body += chunk
                if len(body) > MAX_DOCUMENT:
                    raise RequestError(f"{url}: larger than {MAX_DOCUMENT} bytes")
            encoding = response.headers.get("Content-Encoding", "").strip().lower()
            if encoding in OWN_ENCODINGS:
                return await trio.to_thread.run_sync(_decode, bytes(body), encoding, url)
            return bytes(body)

    @asynccontextmanager
    async def stream(self, name: str) -> AsyncIterator[Reader]:
        url = self._url(name)
        async with self._open(url, NAR_ACCEPT_ENCODING) as response:
            if response.status_code in NOT_FOUND_STATUSES:
                raise NotFoundError(f"{url}: not found (HTTP {response.status_code})")
            _check_status(response, url)
            _check_stream_encoding(response, url)
            yield _HttpReader(response, url, self._stall, self._speed)

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        url = self._url(name)
        last = offset + length - 1
        wanted = f"bytes {offset}-{last}/"  # how a 206's Content-Range starts
        async with self._open(url, NAR_ACCEPT_ENCODING, {"Range": f"bytes={offset}-{last}"}
                              ) as response:
            if response.status_code in NOT_FOUND_STATUSES:
                raise NotFoundError(f"{url}: not found (HTTP {response.status_code})")
            if response.status_code == 416:
                raise RangeError(f"{url}: bytes {offset}-{last} are past its end (HTTP 416)")
            _check_status(response, url)
            # A 200 is the whole file: never read it as the range asked for.
            if (response.status_code != 206
                    or not response.headers.get("Content-Range", "").startswith(wanted)
                    or response.headers.get("Content-Encoding", "identity") != "identity"):
                raise RangeError(f"{url}: the server did not honour a Range request "
                                 f"(HTTP {response.status_code})")
            body = bytearray()
            reader = _HttpReader(response, url, self._stall, self._speed)
            while chunk := await reader.read():
                body += chunk
                if len(body) > length:
                    break
        if len(body) != length:
            raise RangeError(f"{url}: a Range reply of {len(body)} bytes, not {length}")
        return bytes(body)

    async def get_prefix(self, name: str, length: int) -> tuple[bytes, int] | None:
        url = self._url(name)
        async with self._open(url, NAR_ACCEPT_ENCODING, {"Range": f"bytes=0-{length - 1}"}
                              ) as response:
            if response.status_code in NOT_FOUND_STATUSES:
                return None
            if response.status_code == 416:  # an empty file
                return b"", 0
            _check_status(response, url)
            _check_stream_encoding(response, url)
            body = bytearray()
            reader = _HttpReader(response, url, self._stall)
            while chunk := await reader.read():
                body += chunk
                if len(body) > MAX_DOCUMENT:
                    raise RequestError(f"{url}: larger than {MAX_DOCUMENT} bytes")
            if response.status_code != 206:  # the whole file
                return bytes(body), len(body)
            got = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if got is None or int(got[1]) != 0 or int(got[2]) != len(body) - 1 \
                    or len(body) > length or int(got[3]) < len(body):
                raise RangeError(f"{url}: a Range reply that is not the start asked for")
            return bytes(body), int(got[3])

    @asynccontextmanager
    async def _open(self, url: str, accept_encoding: str, extra: dict[str, str] | None = None
                    ) -> AsyncIterator[httpx.Response]:
        try:
            request = self._client.build_request(
                "GET", url, headers={"Accept-Encoding": accept_encoding, **(extra or {})})
            # httpx's connect/read timeouts fire first; this bounds the rest.
            with trio.fail_after(self._stall + 5):
                response = await self._client.send(request, stream=True)
        except trio.TooSlowError:
            raise StalledError(f"{url}: no response in {self._stall:g}s") from None
        except HTTPX_ERRORS as exc:
            raise map_httpx_error(exc, url) from None
        try:
            yield response
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await response.aclose()
                except HTTPX_ERRORS:
                    pass  # a broken connection leaves the pool either way


def _decode(body: bytes, encoding: str, url: str) -> bytes:
    """Undo a Content-Encoding httpx does not know (Nix's ``narinfo-compression``
    and ``ls-compression`` upload xz or bzip2 files with that header)."""
    out = bytearray()

    def sink(piece: bytes) -> None:
        out.extend(piece)
        if len(out) > MAX_DOCUMENT:
            raise RequestError(f"{url}: larger than {MAX_DOCUMENT} bytes once decoded")

    try:
        decoder = decompress.make(encoding, sink)
        decoder.feed(body)
        decoder.finish()
    except VerificationError as exc:
        raise RequestError(f"{url}: cannot undo Content-Encoding {encoding} ({exc})") from None
    return bytes(out)


def _check_stream_encoding(response: httpx.Response, url: str) -> None:
    encodings = [e.strip() for e in response.headers.get("Content-Encoding", "").lower().split(",")]
    unknown = [e for e in encodings if e and e not in HTTPX_ENCODINGS]
    if unknown:
        raise RequestError(
            f"{url}: came with Content-Encoding {', '.join(unknown)}, which is not undone "
            "for NARs (a proxy compressed it; it must pass NARs on as they are)")


def _check_status(response: httpx.Response, url: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    after = retry.parse_retry_after(response.headers.get("Retry-After"))
    raise HTTPStatusError(f"{url}: HTTP {status} {response.reason_phrase}".rstrip(),
                          status, retry_after=after)


class _HttpReader:
    """Body chunks with any Content-Encoding undone, a stall timeout and,
    with *speed*, a low-speed limit (a trickle keeps the stall from firing:
    bytes keep arriving, and each arrival is judged)."""

    def __init__(self, response: httpx.Response, url: str, stall: float,
                 speed: SpeedLimit | None = None) -> None:
        self._chunks = response.aiter_bytes()
        self._url, self._stall = url, stall
        self._pace = None if speed is None else _Pace(speed, trio.current_time())

    async def read(self) -> bytes:
        try:
            with trio.fail_after(self._stall):
                chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""
        except trio.TooSlowError:
            raise StalledError(f"{self._url}: no data for {self._stall:g}s") from None
        except HTTPX_ERRORS as exc:
            raise map_httpx_error(exc, self._url) from None
        if self._pace is not None:
            got = self._pace.too_slow(len(chunk), trio.current_time())
            if got is not None:
                limit = self._pace.limit
                raise LowSpeedError(
                    f"{self._url}: slower than {limit.bytes_per_second:g} bytes/s for "
                    f"{limit.seconds:g}s ({got} bytes in the last {limit.seconds:g}s)")
        return chunk


class FileTransport:
    """A binary cache in a local folder (``file:///path``)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError(f"substituter {url}: file URLs must name a local path")
        self.url = url.rstrip("/")
        self.root = Path(urllib.parse.unquote(parts.path))

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in Path(name).parts:
            raise RequestError(f"{self.url}: refusing path {name!r} outside the cache")
        return self.root / name

    async def get(self, name: str) -> bytes | None:
        path = self._path(name)
        try:
            async with await trio.open_file(path, "rb") as f:
                data = await f.read(MAX_DOCUMENT + 1)
        except (FileNotFoundError, NotADirectoryError):
            if not await trio.Path(self.root).is_dir():
                raise TransportError(f"{self.root}: no such directory") from None
            return None
        except OSError as exc:
            raise _os_error(path, exc) from None
        if len(data) > MAX_DOCUMENT:
            raise RequestError(f"{path}: larger than {MAX_DOCUMENT} bytes")
        return data

    @asynccontextmanager
    async def stream(self, name: str) -> AsyncIterator[Reader]:
        path = self._path(name)
        try:
            f = await trio.open_file(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{path}: not found") from None
        except OSError as exc:
            raise _os_error(path, exc) from None
        async with f:
            yield _FileReader(f, path)


    async def get_prefix(self, name: str, length: int) -> tuple[bytes, int] | None:
        data = await self.get(name)  # local: no link to spare, the whole of it
        return None if data is None else (data, len(data))

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)
        try:
            data = await trio.to_thread.run_sync(_pread, path, offset, length)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{path}: not found") from None
        except OSError as exc:
            raise _os_error(path, exc) from None
        if len(data) != length:
            raise RangeError(f"{path}: {len(data)} bytes at offset {offset}, not {length}")
        return data


def _pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


class _FileReader:
    def __init__(self, f: trio.abc.AsyncResource, path: Path) -> None:
        self._f, self._path = f, path

    async def read(self) -> bytes:
        try:
            return await self._f.read(FILE_CHUNK)  # type: ignore[attr-defined, no-any-return]
        except OSError as exc:
            raise _os_error(self._path, exc) from None


def _os_error(path: Path, exc: OSError) -> TransportError:
    return TransportError(f"{path}: {exc.strerror or exc}")
