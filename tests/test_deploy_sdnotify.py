"""sd_notify against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore import sdnotify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's notify socket, and its address."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_ready_reaches_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": address}) is True
    assert sock.recv(4096) == b"READY=1"


def test_multi_line_state_is_one_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    assert sdnotify.notify("READY=1\nSTATUS=serving", environ={"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_ready_reaches_an_abstract_socket() -> None:
    name = f"lazystore-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_uses_the_process_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sdnotify.notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_without_notify_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


@pytest.mark.allow_log('sd_notify to .* failed')
def test_nobody_listening_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = tmp_path / "gone"
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(gone)}) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(gone) in warnings[0].getMessage()


@pytest.mark.allow_log('unsupported NOTIFY_SOCKET')
def test_unsupported_address_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert any("unsupported" in r.getMessage() for r in caplog.records)


@pytest.mark.allow_log('sd_notify to .* failed: timed out')
def test_a_full_queue_drops_the_message_instead_of_hanging(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A manager that reads nothing cannot hold the daemon up for ever."""
    sock, address = listener
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.connect(address)
        filler.setblocking(False)
        queued = 0
        with pytest.raises(BlockingIOError):
            while True:  # the receive queue holds a bounded number of datagrams
                filler.send(b"x" * 64)
                queued += 1
        monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 0.2)
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": address}) is False
    assert any("failed" in r.getMessage() for r in caplog.records)
    assert all(sock.recv(4096) == b"x" * 64 for _ in range(queued)), "nothing else was queued"


def test_store_fd_sends_the_descriptor_with_its_name(tmp_path: Path) -> None:
    """FDSTORE=1 as systemd takes it: the descriptor rides as SCM_RIGHTS."""
    from lazystore.testing.supervisor import Supervisor

    supervisor = Supervisor(tmp_path)
    try:
        r, w = os.pipe()
        env = supervisor.env({})
        assert sdnotify.fdstore_enabled(env)
        assert sdnotify.store_fd("fuse", w, environ=env)
        os.close(w)
        supervisor.receive()
        assert list(supervisor.stored) == ["fuse"]
        os.write(supervisor.stored["fuse"], b"x")  # the same pipe, passed over
        assert os.read(r, 1) == b"x"
        os.close(r)
    finally:
        supervisor.close()


def test_listen_fds_in_a_process_the_supervisor_started(tmp_path: Path) -> None:
    """The descriptor arrives as fd 3 named as stored; the variables are unset
    and the descriptor close-on-exec, so children do not take it."""
    import subprocess
    import sys

    from lazystore.testing.supervisor import Supervisor

    supervisor = Supervisor(tmp_path)
    try:
        r, w = os.pipe()
        supervisor.stored["fuse"] = w
        probe = (
            "import os; from lazystore import sdnotify; fds = sdnotify.listen_fds();"
            "os.write(fds['fuse'][0], b'ok'); "
            "print(fds, [k for k in os.environ if k.startswith('LISTEN_')],"
            " os.get_inheritable(3), sdnotify.listen_fds({'LISTEN_PID': '1', 'LISTEN_FDS': '1'}))"
        )
        out = subprocess.run(
            supervisor.argv([sys.executable, "-c", probe]), pass_fds=supervisor.pass_fds(),
            capture_output=True, text=True, timeout=60, check=True,
        )
        assert out.stdout.strip() == "{'fuse': [3]} [] False {}"
        assert os.read(r, 2) == b"ok"
        os.close(r)
    finally:
        supervisor.close()


def test_fdstore_needs_the_managers_variable() -> None:
    assert not sdnotify.fdstore_enabled({"NOTIFY_SOCKET": "/x"})
    assert not sdnotify.fdstore_enabled({"FDSTORE": "4"})
    assert not sdnotify.fdstore_enabled({"NOTIFY_SOCKET": "/x", "FDSTORE": "0"})
    assert sdnotify.fdstore_enabled({"NOTIFY_SOCKET": "/x", "FDSTORE": "4"})
