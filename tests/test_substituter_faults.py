"""The substituter against a fault-injecting HTTP server on 127.0.0.1: every
failure ends in a clear SubstituterError (or a retried success) and never
leaves a partial store path behind."""

from __future__ import annotations

import base64
import bz2
import email.utils
import gzip
import http.client
import json
import logging
import lzma
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import brotli
import pytest
import trio
import zstandard

from lazystore.cli.fetch import unpack_into
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.signing import SecretKey
from lazystore.nix.storepath import StorePath
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig
from lazystore.substituter.errors import NotAvailableError, SubstituterError
from lazystore.testing import nixcache
from tests.support.faultserver import Fault, FaultServer


@pytest.fixture(scope="module")
def plain_cache(tmp_path_factory: pytest.TempPathFactory, sample_closure: str,
                test_key: nixcache.KeyPair) -> nixcache.BinaryCache:
    """The sample closure uncompressed, so a flipped byte is a NarHash mismatch."""
    return nixcache.make_cache(sample_closure, tmp_path_factory.mktemp("plain"), test_key,
                               compression="none")


@pytest.fixture
def server(binary_cache: nixcache.BinaryCache) -> Iterator[FaultServer]:
    with FaultServer(binary_cache.root) as srv:
        yield srv


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    dest, tmp = tmp_path / "store", tmp_path / "tmp"
    dest.mkdir()
    tmp.mkdir()
    return dest, tmp


def config(urls: list[str], key: str, **overrides: object) -> SubstituterConfig:
    values: dict[str, object] = dict(
        urls=urls, trusted_public_keys=[key], netrc_file=None, attempts=3,
        backoff_base=0.01, backoff_max=0.05, retry_after_max=5.0,
        connect_timeout=5.0, stall_timeout=5.0)
    values.update(overrides)
    return SubstituterConfig(**values)  # type: ignore[arg-type]


def path_named(cache: nixcache.BinaryCache, name: str) -> StorePath:
    return next(StorePath.parse(p) for p in cache.paths if p.endswith(f"-{name}"))


def narinfo(cache: nixcache.BinaryCache, path: StorePath) -> NarInfo:
    return NarInfo.parse((cache.root / f"{path.hash_part}.narinfo").read_text())


def nar_url(cache: nixcache.BinaryCache, path: StorePath) -> str:
    return "/" + narinfo(cache, path).url


def nar_len(cache: nixcache.BinaryCache, path: StorePath) -> int:
    return (cache.root / narinfo(cache, path).url).stat().st_size


def assert_nothing_left(dest: Path, tmp: Path) -> None:
    assert list(dest.iterdir()) == [], "a partial path is visible"
    assert list(tmp.iterdir()) == [], "a temporary was left behind"


def assert_fetched(dest: Path, tmp: Path, info: NarInfo) -> None:
    got = nixcache.nar_hash(str(dest / info.path.basename))
    assert got.removeprefix("sha256:") == info.nar_hash.nix32()
    assert list(tmp.iterdir()) == []


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("lazystore")]


async def test_500_then_success_is_retried(binary_cache: nixcache.BinaryCache,
                                           server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    server.program(nar_url(binary_cache, busybox), Fault.error(500))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        info = await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
        assert subs.stats.retries == 1
    assert server.count(nar_url(binary_cache, busybox)) == 2
    assert_fetched(dest, tmp, info)


@pytest.mark.parametrize("status", [501, 505, 511, 400])
async def test_permanent_http_errors_are_not_retried(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        status: int) -> None:
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    url = nar_url(binary_cache, busybox)
    server.always(url, Fault.error(status))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match=f"HTTP {status}"):
            await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
        assert subs.stats.retries == 0
    assert server.count(url) == 1
    assert_nothing_left(dest, tmp)


async def test_503_with_retry_after_waits_as_asked(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    server.program(f"/{liba.hash_part}.narinfo", Fault.error(503, {"Retry-After": "1"}))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        start = trio.current_time()
        info = await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
        waited = trio.current_time() - start
    assert waited >= 0.95  # Retry-After: 1, not the 0.01 s backoff of this config
    assert server.count(f"/{liba.hash_part}.narinfo") == 2
    assert any("retrying in 1.00s" in r.getMessage() for r in caplog.records)
    assert_fetched(dest, tmp, info)


async def test_429_with_retry_after_as_http_date_waits_until_then(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    url = nar_url(binary_cache, liba)
    # Whole seconds, and the request comes a little later (more on a loaded machine).
    when = email.utils.formatdate(time.time() + 4, usegmt=True)
    server.program(url, Fault.error(429, {"Retry-After": when}))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        start = trio.current_time()
        info = await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
        waited = trio.current_time() - start
        assert subs.stats.retries == 1
    assert server.count(url) == 2
    [delay] = [float(m.group(1)) for r in caplog.records
               if (m := re.search(r"HTTP 429.*retrying in ([0-9.]+)s", r.getMessage()))]
    assert 0.5 <= delay <= 4.05  # until the date, not this config's 0.01-0.05 s backoff
    assert waited >= delay - 0.01  # the log rounds to 0.01 s
    assert_fetched(dest, tmp, info)


async def test_connection_reset_mid_body_is_retried(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    url = nar_url(binary_cache, busybox)
    server.program(url, Fault.reset(after=nar_len(binary_cache, busybox) // 2))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        info = await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
    assert server.count(url) == 2
    assert_fetched(dest, tmp, info)


async def test_truncated_body_every_time_fails_cleanly(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    url = nar_url(binary_cache, busybox)
    server.always(url, Fault.truncate(after=nar_len(binary_cache, busybox) // 2))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match=f"cannot substitute {busybox.path()}"
                           ) as info:
            await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
    assert server.url in str(info.value)  # said once, by the caller: nothing logged here
    assert server.count(url) == 3  # attempts=3
    assert_nothing_left(dest, tmp)


@pytest.mark.allow_log('substituted .* after 1 other cache')
async def test_corrupted_byte_skips_to_the_next_substituter(
        plain_cache: nixcache.BinaryCache, dirs: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    dest, tmp = dirs
    busybox = path_named(plain_cache, "busybox")
    url = nar_url(plain_cache, busybox)
    with FaultServer(plain_cache.root) as bad, FaultServer(plain_cache.root) as good:
        bad.always(url, Fault.corrupt(offset=nar_len(plain_cache, busybox) // 2))
        cfg = config([bad.url, good.url], plain_cache.key.public_key)
        async with Substituters(cfg) as subs:
            info = await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
        assert bad.count(url) == 1  # a hash mismatch is not retried at the same cache
        assert good.count(url) == 1
        # both asked at once for the narinfo, each once: the fallback asks nothing again
        assert bad.count(f"/{busybox.hash_part}.narinfo") == 1
        assert good.count(f"/{busybox.hash_part}.narinfo") == 1
    assert_fetched(dest, tmp, info)
    [warning] = warnings(caplog)  # one line for the fault: the cache that failed, and why
    assert "does not match its NarHash" in warning and bad.url in warning
    assert f"from {good.url} after" in warning


async def test_corrupted_byte_with_no_other_substituter_leaves_nothing(
        plain_cache: nixcache.BinaryCache, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    busybox = path_named(plain_cache, "busybox")
    url = nar_url(plain_cache, busybox)
    with FaultServer(plain_cache.root) as bad:
        bad.always(url, Fault.corrupt(offset=nar_len(plain_cache, busybox) // 3))
        async with Substituters(config([bad.url], plain_cache.key.public_key)) as subs:
            with pytest.raises(NotAvailableError, match="NarHash"):
                await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
    assert_nothing_left(dest, tmp)


def _tampered_sig(text: str) -> bytes:
    lines = []
    for line in text.splitlines():
        if line.startswith("Sig: "):
            name, _, sig = line[5:].partition(":")
            raw = bytearray(base64.b64decode(sig))
            raw[0] ^= 0xFF
            line = f"Sig: {name}:{base64.b64encode(bytes(raw)).decode()}"
        lines.append(line)
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.allow_log('no valid signature by a trusted key')
async def test_wrong_signature_is_not_used(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    text = (binary_cache.root / f"{liba.hash_part}.narinfo").read_text()
    server.always(f"/{liba.hash_part}.narinfo", Fault.replace(_tampered_sig(text)))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        assert await subs.query(liba) is None
        with pytest.raises(NotAvailableError):
            await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert nar_url(binary_cache, liba) not in server.requests
    assert_nothing_left(dest, tmp)
    found = warnings(caplog)  # one per narinfo received (the store caches absence)
    assert len(found) == server.count(f"/{liba.hash_part}.narinfo") == 2
    assert all(liba.path() in w and server.url in w and "signature" in w for w in found)


@pytest.mark.allow_log('no valid signature by a trusted key')
async def test_signature_by_an_unknown_key_is_not_used(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    other = str(SecretKey.generate("someone-else-1").public_key)
    async with Substituters(config([server.url], other)) as subs:
        with pytest.raises(NotAvailableError):
            await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert_nothing_left(dest, tmp)
    assert any(liba.path() in w and "signature" in w for w in warnings(caplog))


async def test_unsigned_narinfo_is_accepted_without_require_sigs(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    other = str(SecretKey.generate("someone-else-1").public_key)
    async with Substituters(config([server.url], other, require_sigs=False)) as subs:
        info = await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert_fetched(dest, tmp, info)


@pytest.mark.allow_log(r'\.narinfo: it describes ')
async def test_narinfo_naming_another_path_is_not_used(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    dest, tmp = dirs
    liba, docs = path_named(binary_cache, "liba"), path_named(binary_cache, "docs")
    other = (binary_cache.root / f"{docs.hash_part}.narinfo").read_bytes()
    server.always(f"/{liba.hash_part}.narinfo", Fault.replace(other))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        assert await subs.query(liba) is None
        with pytest.raises(NotAvailableError):
            await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert_nothing_left(dest, tmp)
    assert any(docs.path() in w and liba.hash_part in w for w in warnings(caplog))


@pytest.mark.parametrize("status", [404, 403, 410])
async def test_404_narinfo_is_absent_and_not_retried(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        status: int) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    server.always(f"/{liba.hash_part}.narinfo", Fault.error(status))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        assert await subs.query(liba) is None
        with pytest.raises(NotAvailableError, match="no substituter has it"):
            await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
        assert subs.stats.narinfo_misses == 1
    # asked once per lookup, never retried (the store caches the absence)
    assert server.count(f"/{liba.hash_part}.narinfo") == 2
    assert_nothing_left(dest, tmp)


async def test_404_nar_behind_a_valid_narinfo(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    url = nar_url(binary_cache, liba)
    server.always(url, Fault.error(404))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match="not found"):
            await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert server.count(url) == 1
    assert_nothing_left(dest, tmp)


@pytest.mark.parametrize("where", [
    "narinfo",  # the narinfo request fails: the error goes to the caller, nothing is logged
    "nar-headers",  # nor when the NAR stalls: the caller's error says it (once)
    "nar-body",
])
async def test_stalling_server_is_an_error_in_bounded_time(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        where: str) -> None:
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    if where == "narinfo":
        server.always(f"/{busybox.hash_part}.narinfo", Fault.stall(after=-1))
    elif where == "nar-headers":
        server.always(nar_url(binary_cache, busybox), Fault.stall(after=-1))
    else:
        server.always(nar_url(binary_cache, busybox), Fault.stall(after=4096))
    cfg = config([server.url], binary_cache.key.public_key, stall_timeout=0.5, attempts=2)
    with trio.fail_after(60):  # the property: an error, not a hang
        async with Substituters(cfg) as subs:
            with pytest.raises(SubstituterError, match="no (data|response)"):
                await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
    assert_nothing_left(dest, tmp)


async def test_a_trickling_server_is_cut_off_by_the_low_speed_limit(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    """A byte a second never trips the stall timeout (bytes keep coming); the
    low-speed limit (1000 bytes/s over 1 s here) cuts each attempt off."""
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    url = nar_url(binary_cache, busybox)
    server.always(url, Fault.trickle(per_second=1))
    cfg = config([server.url], binary_cache.key.public_key, stall_timeout=5.0, attempts=2,
                 low_speed_limit=1000.0, low_speed_time=1.0)
    with trio.fail_after(30):  # the property: an error, not a 2 MB download at 1 byte/s
        async with Substituters(cfg) as subs:
            with pytest.raises(NotAvailableError, match="slower than 1000 bytes/s for 1s"):
                await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
            assert subs.stats.retries == 1  # transient, as a stall: retried
    assert server.count(url) == 2
    assert_nothing_left(dest, tmp)


async def test_a_slow_but_steady_server_is_within_the_low_speed_limit(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")  # a few hundred bytes: 0.5 s at 1000 bytes/s
    server.always(nar_url(binary_cache, liba), Fault.trickle(per_second=1000))
    cfg = config([server.url], binary_cache.key.public_key, low_speed_limit=100.0,
                 low_speed_time=0.2)
    async with Substituters(cfg) as subs:
        info = await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
        assert subs.stats.retries == 0
    assert_fetched(dest, tmp, info)


async def test_cancelled_fetch_leaves_nothing(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    url = nar_url(binary_cache, busybox)
    server.always(url, Fault.stall(after=nar_len(binary_cache, busybox) // 2))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with trio.move_on_after(1.0) as scope:
            await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
    assert scope.cancelled_caught
    assert server.count(url) == 1
    assert_nothing_left(dest, tmp)


async def test_content_encoding_is_decoded(
        binary_cache: nixcache.BinaryCache, server: FaultServer) -> None:
    liba = path_named(binary_cache, "liba")
    text = (binary_cache.root / f"{liba.hash_part}.narinfo").read_bytes()
    server.always(f"/{liba.hash_part}.narinfo",
                  Fault.replace(gzip.compress(text), {"Content-Encoding": "gzip"}))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        info = await subs.query(liba)
    assert info is not None and info.store_path == liba.path()


async def test_netrc_credentials_are_sent_and_never_logged(
        binary_cache: nixcache.BinaryCache, server: FaultServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-pw-do-not-log"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login alice password {secret}\n")
    liba = path_named(binary_cache, "liba")
    cfg = config([server.url], binary_cache.key.public_key, netrc_file=netrc)
    async with Substituters(cfg) as subs:
        assert await subs.query(liba) is not None
    token = base64.b64encode(f"alice:{secret}".encode()).decode()
    assert all(h.get("Authorization") == f"Basic {token}" for h in server.request_headers)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged and secret not in logged and token not in logged


@pytest.mark.allow_log('is unreachable')
async def test_unreachable_cache_is_asked_again_later(
        binary_cache: nixcache.BinaryCache, server: FaultServer,
        caplog: pytest.LogCaptureFixture) -> None:
    liba = path_named(binary_cache, "liba")
    server.program("/nix-cache-info", *[Fault.error(502)] * 3)  # every attempt of one read
    cfg = config([server.url], binary_cache.key.public_key, cache_info_retry=0.3)
    async with Substituters(cfg) as subs:
        with pytest.raises(NotAvailableError, match="unreachable"):
            await subs.query(liba)
        assert server.count(f"/{liba.hash_part}.narinfo") == 0
        with pytest.raises(NotAvailableError, match="unreachable"):
            await subs.query(liba)  # not asked again yet
        assert server.count("/nix-cache-info") == 3
        await trio.sleep(0.4)
        assert await subs.query(liba) is not None
    assert server.count("/nix-cache-info") == 4
    assert any("unreachable" in w and server.url in w for w in warnings(caplog))


async def test_absolute_nar_url_is_followed(
        binary_cache: nixcache.BinaryCache, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    text = (binary_cache.root / f"{liba.hash_part}.narinfo").read_text()
    relative = narinfo(binary_cache, liba).url
    with FaultServer(binary_cache.root) as front, FaultServer(binary_cache.root) as mirror:
        absolute = text.replace(f"URL: {relative}\n", f"URL: {mirror.url}/{relative}\n")
        front.always(f"/{liba.hash_part}.narinfo", Fault.replace(absolute.encode()))
        async with Substituters(config([front.url], binary_cache.key.public_key)) as subs:
            info = await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
        assert mirror.requests == [f"/{relative}"]
        assert f"/{relative}" not in front.requests
    assert_fetched(dest, tmp, info)


def _edited_narinfo(cache: nixcache.BinaryCache, path: StorePath, field: str,
                    value: str | None) -> bytes:
    """The narinfo of *path* with *field* set to *value* (None: removed); the
    signature stays valid (FileHash/FileSize are not in the fingerprint)."""
    lines = []
    for line in (cache.root / f"{path.hash_part}.narinfo").read_text().splitlines():
        if line.startswith(f"{field}: "):
            if value is None:
                continue
            line = f"{field}: {value}"
        lines.append(line)
    return ("\n".join(lines) + "\n").encode()


async def test_file_hash_mismatch_is_refused(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    wrong = "sha256:" + "0" * 52
    server.always(f"/{liba.hash_part}.narinfo",
                  Fault.replace(_edited_narinfo(binary_cache, liba, "FileHash", wrong)))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match="does not match its FileHash"):
            await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert_nothing_left(dest, tmp)


async def test_nar_file_longer_than_file_size_is_refused(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    liba = path_named(binary_cache, "liba")
    size = str(nar_len(binary_cache, liba) - 1)
    server.always(f"/{liba.hash_part}.narinfo",
                  Fault.replace(_edited_narinfo(binary_cache, liba, "FileSize", size)))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match="larger than its FileSize"):
            await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert_nothing_left(dest, tmp)


async def test_endless_padding_without_file_size_is_cut_off(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path]) -> None:
    """zstd skippable frames decompress to nothing, so the NAR still matches its
    NarHash: without a bound a server could make us download without end."""
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    info = narinfo(binary_cache, busybox)
    assert info.compression == "zstd"
    text = _edited_narinfo(binary_cache, busybox, "FileSize", None)
    text = text.replace(b"FileHash: ", b"X-FileHash: ")  # unknown fields are ignored
    padding = (4 << 20) + info.nar_size // 16
    skippable = (0x184D2A50).to_bytes(4, "little") + padding.to_bytes(4, "little")
    body = (binary_cache.root / info.url).read_bytes() + skippable + bytes(padding)
    server.always(f"/{busybox.hash_part}.narinfo", Fault.replace(text))
    server.always("/" + info.url, Fault.replace(body))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match="larger than its NarSize allows"):
            await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
    assert_nothing_left(dest, tmp)


class _ForwardProxy(ThreadingHTTPServer):
    """A minimal HTTP forward proxy on 127.0.0.1: every request, whatever host
    it names, is answered by *upstream*; the absolute URLs asked are recorded."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.seen: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ForwardProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.seen.append(self.path)
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname or "", up.port, timeout=10)
        try:
            conn.request("GET", urllib.parse.urlsplit(self.path).path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        self.send_response(response.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def proxy(server: FaultServer) -> Iterator[_ForwardProxy]:
    srv = _ForwardProxy(server.url)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


async def test_http_proxy_from_the_environment_is_used(
        binary_cache: nixcache.BinaryCache, proxy: _ForwardProxy, dirs: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    dest, tmp = dirs
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url)
    liba = path_named(binary_cache, "liba")
    url = "http://binary-cache.invalid"  # reachable only through the proxy
    async with Substituters(config([url], binary_cache.key.public_key)) as subs:
        info = await subs.fetch(liba, unpack_into(dest / liba.basename, tmp))
    assert_fetched(dest, tmp, info)
    assert f"{url}/{liba.hash_part}.narinfo" in proxy.seen
    assert f"{url}/{info.url}" in proxy.seen


async def test_no_proxy_bypasses_the_proxy(
        binary_cache: nixcache.BinaryCache, server: FaultServer, proxy: _ForwardProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "all_proxy", "ALL_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    liba = path_named(binary_cache, "liba")
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        assert await subs.query(liba) is not None
    assert proxy.seen == []
    assert server.count(f"/{liba.hash_part}.narinfo") == 1


async def test_unusable_proxy_setting_is_one_clear_error(
        binary_cache: nixcache.BinaryCache, server: FaultServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "ftp://proxy.invalid")
    with pytest.raises(SubstituterError, match="proxy"):
        async with Substituters(config([server.url], binary_cache.key.public_key)):
            pass


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept queue is full: Linux drops further
    SYNs, so a connect() neither succeeds nor fails, it hangs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            try:
                filler.connect(listener.getsockname())
            except BlockingIOError:
                pass
        yield listener.getsockname()[1]
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.allow_log('is unreachable: .*timed out')
async def test_connect_timeout_turns_a_hanging_connect_into_an_error(
        binary_cache: nixcache.BinaryCache, unanswered_port: int) -> None:
    liba = path_named(binary_cache, "liba")
    url = f"http://127.0.0.1:{unanswered_port}"
    # The stall timeout is far beyond the bound below: only the connect timeout can end it.
    cfg = config([url], binary_cache.key.public_key, connect_timeout=0.5,
                 stall_timeout=300.0, attempts=2)
    with trio.fail_after(60):
        async with Substituters(cfg) as subs:
            with pytest.raises(NotAvailableError, match="connection timed out"):
                await subs.query(liba)
            assert subs.stats.retries == 1  # a timeout is transient: retried once


_ENCODERS = {
    "gzip": gzip.compress,
    "br": brotli.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "xz": lzma.compress,
    "bzip2": bz2.compress,
}


@pytest.mark.parametrize("encoding", sorted(_ENCODERS))
async def test_compressed_listing_and_narinfo_are_decoded(
        binary_cache: nixcache.BinaryCache, server: FaultServer, encoding: str) -> None:
    """As Nix's ls-compression/narinfo-compression upload them (Content-Encoding)."""
    liba = path_named(binary_cache, "liba")
    ls = (binary_cache.root / f"{liba.hash_part}.ls").read_bytes()
    text = (binary_cache.root / f"{liba.hash_part}.narinfo").read_bytes()
    headers = {"Content-Encoding": encoding}
    server.always(f"/{liba.hash_part}.ls", Fault.replace(_ENCODERS[encoding](ls), headers))
    server.always(f"/{liba.hash_part}.narinfo",
                  Fault.replace(_ENCODERS[encoding](text), headers))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        info = await subs.query(liba)
        assert info is not None and info.store_path == liba.path()
        assert await subs.listing(liba) == json.loads(ls)


async def test_undecodable_content_encoding_is_a_clear_error(
        binary_cache: nixcache.BinaryCache, server: FaultServer) -> None:
    liba = path_named(binary_cache, "liba")
    server.always(f"/{liba.hash_part}.narinfo",
                  Fault.replace(b"not xz at all", {"Content-Encoding": "xz"}))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match="cannot undo Content-Encoding xz"):
            await subs.query(liba)


@pytest.mark.parametrize("encoding", ["xz", "bzip2"])
async def test_a_nar_compressed_on_the_way_by_a_proxy_is_a_clear_error(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        encoding: str) -> None:
    """httpx undoes gzip/deflate/br/zstd on NARs itself; an encoding it does not
    know would reach the hash checks still encoded: say so instead of a mismatch."""
    dest, tmp = dirs
    busybox = path_named(binary_cache, "busybox")
    url = nar_url(binary_cache, busybox)
    body = (binary_cache.root / url.lstrip("/")).read_bytes()
    server.always(url, Fault.replace(_ENCODERS[encoding](body), {"Content-Encoding": encoding}))
    async with Substituters(config([server.url], binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError, match=f"Content-Encoding {encoding}"):
            await subs.fetch(busybox, unpack_into(dest / busybox.basename, tmp))
        assert subs.stats.retries == 0  # the same proxy would answer the same
    assert server.count(url) == 1
    assert_nothing_left(dest, tmp)


@pytest.mark.parametrize("cap", [1, 3])
async def test_connections_are_capped_globally(
        binary_cache: nixcache.BinaryCache, server: FaultServer, dirs: tuple[Path, Path],
        cap: int) -> None:
    dest, tmp = dirs
    paths = [StorePath.parse(p) for p in binary_cache.paths]
    assert len(paths) > cap
    for path in paths:  # slow answers, so parallel requests overlap
        server.always(nar_url(binary_cache, path), Fault.delay(0.3))
    cfg = config([server.url], binary_cache.key.public_key, max_connections=cap)
    async with Substituters(cfg) as subs:
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(subs.fetch, path, unpack_into(dest / path.basename, tmp))
    assert len(list(dest.iterdir())) == len(paths)
    assert min(cap, 2) <= server.peak_connections <= cap  # parallel, never above the cap
