"""Build an OCI image archive of a closure of local store paths."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lazystore.errors import ImageError
from lazystore.image import layered, nix, oci
from lazystore.image.closure import STORE_DIR, PathInfo, local_closure, resolve_store_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    path: Path
    name: oci.ImageName
    manifest_digest: str
    layers: list[list[str]]  # store paths in each layer, bottom first
    store_paths: list[str]  # the closure


def build_image(
    args: Sequence[str],
    dest: Path,
    name: str,
    runtime: oci.RuntimeConfig,
    layers: int | None = None,
    profile: Sequence[str] = (),
) -> BuildResult:
    """Write an image of the closure of *args* to *dest*: a nix image (one layer
    of placeholders, annotated; with *profile*, an access profile's store
    paths, which a lazystore snapshotter fetches ahead), or with *layers*, a
    classic image of at most that many layers of real contents."""
    image_name = oci.ImageName.parse(name)
    if not args:
        raise ImageError("no store paths given")
    check_layers(layers)
    if profile and layers is not None:
        raise ImageError("--profile is for nix images, not --layered ones")
    infos = local_closure([resolve_store_path(a) for a in args])
    try:
        with tempfile.TemporaryDirectory(prefix=".lazystore-image-", dir=dest.parent) as tmp:
            if layers is None:
                kinds = {i.path: _is_dir(i.path) for i in infos}
                image = nix_image(infos, kinds, runtime, Path(tmp), profile)
            else:
                image = layered_image(infos, layers, runtime, Path(tmp), Path)
            _write(dest, image_name, image)
    except OSError as exc:
        raise ImageError(f"{exc.filename or dest}: {exc.strerror or exc}") from None
    log.info("wrote %s (%d store paths, %d layers, manifest %s)",
             dest, len(infos), len(image.groups), image.manifest_digest)
    return BuildResult(dest, image_name, image.manifest_digest, image.groups,
                       [i.path for i in infos])


def check_layers(layers: int | None) -> None:
    if layers is not None and layers < 1:
        raise ImageError(f"--layered needs at least 1 layer, not {layers}")


@dataclass(frozen=True)
class Image:
    """An image's documents and written layer blobs, ready to archive or serve."""

    manifest: bytes
    config: bytes
    layers: list[oci.Layer]
    groups: list[list[str]]  # store paths in each layer, bottom first

    @property
    def manifest_digest(self) -> str:
        return oci.digest_of(self.manifest)

    @property
    def config_digest(self) -> str:
        return oci.digest_of(self.config)


def nix_image(
    infos: Sequence[PathInfo], is_dir: Mapping[str, bool], runtime: oci.RuntimeConfig, tmp: Path,
    profile: Sequence[str] = (),
) -> Image:
    """The nix image of the closure *infos* (sorted by path; *is_dir*: store
    path -> whether it is a directory), its one layer written under *tmp*.
    Needs no store: a closure's narinfos and root kinds are enough."""
    paths = [i.path for i in infos]
    return image_of(runtime, [nix_layer(paths, is_dir, tmp / "layer0", profile)], [paths])


def nix_layer(
    paths: Sequence[str], is_dir: Mapping[str, bool], dest: Path, profile: Sequence[str] = ()
) -> tuple[oci.Layer, dict[str, str]]:
    """The placeholder layer of *paths* (written to *dest*) and its annotations
    (with *profile*'s store paths of the closure, as many as a label takes)."""
    layer = oci.write_layer(
        nix.placeholder_entries({p: is_dir[p] for p in paths}, STORE_DIR), dest)
    return layer, nix.annotations(paths, nix.profile_paths(paths, profile))


def layered_image(
    infos: Sequence[PathInfo], layers: int, runtime: oci.RuntimeConfig, tmp: Path,
    root_of: Callable[[str], Path],
) -> Image:
    """A classic image of *infos* in at most *layers* layers; *root_of* gives
    the local tree of a store path (the path itself for a local store)."""
    groups = layered.group_layers(infos, layers)
    # zlib, hashlib and file reads release the GIL: layers compress in parallel.
    with ThreadPoolExecutor(max_workers=min(len(groups), os.cpu_count() or 1) or 1) as pool:
        jobs = [pool.submit(content_layer, g, root_of, tmp / f"layer{n}")
                for n, g in enumerate(groups)]
        written = [(job.result(), {}) for job in jobs]
    return image_of(runtime, written, groups)


def content_layer(paths: Sequence[str], root_of: Callable[[str], Path], dest: Path) -> oci.Layer:
    """The layer of the real contents of *paths*, read from ``root_of(path)``."""
    return oci.write_layer(_content_entries(paths, root_of), dest)


def _content_entries(paths: Sequence[str], root_of: Callable[[str], Path]) -> Iterator[oci.Entry]:
    yield from nix.store_parents(STORE_DIR)
    for path in sorted(paths):
        yield from oci.tree_entries(root_of(path), path.lstrip("/"))


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None


def history(group: Sequence[str]) -> str:
    names = [os.path.basename(p) for p in group]
    if len(names) > 4:
        names = [*names[:3], f"and {len(names) - 3} more"]
    return f"lazystore image build: {', '.join(names)}"


def image_of(
    runtime: oci.RuntimeConfig,
    written: Sequence[tuple[oci.Layer, dict[str, str]]],
    groups: list[list[str]],
) -> Image:
    """The config and manifest of layers *written* (with their descriptor
    annotations), one history line per group."""
    lines = [history(g) for g in groups]
    config = oci.config_document(runtime, [layer.diff_id for layer, _ in written], lines)
    config_desc = oci.Descriptor(oci.MEDIA_CONFIG, oci.digest_of(config), len(config))
    manifest = oci.manifest_document(config_desc, [layer.descriptor(a) for layer, a in written])
    return Image(manifest, config, [layer for layer, _ in written], groups)


def _write(dest: Path, name: oci.ImageName, image: Image) -> None:
    manifest_desc = oci.Descriptor(
        oci.MEDIA_MANIFEST,
        image.manifest_digest,
        len(image.manifest),
        {oci.ANNOTATION_IMAGE_NAME: name.full, oci.ANNOTATION_REF_NAME: name.tag},
    )
    blobs: dict[str, bytes | Path] = {layer.digest: layer.path for layer in image.layers}
    blobs[image.config_digest] = image.config
    blobs[manifest_desc.digest] = image.manifest
    oci.write_archive(dest, oci.index_document(manifest_desc), blobs)
