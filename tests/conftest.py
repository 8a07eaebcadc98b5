"""Shared fixtures. A WARNING/ERROR log record of lazystore fails a test unless
the test expects it: ``@pytest.mark.allow_log("regex", ...)`` names the records
it expects (searched in each record's message); each must have been logged,
and every other WARNING/ERROR record still fails the test."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.testing import nixcache
from lazystore.testing.httpserver import serve_directory

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_log(*patterns): the WARNING/ERROR log records the test expects")


@pytest.fixture(autouse=True)
def _fail_on_unexpected_logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    caplog.set_level(logging.INFO, logger="lazystore")
    yield
    marker = request.node.get_closest_marker("allow_log")
    patterns = [re.compile(p) for p in marker.args] if marker else []
    if marker and not patterns:
        pytest.fail("allow_log names no expected record (give the patterns it expects)")
    records = [
        r for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING and r.name.startswith("lazystore")
    ]
    missing = [p.pattern for p in patterns if not any(p.search(r.getMessage()) for r in records)]
    bad = [r for r in records if not any(p.search(r.getMessage()) for p in patterns)]
    if bad:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)
        pytest.fail(f"unexpected log records:\n{lines}")
    if missing:
        pytest.fail(f"expected log records not logged: {missing}")


@pytest.fixture(scope="session")
def conformance() -> Path:
    """../shared/conformance, or skip when it is absent."""
    if not CONFORMANCE.is_dir():
        pytest.skip("conformance data (../shared/conformance) is absent")
    return CONFORMANCE


@pytest.fixture(scope="session")
def nix() -> None:
    if not nixcache.have_nix():
        pytest.skip("real Nix (nix-bin) is not installed")


@pytest.fixture(scope="session")
def test_key(tmp_path_factory: pytest.TempPathFactory, nix: None) -> nixcache.KeyPair:
    return nixcache.KeyPair.generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def sample_closure(nix: None) -> str:
    """The sample program's store path (prog -> busybox, liba, docs), built by Nix."""
    return nixcache.build()


@pytest.fixture(scope="session")
def binary_cache(
    tmp_path_factory: pytest.TempPathFactory, sample_closure: str, test_key: nixcache.KeyPair
) -> nixcache.BinaryCache:
    """A signed zstd binary cache with .ls listings holding the sample closure."""
    return nixcache.make_cache(sample_closure, tmp_path_factory.mktemp("cache"), test_key)


@pytest.fixture(scope="session")
def http_cache(binary_cache: nixcache.BinaryCache) -> Iterator[str]:
    """URL of a real HTTP server on 127.0.0.1 serving ``binary_cache``."""
    with serve_directory(binary_cache.root) as server:
        yield server.url  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def roots_closure(nix: None) -> str:
    """roots-prog's store path: its closure holds file, executable, empty-file and
    symlink store paths (lazystore/testing/sample.nix with roots = "1")."""
    return nixcache.build(roots="1")


@pytest.fixture(scope="session")
def roots_cache(
    tmp_path_factory: pytest.TempPathFactory, roots_closure: str, test_key: nixcache.KeyPair
) -> nixcache.BinaryCache:
    """A signed zstd binary cache with .ls listings holding roots-prog's closure."""
    return nixcache.make_cache(roots_closure, tmp_path_factory.mktemp("roots-cache"), test_key)
