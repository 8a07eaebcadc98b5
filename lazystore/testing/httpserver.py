"""A real HTTP server on 127.0.0.1 serving a folder (a binary cache) from a thread.

Unlike Python's own handler it honours single-range requests (``Range:
bytes=a-b``, answered 206 with Content-Range) unless ``ranges=False``, when it
answers 200 with the whole file as many simple servers do. ``server.mangle``,
when set, changes the body of each 206 reply (a reply of the wrong length, a
chunk damaged in transit) while the headers stay as for the right one.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: with Nagle's algorithm the body
    # waits for the client's delayed ACK of the headers (40 ms a request on a
    # kept-alive connection). Real servers (nginx's tcp_nodelay) do not wait.
    disable_nagle_algorithm = True
    requests: list[str]  # set per server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        server = self.server
        server.requests.append(self.path)  # type: ignore[attr-defined]
        wanted = _RANGE.fullmatch(self.headers.get("Range", ""))
        if wanted and server.ranges:  # type: ignore[attr-defined]
            server.range_requests.append(self.path)  # type: ignore[attr-defined]
            self._range(int(wanted[1]), int(wanted[2]))
        else:
            super().do_GET()

    def _range(self, first: int, last: int) -> None:
        path = self.translate_path(self.path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if first > last or first >= size:
                    self.send_error(416)
                    return
                last = min(last, size - 1)
                f.seek(first)
                body = f.read(last - first + 1)
        except OSError:
            self.send_error(404)
            return
        mangle = self.server.mangle  # type: ignore[attr-defined]
        if mangle is not None:
            body = mangle(body)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many parallel clients; the default 5 stalls them


@contextmanager
def serve_directory(root: Path, ranges: bool = True,
                    mangle: Callable[[bytes], bytes] | None = None
                    ) -> Iterator[ThreadingHTTPServer]:
    """Serve *root*; yields the server (``server.url``, ``server.requests``,
    ``server.range_requests``, ``server.mangle``)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    server.range_requests = []  # type: ignore[attr-defined]
    server.ranges, server.mangle = ranges, mangle  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
