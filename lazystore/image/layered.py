"""Classic layered images: a closure's real contents in at most N layers.

Grouping is a pure function of the closure graph. Each store path gets a layer
of its own while they fit; otherwise the N-1 most popular paths (popularity =
how many paths of the closure depend on it, directly or not; ties broken by
larger NAR size, then by path) keep theirs and everything else, the least
popular and smallest, shares the last layer, as Nixery and
``dockerTools.buildLayeredImage`` do. Popular paths go at the bottom so images
that share them share those layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from lazystore.errors import ImageError
from lazystore.image.closure import PathInfo


def popularity(infos: Sequence[PathInfo]) -> dict[str, int]:
    """For each path, the number of other closure paths that depend on it."""
    refs = {i.path: [r for r in i.references if r != i.path] for i in infos}
    closures: dict[str, frozenset[str]] = {}

    def closure(path: str) -> frozenset[str]:
        if path not in closures:
            closures[path] = frozenset()  # a cycle cannot occur in Nix; guard anyway
            below: set[str] = set()
            for ref in refs.get(path, ()):
                below.add(ref)
                below |= closure(ref)
            closures[path] = frozenset(below - {path})
        return closures[path]

    counts = dict.fromkeys(refs, 0)
    for path in refs:
        for dep in closure(path):
            if dep in counts:
                counts[dep] += 1
    return counts


def group_layers(infos: Sequence[PathInfo], max_layers: int) -> list[list[str]]:
    """Split the closure *infos* into at most *max_layers* groups of store paths,
    bottom layer first; every path is in exactly one group."""
    if max_layers < 1:
        raise ImageError(f"--layered needs at least 1 layer, not {max_layers}")
    if not infos:
        return []
    pop = popularity(infos)
    size = {i.path: i.nar_size for i in infos}
    ranked = sorted(pop, key=lambda p: (-pop[p], -size[p], p))
    if len(ranked) <= max_layers:
        return [[p] for p in ranked]
    keep = max_layers - 1
    return [[p] for p in ranked[:keep]] + [sorted(ranked[keep:])]
