"""A real HTTP server on 127.0.0.1 serving a folder (a binary cache) from a thread."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[str]  # set per server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many parallel clients; the default 5 stalls them


@contextmanager
def serve_directory(root: Path) -> Iterator[ThreadingHTTPServer]:
    """Serve *root*; yields the server (``server.url``, ``server.requests``)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
