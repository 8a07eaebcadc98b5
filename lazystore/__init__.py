"""lazystore: a lazily fetched Nix store (FUSE daemon + containerd snapshotter)."""

__version__ = "0.1.0"
