"""Registry errors: the distribution spec's error codes and HTTP statuses.

Every failure answering a request is a :class:`RegistryError`; the HTTP layer
turns it into the spec's JSON body (``{"errors": [{"code", "message",
"detail"}]}``) with its status, in one place (``app.error_response``).
"""

from __future__ import annotations

from lazystore.errors import LazystoreError


class RegistryError(LazystoreError):
    code = "UNKNOWN"
    status = 500


class NameInvalid(RegistryError):
    code, status = "NAME_INVALID", 400


class NameUnknown(RegistryError):
    code, status = "NAME_UNKNOWN", 404


class ManifestUnknown(RegistryError):
    code, status = "MANIFEST_UNKNOWN", 404


class TagInvalid(RegistryError):
    code, status = "TAG_INVALID", 400


class BlobUnknown(RegistryError):
    code, status = "BLOB_UNKNOWN", 404


class DigestInvalid(RegistryError):
    code, status = "DIGEST_INVALID", 400


class Unsupported(RegistryError):
    code, status = "UNSUPPORTED", 405


class NotFound(RegistryError):
    """A path outside the API (no spec code fits better than NAME_UNKNOWN)."""

    code, status = "NAME_UNKNOWN", 404


class Unavailable(RegistryError):
    """The binary caches (or Nix) could not be asked; try again later."""

    code, status = "UNAVAILABLE", 503
