"""A stand-in lazystore daemon on a real unix socket, for the clients' tests:
it starts listening late (a daemon restarting), answers each request with
a step in turn, or reads the request and closes without answering (a daemon
stopping)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from lazystore.control import protocol
from lazystore.errors import ControlError

# What the stand-in does with each connection, in turn: answer with a message,
# or (None) read the request and close without an answer (a daemon stopping).
Step = dict[str, Any] | None


def _read_request(conn: socket.socket) -> dict[str, Any]:
    header = conn.recv(protocol.HEADER_SIZE, socket.MSG_WAITALL)
    body = conn.recv(protocol.frame_length(header), socket.MSG_WAITALL)
    return protocol.decode_body(body)


def stand_in(path: Path, steps: list[Step], delay: float) -> tuple[threading.Thread, list[str]]:
    """A daemon that starts listening at *path* after *delay* seconds, takes
    each connection's request as it comes (a connection that asks nothing
    waits, as the daemon's do), and once every step is taken stops: closes
    every connection and removes its socket."""
    asked: list[str] = []
    left = list(steps)
    lock = threading.Lock()
    done = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            try:
                request = _read_request(conn)
            except (OSError, struct.error, ControlError):
                return  # closed by the client, or at the stop
            with lock:
                if not left:
                    return
                asked.append(request["op"])
                step = left.pop(0)
                if step is not None:
                    conn.sendall(protocol.encode_frame(step))
                if not left:
                    done.set()

    def serve() -> None:
        time.sleep(delay)
        conns: list[socket.socket] = []
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            listener.listen()
            listener.settimeout(0.02)
            while not done.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conns.append(conn)
                threading.Thread(target=answer, args=(conn,), daemon=True).start()
            for conn in conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed already
            path.unlink()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, asked
