"""Claiming a unix socket's path (lazystore.unixsocket), as every listening process does."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lazystore.errors import ControlError
from lazystore.unixsocket import claim


def test_a_stale_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: as left by a killed process
    claim(str(path), ControlError, "busy:")
    assert not path.exists()
    claim(str(tmp_path / "absent.sock"), ControlError, "busy:")  # nothing there: fine


def test_a_live_socket_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(ControlError) as info:
            claim(str(path), ControlError, "another one serves")
        assert str(info.value) == f"another one serves {path}"
        assert path.is_socket()


def test_what_is_not_a_socket_is_refused_and_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        claim(str(path), ControlError, "busy:")
    assert path.read_text() == "data"
