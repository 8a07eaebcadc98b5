"""A real HTTP server on 127.0.0.1 (port 0, in a thread) serving a binary-cache
folder, with faults programmable per URL path.

    with FaultServer(root) as server:
        server.program("/nar/x.nar.zst", Fault.status(500))  # next request only
        server.always("/abc.narinfo", Fault.stall())          # every request
        ... server.url ..., server.count("/nar/x.nar.zst")
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0  # bytes of the body sent before a reset/truncation
    offset: int = 0  # byte flipped by "corrupt" (negative: from the end)
    body: bytes | None = None

    @classmethod
    def error(cls, status: int, headers: dict[str, str] | None = None) -> Fault:
        return cls("status", status=status, headers=headers or {})

    @classmethod
    def reset(cls, after: int) -> Fault:
        """Full Content-Length, *after* bytes of body, then a TCP RST."""
        return cls("reset", after=after)

    @classmethod
    def truncate(cls, after: int) -> Fault:
        """Full Content-Length, *after* bytes of body, then a clean close."""
        return cls("truncate", after=after)

    @classmethod
    def corrupt(cls, offset: int) -> Fault:
        return cls("corrupt", offset=offset)

    @classmethod
    def stall(cls, after: int = 0) -> Fault:
        """Headers and *after* body bytes (or, with after=-1, nothing at all), then silence."""
        return cls("stall", after=after)

    @classmethod
    def trickle(cls, per_second: int = 1) -> Fault:
        """Headers with the full Content-Length, then the body *per_second*
        bytes a second (a byte at a time) until the client gives up."""
        return cls("trickle", after=per_second)

    @classmethod
    def replace(cls, body: bytes, headers: dict[str, str] | None = None) -> Fault:
        return cls("replace", body=body, headers=headers or {})

    @classmethod
    def gather(cls, n: int) -> Fault:
        """Held until *n* requests with a gather fault are held at once (at most
        60 s), then the normal answer: proves that many were in flight together."""
        return cls("gather", after=n)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """The normal answer, *seconds* late."""
        return cls("delay", after=int(seconds * 1000))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as lazystore.testing.httpserver: otherwise every request after the
    # first on a kept-alive connection waits ~40 ms (Nagle and the client's delayed ACK)
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        fault = self.server.take(path, dict(self.headers))
        if fault is not None and fault.kind == "status":
            return self._send(fault.status, b"fault\n", fault.headers)
        if fault is not None and fault.kind == "stall" and fault.after < 0:
            self.server.stopping.wait()
            self.close_connection = True
            return None
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.after / 1000)
            fault = None
        if fault is not None and fault.kind == "gather":
            self.server.gather(fault.after)
            fault = None
        body = fault.body if fault is not None and fault.kind == "replace" else self._file(path)
        if body is None:
            return self._send(404, b"not found\n")
        if fault is None or fault.kind == "replace":
            return self._send(200, body, fault.headers if fault is not None else None)
        return self._faulty(fault, body)

    def _file(self, path: str) -> bytes | None:
        target = (self.server.root / path.lstrip("/")).resolve()
        if self.server.root not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _faulty(self, fault: Fault, body: bytes) -> None:
        if fault.kind == "corrupt":
            data = bytearray(body)
            data[fault.offset] ^= 0x01
            return self._send(200, bytes(data))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault.kind == "trickle":
            return self._trickle(body, fault.after)
        self.wfile.write(body[: fault.after])
        self.wfile.flush()
        self.close_connection = True
        if fault.kind == "stall":
            self.server.stopping.wait()
        elif fault.kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
        return None


    def _trickle(self, body: bytes, per_second: int) -> None:
        self.close_connection = True
        for i in range(len(body)):
            try:
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
            except OSError:
                return  # the client gave up
            if self.server.stopping.wait(1 / per_second):
                return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs of parallel clients (1 s stalls)

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.queued: dict[str, deque[Fault]] = defaultdict(deque)
        self.permanent: dict[str, Fault] = {}
        self.active = 0  # connections open now
        self.peak = 0  # most connections open at once
        self.gathering = threading.Condition()
        self.held = 0  # requests held by a gather fault now
        self.most_held = 0  # most of them held at once

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.active -= 1

    def gather(self, n: int) -> None:
        with self.gathering:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            self.gathering.notify_all()
            self.gathering.wait_for(lambda: self.most_held >= n, timeout=60)
            self.held -= 1

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up (timeouts, cancelled downloads) are expected here

    def take(self, path: str, headers: dict[str, str]) -> Fault | None:
        with self.lock:
            self.requests.append(path)
            self.headers.append(headers)
            if self.queued[path]:
                return self.queued[path].popleft()
            return self.permanent.get(path)


class FaultServer:
    def __init__(self, root: Path) -> None:
        self._server = _Server(root)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def program(self, path: str, *faults: Fault) -> None:
        """The next requests for *path* get *faults*, one each, then normal service."""
        with self._server.lock:
            self._server.queued[path].extend(faults)

    def always(self, path: str, fault: Fault) -> None:
        with self._server.lock:
            self._server.permanent[path] = fault

    def count(self, path: str) -> int:
        with self._server.lock:
            return self._server.requests.count(path)

    @property
    def peak_connections(self) -> int:
        with self._server.lock:
            return self._server.peak

    @property
    def most_held(self) -> int:
        """Most requests a gather fault held at once."""
        with self._server.gathering:
            return self._server.most_held

    @property
    def requests(self) -> list[str]:
        with self._server.lock:
            return list(self._server.requests)

    @property
    def request_headers(self) -> list[dict[str, str]]:
        with self._server.lock:
            return list(self._server.headers)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
