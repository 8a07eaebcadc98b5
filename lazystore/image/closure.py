"""Closures of local store paths, from real Nix.

``nix-store --dump-db PATH...`` prints the validity registration of each path
(path, NAR hash, NAR size, deriver, number of references, references), which
gives references and sizes for a whole closure in one call; parsing it is a pure
function.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from lazystore.errors import ImageError
from lazystore.nix.narinfo import NarInfo
from lazystore.nix.storepath import is_valid_basename

STORE_DIR = "/nix/store"


@dataclass(frozen=True)
class PathInfo:
    path: str  # full store path
    nar_size: int
    references: tuple[str, ...]  # full store paths, without the path itself


def path_info(info: NarInfo, store_dir: str = STORE_DIR) -> PathInfo:
    """The closure record of a narinfo (as nix-store --dump-db would give it)."""
    refs = (f"{store_dir}/{r}" for r in info.references)
    return PathInfo(info.store_path, info.nar_size,
                    tuple(sorted(r for r in refs if r != info.store_path)))


def is_store_path(path: str, store_dir: str = STORE_DIR) -> bool:
    parent, _, base = path.rpartition("/")
    return parent == store_dir and is_valid_basename(base)


def parse_dump_db(text: str, store_dir: str = STORE_DIR) -> list[PathInfo]:
    """Parse the output of ``nix-store --dump-db`` (ImageError when malformed)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    infos, i = [], 0
    try:
        while i < len(lines):
            path, size, count = lines[i], int(lines[i + 2]), int(lines[i + 4])
            refs = lines[i + 5 : i + 5 + count]
            if len(refs) != count or not all(is_store_path(p, store_dir) for p in (path, *refs)):
                raise ValueError(f"bad record for {path!r}")
            infos.append(PathInfo(path, size, tuple(sorted(r for r in refs if r != path))))
            i += 5 + count
    except (IndexError, ValueError) as exc:
        raise ImageError(f"cannot parse nix-store --dump-db output: {exc}") from None
    return infos


def resolve_store_path(arg: str, store_dir: str = STORE_DIR) -> str:
    """The store path an argument names, following symlinks such as ``result``
    until one is reached (a store path may itself be a symlink)."""
    path = os.path.abspath(arg)
    for _ in range(40):
        if is_store_path(path, store_dir) or not os.path.islink(path):
            break
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    if not is_store_path(path, store_dir):
        raise ImageError(f"{arg}: not a store path under {store_dir}")
    if not os.path.lexists(path):
        raise ImageError(f"{arg}: not in the local Nix store")
    return path


def local_closure(paths: Sequence[str]) -> list[PathInfo]:
    """The closure of *paths* (store paths in the local store), sorted by path."""
    listed = _nix_store("-qR", *paths).split()
    infos = parse_dump_db(_nix_store("--dump-db", *listed))
    missing = set(listed) - {i.path for i in infos}
    if missing:
        raise ImageError(f"nix-store --dump-db did not describe {sorted(missing)[0]}")
    return sorted(infos, key=lambda i: i.path)


def _nix_store(*args: str) -> str:
    try:
        proc = subprocess.run(["nix-store", *args], capture_output=True, text=True)
    except OSError as exc:
        raise ImageError(f"cannot run nix-store: {exc.strerror}") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ImageError(f"nix-store {args[0]} failed: {lines[-1]}")
    return proc.stdout
