"""The control client from asyncio (the snapshotter, the CRI image service).

Each call runs the blocking :class:`~lazystore.control.client.ControlClient`
in a daemon thread of its own: a process that stops never waits for a
daemon's answer (a pool's threads are joined at exit, which held a stop for up
to the call's timeout), and slow calls never hold up asyncio's default
threads. A call the daemon could not take (:class:`DaemonUnavailable`: it is
restarting or away) is sent again for a while when the caller says the call
is idempotent; a refusal or a timeout is never sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

from lazystore.control.client import ControlClient, DaemonUnavailable

log = logging.getLogger(__name__)

# A view of hundreds of paths waits for their narinfos; a daemon that answers
# nothing in this long is treated as unavailable (only the call asking waits).
CALL_TIMEOUT = 300.0
MAX_CALLS = 16  # daemon calls at once
# A daemon restarting (``systemctl restart``, or Restart= after a crash) is away
# for a few seconds: callers ask idempotent calls again for this long.
RESTART_WAIT = 60.0
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0)  # between attempts, the last one repeated


class AsyncControl:
    """Calls to the daemon at *path*, from a running asyncio loop."""

    def __init__(self, path: str, timeout: float = CALL_TIMEOUT,
                 max_calls: int = MAX_CALLS) -> None:
        self.path = path
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_calls)

    async def call(self, op: str, args: dict[str, object], wait: float = 0.0) -> object:
        """The daemon's answer to *op*; while it is unavailable, asked again
        for up to *wait* seconds (only for a call that changes nothing when
        made twice). ControlError (DaemonUnavailable after *wait*) if not."""
        deadline = time.monotonic() + wait
        attempt = 0
        while True:
            try:
                return await self._in_thread(op, args)
            except DaemonUnavailable as exc:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                if time.monotonic() + delay > deadline:
                    raise
                if attempt == 0:
                    log.info("%s; %s again for up to %g s", exc, op, wait)
                attempt += 1
                await asyncio.sleep(delay)

    async def _in_thread(self, op: str, args: dict[str, object]) -> object:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[object] = loop.create_future()

        def settle(result: object, error: Exception | None) -> None:
            if answer.done():  # the asking operation was cancelled
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result)

        def call() -> None:
            result: object = None
            error: Exception | None = None
            try:
                with ControlClient(self.path, timeout=self.timeout) as client:
                    result = client.call(op, **args)
            except Exception as exc:  # handed to the awaiting operation
                error = exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                pass  # the loop is closed: the process is stopping

        async with self._slots:
            threading.Thread(target=call, name=f"daemon-{op}", daemon=True).start()
            return await answer


class DaemonWatch:
    """An idle connection to the daemon at *path*, never sent anything: while
    it is open, the daemon process that accepted it still serves, so what
    that process made (views) is still there. A daemon that stops closes it
    (its server closes every connection before its socket, and a killed
    process's are closed by the kernel), and no other daemon can serve the
    socket before then; so a caller that saw a call answered between
    :meth:`open` and an unchanged :meth:`current` may skip asking again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._number = 0  # of the connection open now, one more for each

    def current(self) -> int | None:
        """The number of the watch open now; None if there is none (never
        opened, or its daemon has gone since)."""
        if self._sock is not None and not self._still_open(self._sock):
            self._sock.close()
            self._sock = None
        return self._number if self._sock is not None else None

    def open(self) -> int | None:
        """:meth:`current`, after connecting if there is no watch (None: the
        daemon cannot be reached now). Never blocks: a unix socket's connect
        completes at once or fails."""
        if self.current() is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)
            except OSError:  # absent, refused, or its backlog full (EAGAIN)
                sock.close()
                return None
            self._sock = sock
            self._number += 1
        return self._number

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _still_open(sock: socket.socket) -> bool:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: connected, the daemon is there
        except OSError:
            return False
        return False  # EOF, or bytes the daemon never sends unasked: not trusted
