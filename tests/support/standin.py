"""A stand-in lazystore daemon on a real unix socket, for the clients' tests:
it starts listening late (a daemon restarting), answers each connection with
a step in turn, or reads the request and closes without answering (a daemon
stopping)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from lazystore.control import protocol

# What the stand-in does with each connection, in turn: answer with a message,
# or (None) read the request and close without an answer (a daemon stopping).
Step = dict[str, Any] | None


def _read_request(conn: socket.socket) -> dict[str, Any]:
    header = conn.recv(protocol.HEADER_SIZE, socket.MSG_WAITALL)
    body = conn.recv(protocol.frame_length(header), socket.MSG_WAITALL)
    return protocol.decode_body(body)


def stand_in(path: Path, steps: list[Step], delay: float) -> tuple[threading.Thread, list[str]]:
    """A daemon that starts listening at *path* after *delay* seconds."""
    asked: list[str] = []

    def serve() -> None:
        time.sleep(delay)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            listener.listen()
            for step in steps:
                conn, _ = listener.accept()
                with conn:
                    asked.append(_read_request(conn)["op"])
                    if step is not None:
                        conn.sendall(protocol.encode_frame(step))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, asked
