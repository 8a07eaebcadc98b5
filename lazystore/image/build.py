"""Build an OCI image archive of a closure of local store paths."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
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
) -> BuildResult:
    """Write an image of the closure of *args* to *dest*: a nix image (one layer
    of placeholders, annotated), or with *layers*, a classic image of at most
    that many layers of real contents."""
    image_name = oci.ImageName.parse(name)
    if not args:
        raise ImageError("no store paths given")
    if layers is not None and layers < 1:
        raise ImageError(f"--layered needs at least 1 layer, not {layers}")
    infos = local_closure([resolve_store_path(a) for a in args])
    try:
        with tempfile.TemporaryDirectory(prefix=".lazystore-image-", dir=dest.parent) as tmp:
            groups, written = _layers(infos, layers, Path(tmp))
            digest = _write(dest, image_name, runtime, written, groups)
    except OSError as exc:
        raise ImageError(f"{exc.filename or dest}: {exc.strerror or exc}") from None
    log.info(
        "wrote %s (%d store paths, %d layers, manifest %s)", dest, len(infos), len(groups), digest
    )
    return BuildResult(dest, image_name, digest, groups, [i.path for i in infos])


def _layers(
    infos: Sequence[PathInfo], layers: int | None, tmp: Path
) -> tuple[list[list[str]], list[tuple[oci.Layer, dict[str, str]]]]:
    if layers is None:
        return [[i.path for i in infos]], [_nix_layer(infos, tmp)]
    groups = layered.group_layers(infos, layers)
    # zlib, hashlib and file reads release the GIL: layers compress in parallel.
    with ThreadPoolExecutor(max_workers=min(len(groups), os.cpu_count() or 1) or 1) as pool:
        jobs = [pool.submit(_content_layer, g, tmp / f"layer{n}") for n, g in enumerate(groups)]
        return groups, [job.result() for job in jobs]


def _nix_layer(infos: Sequence[PathInfo], tmp: Path) -> tuple[oci.Layer, dict[str, str]]:
    kinds = {i.path: _is_dir(i.path) for i in infos}
    layer = oci.write_layer(nix.placeholder_entries(kinds, STORE_DIR), tmp / "layer0")
    return layer, nix.annotations([i.path for i in infos])


def _content_layer(paths: Sequence[str], dest: Path) -> tuple[oci.Layer, dict[str, str]]:
    return oci.write_layer(_content_entries(paths), dest), {}


def _content_entries(paths: Sequence[str]) -> Iterator[oci.Entry]:
    yield from nix.store_parents(STORE_DIR)
    for path in sorted(paths):
        yield from oci.tree_entries(Path(path), path.lstrip("/"))


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None


def _history(group: Sequence[str]) -> str:
    names = [os.path.basename(p) for p in group]
    if len(names) > 4:
        names = [*names[:3], f"and {len(names) - 3} more"]
    return f"lazystore image build: {', '.join(names)}"


def _write(
    dest: Path,
    name: oci.ImageName,
    runtime: oci.RuntimeConfig,
    written: list[tuple[oci.Layer, dict[str, str]]],
    groups: list[list[str]],
) -> str:
    history = [_history(g) for g in groups]
    config = oci.config_document(runtime, [layer.diff_id for layer, _ in written], history)
    config_desc = oci.Descriptor(oci.MEDIA_CONFIG, oci.digest_of(config), len(config))
    layer_descs = [layer.descriptor(ann) for layer, ann in written]
    manifest = oci.manifest_document(config_desc, layer_descs)
    manifest_desc = oci.Descriptor(
        oci.MEDIA_MANIFEST,
        oci.digest_of(manifest),
        len(manifest),
        {oci.ANNOTATION_IMAGE_NAME: name.full, oci.ANNOTATION_REF_NAME: name.tag},
    )
    blobs: dict[str, bytes | Path] = {layer.digest: layer.path for layer, _ in written}
    blobs[config_desc.digest] = config
    blobs[manifest_desc.digest] = manifest
    oci.write_archive(dest, oci.index_document(manifest_desc), blobs)
    return manifest_desc.digest
