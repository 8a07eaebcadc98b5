"""Errors of the image service, each with the gRPC status it is answered with."""

from __future__ import annotations

from lazystore.errors import LazystoreError


class ImageServiceError(LazystoreError):
    """Base class; subclasses name the gRPC status code (see service.status_code)."""


class InvalidReference(ImageServiceError):
    """The reference is not ``nix:0/`` + a store path (INVALID_ARGUMENT)."""


class ArchiveNotFound(ImageServiceError):
    """No substituter has the store path (NOT_FOUND)."""


class BadArchive(ImageServiceError):
    """The store path is no acceptable image archive (FAILED_PRECONDITION)."""


class Unavailable(ImageServiceError):
    """The daemon or containerd cannot be reached or failed (UNAVAILABLE)."""
