"""Units of the substituter below the network: retry policy, error mapping,
decompression, nix.conf."""

from __future__ import annotations

import bz2
import inspect
import lzma
import os
import random
import tracemalloc
from pathlib import Path

import brotli
import httpx
import pytest
import trio
import trio.testing
import zstandard

from lazystore.errors import LazystoreError, SubstituterError
from lazystore.substituter import decompress, errors, retry
from lazystore.substituter.config import (
    CACHE_NIXOS_ORG,
    CACHE_NIXOS_ORG_KEY,
    SpeedLimit,
    SubstituterConfig,
)
from lazystore.substituter.transport import _Pace

# -- error classification -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "transient"),
    [(500, True), (502, True), (503, True), (504, True), (599, True), (408, True),
     (429, True), (501, False), (505, False), (511, False), (400, False), (401, False),
     (418, False), (300, False)],
)
def test_http_status_transience_follows_nix(status: int, transient: bool) -> None:
    assert errors.HTTPStatusError("x", status).transient is transient


def _httpx_exception_classes() -> list[type[Exception]]:
    return [obj for _, obj in inspect.getmembers(httpx, inspect.isclass)
            if issubclass(obj, Exception) and obj.__module__.startswith("httpx")]


def test_every_httpx_exception_is_caught_and_mapped_to_a_specific_class() -> None:
    classes = _httpx_exception_classes()
    assert len(classes) > 20  # the walk really found httpx's hierarchy
    for cls in classes:
        assert issubclass(cls, errors.httpx_errors()), f"{cls.__name__} would escape"
        exc = cls.__new__(cls)
        Exception.__init__(exc, "boom")
        mapped = errors.map_httpx_error(exc, "http://cache")
        assert isinstance(mapped, errors.TransportError)
        assert type(mapped) is not errors.TransportError, cls.__name__
        assert "http://cache" in str(mapped) and "\n" not in str(mapped)


@pytest.mark.parametrize(
    ("cls", "mapped", "transient"),
    [(httpx.ConnectError, errors.ConnectionFailed, True),
     (httpx.ConnectTimeout, errors.TimedOut, True),
     (httpx.ReadTimeout, errors.StalledError, True),
     (httpx.ReadError, errors.ConnectionFailed, True),
     (httpx.RemoteProtocolError, errors.ProtocolError, True),
     (httpx.UnsupportedProtocol, errors.RequestError, False),
     (httpx.TooManyRedirects, errors.RequestError, False),
     (httpx.DecodingError, errors.ProtocolError, True)],
)
def test_httpx_mapping_table(cls: type[Exception], mapped: type[Exception],
                             transient: bool) -> None:
    exc = cls.__new__(cls)
    Exception.__init__(exc, "detail")
    result = errors.map_httpx_error(exc, "u")
    assert type(result) is mapped and result.transient is transient


def test_map_rejects_non_httpx_errors() -> None:
    with pytest.raises(TypeError):
        errors.map_httpx_error(ValueError("x"), "u")


# -- retry ----------------------------------------------------------------------


def test_backoff_is_full_jitter_and_exponential_with_a_cap() -> None:
    policy = retry.RetryPolicy(attempts=10, backoff_base=1.0, backoff_max=8.0)
    rng = random.Random(1)
    exc = errors.ConnectionFailed("x")
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (7, 8.0)]:
        delays = [policy.delay(attempt, exc, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2


def test_retry_after_is_honoured_and_capped() -> None:
    policy = retry.RetryPolicy(retry_after_max=10.0)
    rng = random.Random(1)
    assert policy.delay(1, errors.HTTPStatusError("x", 503, retry_after=3.0), rng) == 3.0
    assert policy.delay(1, errors.HTTPStatusError("x", 503, retry_after=3600.0), rng) == 10.0


def test_parse_retry_after() -> None:
    assert retry.parse_retry_after("7") == 7.0
    assert retry.parse_retry_after(None) is None
    assert retry.parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert retry.parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == 20.0
    assert retry.parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0


async def test_retry_call_retries_transient_errors_only(
        autojump_clock: trio.testing.MockClock) -> None:
    policy = retry.RetryPolicy(attempts=4, backoff_base=1.0)
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise errors.HTTPStatusError("503", 503)
        return "ok"

    assert await retry.call(flaky, policy, "op") == "ok" and len(calls) == 3

    calls.clear()

    async def permanent() -> str:
        calls.append(1)
        raise errors.HTTPStatusError("501", 501)

    with pytest.raises(errors.HTTPStatusError):
        await retry.call(permanent, policy, "op")
    assert len(calls) == 1

    calls.clear()

    async def always() -> str:
        calls.append(1)
        raise errors.ConnectionFailed("down")

    with pytest.raises(errors.ConnectionFailed):
        await retry.call(always, policy, "op")
    assert len(calls) == 4


async def test_retry_call_waits_for_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    policy = retry.RetryPolicy(attempts=2, retry_after_max=100.0)
    times: list[float] = []

    async def op() -> None:
        times.append(trio.current_time())
        if len(times) == 1:
            raise errors.HTTPStatusError("429", 429, retry_after=42.0)

    await retry.call(op, policy, "op")
    assert times[1] - times[0] == pytest.approx(42.0)


# -- decompression ----------------------------------------------------------------

DATA = os.urandom(100_000) * 4 + b"\0" * 3_000_000

COMPRESSORS = {
    "none": lambda d: d,
    "xz": lzma.compress,
    "bzip2": bz2.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "br": lambda d: brotli.compress(d, quality=5),
}


def _run(compression: str, data: bytes, chunk: int = 65536) -> list[bytes]:
    out: list[bytes] = []
    dec = decompress.make(compression, out.append)
    for start in range(0, len(data), chunk):
        dec.feed(data[start : start + chunk])
    dec.finish()
    return out


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_decompression_round_trip_in_bounded_pieces(compression: str) -> None:
    pieces = _run(compression, COMPRESSORS[compression](DATA))
    assert b"".join(pieces) == DATA
    assert max(len(p) for p in pieces) <= decompress.PIECE


@pytest.mark.parametrize("compression", sorted(set(COMPRESSORS) - {"none"}))
def test_decompression_bomb_is_decompressed_in_bounded_memory(compression: str) -> None:
    size = 32 << 20
    packed = COMPRESSORS[compression](bytes(size))
    assert len(packed) < size // 100
    seen = 0

    def sink(piece: bytes) -> None:
        nonlocal seen
        assert len(piece) <= decompress.PIECE
        seen += len(piece)

    tracemalloc.start()
    try:
        dec = decompress.make(compression, sink)
        dec.feed(packed)
        dec.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == size
    assert peak < size // 2  # decoder state (xz: its 8 MiB dictionary) and a few pieces


def test_concatenated_xz_streams_are_read_whole() -> None:
    data = lzma.compress(b"a" * 1000) + lzma.compress(b"b" * 1000)
    assert b"".join(_run("xz", data, chunk=7)) == b"a" * 1000 + b"b" * 1000


@pytest.mark.parametrize("compression", ["xz", "bzip2", "br"])
def test_truncated_stream_is_an_error(compression: str) -> None:
    packed = COMPRESSORS[compression](DATA)
    with pytest.raises(errors.VerificationError, match="ends before"):
        _run(compression, packed[: len(packed) // 2])


@pytest.mark.parametrize("compression", ["xz", "bzip2", "zstd", "br"])
def test_garbage_is_a_verification_error(compression: str) -> None:
    with pytest.raises(errors.VerificationError, match="corrupt"):
        _run(compression, b"this is not compressed at all" * 100)


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(errors.VerificationError, match="unsupported NAR compression 'lzip'"):
        decompress.make("lzip", lambda b: None)


# -- nix.conf ---------------------------------------------------------------------


def test_nix_conf_settings_includes_and_extra(tmp_path: Path) -> None:
    (tmp_path / "more.conf").write_text("extra-substituters = http://b\n")
    conf = tmp_path / "nix.conf"
    conf.write_text(
        "# comment\n"
        "substituters = http://a  # trailing comment\n"
        "include more.conf\n"
        "!include missing.conf\n"
        "trusted-public-keys = k1:AAAA k2:BBBB\n"
        "require-sigs = false\n"
        "http-connections = 7\n"
        "download-attempts = 2\n"
        "stalled-download-timeout = 12\n"
        "connect-timeout = 0\n"
        "netrc-file = /x/netrc\n"
        "narinfo-cache-negative-ttl = 5\n"
    )
    config = SubstituterConfig.from_nix_conf(conf, attempts=None, max_connections=3)
    assert config.urls == ["http://a", "http://b"]
    assert config.trusted_public_keys == ["k1:AAAA", "k2:BBBB"]
    assert config.require_sigs is False
    assert config.max_connections == 3  # override wins; None overrides are ignored
    assert config.attempts == 2
    assert config.stall_timeout == 12.0
    assert config.connect_timeout == SubstituterConfig().connect_timeout  # 0: default
    assert config.netrc_file == Path("/x/netrc")
    assert config.negative_ttl == 5.0


def test_missing_nix_conf_falls_back_to_cache_nixos_org(tmp_path: Path) -> None:
    config = SubstituterConfig.from_nix_conf(tmp_path / "absent.conf")
    assert config.urls == [CACHE_NIXOS_ORG]
    assert config.trusted_public_keys == [CACHE_NIXOS_ORG_KEY]
    assert config.require_sigs is True


def test_substituters_without_keys_keep_the_default_key(tmp_path: Path) -> None:
    conf = tmp_path / "nix.conf"
    conf.write_text("substituters = http://mine\n")
    config = SubstituterConfig.from_nix_conf(conf)
    assert config.urls == ["http://mine"]
    assert config.trusted_public_keys == [CACHE_NIXOS_ORG_KEY]


@pytest.mark.parametrize(
    ("text", "message"),
    [("substituters\n", "expected 'name = value'"),
     ("require-sigs = maybe\n", "not a boolean"),
     ("http-connections = many\n", "not a number"),
     ("include nowhere.conf\n", "does not exist")],
)
def test_bad_nix_conf_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "nix.conf"
    conf.write_text(text)
    with pytest.raises(SubstituterError, match=message) as info:
        SubstituterConfig.from_nix_conf(conf)
    assert "\n" not in str(info.value) and isinstance(info.value, LazystoreError)


def test_the_low_speed_limit_judges_whole_windows_of_arrivals() -> None:
    pace = _Pace(SpeedLimit(100, 2.0), now=0.0)  # under 200 bytes in any 2 s: too slow
    assert pace.too_slow(1, 0.5) is None and pace.too_slow(1, 1.5) is None  # no window yet
    assert pace.too_slow(1, 2.0) == 3  # a byte a second, judged after 2 s
    fast = _Pace(SpeedLimit(100, 2.0), now=0.0)
    assert all(fast.too_slow(60, t / 2) is None for t in range(1, 20))  # 120 bytes/s
    assert fast.too_slow(10, 12.0) == 10  # then 2.5 s of silence: only what came since
    burst = _Pace(SpeedLimit(100, 2.0), now=0.0)
    assert burst.too_slow(10_000, 0.1) is None
    assert burst.too_slow(1, 2.05) is None  # the burst is still inside the window
    assert burst.too_slow(1, 3.0) == 2  # and then it is not


def test_the_low_speed_window_defaults_to_the_stall_timeout_and_0_is_off() -> None:
    assert SubstituterConfig(stall_timeout=7).speed_limit() == SpeedLimit(1024, 7)
    assert SubstituterConfig(low_speed_limit=5, low_speed_time=3).speed_limit() == \
        SpeedLimit(5, 3)
    assert SubstituterConfig(low_speed_limit=0).speed_limit() is None
