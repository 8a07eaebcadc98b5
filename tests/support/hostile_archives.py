"""Image archives that the image service must refuse, each wrong in one way.

``layout(...)`` writes a small valid OCI layout tar (one layer, optional
annotations); the writers below break one thing each. ``MESSAGES`` holds the
words the refusal must contain.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

NIX_NOTES = {"containerd.io/snapshot/nix-layer": "true",
             "containerd.io/snapshot/nix-store-path.0": "/nix/store/" + "a" * 32 + "-x"}

MESSAGES = {
    "not-a-tar": "not an image archive",
    "escaping-entry": "lies outside the image layout",
    "absolute-entry": "lies outside the image layout",
    "symlink-entry": "is not a regular file or directory",
    "duplicate-entry": "appears twice",
    "huge-manifest": "larger than 4 MiB",
    "digest-mismatch": "does not match its digest or size",
    "no-index": "no index.json",
    "two-images": "exactly one image",
    "missing-layer": "is missing",
    "symlink-path": "a symlink",  # a store path that is a symlink (to a host file)
}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("nix")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    return buf.getvalue()


def documents(notes: dict[str, str] | None = None, manifest_pad: int = 0
              ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(index document, blobs by digest) of a one-layer image."""
    layer = _layer()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]}}).encode()
    layer_desc: dict[str, Any] = {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                  "digest": _digest(layer), "size": len(layer)}
    if notes:
        layer_desc["annotations"] = notes
    manifest_doc: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config), "size": len(config)},
        "layers": [layer_desc]}
    if manifest_pad:
        manifest_doc["annotations"] = {"pad": "x" * manifest_pad}
    manifest = json.dumps(manifest_doc).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": _digest(manifest), "size": len(manifest)}]}
    blobs = {_digest(b): b for b in (layer, config, manifest)}
    return index, blobs


Entry = tuple[str, bytes | None, str]  # name, data, symlink target ("" for none)


def write_tar(dest: Path, entries: list[Entry]) -> Path:
    with tarfile.open(dest, mode="w") as tar:
        for name, data, target in entries:
            info = tarfile.TarInfo(name)
            if target:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return dest


def entries(index: dict[str, Any], blobs: dict[str, bytes]) -> list[Entry]:
    found: list[Entry] = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', ""),
                          ("index.json", json.dumps(index).encode(), "")]
    found += [(f"blobs/sha256/{d[7:]}", data, "") for d, data in blobs.items()]
    return found


def layout(dest: Path, notes: dict[str, str] | None = None) -> Path:
    """A valid archive (a nix layer when *notes* are nix annotations)."""
    return write_tar(dest, entries(*documents(notes)))


def _broken(what: str) -> Callable[[Path], Path]:
    def write(dest: Path) -> Path:
        index, blobs = documents(NIX_NOTES, manifest_pad=(5 << 20) if what == "huge-manifest"
                                 else 0)
        files = entries(index, blobs)
        layer_name = files[2][0]
        if what == "not-a-tar":
            dest.write_text("just some text, not a tar\n" * 40)
            return dest
        if what == "symlink-path":
            dest.symlink_to("/etc/hostname")
            return dest
        if what == "escaping-entry":
            files.append(("blobs/../../evil", b"x", ""))
        elif what == "absolute-entry":
            files.append(("/etc/evil", b"x", ""))
        elif what == "symlink-entry":
            files.append(("blobs/sha256/" + "f" * 64, None, "/etc/passwd"))
        elif what == "duplicate-entry":
            files.append((layer_name, b"other bytes", ""))
        elif what == "digest-mismatch":
            files[2] = (layer_name, b"\0" * len(files[2][1] or b""), "")
        elif what == "no-index":
            files = [f for f in files if f[0] != "index.json"]
        elif what == "two-images":
            index["manifests"] *= 2
            files[1] = ("index.json", json.dumps(index).encode(), "")
        elif what == "missing-layer":
            files = [f for f in files if f[0] != layer_name]
        return write_tar(dest, files)
    return write


def write_all(directory: Path) -> dict[str, Path]:
    """Every broken archive (what is wrong -> its file) under *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    return {what: _broken(what)(directory / f"{what}.tar") for what in MESSAGES}
