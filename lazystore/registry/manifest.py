"""Manifest media types (pure): OCI, or Docker schema 2 for clients that ask.

The registry builds OCI manifests (as ``lazystore image build`` writes them);
a client whose Accept header names Docker's schema 2 and not OCI gets the same
manifest with Docker's media types (same config and layer blobs).
"""

from __future__ import annotations

import json

from lazystore.image import oci

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_DOCKER_TYPES = {
    oci.MEDIA_MANIFEST: DOCKER_MANIFEST,
    oci.MEDIA_CONFIG: DOCKER_CONFIG,
    oci.MEDIA_LAYER_GZIP: DOCKER_LAYER_GZIP,
}


def accepted_types(accept: str) -> list[str]:
    """The media types of an Accept header, parameters dropped, in order."""
    return [part.split(";", 1)[0].strip().lower() for part in accept.split(",") if part.strip()]


def wants_docker(accept: str) -> bool:
    """Whether to answer with Docker schema 2: asked for, and OCI (or anything) not."""
    types = accepted_types(accept)
    return DOCKER_MANIFEST in types and oci.MEDIA_MANIFEST not in types and "*/*" not in types


def as_docker(manifest: bytes) -> bytes:
    """The OCI *manifest* with Docker schema 2 media types, canonical JSON."""
    doc = json.loads(manifest)
    doc["mediaType"] = _DOCKER_TYPES[doc["mediaType"]]
    for desc in [doc["config"], *doc["layers"]]:
        desc["mediaType"] = _DOCKER_TYPES.get(desc["mediaType"], desc["mediaType"])
    return oci.canonical_json(doc)
