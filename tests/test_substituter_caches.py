"""Substituters against binary caches written and signed by real Nix, served
as file:// and by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from lazystore.cli.fetch import unpack_into
from lazystore.nix.storepath import StorePath
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig
from lazystore.substituter.errors import NotAvailableError, SubstituterError
from lazystore.testing import nixcache
from lazystore.testing.httpserver import serve_directory
from tests.support.faultserver import Fault, FaultServer


def test_config(urls: list[str], key: str, **overrides: object) -> SubstituterConfig:
    values: dict[str, object] = dict(
        urls=urls, trusted_public_keys=[key], netrc_file=None, attempts=3,
        backoff_base=0.01, backoff_max=0.05, connect_timeout=5.0, stall_timeout=5.0)
    values.update(overrides)
    return SubstituterConfig(**values)  # type: ignore[arg-type]


test_config.__test__ = False  # type: ignore[attr-defined]


def nix_hash_path(path: Path) -> str:
    """``nix hash path`` of *path* as ``sha256:<nix32>`` (Nix 2.8 prints it bare)."""
    digest = nixcache.nar_hash(str(path))
    return digest if digest.startswith("sha256:") else f"sha256:{digest}"


@pytest.fixture(scope="module", params=["xz", "zstd", "none", "bzip2", "br"])
def nix_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              sample_closure: str, test_key: nixcache.KeyPair) -> nixcache.BinaryCache:
    root = tmp_path_factory.mktemp(f"cache-{request.param}")
    return nixcache.make_cache(sample_closure, root, test_key, compression=request.param)


@pytest.fixture(params=["file", "http"])
def cache_url(request: pytest.FixtureRequest, nix_cache: nixcache.BinaryCache) -> Iterator[str]:
    if request.param == "file":
        yield nix_cache.url
    else:
        with serve_directory(nix_cache.root) as server:
            yield server.url  # type: ignore[attr-defined]


async def test_closure_fetched_from_real_nix_cache_hashes_to_nar_hash(
        nix_cache: nixcache.BinaryCache, cache_url: str, tmp_path: Path) -> None:
    assert len(nix_cache.paths) >= 4
    top = StorePath.parse(nix_cache.top)
    dest, tmp = tmp_path / "store", tmp_path / "tmp"
    dest.mkdir()
    tmp.mkdir()
    config = test_config([cache_url], nix_cache.key.public_key)
    async with Substituters(config) as subs:
        infos = await subs.closure([top])
        assert sorted(i.store_path for i in infos) == sorted(nix_cache.paths)
        assert infos[0].store_path == nix_cache.top  # breadth-first from the root
        for info in infos:
            await subs.fetch(info.path, unpack_into(dest / info.path.basename, tmp))
        assert subs.stats.nars_fetched == len(infos)
        assert subs.stats.bytes_downloaded > 0
    for info in infos:
        fetched = dest / info.path.basename
        assert nix_hash_path(fetched) == str(info.nar_hash)
        assert nix_hash_path(Path(info.store_path)) == str(info.nar_hash)  # Nix's own copy
    assert list(tmp.iterdir()) == []


async def test_listing_is_the_ls_document(binary_cache: nixcache.BinaryCache,
                                          http_cache: str) -> None:
    top = StorePath.parse(binary_cache.top)
    async with Substituters(test_config([http_cache], binary_cache.key.public_key)) as subs:
        listing = await subs.listing(top)
    assert listing is not None and listing["version"] == 1
    assert listing["root"]["type"] in ("directory", "regular", "symlink")


async def test_absent_path_is_none_and_not_retried(binary_cache: nixcache.BinaryCache) -> None:
    """The store keeps negative answers (test_store_substituter); here each
    lookup asks once."""
    absent = StorePath("0" * 32, "absent")
    with serve_directory(binary_cache.root) as server:
        config = test_config([server.url], binary_cache.key.public_key)  # type: ignore[attr-defined]
        async with Substituters(config) as subs:
            assert await subs.query(absent) is None
            assert await subs.query(absent) is None
            assert await subs.listing(absent) is None
        requests = server.requests  # type: ignore[attr-defined]
    assert requests.count(f"/{'0' * 32}.narinfo") == 3
    assert requests.count("/nix-cache-info") == 1


async def test_query_with_a_wrong_name_is_absent(binary_cache: nixcache.BinaryCache) -> None:
    real = StorePath.parse(binary_cache.top)
    async with Substituters(test_config([binary_cache.url], binary_cache.key.public_key)) as s:
        assert await s.query(StorePath(real.hash_part, "other-name")) is None
        assert (await s.query(real)) is not None


async def test_priority_orders_substituters_stably(
        binary_cache: nixcache.BinaryCache, tmp_path_factory: pytest.TempPathFactory,
        sample_closure: str, test_key: nixcache.KeyPair) -> None:
    second = nixcache.make_cache(sample_closure, tmp_path_factory.mktemp("prio"), test_key)
    (second.root / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 10\n")
    top = StorePath.parse(binary_cache.top)
    with serve_directory(binary_cache.root) as first_server, \
            serve_directory(second.root) as second_server:
        urls = [first_server.url, second_server.url]  # type: ignore[attr-defined]
        async with Substituters(test_config(urls, test_key.public_key)) as subs:
            ordered = [c.url for c in await subs.substituters()]
            info = await subs.query(top)
        assert ordered == [urls[1], urls[0]]
        assert info is not None and info.substituter == urls[1]  # type: ignore[attr-defined]


@pytest.fixture
def two_caches(binary_cache: nixcache.BinaryCache, tmp_path: Path, sample_closure: str,
               test_key: nixcache.KeyPair) -> Path:
    """One directory holding two caches of the sample closure: worse/ (priority
    50) and best/ (priority 10), so one fault server can hold both's requests."""
    shutil.copytree(binary_cache.root, tmp_path / "worse")
    nixcache.make_cache(sample_closure, tmp_path / "best", test_key)
    (tmp_path / "best" / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 10\n")
    return tmp_path


async def test_every_substituter_is_asked_at_once(
        binary_cache: nixcache.BinaryCache, two_caches: Path, test_key: nixcache.KeyPair) -> None:
    # Each narinfo is held until both are held: asked one after another, the
    # query would wait for the gather's 60 s timeout.
    top = StorePath.parse(binary_cache.top)
    with FaultServer(two_caches) as server:
        for cache in ("worse", "best"):
            server.always(f"/{cache}/{top.hash_part}.narinfo", Fault.gather(2))
        urls = [f"{server.url}/worse", f"{server.url}/best"]
        async with Substituters(test_config(urls, test_key.public_key)) as subs:
            with trio.fail_after(30):
                info = await subs.query(top)
        assert server.most_held == 2
        assert info is not None and info.substituter == urls[1]  # type: ignore[attr-defined]
        for cache in ("worse", "best"):
            assert server.count(f"/{cache}/{top.hash_part}.narinfo") == 1


async def test_the_best_priority_wins_when_it_answers_last(
        binary_cache: nixcache.BinaryCache, two_caches: Path, test_key: nixcache.KeyPair) -> None:
    top = StorePath.parse(binary_cache.top)
    with FaultServer(two_caches) as server:
        server.always(f"/best/{top.hash_part}.narinfo", Fault.delay(0.5))
        urls = [f"{server.url}/worse", f"{server.url}/best"]
        async with Substituters(test_config(urls, test_key.public_key)) as subs:
            info = await subs.query(top)
        assert info is not None and info.substituter == urls[1]  # type: ignore[attr-defined]


async def test_substituters_ranked_below_a_held_answer_are_not_asked(
        binary_cache: nixcache.BinaryCache, two_caches: Path, test_key: nixcache.KeyPair) -> None:
    top = StorePath.parse(binary_cache.top)
    with FaultServer(two_caches) as server:
        urls = [f"{server.url}/worse", f"{server.url}/best"]
        async with Substituters(test_config(urls, test_key.public_key)) as subs:
            assert await subs.query(top) is not None
            assert await subs.query(top) is not None  # the best's answer is held
        for cache in ("worse", "best"):  # the first query asked both, the second none
            assert server.count(f"/{cache}/{top.hash_part}.narinfo") == 1


@pytest.mark.allow_log('is a binary cache for store /gnu/store, not /nix/store')
async def test_store_dir_mismatch_is_a_clear_error(
        tmp_path: Path, binary_cache: nixcache.BinaryCache,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "nix-cache-info").write_text("StoreDir: /gnu/store\n")
    top = StorePath.parse(binary_cache.top)
    async with Substituters(test_config([f"file://{tmp_path}"],
                                        binary_cache.key.public_key)) as subs:
        with pytest.raises(NotAvailableError,
                           match="binary cache for store /gnu/store, not /nix/store"):
            await subs.query(top)
        with pytest.raises(SubstituterError, match="/gnu/store"):
            await subs.fetch(top, unpack_into(tmp_path / "dest", tmp_path))
    assert not (tmp_path / "dest").exists()
    assert any("/gnu/store" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")


async def test_untrusted_key_config_is_rejected() -> None:
    with pytest.raises(SubstituterError, match="trusted public key"):
        Substituters(test_config(["file:///x"], "not-a-key"))


async def test_unsupported_scheme_is_rejected() -> None:
    with pytest.raises(SubstituterError, match="unsupported URL scheme 's3'"):
        async with Substituters(test_config(["s3://bucket"], nixcache.KEY_NAME + ":" + "A" * 43
                                            + "=")):
            pass


@pytest.mark.parametrize(("url", "message"), [
    ("http://[::1", "invalid URL"), ("http://", "no host name"),
    ("https://cache.example:99999", "invalid URL")])
async def test_malformed_url_is_one_clear_error(url: str, message: str) -> None:
    with pytest.raises(SubstituterError, match=f"substituter .*: {message}"):
        async with Substituters(test_config([url], nixcache.KEY_NAME + ":" + "A" * 43 + "=")):
            pass


async def test_credentials_in_a_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(SubstituterError, match="use a netrc file") as caught:
        async with Substituters(test_config(["https://alice:s3cret@cache.example"],
                                            nixcache.KEY_NAME + ":" + "A" * 43 + "=")):
            pass
    assert "s3cret" not in str(caught.value) and "alice" not in str(caught.value)


@pytest.mark.allow_log('is unreachable')
async def test_missing_cache_folder_is_an_error_not_an_empty_cache(
        binary_cache: nixcache.BinaryCache, tmp_path: Path) -> None:
    top = StorePath.parse(binary_cache.top)
    config = test_config([(tmp_path / "absent").as_uri()], binary_cache.key.public_key)
    async with Substituters(config) as subs:
        with pytest.raises(NotAvailableError, match="absent: no such directory"):
            await subs.query(top)


async def test_positive_narinfo_answers_expire_after_their_ttl(
        binary_cache: nixcache.BinaryCache, tmp_path: Path,
        autojump_clock: trio.testing.MockClock) -> None:
    root = tmp_path / "cache"
    shutil.copytree(binary_cache.root, root)
    liba = StorePath.parse(next(p for p in binary_cache.paths if p.endswith("-liba")))
    narinfo = root / f"{liba.hash_part}.narinfo"
    config = test_config([f"file://{root}"], binary_cache.key.public_key, positive_ttl=100.0)
    async with Substituters(config) as subs:
        assert await subs.query(liba) is not None
        narinfo.unlink()
        await trio.sleep(50)
        assert await subs.query(liba) is not None  # the positive answer is cached
        await trio.sleep(51)
        assert await subs.query(liba) is None
