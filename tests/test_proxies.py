"""lazystore behind the caching proxies of deploy/: real nginx and Squid on
127.0.0.1 with the shipped configurations, real daemons (real FUSE mounts)
behind them, a real HTTP origin that logs every request."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from lazystore.substituter import transport
from lazystore.testing import nixcache, proxies
from lazystore.testing.daemon import Daemon, fuse_missing
from tests.support.faultserver import FaultServer

pytestmark = pytest.mark.root
DAEMONS = 4


def _need(program: str) -> None:
    reason = fuse_missing() or proxies.missing(program)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def origin(tmp_path: Path, binary_cache: nixcache.BinaryCache) -> Iterator[FaultServer]:
    """A private copy of the sample cache on a server that logs each request."""
    shutil.copytree(binary_cache.root, tmp_path / "www")
    with FaultServer(tmp_path / "www") as server:
        yield server


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@contextmanager
def _daemons(root: Path, url: str, key: str, *extra: str, count: int = DAEMONS,
             env: dict[str, str] | None = None) -> Iterator[list[Daemon]]:
    """*count* daemons, each with its own cache dir and mount."""
    with ExitStack() as stack:
        daemons = []
        for i in range(count):
            d = Daemon(root / f"node{i}", url, key, "--attempts", "2", *extra)
            stack.callback(d.stop)
            d.start(env=env)
            daemons.append(d)
        yield daemons


def _files(store_path: str) -> dict[str, bytes]:
    """Every regular file of *store_path* (as Nix built it), relative name -> bytes."""
    out = {}
    for dirpath, _, names in os.walk(store_path):
        for name in names:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                out[os.path.relpath(full, store_path)] = Path(full).read_bytes()
    return out


def _at_once(daemons: list[Daemon], work: Callable[[Daemon], object]) -> list[object]:
    """Run *work* for every daemon in its own thread, released together."""
    barrier = threading.Barrier(len(daemons))
    results: list[object] = [None] * len(daemons)

    def run(i: int, d: Daemon) -> None:
        barrier.wait()
        try:
            results[i] = work(d)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, d)) for i, d in enumerate(daemons)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def _read_workload(paths: list[str]) -> Callable[[Daemon], dict[str, dict[str, bytes]]]:
    def work(d: Daemon) -> dict[str, dict[str, bytes]]:
        return {p: _files(str(d.mnt / os.path.basename(p))) for p in paths}
    return work


def _proxy(kind: str, tmp_path: Path, origin: FaultServer) -> AbstractContextManager[proxies.Proxy]:
    if kind == "nginx":
        return proxies.nginx(tmp_path / "nginx", origin.url.removeprefix("http://"))
    return proxies.squid(upstream=_host_port(origin.url))


@pytest.mark.parametrize("kind", ["nginx", "squid"])
def test_daemons_behind_one_proxy_cost_the_origin_one_copy_of_each_nar(
    kind: str, tmp_path: Path, binary_cache: nixcache.BinaryCache, origin: FaultServer
) -> None:
    _need(kind)
    expected = {p: _files(p) for p in binary_cache.paths}
    with _proxy(kind, tmp_path, origin) as proxy, _daemons(
        tmp_path, proxy.url, binary_cache.key.public_key
    ) as daemons:
        results = _at_once(daemons, _read_workload(binary_cache.paths))
    for got in results:
        assert got == expected  # every daemon verified and serves the real bytes
    nars = [r for r in origin.requests if r.startswith("/nar/")]
    assert len(nars) == len(binary_cache.paths)  # one NAR per store path read
    assert Counter(origin.requests).most_common(1)[0][1] == 1, origin.requests


def test_request_headers_let_a_shared_cache_keep_one_copy(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, origin: FaultServer
) -> None:
    """Direct to the origin: no per-client header or query, one Accept-Encoding
    for NARs (as stored) and one for documents, the same from every daemon."""
    if reason := fuse_missing():
        pytest.skip(reason)
    with _daemons(tmp_path, origin.url, binary_cache.key.public_key, count=2) as daemons:
        _at_once(daemons, _read_workload(binary_cache.paths))
    seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for path, headers in zip(origin.requests, origin.request_headers, strict=True):
        lower = {k.lower(): v for k, v in headers.items()}
        assert "?" not in path
        assert not {"cache-control", "pragma", "cookie", "if-none-match"} & lower.keys()
        want = (transport.NAR_ACCEPT_ENCODING if path.startswith("/nar/")
                else transport.DOCUMENT_ACCEPT_ENCODING)
        assert lower["accept-encoding"] == want
        seen.setdefault(path, set()).add(tuple(sorted(
            (k, v) for k, v in lower.items() if k not in ("host", "connection"))))
    assert all(len(variants) == 1 for variants in seen.values()), seen
    assert sum(path.startswith("/nar/") for path in seen) == len(binary_cache.paths)


def _nar_of(binary_cache: nixcache.BinaryCache, name: str) -> tuple[str, str]:
    """(store path, NAR URL path) of the closure member called *name*."""
    path = next(p for p in binary_cache.paths if p.endswith(f"-{name}"))
    text = binary_cache.narinfo_path(path).read_text()
    url = next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("URL: "))
    return path, f"/{url}"


def _cache_file(proxy: proxies.Proxy, url_path: str) -> tuple[Path, int]:
    """The proxy's cache file for *url_path* and the offset where the body starts
    (both keep a header naming the URL, then the HTTP response head)."""
    deadline = time.monotonic() + 10  # Squid writes its swap file after answering
    while time.monotonic() < deadline:
        for path in proxy.cache_files():
            data = path.read_bytes()
            if url_path.encode() + b"\n" in data or url_path.encode() + b"\0" in data:
                return path, data.index(b"\r\n\r\n") + 4
        time.sleep(0.1)
    raise AssertionError(f"no cache file for {url_path}: {proxy.cache_files()}")


def _disk_proxy(kind: str, tmp_path: Path,
                origin: FaultServer) -> AbstractContextManager[proxies.Proxy]:
    """A reverse proxy that serves what its disk cache holds (Squid would keep
    small objects in memory: its memory cache is off here)."""
    if kind == "nginx":
        return proxies.nginx(tmp_path / "nginx", origin.url.removeprefix("http://"))
    return proxies.squid(upstream=_host_port(origin.url), extra="cache_mem 0 MB")


@pytest.mark.parametrize("kind", ["nginx", "squid"])
@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_damaged_proxy_cache_file_is_caught_by_every_daemon(
    damage: str, kind: str, tmp_path: Path, binary_cache: nixcache.BinaryCache,
    origin: FaultServer,
) -> None:
    _need(kind)
    docs, nar_url = _nar_of(binary_cache, "docs")
    with _disk_proxy(kind, tmp_path, origin) as proxy:
        assert httpx.get(proxy.url + nar_url).status_code == 200  # an earlier node's fetch
        cached, body = _cache_file(proxy, nar_url)
        data = bytearray(cached.read_bytes())
        if damage == "corrupt":
            data[body + (len(data) - body) // 2] ^= 0x40
        else:
            del data[body + (len(data) - body) // 2:]
        cached.write_bytes(bytes(data))
        manual = f"{os.path.basename(docs)}/share/doc/manual.txt"
        # nginx sends what is left of a truncated file, then waits (send_timeout):
        # the daemons' stall timeout ends it; Squid closes the connection.
        with _daemons(tmp_path, proxy.url, binary_cache.key.public_key,
                      "--stall-timeout", "10") as daemons:
            results = _at_once(daemons, lambda d: (d.mnt / manual).read_bytes())
            for d, got in zip(daemons, results, strict=True):
                assert isinstance(got, OSError) and got.errno == errno.EIO, got
                assert os.path.basename(docs) not in d.status()["paths_materialized"]
                # one line for the fault, the read's, naming the path and the cache
                logged = d.log.read_text()
                lines = [ln for ln in logged.splitlines() if os.path.basename(docs) in ln
                         and "WARNING" in ln]
                assert len(lines) == 1 and proxy.url in lines[0], logged[-3000:]
                assert f"lazystore.fs.operations: cannot substitute {docs}: " in lines[0]
    assert origin.count(nar_url) == 1  # the proxy kept serving its damaged copy


GZIP_ORIGIN = """
server {{
    listen 127.0.0.1:{port};
    root {root};
    gzip_static always;   # the .gz next to each file, whatever the client accepts
}}
gzip on;
gzip_types *;
gzip_min_length 0;
"""


def test_a_proxy_that_adds_gzip_is_decoded_and_still_verified(
    tmp_path: Path, binary_cache: nixcache.BinaryCache
) -> None:
    """nginx gzips the narinfos itself (``gzip on``) and its origin serves every
    file gzip-encoded (``gzip_static always``, as NixOS/nix #10275's proxies did):
    the daemons get gzip on NARs and narinfos, undo it and verify the rest."""
    _need("nginx")
    www = tmp_path / "www"
    shutil.copytree(binary_cache.root, www)
    for path in list(www.rglob("*")):
        if path.is_file() and not path.name.endswith(".narinfo"):
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
    port = proxies.free_port()
    extra = GZIP_ORIGIN.format(port=port, root=www)
    expected = {p: _files(p) for p in binary_cache.paths}
    with proxies.nginx(tmp_path / "nginx", f"127.0.0.1:{port}", extra=extra) as proxy, \
            _daemons(tmp_path, proxy.url, binary_cache.key.public_key, count=2) as daemons:
        results = _at_once(daemons, _read_workload(binary_cache.paths))
        assert all(got == expected for got in results)
    log = proxy.access_log()  # both servers' requests; the origin's have no cache status
    sent = [line for line in log if (line.startswith("/nar/") or ".narinfo " in line)
            and line.split()[2] != "-"]
    assert sent and all(line.endswith("enc=gzip") for line in sent), log
    assert any(line.startswith("/nar/") for line in sent)


@pytest.fixture
def no_proxy_env() -> dict[str, str]:
    """This environment without any proxy settings."""
    names = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {k: v for k, v in os.environ.items() if k.lower() not in names}


def test_squid_as_a_forward_proxy_from_http_proxy(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, origin: FaultServer,
    no_proxy_env: dict[str, str],
) -> None:
    """The substituter URL is the origin's own; ``http_proxy`` sends every
    request through Squid (127.0.0.1 included: nothing is bypassed unless
    ``no_proxy`` says so), which fetches each file once."""
    _need("squid")
    expected = {p: _files(p) for p in binary_cache.paths}
    with proxies.squid(forward=True) as proxy:
        env = {**no_proxy_env, "http_proxy": proxy.url}
        with _daemons(tmp_path, origin.url, binary_cache.key.public_key, env=env) as daemons:
            results = _at_once(daemons, _read_workload(binary_cache.paths))
        assert all(got == expected for got in results)
        through = [line for line in proxy.access_log() if line.startswith(origin.url)]
    assert origin.requests and all("squid" in h.get("Via", "")
                                   for h in origin.request_headers)
    assert len(through) > len(origin.requests)  # later daemons were served by Squid
    assert Counter(origin.requests).most_common(1)[0][1] == 1, origin.requests


def test_no_proxy_sends_the_named_hosts_around_the_proxy(
    tmp_path: Path, binary_cache: nixcache.BinaryCache, origin: FaultServer,
    no_proxy_env: dict[str, str],
) -> None:
    _need("squid")
    with proxies.squid(forward=True) as proxy:
        env = {**no_proxy_env, "http_proxy": proxy.url, "no_proxy": "127.0.0.1"}
        with _daemons(tmp_path, origin.url, binary_cache.key.public_key, count=1,
                      env=env) as (d,):
            _read_workload(binary_cache.paths)(d)
        assert not [line for line in proxy.access_log() if line.startswith(origin.url)]
    assert origin.requests and not any("Via" in h for h in origin.request_headers)
