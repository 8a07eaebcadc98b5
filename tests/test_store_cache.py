"""The local cache without FUSE: index, single flight, quota, restart consistency.

The substituter is a fake here (this is the layer below it); the real one is
used by the mount tests.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from lazystore.errors import StoreError
from lazystore.nix.storepath import StorePath
from lazystore.store import index, tree
from lazystore.store.cache import LocalStore
from lazystore.testing import nartree as nar


def base(char: str, name: str) -> str:
    return f"{char * 32}-{name}"


A, B, C, D = base("a", "liba"), base("b", "libb"), base("c", "docs"), base("d", "single")
MISSING = base("f", "missing")


class FakeSubstituters:
    """Serves trees described as {relpath: content}, content being bytes,
    ("exec", bytes), ("link", target) or None (a directory); a path that is
    not a directory is described by its content alone (the NAR's root)."""

    def __init__(self, paths: dict[str, dict[str, Any]], listings: bool = True) -> None:
        self.paths = paths
        self.listings = listings
        self.fetches: list[str] = []
        self.queries: list[str] = []
        self.fail: set[str] = set()
        self.gate: trio.Event | None = None
        self.stats = SimpleNamespace(bytes_downloaded=0, nars_fetched=0)

    async def query(self, path: StorePath) -> Any:
        self.queries.append(path.basename)
        if path.basename not in self.paths:
            return None
        return SimpleNamespace(
            store_path=f"/nix/store/{path.basename}", path=path, nar_size=100, references=[]
        )

    async def listing(self, info: Any) -> dict[str, Any] | None:
        if not self.listings:
            return None
        described = self.paths[info.path.basename]
        if not isinstance(described, dict):
            return {"version": 1, "root": _ls_node(described)}
        root: dict[str, Any] = {"type": "directory", "entries": {}}
        for rel, content in sorted(described.items()):
            node = root
            parts = rel.split("/")
            for part in parts[:-1]:
                node = node["entries"].setdefault(part, {"type": "directory", "entries": {}})
            node["entries"][parts[-1]] = _ls_node(content)
        return {"version": 1, "root": root}

    def expect_index(self, path: Any) -> None:
        pass  # these caches offer no file indexes (see test_store_chunks.py)

    async def index_ahead(self, info: Any, limit: int, whole: int = 0) -> bool:
        return True

    async def file_index(self, info: Any) -> None:
        return None

    async def read_chunks(self, info: Any, index: Any, wanted: Any) -> Any:
        raise AssertionError("no file index was offered")

    async def fetch(self, info: Any, open_sink: Any) -> Any:
        """As the real one: the NAR into a fresh sink, finished once whole."""
        basename = info.path.basename
        self.fetches.append(basename)
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(0)
        if basename in self.fail:
            from lazystore.errors import SubstituterError

            raise SubstituterError(f"{basename}: NAR hash mismatch")
        data = nar.pack(_nar_tree(self.paths[basename]))
        sink = open_sink(info)
        try:
            for start in range(0, len(data), 4096):
                sink.feed(data[start:start + 4096])
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        self.stats.nars_fetched += 1
        return info

    async def closure(self, paths: list[StorePath]) -> list[Any]:
        return [await self.query(p) for p in paths]


def _nar_tree(described: Any) -> nar.Tree:
    """The in-memory NAR tree of a path described as FakeSubstituters takes it."""
    if not isinstance(described, dict):
        return _nar_node(described)
    root = nar.TreeDir()
    for rel, content in described.items():
        node = root
        *dirs, name = rel.split("/")
        for part in dirs:
            node = node.entries.setdefault(os.fsencode(part), nar.TreeDir())  # type: ignore[assignment]
        node.entries.setdefault(os.fsencode(name), _nar_node(content))
    return root


def _nar_node(content: Any) -> nar.Tree:
    if content is None:
        return nar.TreeDir()
    if isinstance(content, tuple) and content[0] == "link":
        return nar.TreeSymlink(os.fsencode(content[1]))
    if isinstance(content, tuple):
        return nar.TreeFile(content[1], executable=True)
    return nar.TreeFile(content)


def _ls_node(content: Any) -> dict[str, Any]:
    if content is None:
        return {"type": "directory", "entries": {}}
    if isinstance(content, tuple) and content[0] == "link":
        return {"type": "symlink", "target": content[1]}
    if isinstance(content, tuple):
        return {"type": "regular", "size": len(content[1]), "executable": True}
    return {"type": "regular", "size": len(content)}


def sample_paths(size: int = 10_000) -> dict[str, dict[str, Any]]:
    return {
        A: {"lib/data": b"hello from liba\n", "lib/link": ("link", "data"), "share": None},
        B: {"big": b"b" * size},
        C: {"share/doc/manual": b"d" * size},
        D: {"x": b"y" * size},
    }


@pytest.fixture
def subs() -> FakeSubstituters:
    return FakeSubstituters(sample_paths())


async def test_lookup_caches_positive_and_negative(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        assert await store.lookup(A) is not None
        assert await store.lookup(A) is not None
        assert await store.lookup(MISSING) is None
        assert await store.lookup(MISSING) is None
        assert await store.lookup("not-a-store-path") is None
    assert subs.queries == [A, MISSING]


async def test_listing_gives_tree_without_fetch(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        node = await store.tree(A)
        assert tree.resolve(node, ("lib", "data")).size == len(b"hello from liba\n")
        assert tree.resolve(node, ("lib", "link")).target == "data"
        assert subs.fetches == []


async def test_no_listing_fetches_for_metadata(tmp_path: Path) -> None:
    subs = FakeSubstituters(sample_paths(), listings=False)
    async with LocalStore(subs, tmp_path) as store:
        node = await store.tree(A)
        assert tree.resolve(node, ("lib", "data")).kind == tree.REGULAR
        assert subs.fetches == [A]


async def test_concurrent_materialize_is_one_fetch(tmp_path: Path, subs: FakeSubstituters) -> None:
    subs.gate = trio.Event()
    results: list[Path] = []
    async with LocalStore(subs, tmp_path) as store:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(lambda: _append(results, store.materialize(B)))
            await trio.sleep(0.05)
            assert store.in_flight == 1
            subs.gate.set()
        assert subs.fetches == [B]
        assert len(results) == 50
        assert (results[0] / "big").read_bytes() == b"b" * 10_000


async def _append(out: list[Any], coro: Any) -> None:
    out.append(await coro)


async def test_failed_fetch_errors_all_waiters_then_retries(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    subs.fail.add(B)
    errors: list[str] = []

    async def reader(store: LocalStore) -> None:
        try:
            await store.materialize(B)
        except StoreError as exc:
            errors.append(str(exc))

    async with LocalStore(subs, tmp_path) as store:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(reader, store)
        assert len(errors) == 10 and "hash mismatch" in errors[0]
        assert subs.fetches == [B]
        assert not (tmp_path / "store" / B).exists()
        subs.fail.clear()
        assert (await store.materialize(B) / "big").read_bytes() == b"b" * 10_000
        assert subs.fetches == [B, B]


async def test_quota_evicts_lru_keeps_pinned(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path, cache_limit=40_000) as store:
        await store.materialize(B)
        store.pin(B)  # an open file
        await trio.sleep(0.01)
        await store.materialize(C)
        await trio.sleep(0.01)
        await store.materialize(D)  # over the limit: C is the oldest unpinned
        status = store.status()
        assert B in status["paths_materialized"] and D in status["paths_materialized"]
        assert C not in status["paths_materialized"]
        assert not (tmp_path / "store" / C).exists()
        assert store.cache_bytes <= 40_000
        # metadata stays; the next read fetches it again, transparently
        assert tree.resolve(store.records[C].tree, ("share", "doc", "manual")).size == 10_000
        data = (await store.materialize(C) / "share/doc/manual").read_bytes()
        assert data == b"d" * 10_000
        assert subs.fetches == [B, C, D, C]
        assert B in store.status()["paths_materialized"]


async def test_evict_skips_pinned(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        await store.materialize(A)
        await store.materialize(B)
        store.pin(A)
        assert await store.evict([]) == [B]
        store.unpin(A)
        assert await store.evict([f"/nix/store/{A}"]) == [A]
        assert store.cache_bytes == 0


async def test_evict_of_a_non_store_path_is_an_error(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    async with LocalStore(subs, tmp_path) as store:
        await store.materialize(A)
        for bad in ("bogus", "/etc/passwd", "../" + A):
            with pytest.raises(StoreError):
                await store.evict([bad])
        assert store.status()["paths_materialized"] == [A]


async def test_index_survives_restart(tmp_path: Path, subs: FakeSubstituters) -> None:
    async with LocalStore(subs, tmp_path) as store:
        await store.materialize(A)
        await store.tree(C)
    async with LocalStore(subs, tmp_path) as store:
        assert store.status()["paths_materialized"] == [A]
        assert store.records[C].tree is not None and not store.records[C].materialized
        await store.tree(C)
        await store.materialize(A)
    assert subs.fetches == [A]


async def test_restart_after_crash_is_consistent(tmp_path: Path, subs: FakeSubstituters) -> None:
    """A crash can leave: a half unpack in tmp/, a path renamed into store/ but
    not yet in the index, an index naming a path whose data is gone."""
    async with LocalStore(subs, tmp_path) as store:
        await store.materialize(A)
        await store.materialize(B)
    (tmp_path / "tmp" / "unpack-half").mkdir()
    (tmp_path / "tmp" / "unpack-half" / "partial").write_bytes(b"xx")
    os.chmod(tmp_path / "tmp" / "unpack-half", 0o555)
    import shutil

    shutil.rmtree(tmp_path / "store" / B)
    async with LocalStore(subs, tmp_path) as other:  # writes D into store/ behind the index
        await other.materialize(D)
        other.records.pop(D)
        await other._save()
    async with LocalStore(subs, tmp_path) as store:
        assert list((tmp_path / "tmp").iterdir()) == []
        assert store.status()["paths_materialized"] == sorted([A, D])
        assert store.cache_bytes == store.records[A].disk_bytes + store.records[D].disk_bytes
        assert (await store.materialize(B) / "big").read_bytes() == b"b" * 10_000


def test_index_roundtrip_and_compression(tmp_path: Path) -> None:
    node = tree.from_listing(
        {"root": {"type": "directory", "entries": {
            f"f{i}": {"type": "regular", "size": i, "executable": i % 2 == 0}
            for i in range(2000)
        } | {"l": {"type": "symlink", "target": "f1"}}}}
    )
    records = {A: index.Record(nar_size=5, references=(B,), tree=node, last_used=3.5)}
    index.save(tmp_path / "index", records)
    data = (tmp_path / "index").read_bytes()
    assert data[:1] == b"L"  # compressed: it pays for a tree like this
    loaded = index.load(tmp_path / "index")
    assert loaded[A].tree == node and loaded[A].references == (B,)


@pytest.mark.allow_log('corrupt cache index')
def test_corrupt_index_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "index").write_bytes(b"Lgarbage")
    assert index.load(tmp_path / "index") == {}


@pytest.mark.parametrize("doc", [
    [], {"root": {"type": "fifo"}}, {"root": {"type": "regular", "size": -1}},
    {"root": {"type": "directory", "entries": {"..": {"type": "regular", "size": 1}}}},
    {"root": {"type": "directory", "entries": {"a/b": {"type": "regular", "size": 1}}}},
    {"root": {"type": "symlink"}},
])
def test_malformed_listing_is_a_store_error(doc: Any) -> None:
    with pytest.raises(StoreError):
        tree.from_listing(doc)


def test_readdir_keys_are_distinct_and_positive() -> None:
    names = [f"name{i}" for i in range(10000)]
    keys = {tree.name_key(n) for n in names}
    assert len(keys) == len(names) and all(0 < k < 2**63 for k in keys)


# Every directory's (readdir key, name) pairs of every tree in a cache dir's index.
_INDEX_KEYS = """
import json, sys
from pathlib import Path
from lazystore.store import index
out = {}
for base, rec in sorted(index.load(Path(sys.argv[1]) / "index").items()):
    stack = [(base, rec.tree)]
    while stack:
        path, node = stack.pop()
        if node.entries is not None:
            out[path] = node.sorted_keys()
            stack.extend((f"{path}/{n}", c) for n, c in node.entries.items())
print(json.dumps(out, sort_keys=True))
"""


async def test_readdir_keys_are_the_same_in_every_process(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    """Readdir offsets outlive the daemon: two other processes (with other
    string hash seeds) reading the same cache dir give every entry the key it
    had in the process that fetched it."""
    async with LocalStore(subs, tmp_path) as store:
        for base in (A, B):
            await store.materialize(base)
        trees = {base: store.records[base].tree for base in (A, B)}
    here: dict[str, Any] = {}
    stack = list(trees.items())
    while stack:
        path, node = stack.pop()
        if node is not None and node.entries is not None:
            here[path] = [list(pair) for pair in node.sorted_keys()]
            stack.extend((f"{path}/{n}", c) for n, c in node.entries.items())
    assert len(here) >= 3  # A, A/lib, A/share, B
    outputs = []
    for seed in ("1", "2"):
        proc = await trio.run_process(
            [sys.executable, "-c", _INDEX_KEYS, str(tmp_path)], capture_stdout=True,
            env=dict(os.environ, PYTHONHASHSEED=seed))
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1] == here


@pytest.mark.allow_log('vanished from the cache directory')
async def test_data_removed_behind_the_daemon_is_fetched_again(
    tmp_path: Path, subs: FakeSubstituters
) -> None:
    from lazystore.nix.fsio import remove_tree as _remove

    async with LocalStore(subs, tmp_path) as store:
        await store.materialize(B)
        _remove(tmp_path / "store" / B)
        assert (await store.materialize(B) / "big").read_bytes() == b"b" * 10_000
        assert subs.fetches == [B, B]
        _remove(tmp_path / "store" / B)
        assert await store.evict([]) == [B]
        assert store.cache_bytes == 0


@pytest.mark.allow_log('cannot write the cache index')
async def test_unwritable_index_is_a_warning_not_a_crash(
    tmp_path: Path, subs: FakeSubstituters, caplog: pytest.LogCaptureFixture
) -> None:
    async with LocalStore(subs, tmp_path) as store:
        (tmp_path / "index").mkdir()  # os.replace onto a directory fails
        await store.materialize(A)
        await store._save()
        assert (await store.materialize(A) / "lib/data").read_bytes() == b"hello from liba\n"
        assert not list(tmp_path.glob(".index.*"))  # no temporary left behind
    assert any("cannot write the cache index" in r.getMessage() for r in caplog.records)


@pytest.mark.allow_log(r"cannot write the cache index .*unexpected error")
async def test_a_save_that_fails_unexpectedly_is_one_error_and_the_store_goes_on(
    tmp_path: Path, subs: FakeSubstituters, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not an OSError: before, this ended the saver task and with it the daemon.
    real_save, attempts = index.save, []

    def broken_save(path: Path, records: dict[str, index.Record]) -> None:
        attempts.append(path)
        raise ValueError("cannot encode this record")

    monkeypatch.setattr("lazystore.store.cache.SAVE_DELAY", 0.01)
    monkeypatch.setattr(index, "save", broken_save)
    async with LocalStore(subs, tmp_path) as store:
        await store.materialize(A)
        def errors() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "cannot write the cache index" in r.getMessage()]

        # The background saver's own attempt runs in a worker thread; its error is
        # logged on the trio side once the thread returns, so wait for the record.
        with trio.fail_after(10):
            while not errors():
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # further attempts (there must be none) would log again
        assert attempts and len(errors()) == 1 and errors()[0].levelname == "ERROR"
        assert errors()[0].exc_info is not None  # with its traceback: it is a bug
        # The saver is still there: the next change is saved once save works again.
        monkeypatch.setattr(index, "save", real_save)
        await store.materialize(B)
        with trio.fail_after(10):
            while not (tmp_path / "index").exists():
                await trio.sleep(0.01)
        assert (await store.materialize(A) / "lib/data").read_bytes() == b"hello from liba\n"
    assert set(index.load(tmp_path / "index")) >= {A, B}


DEEP = "/".join(["d"] * 600) + "/f"  # deeper than the index (msgpack) could hold


async def test_too_deep_a_tree_is_refused_and_removed(tmp_path: Path) -> None:
    subs = FakeSubstituters({A: {DEEP: b"x"}, B: {"/".join(["d"] * 150) + "/f": b"y"}},
                            listings=False)
    async with LocalStore(subs, tmp_path) as store:
        with pytest.raises(StoreError, match="deeper than"):
            await store.materialize(A)
        assert not store.data_path(A).exists()
        assert store.cache_bytes == 0
        assert (await store.materialize(B)).is_dir()  # a deep but reasonable tree is kept


async def test_too_deep_a_tree_found_at_start_is_removed(tmp_path: Path) -> None:
    deep = tmp_path / "store" / A / DEEP
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"x")
    async with LocalStore(FakeSubstituters(sample_paths()), tmp_path) as store:
        assert not (tmp_path / "store" / A).exists()
        assert not store.records.get(A) or not store.records[A].materialized


# Store paths whose NAR root is not a directory (nix-store --add FILE, writeText,
# writeScript, a symlink): the listing hint, the verified tree and the data.
TEXT, SCRIPT, EMPTY, LINK = (
    base("g", "text"), base("h", "script"), base("i", "empty"), base("j", "link"))
ROOTS: dict[str, Any] = {
    TEXT: b"some text\n", SCRIPT: ("exec", b"#!/bin/sh\necho hi\n"), EMPTY: b"",
    LINK: ("link", "/nix/store/somewhereelse"),  # dangling here, as in most caches
}


async def test_file_and_symlink_roots_are_materialised_as_files_and_symlinks(
    tmp_path: Path,
) -> None:
    subs = FakeSubstituters(ROOTS)
    async with LocalStore(subs, tmp_path) as store:
        hints = {b: await store.tree(b) for b in ROOTS}
        assert subs.fetches == []
        assert hints[TEXT] == tree.Node(tree.REGULAR, size=10)
        assert hints[SCRIPT] == tree.Node(tree.REGULAR, size=18, executable=True)
        assert hints[EMPTY] == tree.Node(tree.REGULAR)
        assert hints[LINK] == tree.Node(tree.SYMLINK, target="/nix/store/somewhereelse")
        for b in ROOTS:
            path = await store.materialize(b)
            assert path == tmp_path / "store" / b
            assert store.records[b].tree_verified and store.records[b].tree == hints[b]
        assert (tmp_path / "store" / TEXT).read_bytes() == b"some text\n"
        assert os.access(tmp_path / "store" / SCRIPT, os.X_OK)
        assert os.readlink(tmp_path / "store" / LINK) == "/nix/store/somewhereelse"
        # materialised again: a hit, even for a symlink whose target does not exist
        await store.materialize(LINK)
        assert subs.fetches == list(ROOTS) and store.hits == 1
        assert sorted(store.status()["paths_materialized"]) == sorted(ROOTS)
    async with LocalStore(subs, tmp_path) as store:  # the index and store/ agree
        assert sorted(store.status()["paths_materialized"]) == sorted(ROOTS)
        assert {b: store.records[b].tree for b in ROOTS} == hints
        assert sorted(await store.evict([])) == sorted(ROOTS)
        assert store.cache_bytes == 0 and list((tmp_path / "store").iterdir()) == []
        assert (await store.materialize(TEXT)).read_bytes() == b"some text\n"


async def test_file_and_symlink_roots_found_at_start_are_adopted(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / TEXT).write_bytes(b"some text\n")
    (tmp_path / "store" / LINK).symlink_to("/nix/store/somewhereelse")
    subs = FakeSubstituters(ROOTS)
    async with LocalStore(subs, tmp_path) as store:
        assert sorted(store.status()["paths_materialized"]) == sorted([TEXT, LINK])
        target = "/nix/store/somewhereelse"
        assert store.records[LINK].tree == tree.Node(tree.SYMLINK, target=target)
        assert store.records[TEXT].tree == tree.Node(tree.REGULAR, size=10)
        await store.materialize(LINK)
        assert subs.fetches == []


async def test_quota_evicts_file_roots(tmp_path: Path) -> None:
    subs = FakeSubstituters({TEXT: b"t" * 20_000, SCRIPT: ("exec", b"s" * 20_000)})
    async with LocalStore(subs, tmp_path, cache_limit=30_000) as store:
        await store.materialize(TEXT)
        await trio.sleep(0.01)
        await store.materialize(SCRIPT)
        assert store.status()["paths_materialized"] == [SCRIPT]
        assert not os.path.lexists(tmp_path / "store" / TEXT)
        assert 0 < store.cache_bytes <= 30_000


async def test_names_and_targets_that_are_not_utf8_survive_the_index(tmp_path: Path) -> None:
    # NAR names and targets are bytes; Python holds them surrogate-escaped, which
    # msgpack cannot write as a string (it ended the daemon at its next index save).
    odd = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    subs = FakeSubstituters({A: {odd: b"x", "l": ("link", odd), "ünï": b"y"},
                             LINK: ("link", odd)}, listings=False)
    async with LocalStore(subs, tmp_path) as store:
        await store.materialize(A)
        await store.materialize(LINK)
        trees = {b: store.records[b].tree for b in (A, LINK)}
        await store._save()
    loaded = index.load(tmp_path / "index")
    assert {b: loaded[b].tree for b in (A, LINK)} == trees
    assert tree.resolve(trees[A], ("l",)).target == odd and odd in trees[A].entries


def test_index_load_removes_temporaries_of_killed_saves(tmp_path: Path) -> None:
    from lazystore.store import index

    path = tmp_path / "index"
    index.save(path, {})
    stale = tmp_path / ".index.4242.tmp"  # a save killed before its rename
    stale.write_bytes(b"partial")
    assert index.load(path) == {}
    assert not stale.exists() and path.exists()
