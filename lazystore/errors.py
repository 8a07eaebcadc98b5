"""The one exception hierarchy of lazystore.

Every expected failure is a :class:`LazystoreError` whose ``str()`` is a single
clear line. Each layer translates the errors of the layer below it exactly once
(HTTP -> substituter errors -> store errors -> errno / CLI exit status).
"""

from __future__ import annotations


class LazystoreError(Exception):
    """Base class; ``str(exc)`` is a one-line message meant for users."""


class FormatError(LazystoreError):
    """Malformed input in one of Nix's formats (nix32, store path, hash, key...)."""


class NarError(FormatError):
    """A NAR that Nix would reject."""


class NarInfoError(FormatError):
    """A narinfo or nix-cache-info document that cannot be parsed."""


class SignatureError(LazystoreError):
    """A missing, malformed or invalid signature, or an untrusted key."""


class UnpackError(LazystoreError):
    """Unpacking a NAR onto the filesystem failed (nothing was left behind)."""


class SubstituterError(LazystoreError):
    """A binary cache could not provide a verified store path."""


class StoreError(LazystoreError):
    """The local cache could not provide a store path."""


class ControlError(LazystoreError):
    """The daemon's control socket failed or answered with an error."""


class SnapshotterError(LazystoreError):
    """The containerd snapshotter could not complete a request."""


class ImageError(LazystoreError):
    """Building or pushing an OCI image failed."""
