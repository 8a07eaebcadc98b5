"""Store paths of every root type a NAR allows (directory, regular file,
executable, empty file, symlink) through a real FUSE mount, compared with what
real Nix shows in /nix/store and what ``nix-store --restore`` makes of the
same NAR: Nix-built paths, the conformance NARs and random roots."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazystore.testing import nartree, nixcache
from lazystore.testing.daemon import LAZYSTORE, Daemon, fuse_missing
from lazystore.testing.daemon import lazystore_mount as support_mount
from lazystore.testing.httpserver import serve_directory
from lazystore.testing.nartree import TreeDir, TreeFile, TreeSymlink

pytestmark = pytest.mark.root

Snapshot = dict[str, tuple[Any, ...]]


def _need_fuse() -> None:
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)


def snapshot(root: Path, contents: bool = True) -> Snapshot:
    """Every object at and below *root*, symlinks not followed: relative path ->
    (kind, permission bits, mtime, size, contents or target). Directory sizes
    are left out: they are the file system's, not the store path's. Without
    *contents*: what stat and readdir tell (no open, no readlink)."""
    out: Snapshot = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        path = root / rel
        st_ = os.lstat(path)
        head = (stat.S_IMODE(st_.st_mode), int(st_.st_mtime))
        if stat.S_ISDIR(st_.st_mode):
            out[rel] = ("d", *head)
            stack.extend(f"{rel}/{n}" if rel else n for n in os.listdir(path))
        elif stat.S_ISLNK(st_.st_mode):
            out[rel] = ("l", *head, st_.st_size, *([os.readlink(path)] if contents else []))
        else:
            assert stat.S_ISREG(st_.st_mode), path
            out[rel] = ("r", *head, st_.st_size, *([path.read_bytes()] if contents else []))
    return out


def shape(snap: Snapshot) -> Snapshot:
    """What a NAR says of a snapshot: kinds, executable bits, contents and
    targets (``nix-store --restore`` leaves modes to the umask and mtimes to now)."""
    out: Snapshot = {}
    for rel, (kind, mode, _mtime, *rest) in snap.items():
        if kind == "d":
            out[rel] = ("d",)
        elif kind == "l":
            out[rel] = ("l", rest[1])
        else:
            out[rel] = ("r", bool(mode & 0o100), rest[1])
    return out


def nar_requests(server: Any) -> list[str]:
    return [r for r in server.requests if r.startswith("/nar/")]


def by_name(paths: list[str], name: str) -> str:
    return next(os.path.basename(p) for p in paths if p.endswith(f"-{name}"))


def add_nar(data: bytes, work: Path, name: str) -> tuple[str, Path]:
    """Restore NAR *data* with ``nix-store --restore`` into ``work/name``, add that
    to the store (``nix-store --add``); returns (store path, restored tree). The
    store path's NAR is checked to be *data* byte for byte."""
    restored = work / name
    nixcache.run_nix("nix-store", "--restore", restored, input=data)
    path = nixcache.run_nix("nix-store", "--add", restored).decode().strip()
    assert nixcache.run_nix("nix-store", "--dump", path) == data
    return path, restored


def copy_to_cache(paths: list[str], dest: Path, key: nixcache.KeyPair) -> None:
    """Sign *paths* and ``nix copy`` them into the file:// cache *dest* (.ls included)."""
    nixcache.run_nix("nix", "store", "sign", "--key-file", key.secret_file, *paths)
    nixcache.run_nix("nix", "copy", "--to",
                     f"file://{dest}?compression=zstd&write-nar-listing=true", *paths)


# -- Nix-built store paths: writeText, writeScript, empty file, symlinks -------


def test_every_root_type_reads_through_the_mount_as_in_the_nix_store(
    tmp_path: Path, roots_cache: nixcache.BinaryCache
) -> None:
    _need_fuse()
    paths = roots_cache.paths
    bases = [os.path.basename(p) for p in paths]
    text, script = by_name(paths, "greeting.txt"), by_name(paths, "greet-script")
    empty, link = by_name(paths, "empty-file"), by_name(paths, "greeting-link")
    dir_link = by_name(paths, "liba-link")
    shutil.copytree(roots_cache.root, tmp_path / "www")
    with serve_directory(tmp_path / "www") as server, support_mount(
        tmp_path, server.url, roots_cache.key.public_key  # type: ignore[attr-defined]
    ) as d:
        mnt = d.mnt
        # stat and readdir come from the .ls listings (a file root's included)
        expected_modes = {text: stat.S_IFREG | 0o444, script: stat.S_IFREG | 0o555,
                          empty: stat.S_IFREG | 0o444, link: stat.S_IFLNK | 0o777,
                          dir_link: stat.S_IFLNK | 0o777}
        for base, mode in expected_modes.items():
            st_ = os.lstat(mnt / base)
            assert st_.st_mode == mode, base
            assert st_.st_size == os.lstat(f"/nix/store/{base}").st_size, base
        assert nar_requests(server) == []
        assert set(expected_modes) <= set(os.listdir(mnt))  # the paths looked up
        # contents, modes, mtimes and targets exactly as in /nix/store
        for base in bases:
            assert snapshot(mnt / base) == snapshot(Path("/nix/store") / base), base
        # the cache holds each path as what it is, in <cache>/store/<basename>
        for base in bases:
            cached = os.lstat(d.cache / "store" / base)
            assert stat.S_IFMT(cached.st_mode) == stat.S_IFMT(
                os.lstat(f"/nix/store/{base}").st_mode), base
        # exec: the script root directly, and a program using every root type
        # with the mount as /nix/store (so nothing comes from the host's store)
        out = subprocess.run([mnt / script], capture_output=True, timeout=60, check=True)
        assert out.stdout == b"hello from a script path\n"
        prog = f"{roots_cache.top}/bin/prog"
        shell = f"mount --bind {mnt} /nix/store && exec {prog}"
        out = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout == (b"hello from a text path\n" * 2 + b"hello from liba\n"
                              b"hello from a script path\n0\n")
        status = d.status()
        assert set(expected_modes) <= set(status["paths_materialized"])
        text_status = subprocess.run(
            [LAZYSTORE, "status", "--control-socket", str(d.sock)],
            capture_output=True, text=True, check=True).stdout
        assert all(base in text_status for base in expected_modes)
        # evicted and read again: fetched again, the same
        evicted = d.call("evict", paths=[f"/nix/store/{b}" for b in expected_modes])
        assert sorted(evicted["evicted"]) == sorted(expected_modes)
        assert not any(os.path.lexists(d.cache / "store" / b) for b in expected_modes)
        assert d.status()["cache_bytes"] < status["cache_bytes"]
        # prefetched: in the cache again without a read
        d.call("prefetch", paths=[f"/nix/store/{b}" for b in expected_modes])
        assert set(expected_modes) <= set(d.status()["paths_materialized"])
        assert d.status()["cache_bytes"] == status["cache_bytes"]
        for base in expected_modes:
            assert snapshot(mnt / base) == snapshot(Path("/nix/store") / base), base
    log = d.log.read_text()
    assert "disagrees" not in log and "ignoring the listing" not in log


# -- the conformance NARs, and NARs of the root types they lack ----------------

CONFORMANCE_NARS = {  # store path name -> file under ../shared/conformance
    "one-byte": "nix/nars/regular-one-byte-zero-padding.nar",  # regular root
    "helloworld": "snix/helloworld.nar",  # regular root
    "symlink": "snix/symlink.nar",  # symlink root (dangling)
    "complicated": "snix/complicated.nar",  # directory
    "simple": "nix/fuzz-nars/simple.nar",  # directory: empty file, subdir, symlink
    "empty-dir": "nix/fuzz-nars/empty-dir.nar",  # empty directory root
}
PACKED_NARS = {  # root types no conformance NAR has
    "exec-root": TreeFile(b"#!/bin/sh\necho exec root\n", executable=True),
    "empty-root": TreeFile(b""),
    "empty-exec-root": TreeFile(b"", executable=True),
    "relative-link": TreeSymlink(b"../some/where"),
}


def test_conformance_nars_of_every_root_type_read_as_nix_restores_them(
    tmp_path: Path, conformance: Path, test_key: nixcache.KeyPair
) -> None:
    _need_fuse()
    nars = {name: (conformance / rel).read_bytes() for name, rel in CONFORMANCE_NARS.items()}
    nars |= {name: nartree.pack(tree) for name, tree in PACKED_NARS.items()}
    (tmp_path / "restored").mkdir()
    added = {name: add_nar(data, tmp_path / "restored", name) for name, data in nars.items()}
    kinds = {stat.S_IFMT(os.lstat(path).st_mode) for path, _ in added.values()}
    assert kinds == {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK}
    copy_to_cache([path for path, _ in added.values()], tmp_path / "www", test_key)
    with serve_directory(tmp_path / "www") as server, support_mount(
        tmp_path / "d", server.url, test_key.public_key  # type: ignore[attr-defined]
    ) as d:
        for name, (path, restored) in added.items():
            through_mount = snapshot(d.mnt / os.path.basename(path))
            assert through_mount == snapshot(Path(path)), name
            assert shape(through_mount) == shape(snapshot(restored)), name
    helloworld = Path(added["helloworld"][0]).name
    assert (d.cache / "store" / helloworld).read_bytes() == b"Hello World!"


# -- random roots ---------------------------------------------------------------

names = st.binary(min_size=1, max_size=12).filter(  # bytes, as in a NAR: UTF-8 or not
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
targets = st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)
leaves = st.one_of(
    st.builds(TreeFile, st.binary(max_size=300), st.booleans()),
    st.builds(TreeSymlink, targets),
)
roots = st.recursive(  # a leaf is a whole store path as often as a directory is
    leaves,
    lambda children: st.builds(
        TreeDir, st.dictionaries(names, children, max_size=4)),
    max_leaves=12,
)


class RandomStore:
    """One daemon over one cache that each example adds its store path to."""

    def __init__(self, work: Path, key: nixcache.KeyPair) -> None:
        self.work, self.key = work, key
        self.daemon: Daemon | None = None
        self.server: Any = None
        self.count = 0

    def add(self, tree: nartree.Tree) -> tuple[str, Path]:
        self.count += 1
        restored = self.work / f"r{self.count}"
        restored.mkdir()
        path, tree_dir = add_nar(nartree.pack(tree), restored, "random-root")
        copy_to_cache([path], self.work / "www", self.key)
        return path, tree_dir


@pytest.fixture(scope="module")
def random_store(
    tmp_path_factory: pytest.TempPathFactory, test_key: nixcache.KeyPair
) -> Iterator[RandomStore]:
    _need_fuse()
    work = tmp_path_factory.mktemp("random-roots")
    store = RandomStore(work, test_key)
    store.add(TreeFile(b"first\n"))  # the cache exists before the daemon starts
    with serve_directory(work / "www") as server, support_mount(
        work / "d", server.url, test_key.public_key  # type: ignore[attr-defined]
    ) as d:
        store.daemon, store.server = d, server
        yield store
    log = d.log.read_text()
    assert "disagrees" not in log and "ignoring the listing" not in log


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=roots)
def test_random_roots_read_through_the_mount_as_nix_restores_them(
    random_store: RandomStore, tree: nartree.Tree
) -> None:
    path, restored = random_store.add(tree)
    assert random_store.daemon is not None
    mounted = random_store.daemon.mnt / os.path.basename(path)
    before = len(nar_requests(random_store.server))
    # stat and readdir from the listing Nix wrote (raw bytes where a name is not UTF-8)
    assert snapshot(mounted, contents=False) == snapshot(Path(path), contents=False)
    assert len(nar_requests(random_store.server)) == before
    through_mount = snapshot(mounted)
    assert through_mount == snapshot(Path(path))
    assert shape(through_mount) == shape(snapshot(restored))
