"""``lazystore status`` rendering and ``--watch`` without a terminal (the map
in, text out; a real daemon's is compared in tests/test_metrics.py)."""

from __future__ import annotations

import io
from typing import Any

from lazystore.cli import status
from lazystore.substituter.timings import Timings


def _map(downloaded: int = 0, served: int = 0, **over: Any) -> dict[str, Any]:
    fetches = Timings()
    for seconds in (0.2, 0.3, 4.0):
        fetches.observe(seconds)
    base = {
        "mount_point": "/run/lazystore", "substituters": ["http://proxy:8080"],
        "cache_dir": "/var/cache/lazystore", "cache_bytes": 3 << 20, "cache_limit": None,
        "paths_known": 14, "paths_materialized": ["a" * 32 + "-python"], "in_flight": 2,
        "bytes_downloaded": downloaded, "nars_fetched": 3, "bytes_served": served,
        "hits": 5, "misses": 3, "evictions": 1, "retries": 4, "views": ["c1"],
        "open_files": 7, "fetch_seconds": fetches.to_dict(), "wait_seconds": Timings().to_dict(),
        "requests_by_cache": [["nar", "http://proxy:8080", "ok", 3],
                              ["narinfo", "http://proxy:8080", "found", 14],
                              ["narinfo", "http://proxy:8080", "missing", 2]],
    }
    return {**base, **over}


def test_lines_show_every_figure_the_metrics_export() -> None:
    text = "\n".join(status.lines(_map(downloaded=5 << 20, served=1024)))
    assert "3.0 MiB (no limit), 1 evicted" in text
    assert "a" * 32 + "-python" in text
    assert "in flight:       2" in text
    assert "downloaded:      5.0 MiB in 3 NARs" in text and "served:          1.0 KiB" in text
    assert "fetches:         3, mean 1.500 s, p50 <= 0.5 s, p90 <= 5 s, max <= 5 s" in text
    assert "reader waits:    none yet" in text
    assert "http://proxy:8080 nar: ok 3" in text
    assert "http://proxy:8080 narinfo: found 14, missing 2" in text
    assert "retries:         4" in text and "open files:      7" in text
    assert "views:           c1" in text


def test_a_quota_is_shown_with_the_size() -> None:
    assert "3.0 MiB of 20.0 GiB" in "\n".join(status.lines(_map(cache_limit=20 << 30)))


class _Client:
    def __init__(self, maps: list[dict[str, Any]]) -> None:
        self.maps = maps

    def call(self, op: str) -> dict[str, Any]:
        assert op == "status"
        return self.maps.pop(0)


def test_watch_redraws_with_rates_and_no_escapes_off_a_terminal() -> None:
    out = io.StringIO()
    client = _Client([_map(0, 0), _map(10 << 20, 2 << 20)])
    status.watch(client, 0.05, 2, out, clear=False)  # type: ignore[arg-type]
    frames = out.getvalue().split("\nlazystore status, every 0.05 s")
    assert len(frames) == 2 and "\x1b" not in out.getvalue()
    assert "/s)" not in frames[0]  # no rate before a second sample
    assert "downloaded:      10.0 MiB in 3 NARs (" in frames[1]
    assert "MiB/s)" in frames[1]
    assert "a" * 32 not in out.getvalue()  # the path list is left to the one-shot view


def test_watch_clears_the_screen_on_a_terminal() -> None:
    out = io.StringIO()
    status.watch(_Client([_map(), _map()]), 0.01, 2, out, clear=True)  # type: ignore[arg-type]
    assert out.getvalue().count(status.CLEAR) == 2
    assert out.getvalue().startswith(status.CLEAR)
