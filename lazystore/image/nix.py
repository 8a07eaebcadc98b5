"""The nix image: one layer of empty placeholders, one per closure path.

The layer holds ``nix/store/<basename>`` for every path of the closure: an
empty directory where the store path is a directory, an empty file otherwise
(a file or a symlink). A snapshotter that knows Nix lays the real trees over
the placeholders; its layer descriptor carries nix-snapshotter's annotations
(``containerd.io/snapshot/nix-layer: "true"`` and one
``containerd.io/snapshot/nix-store-path.<i>`` per path, from 0) so the image
also runs on nix-snapshotter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

from lazystore.image.oci import Entry
from lazystore.nix.labels import LAZYSTORE_PROFILE, NIX_LAYER, NIX_STORE_PATH, PROFILE_BYTES

log = logging.getLogger(__name__)

PLACEHOLDER_MODE = 0o555
PARENT_MODE = 0o755


def store_parents(store_dir: str = "/nix/store") -> list[Entry]:
    """Directory entries for the store dir itself (``nix``, ``nix/store``)."""
    parts = store_dir.strip("/").split("/")
    return [Entry("/".join(parts[: i + 1]), "dir", PARENT_MODE) for i in range(len(parts))]


def placeholder_entries(
    paths: Mapping[str, bool], store_dir: str = "/nix/store"
) -> Iterator[Entry]:
    """Layer entries for *paths* (store path -> is a directory), sorted."""
    yield from store_parents(store_dir)
    for path in sorted(paths):
        name = path.lstrip("/")
        kind = "dir" if paths[path] else "file"
        yield Entry(name, kind, PLACEHOLDER_MODE)


def annotations(paths: Sequence[str], profile: Sequence[str] = ()) -> dict[str, str]:
    """The layer descriptor annotations naming *paths* (in the given order) and,
    given, the entries of an access profile (store path basenames and their
    files, ``BASENAME/FILE``: lazystore.profile's entries, in its order)."""
    found = {NIX_LAYER: "true"}
    for i, path in enumerate(paths):
        found[f"{NIX_STORE_PATH}{i}"] = path
    if profile:
        found[LAZYSTORE_PROFILE] = " ".join(profile)
    return found


def profile_paths(paths: Sequence[str], profile: Sequence[str]) -> list[str]:
    """The entries of *profile* (an access profile's store paths or files of
    them, ``BASENAME/FILE``, in order) whose path is in the closure *paths*
    (full store paths), each once, as many as the label takes; what is left
    out is a warning."""
    closure = {p.rsplit("/", 1)[-1] for p in paths}
    wanted = list(dict.fromkeys(profile))
    outside = list(dict.fromkeys(b for e in wanted if (b := e.partition("/")[0]) not in closure))
    if outside:
        log.warning("the profile names %d store paths outside the closure, ignored: %s",
                    len(outside), ", ".join(outside[:3]) + (" ..." if outside[3:] else ""))
    inside = [e for e in wanted if e.partition("/")[0] in closure]
    kept: list[str] = []
    size = -1
    for entry in inside:
        size += len(entry) + 1
        if size > PROFILE_BYTES:
            log.warning("the profile's store paths do not fit in a label: the first %d of "
                        "%d are kept", len(kept), len(inside))
            break
        kept.append(entry)
    return kept


def store_paths_of(annotations: Mapping[str, str]) -> list[str]:
    """The store paths a layer's annotations name, in index order ([] if not a nix layer)."""
    if annotations.get(NIX_LAYER) != "true":
        return []
    indexed = []
    for key, value in annotations.items():
        suffix = key.removeprefix(NIX_STORE_PATH)
        if suffix != key and suffix.isdigit():
            indexed.append((int(suffix), value))
    return [value for _, value in sorted(indexed)]
