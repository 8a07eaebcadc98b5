"""nix-snapshotter's names for a nix layer, the one definition for every part.

An image's layer descriptor carries them as annotations (``lazystore image
build``, the registry, the CRI image service) and containerd hands them to the
snapshotter as snapshot labels: ``nix-layer: "true"`` with one
``nix-store-path.<i>`` per store path (from 0), or, in nix-snapshotter's newer
form, one ``nix-closure`` naming a closureInfo store path whose
``store-paths`` file lists the closure.
"""

PREFIX = "containerd.io/snapshot/"
NIX_LAYER = PREFIX + "nix-layer"
NIX_STORE_PATH = PREFIX + "nix-store-path."
NIX_CLOSURE = PREFIX + "nix-closure"
