"""The registry's blob store: content-addressed files under the cache dir.

``<root>/blobs/sha256/<hex>`` hold config and layer blobs, written under
``<root>/tmp`` and renamed into place, so a blob that exists is complete;
``tmp`` is emptied at start. ``<root>/layers/<key>.json`` remembers which blob
a classic layer of a given group of store paths is, so a layer is built once
per cache dir (digests are deterministic: rebuilding gives the same blob).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from lazystore.image import oci
from lazystore.nix import fsio


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.layers = root / "layers"
        self.tmp = root / "tmp"

    def open(self) -> None:
        """Create the directories and remove what an earlier run left half-written."""
        if self.tmp.exists():
            fsio.remove_tree(self.tmp)
        for d in (self.blobs, self.layers, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path | None:
        """The file of blob *digest* (``sha256:<hex>``), if stored."""
        path = self.blobs / digest.removeprefix("sha256:")
        return path if path.is_file() else None

    def put_bytes(self, data: bytes) -> str:
        digest = oci.digest_of(data)
        if self.path(digest) is None:
            fd, name = tempfile.mkstemp(dir=self.tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.put_file(Path(name), digest)
        return digest

    def put_file(self, path: Path, digest: str) -> Path:
        """Move the complete blob at *path* (under ``tmp``) into the store."""
        dest = self.blobs / digest.removeprefix("sha256:")
        path.chmod(0o444)
        os.replace(path, dest)
        return dest

    def make_tmp(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp))

    # -- classic layers by the store paths they hold ------------------------------

    def layer(self, group: list[str]) -> oci.Layer | None:
        """The stored layer of *group* (store paths), if it was built and is intact."""
        try:
            record = json.loads((self.layers / f"{_key(group)}.json").read_text())
            digest, size, diff_id = record["digest"], int(record["size"]), record["diff_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.path(digest)
        if path is None or path.stat().st_size != size:
            return None
        return oci.Layer(path, digest, size, diff_id)

    def put_layer(self, group: list[str], layer: oci.Layer) -> oci.Layer:
        """Store *layer* (a file under ``tmp``) as the layer of *group*."""
        path = self.put_file(layer.path, layer.digest)
        record = {"digest": layer.digest, "size": layer.size, "diff_id": layer.diff_id,
                  "paths": sorted(group)}
        fd, name = tempfile.mkstemp(dir=self.tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, sort_keys=True)
        os.replace(name, self.layers / f"{_key(group)}.json")
        return oci.Layer(path, layer.digest, layer.size, layer.diff_id)


def _key(group: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(group)).encode()).hexdigest()
