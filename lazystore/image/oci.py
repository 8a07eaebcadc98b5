"""OCI image layout archives: documents, deterministic layer tars, the archive.

The documents (config, manifest, index) are pure functions returning canonical
JSON bytes. A layer is written as a deterministic tar (uid/gid 0, mtime 1, no
user names) compressed with gzip (no name, mtime 0), hashed as it streams so
that both its digest and its diff ID are known without reading it twice. An
archive is the OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/...``) as one uncompressed tar, as ``skopeo`` (``oci-archive:``)
and ``ctr image import`` read it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lazystore.errors import ImageError

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"  # what `ctr image import` names it

MTIME = 1  # as in /nix/store
CREATED = "1970-01-01T00:00:01Z"
CHUNK = 1 << 20

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ARCHES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "riscv64": "riscv64",
    "s390x": "s390x",
}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def host_architecture() -> str:
    machine = platform.machine()
    return _ARCHES.get(machine, machine)


def check_digest(digest: str) -> str:
    """*digest* if it is ``sha256:<64 hex>`` (the only form read), else ImageError."""
    if not _DIGEST.fullmatch(digest):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return digest


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Descriptor:
        try:
            return cls(
                str(doc["mediaType"]),
                check_digest(str(doc["digest"])),
                int(doc["size"]),
                {str(k): str(v) for k, v in (doc.get("annotations") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"malformed OCI descriptor: {exc}") from None


@dataclass(frozen=True)
class RuntimeConfig:
    """The parts of the image config a user sets (``--entrypoint``, ``--cmd``, ``--env``)."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    working_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.entrypoint is not None:
            doc["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            doc["Cmd"] = list(self.cmd)
        if self.env:
            doc["Env"] = list(self.env)
        if self.working_dir:
            doc["WorkingDir"] = self.working_dir
        return doc


def config_document(
    runtime: RuntimeConfig, diff_ids: list[str], history: list[str], architecture: str | None = None
) -> bytes:
    """The image config (``application/vnd.oci.image.config.v1+json``)."""
    return canonical_json(
        {
            "created": CREATED,
            "architecture": architecture or host_architecture(),
            "os": "linux",
            "config": runtime.to_json(),
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created": CREATED, "created_by": line} for line in history],
        }
    )


def manifest_document(config: Descriptor, layers: list[Descriptor]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )


def index_document(manifest: Descriptor) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [manifest.to_json()],
        }
    )


# -- image names --------------------------------------------------------------

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")


@dataclass(frozen=True)
class ImageName:
    """``[HOST[:PORT]/]REPO[:TAG]``; *registry* is "" when the name has no host."""

    registry: str
    repository: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ImageName:
        rest, tag = text, "latest"
        last = text.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = text.rsplit(":", 1)
        parts = rest.split("/")
        registry = ""
        if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
            registry = parts.pop(0)
            if not _HOST.fullmatch(registry):
                raise ImageError(f"invalid registry host in image name {text!r}")
        if not all(_COMPONENT.fullmatch(p) for p in parts):
            raise ImageError(f"invalid image name {text!r} (lower-case [a-z0-9._-] components)")
        if not _TAG.fullmatch(tag):
            raise ImageError(f"invalid tag in image name {text!r}")
        return cls(registry, "/".join(parts), tag)

    @property
    def full(self) -> str:
        """The name as containerd spells it (docker.io/library/... when no host)."""
        if self.registry:
            return f"{self.registry}/{self.repository}:{self.tag}"
        repo = self.repository if "/" in self.repository else f"library/{self.repository}"
        return f"docker.io/{repo}:{self.tag}"


# -- layers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One member of a layer tar; *source* is the file whose bytes a regular
    file holds (None for an empty file)."""

    name: str
    kind: str  # "dir" | "file" | "symlink"
    mode: int
    size: int = 0
    linkname: str = ""
    source: Path | None = None


def tar_info(entry: Entry) -> tarfile.TarInfo:
    """A deterministic header: root owned, mtime 1, no user/group names."""
    info = tarfile.TarInfo(entry.name)
    info.mode, info.mtime = entry.mode, MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, entry.linkname
    elif entry.kind == "file":
        info.type, info.size = tarfile.REGTYPE, entry.size
    else:
        raise ImageError(f"cannot put {entry.name!r} of type {entry.kind!r} in a layer")
    return info


def tree_entries(root: Path, name: str) -> Iterator[Entry]:
    """Entries for the tree at *root* (a store path: directory, file or symlink)
    under the member name *name*, in sorted order, with its real modes."""
    st = os.lstat(root)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        yield Entry(name, "symlink", 0o777, linkname=os.readlink(root))
    elif stat.S_ISREG(st.st_mode):
        yield Entry(name, "file", mode, size=st.st_size, source=root)
    elif stat.S_ISDIR(st.st_mode):
        yield Entry(name, "dir", mode)
        for child in sorted(os.listdir(root)):
            yield from tree_entries(root / child, f"{name}/{child}")
    else:
        raise ImageError(f"{root}: not a regular file, directory or symlink; cannot be in a layer")


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes to *target*."""

    def __init__(self, target: IO[bytes] | None) -> None:
        self.target, self.hash, self.size = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        if self.target is not None:
            self.target.write(view)
        return view.nbytes


@dataclass(frozen=True)
class Layer:
    """A written layer blob: *path* holds its gzip bytes."""

    path: Path
    digest: str
    size: int
    diff_id: str

    def descriptor(self, annotations: dict[str, str] | None = None) -> Descriptor:
        return Descriptor(MEDIA_LAYER_GZIP, self.digest, self.size, dict(annotations or {}))


def write_layer(entries: Iterable[Entry], dest: Path) -> Layer:
    """Write the gzip-compressed tar of *entries* to *dest*."""
    with open(dest, "wb") as out:
        compressed = _HashingWriter(out)
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6
        ) as gz:
            plain = _HashingWriter(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for entry in entries:
                    _add(tar, entry)
    return Layer(
        dest,
        "sha256:" + compressed.hash.hexdigest(),
        compressed.size,
        "sha256:" + plain.hash.hexdigest(),
    )


def _add(tar: tarfile.TarFile, entry: Entry) -> None:
    info = tar_info(entry)
    if entry.kind != "file" or entry.size == 0:
        tar.addfile(info)
        return
    assert entry.source is not None
    with open(entry.source, "rb") as src:
        tar.addfile(info, src)


# -- the archive ----------------------------------------------------------------


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + check_digest(digest).removeprefix("sha256:")


def write_archive(dest: Path, index: bytes, blobs: dict[str, bytes | Path]) -> None:
    """Write an OCI layout tar holding *index* and *blobs* (digest -> bytes or
    file) to *dest*, atomically: a failure leaves whatever was at *dest*."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_bytes(tar, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
            _add_bytes(tar, "index.json", index)
            for name in ("blobs", "blobs/sha256"):
                tar.addfile(tar_info(Entry(name, "dir", 0o755)))
            for digest in sorted(blobs):
                _add_blob(tar, digest, blobs[digest])
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(tar_info(Entry(name, "file", 0o644, size=len(data))), io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, digest: str, blob: bytes | Path) -> None:
    if isinstance(blob, bytes):
        _add_bytes(tar, blob_name(digest), blob)
        return
    size = blob.stat().st_size
    with open(blob, "rb") as src:
        tar.addfile(tar_info(Entry(blob_name(digest), "file", 0o644, size=size)), src)


class OciArchive:
    """Read side of an OCI layout tar with a single image (what ``build`` writes,
    and what ``skopeo copy ... oci-archive:`` writes). Every document read is
    checked against its digest; blobs are checked as they stream."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path, mode="r:")
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(f"{path}: not a readable OCI archive: {exc}") from None
        try:
            self._members = {
                m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()
            }
            self.manifest_descriptor, self.manifest, self.config_descriptor = self._read_top()
        except BaseException:
            self._tar.close()
            raise

    def __enter__(self) -> OciArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    def _read_top(self) -> tuple[Descriptor, dict[str, Any], Descriptor]:
        index = self._json(self._member_bytes("index.json"), "index.json")
        manifests = index.get("manifests") or []
        if len(manifests) != 1:
            raise ImageError(
                f"{self.path}: expected one image in index.json, found {len(manifests)}"
            )
        desc = Descriptor.from_json(manifests[0])
        if desc.media_type != MEDIA_MANIFEST:
            raise ImageError(f"{self.path}: unsupported manifest media type {desc.media_type}")
        manifest = self._json(self.read_blob(desc), "the manifest")
        return desc, manifest, Descriptor.from_json(manifest.get("config"))

    def _json(self, data: bytes, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ImageError(f"{self.path}: {what} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ImageError(f"{self.path}: {what} is not a JSON object")
        return doc

    def _member_bytes(self, name: str) -> bytes:
        return b"".join(self._open(name))

    def _open(self, name: str) -> Iterator[bytes]:
        member = self._members.get(name)
        if member is None:
            raise ImageError(f"{self.path}: {name} is missing from the archive")
        src = self._tar.extractfile(member)
        assert src is not None
        with src:
            while chunk := src.read(CHUNK):
                yield chunk

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self.manifest.get("layers") or []]

    @property
    def config(self) -> dict[str, Any]:
        return self._json(self.read_blob(self.config_descriptor), "the image config")

    def blobs(self) -> list[Descriptor]:
        """Every blob an image needs: layers, then config (the manifest is separate)."""
        return [*self.layers, self.config_descriptor]

    def stream_blob(self, desc: Descriptor) -> Iterator[bytes]:
        """The blob's bytes in chunks, checked against *desc*: the last chunk is
        held back until the whole blob verified, so a consumer (an upload) never
        receives a complete blob that does not match; ImageError then."""
        digest, size, held = hashlib.sha256(), 0, b""
        for chunk in self._open(blob_name(desc.digest)):
            digest.update(chunk)
            size += len(chunk)
            if held:
                yield held
            held = chunk
        if size != desc.size or "sha256:" + digest.hexdigest() != desc.digest:
            raise ImageError(f"{self.path}: blob {desc.digest} does not match its digest or size")
        if held:
            yield held

    def read_blob(self, desc: Descriptor) -> bytes:
        return b"".join(self.stream_blob(desc))
