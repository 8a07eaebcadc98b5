"""DaemonViews against a stand-in daemon on a real unix socket: a daemon away
(restarting) is waited for, a refusal is not asked twice, a view made is not
asked for again while the daemon that made it serves (and is once it stopped,
or the view was removed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lazystore.control import protocol
from lazystore.control.client import DaemonUnavailable
from lazystore.errors import ControlError
from lazystore.snapshotter import views
from tests.support.standin import stand_in


def ensure(path: Path) -> Callable[[], None]:
    provider = views.DaemonViews(str(path), "/mnt", timeout=10)

    def call() -> None:
        try:
            asyncio.run(provider.ensure("v1", ["/nix/store/" + "a" * 32 + "-x"], None))
        finally:
            provider.close()
    return call


def test_a_view_is_asked_again_while_the_daemon_restarts(tmp_path: Path) -> None:
    # not listening for a while (connect fails), then a daemon that reads the
    # request and stops without answering, then the next one, which answers
    sock = tmp_path / "ctl.sock"
    answer = protocol.ok({"path": "/mnt/.views/v1", "paths": ["x"]})
    thread, asked = stand_in(sock, [None, answer], delay=0.5)
    ensure(sock)()
    thread.join(10)
    assert asked == ["view_create", "view_create"]


def test_a_refusal_is_not_asked_again(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    thread, asked = stand_in(sock, [protocol.error("no such store path")], delay=0)
    time.sleep(0.2)
    with pytest.raises(ControlError, match="no such store path") as info:
        ensure(sock)()
    assert not isinstance(info.value, DaemonUnavailable)
    thread.join(10)
    assert asked == ["view_create"]


def test_a_daemon_away_too_long_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "RESTART_WAIT", 0.5)
    with pytest.raises(DaemonUnavailable, match="cannot reach the lazystore daemon"):
        ensure(tmp_path / "none.sock")()


STORE_PATH = "/nix/store/" + "a" * 32 + "-x"
MADE = protocol.ok({"path": "/mnt/.views/v1", "paths": ["x"]})


def test_a_view_made_is_asked_again_only_for_other_paths_or_by_the_next_daemon(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "ctl.sock"

    async def body() -> tuple[list[str], list[str]]:
        provider = views.DaemonViews(str(sock), "/mnt", timeout=10)
        try:
            first, asked = stand_in(sock, [MADE, MADE], delay=0)
            await asyncio.sleep(0.1)  # listening
            await provider.ensure("v1", [STORE_PATH], None)
            await provider.ensure("v1", [STORE_PATH], None)  # the same daemon made it
            await provider.ensure("v1", [STORE_PATH, STORE_PATH + "2"], None)
            await asyncio.to_thread(first.join, 10)  # stopped: every connection closed
            assert not first.is_alive()
            second, asked_next = stand_in(sock, [MADE], delay=0)
            # the next daemon may have lost the view
            await provider.ensure("v1", [STORE_PATH, STORE_PATH + "2"], None)
            await asyncio.to_thread(second.join, 10)
            return asked, asked_next
        finally:
            provider.close()

    asked, asked_next = asyncio.run(body())
    assert asked == ["view_create", "view_create"]
    assert asked_next == ["view_create"]


def test_a_view_removed_is_asked_for_again(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    thread, asked = stand_in(sock, [MADE, protocol.ok({}), MADE], delay=0)
    time.sleep(0.1)

    async def body() -> None:
        provider = views.DaemonViews(str(sock), "/mnt", timeout=10)
        try:
            await provider.ensure("v1", [STORE_PATH], None)
            await provider.remove("v1")
            await provider.ensure("v1", [STORE_PATH], None)
        finally:
            provider.close()

    asyncio.run(body())
    thread.join(10)
    assert asked == ["view_create", "view_remove", "view_create"]
