"""Access profiles: the recorder, the JSON document, and the checks a profile
read back passes (untrusted input); the daemon's handling of one in a view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from lazystore import profile
from lazystore.daemon.operations import ControlOperations
from lazystore.errors import ControlError
from lazystore.fs.vfs import Vfs
from lazystore.store.cache import LocalStore
from tests.test_store_cache import A, B, C, FakeSubstituters, sample_paths


def test_recorder_keeps_first_reads_in_order_within_the_window() -> None:
    rec = profile.Recorder(window=10.0)
    rec.read(B, "bin/x", 5, now=100.0)
    rec.read(A, "lib/y", 7, now=101.0)
    rec.read(B, "bin/x", 5, now=102.0)  # again: not a first read
    rec.read(C, "z", 1, now=111.0)  # after the window
    doc = rec.document()
    assert doc["reads"] == [{"path": B, "file": "bin/x", "size": 5, "at": 0.0},
                            {"path": A, "file": "lib/y", "size": 7, "at": 1.0}]
    assert profile.parse(profile.dumps(doc)).paths == [B, A]


def test_paths_outside_the_closure_are_ignored_and_named() -> None:
    rec = profile.Recorder()
    for i, base in enumerate([A, C, B, C]):
        rec.read(base, f"f{i}", 1, now=float(i))
    read = profile.parse(profile.dumps(rec.document()), closure={A, B})
    assert read.paths == [A, B] and read.ignored == [C]


@pytest.mark.parametrize(("data", "message"), [
    (b"x" * (profile.MAX_BYTES + 1), "more than 10485760"),
    (b"{not json", "not JSON"),
    (b'{"lazystore-profile": 2, "reads": []}', "not a lazystore profile of version 1"),
    (b'{"lazystore-profile": 1}', "no list of reads"),
    (json.dumps({"lazystore-profile": 1, "reads": [
        {"path": "../etc", "file": "", "size": 1, "at": 0}]}).encode(), "read 0 of the profile"),
    (json.dumps({"lazystore-profile": 1, "reads": [
        {"path": A, "file": "", "size": -1, "at": 0}]}).encode(), "read 0 of the profile"),
])
def test_a_bad_profile_is_one_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(profile.ProfileError, match=message):
        profile.parse(data)


def _profile_of(*bases: str) -> str:
    rec = profile.Recorder()
    for i, base in enumerate(bases):
        rec.read(base, "f", 1, now=float(i))
    return profile.dumps(rec.document()).decode()


@pytest.mark.allow_log(r"view v's profile names 1 store paths outside its closure, ignored: "
                       + C)
async def test_a_views_profile_fetches_its_paths_in_order_and_nothing_else(
        tmp_path: Path) -> None:
    subs = FakeSubstituters(sample_paths())
    async with LocalStore(subs, tmp_path) as store:
        ops = ControlOperations(store, Vfs(store), "/mnt", [])
        await ops.handle("view_create", {"id": "v", "paths": [A, B], "closure_info": None,
                                         "prefetch": [B, C, A, B]})
        with trio.fail_after(10):
            while not all(store.records.get(b) and store.records[b].materialized
                          for b in (A, B)):
                await trio.sleep(0.01)
        asked = [(e.path, e.view) for e in store.events.since(0, 100) if e.kind == "profile"]
        assert asked == [(B, "v"), (A, "v")]
        assert C not in store.records  # outside the view: never asked for


async def test_prefetch_profile_refuses_a_profile_too_large(tmp_path: Path) -> None:
    async with LocalStore(FakeSubstituters(sample_paths()), tmp_path) as store:
        ops = ControlOperations(store, Vfs(store), "/mnt", [])
        with pytest.raises(ControlError, match="more than 10485760"):
            await ops.handle("prefetch_profile", {"profile": " " * (profile.MAX_BYTES + 1)})
        result = await ops.handle("prefetch_profile", {"profile": _profile_of(C, A)})
        assert result == {"fetched": [C, A], "ignored": []}
        assert store.records[C].materialized and store.records[A].materialized


async def test_background_fetch_brings_the_rest_of_a_view_after_its_profile(
        tmp_path: Path) -> None:
    async with LocalStore(FakeSubstituters(sample_paths()), tmp_path) as store:
        ops = ControlOperations(store, Vfs(store), "/mnt", [], background_fetch=True)
        await ops.handle("view_create", {"id": "v", "paths": [A, B, C], "closure_info": None,
                                         "prefetch": [C]})
        with trio.fail_after(10):
            while not all(store.records.get(b) and store.records[b].materialized
                          for b in (A, B, C)):
                await trio.sleep(0.01)
        asked = [e.path for e in store.events.since(0, 100) if e.kind == "profile"]
        assert asked[0] == C and sorted(asked[1:]) == sorted([A, B])  # the profile first
