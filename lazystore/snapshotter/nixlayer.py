"""Recognising nix layers: by their labels (untrusted input) or their content.

Labels (as nix-snapshotter's images annotate their layers and CRI/nerdctl pass
them on): ``containerd.io/snapshot/nix-layer``, ``…/nix-store-path.<i>`` (one
store path each) or ``…/nix-closure`` (a closure-info store path whose
``store-paths`` file lists the closure).

Content: a layer whose ``nix/store/`` holds empty placeholders (empty
directories or empty files) named like store paths; those names are the
store paths a daemon view must show through the placeholders. An empty file
of mode 0444 is not one: that is how a store path that is an empty file looks
in /nix/store, so a layer of real contents (``image build --layered``) holds
it (placeholder files are 0555, as `image build` and nix-snapshotter write them).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lazystore import profile
from lazystore.errors import FormatError
from lazystore.nix import storepath
from lazystore.nix.labels import LAZYSTORE_PROFILE, NIX_CLOSURE, NIX_LAYER, NIX_STORE_PATH
from lazystore.snapshotter.errors import InvalidArgument

log = logging.getLogger(__name__)

SNAPSHOT_REF = "containerd.io/snapshot.ref"  # containerd's: the chain id a layer unpacks to

STORE_FILE_MODE = 0o444  # a non-executable file in /nix/store: real content
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


class InvalidLabel(InvalidArgument):
    """A nix label whose value is not acceptable (maps to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class NixLabels:
    paths: tuple[str, ...] = ()
    closure: str | None = None


def _store_path(label: str, value: str, store_dir: str) -> str:
    try:
        return storepath.StorePath.parse(value, store_dir).path(store_dir)
    except FormatError as exc:
        raise InvalidLabel(f"label {label}: {exc}") from None


def profile_of(labels: Mapping[str, str]) -> list[str]:
    """What an image's access profile says to fetch ahead, in order: store
    path basenames and files of them (``BASENAME/FILE``, lazystore.profile's
    entries); untrusted: other words are dropped with a warning (the daemon
    keeps only the view's own paths)."""
    words = labels.get(LAZYSTORE_PROFILE, "").split()
    bad = [w for w in words if profile.parse_ahead(w) is None]
    if bad:
        log.warning("label %s: ignoring %d names that are not store paths or their files "
                    "(%.60s)", LAZYSTORE_PROFILE, len(bad), bad[0])
    return [w for w in words if profile.parse_ahead(w) is not None]


def parse_labels(labels: dict[str, str], store_dir: str) -> NixLabels | None:
    """The nix layer described by *labels*, None when they describe none.

    Every nix label is validated; InvalidLabel names the first bad one.
    """
    indexed: list[tuple[int, str]] = []
    closure: str | None = None
    seen = False
    for label in sorted(labels):
        value = labels[label]
        if label == NIX_LAYER:
            seen = True
        elif label.startswith(NIX_STORE_PATH):
            index = label[len(NIX_STORE_PATH) :]
            if not _INDEX.fullmatch(index):
                raise InvalidLabel(f"label {label}: the index is not a decimal number")
            indexed.append((int(index), _store_path(label, value, store_dir)))
        elif label == NIX_CLOSURE:
            closure = _store_path(label, value, store_dir)
    paths = [path for _, path in sorted(indexed)]
    if not (seen or paths or closure):
        return None
    if not paths and closure is None:
        raise InvalidLabel(f"label {NIX_LAYER} without any {NIX_STORE_PATH}<i> or {NIX_CLOSURE}")
    return NixLabels(tuple(dict.fromkeys(paths)), closure)


def _is_placeholder(entry: os.DirEntry[str]) -> bool:
    if entry.is_symlink():
        return False
    if entry.is_file(follow_symlinks=False):
        st = entry.stat(follow_symlinks=False)
        return st.st_size == 0 and stat.S_IMODE(st.st_mode) != STORE_FILE_MODE
    if entry.is_dir(follow_symlinks=False):
        with os.scandir(entry.path) as it:
            return next(it, None) is None
    return False


def scan_placeholders(layer_root: Path, store_dir: str) -> list[str]:
    """Store paths (full, sorted) whose empty placeholders the layer holds.

    Blocking (walks one directory); call it from a worker thread.
    """
    store = layer_root / store_dir.strip("/")
    try:
        if store.is_symlink() or not store.is_dir():
            return []
        with os.scandir(store) as it:
            entries = list(it)
    except OSError:
        return []
    found = [
        e.name for e in entries
        if storepath.is_valid_basename(e.name) and _is_placeholder(e)
    ]
    return [f"{store_dir}/{name}" for name in sorted(found)]
