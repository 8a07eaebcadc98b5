"""OCI image-layout archives written by tests and benchmarks (loadable by
``ctr image import``, pushable by ``lazystore image push``): uncompressed
layers from lists of entries, and nix-snapshotter's placeholder layer."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from lazystore.testing import nixcache


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    """(name, data or None for a directory, mode) -> an uncompressed tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1
            if data is None:
                info.type = tarfile.DIRTYPE
                out.addfile(info)
            else:
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def oci_archive(dest: Path, name: str, layers: list[tuple[bytes, dict[str, str]]],
                entrypoint: list[str], user: str = "") -> Path:
    """Write an OCI image-layout tar (loadable by ``ctr image import``)."""
    blobs: dict[str, bytes] = {}
    layer_descs, diff_ids = [], []
    for data, notes in layers:
        desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, data)}
        if notes:
            desc["annotations"] = notes
        layer_descs.append(desc)
        diff_ids.append(desc["digest"])
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "User": user},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(blobs, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": layer_descs}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                     **_blob(blobs, json.dumps(manifest).encode()),
                     "annotations": {"io.containerd.image.name": name,
                                     "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    files = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}', 0o644),
             ("index.json", json.dumps(index).encode(), 0o644),
             ("blobs", None, 0o755), ("blobs/sha256", None, 0o755)]
    files += [(f"blobs/sha256/{d[7:]}", data, 0o644) for d, data in blobs.items()]
    dest.write_bytes(tar(files))
    return dest


def placeholder_layer(top: str, all_dirs: bool = False) -> tuple[bytes, dict[str, str]]:
    """nix-snapshotter's mountpoint layer and annotations: an empty directory for
    each store path that is one (followed through a symlink, as its os.Stat
    does), an empty 0555 file for any other; *all_dirs*: directories for all."""
    paths = nixcache.closure(top)
    entries: list[tuple[str, bytes | None, int]] = [
        ("nix", None, 0o755), ("nix/store", None, 0o755)]
    entries += [(p.lstrip("/") + "/", None, 0o555) if all_dirs or os.path.isdir(p)
                else (p.lstrip("/"), b"", 0o555) for p in paths]
    notes = {"containerd.io/snapshot/nix-layer": "true"}
    notes.update({f"containerd.io/snapshot/nix-store-path.{i}": p for i, p in enumerate(paths)})
    return tar(entries), notes
