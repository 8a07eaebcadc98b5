"""``lazystore registry``: a read-only OCI distribution registry of Nix closures."""
