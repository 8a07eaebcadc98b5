"""`--layered N`: grouping (pure) and classic images holding the real bytes."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazystore.errors import ImageError
from lazystore.image.build import build_image
from lazystore.image.closure import PathInfo
from lazystore.image.layered import group_layers, popularity
from lazystore.image.oci import OciArchive, RuntimeConfig
from lazystore.testing import nixcache


def _p(name: str) -> str:
    return f"/nix/store/{'a' * 32}-{name}"


def _graph(edges: dict[str, list[str]], sizes: dict[str, int] | None = None) -> list[PathInfo]:
    sizes = sizes or {}
    return [PathInfo(_p(k), sizes.get(k, 1), tuple(_p(r) for r in v)) for k, v in edges.items()]


# app -> libx -> libc ; app -> libc ; tool -> libc ; app -> data
GRAPH = {
    "app": ["libx", "libc", "data"],
    "libx": ["libc"],
    "libc": [],
    "tool": ["libc"],
    "data": [],
}


def test_popularity_counts_transitive_dependents() -> None:
    pop = popularity(_graph(GRAPH))
    assert pop == {_p("libc"): 3, _p("libx"): 1, _p("data"): 1, _p("app"): 0, _p("tool"): 0}


def test_one_layer_per_path_while_they_fit() -> None:
    groups = group_layers(_graph(GRAPH, {"data": 50}), 5)
    assert groups == [[_p("libc")], [_p("data")], [_p("libx")], [_p("app")], [_p("tool")]]
    assert group_layers(_graph(GRAPH), 9) == group_layers(_graph(GRAPH), 5)


def test_least_popular_and_smallest_are_merged() -> None:
    sizes = {"app": 10, "tool": 5, "libx": 100, "data": 1, "libc": 7}
    groups = group_layers(_graph(GRAPH, sizes), 3)
    # libc is the most popular; of libx and data (popularity 1) libx is larger.
    assert groups == [[_p("libc")], [_p("libx")], sorted([_p("app"), _p("data"), _p("tool")])]
    assert group_layers(_graph(GRAPH, sizes), 1) == [sorted(_p(k) for k in GRAPH)]


def test_group_layers_rejects_zero() -> None:
    with pytest.raises(ImageError, match="at least 1"):
        group_layers(_graph(GRAPH), 0)


@st.composite
def closures(draw: st.DrawFn) -> list[PathInfo]:
    n = draw(st.integers(1, 25))
    names = [f"p{i}" for i in range(n)]
    edges = {  # references only to earlier paths: a DAG, as in a real store
        name: draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
        for i, name in enumerate(names)
    }
    sizes = {name: draw(st.integers(0, 10**9)) for name in names}
    return _graph(edges, sizes)


@given(closures(), st.integers(1, 30))
def test_grouping_respects_n_and_places_every_path_once(infos: list[PathInfo], n: int) -> None:
    groups = group_layers(infos, n)
    assert 1 <= len(groups) <= n
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(i.path for i in infos)
    if len(infos) <= n:
        assert all(len(g) == 1 for g in groups)
    pop = popularity(infos)
    alone = [g[0] for g in groups[:-1]]
    assert all(pop[a] >= pop[m] for a in alone for m in groups[-1])
    assert group_layers(list(reversed(infos)), n) == groups  # independent of input order


def _layer_trees(archive: Path) -> list[dict[str, tarfile.TarInfo | bytes]]:
    trees = []
    with OciArchive(archive) as image:
        for desc in image.layers:
            data = gzip.decompress(image.read_blob(desc))
            tree: dict[str, tarfile.TarInfo | bytes] = {}
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for m in tar.getmembers():
                    tree[m.name] = m
                    if m.isfile():
                        tree[m.name + "//data"] = tar.extractfile(m).read()  # type: ignore[union-attr]
            trees.append(tree)
    return trees


def _names(path: str) -> list[str]:
    """*path* and everything below it, not following symlinks."""
    names = [path]
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for child in sorted(os.listdir(path)):
            names += _names(os.path.join(path, child))
    return names


def _check_tree(path: str, tree: dict[str, tarfile.TarInfo | bytes]) -> int:
    """Assert *tree* holds the store path *path* exactly; return entries checked."""
    names = _names(path)
    for name in names:
        st_ = os.lstat(name)
        member = tree[name.lstrip("/")]
        assert isinstance(member, tarfile.TarInfo)
        assert (member.uid, member.gid, member.mtime) == (0, 0, 1)
        if stat.S_ISLNK(st_.st_mode):
            assert member.issym() and member.linkname == os.readlink(name)
        elif stat.S_ISDIR(st_.st_mode):
            assert member.isdir() and member.mode == stat.S_IMODE(st_.st_mode)
        else:
            assert member.isfile() and member.mode == stat.S_IMODE(st_.st_mode)
            assert tree[name.lstrip("/") + "//data"] == Path(name).read_bytes()
    return len(names)


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_layered_image_holds_real_bytes_in_at_most_n_layers(
    tmp_path: Path, sample_closure: str, n: int
) -> None:
    out = tmp_path / "layered.tar"
    result = build_image([sample_closure], out, "sample", RuntimeConfig(), layers=n)
    closure = nixcache.closure(sample_closure)
    trees = _layer_trees(out)
    assert len(trees) == len(result.layers) == min(n, len(closure))
    for paths, tree in zip(result.layers, trees, strict=True):
        checked = sum(_check_tree(p, tree) for p in paths)
        store_entries = [k for k in tree if not k.endswith("//data")]
        assert len(store_entries) == 2 + checked  # nix, nix/store, and nothing else
    assert sorted(p for g in result.layers for p in g) == sorted(closure)
    with OciArchive(out) as image:
        assert all(not d.annotations for d in image.layers)
        assert len(image.config["rootfs"]["diff_ids"]) == len(trees)


def test_layered_symlink_and_file_store_paths(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("content of a file store path\n")
    (tmp_path / "alink").symlink_to("afile")
    paths = [
        nixcache.run_nix("nix-store", "--add", tmp_path / n).decode().strip()
        for n in ("afile", "alink")
    ]
    out = tmp_path / "l.tar"
    build_image(paths, out, "files", RuntimeConfig(), layers=5)
    merged: dict[str, tarfile.TarInfo | bytes] = {}
    for tree in _layer_trees(out):
        merged |= tree
    for path in paths:
        assert _check_tree(path, merged) == 1
