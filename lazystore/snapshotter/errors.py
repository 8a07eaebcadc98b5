"""The snapshotter's errors; each maps to one gRPC status code (service.py)."""

from __future__ import annotations

from lazystore.errors import SnapshotterError


class NotFound(SnapshotterError):
    pass


class AlreadyExists(SnapshotterError):
    pass


class FailedPrecondition(SnapshotterError):
    pass


class InvalidArgument(SnapshotterError):
    pass


class Unavailable(SnapshotterError):
    """The daemon (needed for a nix layer's view) could not be reached or refused."""
