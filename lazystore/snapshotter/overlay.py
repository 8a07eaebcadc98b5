"""Overlay layout on disk and the mounts containerd gets, as its overlayfs snapshotter.

``<root>/snapshots/<id>/fs`` is a snapshot's content (its upperdir while
active), ``<root>/snapshots/<id>/work`` its overlay workdir and, for a nix
layer, ``<root>/snapshots/<id>/view`` a symlink to its daemon view. Directory
names are numeric ids and every lowerdir lies under ``<root>/snapshots/``:
containerd shortens a lowerdir option longer than the one page (4096 bytes)
the kernel accepts to paths relative to that common directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lazystore.nix import fsio

# The kernel copies mount options into a single page.
MOUNT_OPTIONS_LIMIT = 4096


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / "snapshots"
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self.index_off = Path("/sys/module/overlay/parameters/index").exists()
        self.data_layers = kernel_release() >= (6, 5)  # "::" in lowerdir

    def dir(self, id_: int) -> Path:
        return self.snapshots / str(id_)

    def fs(self, id_: int) -> str:
        return str(self.dir(id_) / "fs")

    def work(self, id_: int) -> str:
        return str(self.dir(id_) / "work")

    def view_link(self, id_: int, target: str, name: str = "view") -> str:
        """``<root>/snapshots/<id>/<name>``, a symlink to the daemon's view *target* (blocking).

        Overlay follows it when mounting; it keeps every lowerdir under one
        directory, so that containerd can shorten long lowerdir options (it
        chdirs to their common parent) below the page-size limit.
        """
        link = self.dir(id_) / name
        try:
            if os.readlink(link) == target:
                return str(link)
        except OSError:
            pass
        tmp = self.dir(id_) / f"{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.rename(link)
        return str(link)

    def create(self, id_: int, active: bool) -> None:
        """Make the snapshot's directories (blocking); a leftover of a crash is replaced."""
        path = self.dir(id_)
        fsio.remove_tree(path)
        tmp = self.snapshots / f"new-{id_}"
        fsio.remove_tree(tmp)
        (tmp / "fs").mkdir(parents=True)
        os.chmod(tmp / "fs", 0o755)
        if active:
            (tmp / "work").mkdir()
        tmp.rename(path)

    def remove(self, id_: int) -> None:
        """Delete the snapshot's directories (blocking), renaming them away first."""
        doomed = self.snapshots / f"rm-{id_}"
        try:
            self.dir(id_).rename(doomed)
        except FileNotFoundError:
            return  # never made, or a Cleanup running meanwhile took it as an orphan
        fsio.remove_tree(doomed, ignore_errors=True)

    def orphans(self, known: set[int]) -> list[Path]:
        """Directories that no snapshot row owns (crash leftovers)."""
        out = []
        for entry in self.snapshots.iterdir():
            name = entry.name
            if name.isdigit() and int(name) in known:
                continue
            out.append(entry)
        return out


def kernel_release() -> tuple[int, int]:
    """(major, minor) of the running kernel."""
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def usage(path: str) -> tuple[int, int]:
    """(bytes, inodes) used below *path*, counting hard links once (blocking)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            size += st.st_blocks * 512
    return size, len(seen)


def mounts(
    *, active: bool, upper: str, work: str, lowers: list[str], index_off: bool,
    data: str | None = None,
) -> list[Mount]:
    """containerd's overlayfs snapshotter rules.

    No lower layers: a bind mount of the snapshot's own directory. A view over
    a single lower directory: a read-only bind mount of it. Otherwise overlay,
    with upperdir/workdir when active.

    *data* (the daemon's ``<cache>/store``) becomes a data-only lower layer
    (``::``, Linux 6.5+) when the options still fit in one page: a view's file
    whose path is materialised carries ``trusted.overlay.metacopy`` and a
    ``redirect`` into it (lazystore.fs.vfs), so overlay reads its data straight
    from the cache (the page cache of the cache's file, no FUSE); the others
    are read through the view. Left out beyond a page, where containerd would
    shorten the lowerdirs and does not know ``::``.
    """
    if not lowers:
        return [Mount("bind", upper, ["rw" if active else "ro", "rbind"])]
    if not active and len(lowers) == 1:
        return [Mount("bind", lowers[0], ["ro", "rbind"])]
    options = ["index=off"] if index_off else []
    if active:
        options += [f"workdir={work}", f"upperdir={upper}"]
    lowerdir = "lowerdir=" + ":".join(lowers)
    # metacopy=on: overlay follows a metacopy file's redirect from any lower
    # layer, not only from the last one above the data-only layers
    with_data = ["metacopy=on", f"{lowerdir}::{data}"]
    if data and len(",".join([*options, *with_data])) < MOUNT_OPTIONS_LIMIT:
        options += with_data
    else:
        options.append(lowerdir)
    return [Mount("overlay", "overlay", options)]


def with_data_layer(mounts: list[Mount]) -> bool:
    """Whether *mounts* is an overlay with the data-only layer."""
    return any("metacopy=on" in m.options for m in mounts)
