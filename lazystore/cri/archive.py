"""Checking an image archive from the store before containerd sees it.

An archive named by a ``nix:0`` reference is untrusted input: an OCI image
layout tar (``oci-layout``, ``index.json``, ``blobs/sha256/…``) as
``lazystore image build`` and nix-snapshotter's buildImage write it (the
latter adds a Docker ``manifest.json``, which is ignored). :func:`inspect`
reads and verifies everything the image needs — one manifest, its config
and every layer against their digests and sizes, documents of at most
``MAX_DOCUMENT`` bytes, no entry outside the layout — and
:func:`write_import` writes a fresh layout holding only those verified blobs
and an index naming the image, which is what containerd imports. Blocking
file I/O: call both from a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lazystore.cri.errors import BadArchive
from lazystore.errors import FormatError, ImageError
from lazystore.image import nix, oci
from lazystore.nix import labels
from lazystore.nix.storepath import DEFAULT_STORE_DIR, StorePath

MAX_DOCUMENT = 4 << 20  # index, manifest, config
MAX_MEMBERS = 100_000
MANIFEST_TYPES = (oci.MEDIA_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json")
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    oci.MEDIA_LAYER_GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)


@dataclass
class Image:
    """What :func:`inspect` verified."""

    manifest: oci.Descriptor
    config: oci.Descriptor
    layers: list[oci.Descriptor]
    store_paths: list[str] = field(default_factory=list)  # nix layers' paths (legacy form)
    closures: list[str] = field(default_factory=list)  # nix layers' closure-info paths

    @property
    def id(self) -> str:
        """The image id containerd's CRI reports: the config's digest."""
        return self.config.digest

    @property
    def is_nix(self) -> bool:
        return bool(self.store_paths or self.closures)


def _members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    found: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise BadArchive(f"{path}: more than {MAX_MEMBERS} entries")
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or not parts:
            raise BadArchive(f"{path}: entry {name!r} lies outside the image layout")
        if not (member.isfile() or member.isdir()):
            raise BadArchive(f"{path}: entry {name!r} is not a regular file or directory")
        key = "/".join(p for p in parts if p != ".")
        if member.isfile():
            if key in found:
                raise BadArchive(f"{path}: entry {name!r} appears twice")
            found[key] = member
    return found


class _Reader:
    def __init__(self, path: Path, tar: tarfile.TarFile) -> None:
        self.path, self.tar = path, tar
        self.members = _members(tar, path)

    def chunks(self, name: str) -> Iterator[bytes]:
        member = self.members.get(name)
        if member is None:
            raise BadArchive(f"{self.path}: {name} is missing")
        src = self.tar.extractfile(member)
        assert src is not None
        with src:
            while chunk := src.read(oci.CHUNK):
                yield chunk

    def blob(self, desc: oci.Descriptor) -> Iterator[bytes]:
        """The blob's chunks, checked against *desc* (BadArchive at the end otherwise)."""
        digest, size = hashlib.sha256(), 0
        for chunk in self.chunks(oci.blob_name(desc.digest)):
            size += len(chunk)
            if size > desc.size:
                break
            digest.update(chunk)
            yield chunk
        if size != desc.size or "sha256:" + digest.hexdigest() != desc.digest:
            raise BadArchive(f"{self.path}: blob {desc.digest} does not match its digest or size")

    def document(self, what: str, name: str, desc: oci.Descriptor | None = None) -> Any:
        member = self.members.get(name)
        size = desc.size if desc is not None else (member.size if member else 0)
        if size > MAX_DOCUMENT or (member is not None and member.size > MAX_DOCUMENT):
            raise BadArchive(f"{self.path}: {what} is larger than {MAX_DOCUMENT >> 20} MiB")
        data = b"".join(self.blob(desc) if desc is not None else self.chunks(name))
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise BadArchive(f"{self.path}: {what} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadArchive(f"{self.path}: {what} is not a JSON object")
        return doc


def _descriptor(path: Path, doc: Any, what: str) -> oci.Descriptor:
    try:
        desc = oci.Descriptor.from_json(doc)
    except ImageError as exc:
        raise BadArchive(f"{path}: {what}: {exc}") from None
    if desc.size < 0:
        raise BadArchive(f"{path}: {what}: negative size")
    return desc


def _store_path(path: Path, value: str, store_dir: str) -> str:
    try:
        return StorePath.parse(value, store_dir).path(store_dir)
    except FormatError as exc:
        raise BadArchive(f"{path}: nix layer annotation: {exc}") from None


def _nix_layer(path: Path, image: Image, layer: oci.Descriptor, store_dir: str) -> bool:
    notes = layer.annotations
    closure = notes.get(labels.NIX_CLOSURE)
    paths = nix.store_paths_of(notes)
    if closure is None and not paths:
        return False
    if closure is not None:
        image.closures.append(_store_path(path, closure, store_dir))
    image.store_paths += [_store_path(path, p, store_dir) for p in paths]
    return True


def _open(path: Path) -> Any:
    """The archive file itself, never what a symlink store path points at
    (the host's files are not the store's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadArchive(f"{path}: not an image archive (a symlink)") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise BadArchive(f"{path}: not an image archive ({kind})")
    return os.fdopen(fd, "rb")


def inspect(path: Path, nix_only: bool = False, store_dir: str = DEFAULT_STORE_DIR) -> Image:
    """Verify the archive at *path*; BadArchive says what is wrong with it."""
    try:
        with _open(path) as src, tarfile.open(fileobj=src, mode="r:") as tar:
            return _inspect(_Reader(path, tar), nix_only, store_dir)
    except tarfile.TarError as exc:
        raise BadArchive(f"{path}: not an image archive (tar: {exc})") from None


def _inspect(reader: _Reader, nix_only: bool, store_dir: str) -> Image:
    path = reader.path
    if "index.json" not in reader.members:
        raise BadArchive(f"{path}: not an OCI image layout (no index.json)")
    manifests = reader.document("index.json", "index.json").get("manifests")
    if not isinstance(manifests, list) or len(manifests) != 1:
        raise BadArchive(f"{path}: index.json must list exactly one image")
    manifest_desc = _descriptor(path, manifests[0], "index.json")
    if manifest_desc.media_type not in MANIFEST_TYPES:
        raise BadArchive(f"{path}: unsupported manifest media type {manifest_desc.media_type}")
    manifest = reader.document("the manifest", "", manifest_desc)
    config_desc = _descriptor(path, manifest.get("config"), "the manifest's config")
    config = reader.document("the image config", "", config_desc)
    layers = [_descriptor(path, d, "a layer") for d in manifest.get("layers") or []]
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise BadArchive(f"{path}: the config's rootfs.diff_ids do not match the layers")
    image = Image(manifest_desc, config_desc, layers)
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise BadArchive(f"{path}: unsupported layer media type {layer.media_type}")
        for _ in reader.blob(layer):
            pass
        if not _nix_layer(path, image, layer, store_dir) and nix_only:
            raise BadArchive(f"{path}: layer {layer.digest} is not a nix layer (--nix-only)")
    return image


def import_index(image: Image, name: str) -> bytes:
    """index.json of the import: the one manifest, named *name* for containerd."""
    notes = {oci.ANNOTATION_IMAGE_NAME: name}
    desc = oci.Descriptor(image.manifest.media_type, image.manifest.digest,
                          image.manifest.size, notes)
    return oci.canonical_json(
        {"schemaVersion": 2, "mediaType": oci.MEDIA_INDEX, "manifests": [desc.to_json()]}
    )


def write_import(src: Path, image: Image, name: str, dest: Path) -> None:
    """Write the layout containerd imports to *dest*: the verified blobs of
    *image* (checked again as they are copied) and :func:`import_index`."""
    with _open(src) as fileobj, tarfile.open(fileobj=fileobj, mode="r:") as tar:
        reader = _Reader(src, tar)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w") as dst:
            _add(dst, "oci-layout", [oci.canonical_json({"imageLayoutVersion": "1.0.0"})])
            _add(dst, "index.json", [import_index(image, name)])
            for desc in (image.manifest, image.config, *image.layers):
                _add(dst, oci.blob_name(desc.digest), reader.blob(desc), desc.size)


def _add(tar: tarfile.TarFile, name: str, chunks: Iterator[bytes] | list[bytes],
         size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o644, oci.MTIME
    if size is None:
        data = b"".join(chunks)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        return
    info.size = size
    tar.addfile(info, _ChunkReader(iter(chunks)))


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of chunks (for TarFile.addfile)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buf = chunk
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
