"""A shaping TCP proxy for the benchmarks: it puts a real-looking link between
the clients and a binary cache or a registry on 127.0.0.1.

Shaping, per link (all connections through one proxy share it):

- latency: every chunk the client sends (an HTTP request, a TLS record, a
  connection being opened) reaches the upstream *latency* seconds after it
  arrived, so each request costs one round trip more than on loopback;
- bandwidth: the bytes flowing back to the clients leave at most at *rate*
  bits per second in total (a shared virtual clock, i.e. one bottleneck link).

The proxy also counts what crosses it: bytes in both directions and the HTTP
request targets it saw (``GET /nar/…``, ``GET /v2/…/blobs/…``), which is how
the harness measures "bytes transferred" the same way for every mode.

Run alone: ``python bench/proxy.py --upstream 127.0.0.1:8080 --profile 100mbit``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n")
_RANGE = re.compile(rb"\r\nrange: *bytes=(\S+)\r\n", re.IGNORECASE)


@dataclass(frozen=True)
class Profile:
    """A link: one-way added latency (seconds) and a bandwidth cap (bits/s, None = no cap)."""

    name: str
    latency: float
    rate: float | None

    def describe(self) -> str:
        rate = "unlimited" if self.rate is None else f"{self.rate / 1e6:g} Mbit/s"
        return f"{self.name} ({self.latency * 1000:g} ms, {rate})"


PROFILES = {
    "100mbit": Profile("100mbit", 0.020, 100e6),
    "1gbit": Profile("1gbit", 0.020, 1e9),
    "unshaped": Profile("unshaped", 0.0, None),
}


@dataclass
class Stats:
    """What crossed the proxy since the last reset."""

    bytes_down: int = 0  # upstream -> clients
    bytes_up: int = 0  # clients -> upstream
    connections: int = 0
    requests: list[str] = field(default_factory=list)  # "GET /nar/…"
    # (time.monotonic() it arrived, "GET /lzdata/… bytes=A-B"): one per request
    log: list[tuple[float, str]] = field(default_factory=list)

    def targets(self, prefix: str) -> list[str]:
        return [r.split(" ", 1)[1] for r in self.requests if r.split(" ", 1)[1].startswith(prefix)]

    def as_dict(self) -> dict[str, object]:
        return {
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "connections": self.connections,
            "requests": len(self.requests),
        }


class _Link:
    """The shared bottleneck: a virtual clock of when the link is next free."""

    # How far the clock may lag behind real time: the credit a sender keeps for
    # the time it spent between chunks (like a token bucket's depth).
    BURST = 0.020

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._free_at = 0.0

    async def transmit(self, nbytes: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        start = max(now - self.BURST, self._free_at)
        self._free_at = start + nbytes * 8 / self.rate
        delay = self._free_at - now
        if delay > 0:
            await asyncio.sleep(delay)


class ShapingProxy:
    """A TCP proxy to *upstream* ``(host, port)`` shaped by *profile*, served
    from its own thread and event loop (so the harness can stay synchronous)."""

    def __init__(self, upstream: tuple[str, int], profile: Profile) -> None:
        self.upstream = upstream
        self.profile = profile
        self.stats = Stats()
        self._link = _Link(profile.rate)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- life cycle (called from the harness thread) --------------------------
    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def reset(self) -> Stats:
        """Return the stats so far and start counting afresh."""
        old, self.stats = self.stats, Stats()
        return old

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # -- inside the loop --------------------------------------------------------
    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        try:
            await asyncio.sleep(self.profile.latency)  # the handshake's round trip
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.debug("upstream %s unreachable: %s", self.upstream, exc)
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._upstream_pump(reader, up_writer), self._downstream_pump(up_reader, writer)
            )
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("proxied connection ended: %s", exc)
        except asyncio.CancelledError:
            pass  # the proxy is closing; this task is its own top level
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _upstream_pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Client -> upstream: each chunk is delivered *latency* after it arrived."""
        while chunk := await reader.read(CHUNK):
            arrived = time.monotonic()
            self.stats.bytes_up += len(chunk)
            for found in _REQUEST_LINE.finditer(chunk):
                line = f"{found[1].decode()} {found[2].decode(errors='replace')}"
                self.stats.requests.append(line)
                head = chunk[found.end() - 2:chunk.find(b"\r\n\r\n", found.end()) + 2]
                if wanted := _RANGE.search(head):
                    line += f" bytes={wanted[1].decode(errors='replace')}"
                self.stats.log.append((arrived, line))
            delay = arrived + self.profile.latency - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def _downstream_pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Upstream -> client, through the shared bandwidth cap."""
        while chunk := await reader.read(CHUNK):
            self.stats.bytes_down += len(chunk)
            await self._link.transmit(len(chunk))
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def parse_upstream(text: str) -> tuple[str, int]:
    """``http://host:port/…`` or ``host:port`` -> (host, port)."""
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"upstream must be HOST:PORT or a URL with a port: {text!r}")
    return parts.hostname, parts.port


@contextmanager
def shaping_proxy(upstream: str, profile: Profile | str) -> Iterator[ShapingProxy]:
    """A started proxy in front of *upstream* (a URL or HOST:PORT); closed on exit."""
    if isinstance(profile, str):
        profile = PROFILES[profile]
    proxy = ShapingProxy(parse_upstream(upstream), profile)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT or URL to forward to")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="100mbit")
    parser.add_argument("--latency-ms", type=float, help="override the profile's latency")
    parser.add_argument("--rate-mbit", type=float, help="override the profile's bandwidth")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="proxy: %(message)s")
    profile = PROFILES[args.profile]
    if args.latency_ms is not None or args.rate_mbit is not None:
        profile = Profile(
            "custom",
            profile.latency if args.latency_ms is None else args.latency_ms / 1000,
            profile.rate if args.rate_mbit is None else args.rate_mbit * 1e6,
        )
    with shaping_proxy(args.upstream, profile) as proxy:
        log.info("listening on %s -> %s, %s", proxy.url, args.upstream, profile.describe())
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            log.info("%s", proxy.stats.as_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
