"""nix-snapshotter's names for a nix layer, the one definition for every part.

An image's layer descriptor carries them as annotations (``lazystore image
build``, the registry, the CRI image service) and containerd hands them to the
snapshotter as snapshot labels: ``nix-layer: "true"`` with one
``nix-store-path.<i>`` per store path (from 0), or, in nix-snapshotter's newer
form, one ``nix-closure`` naming a closureInfo store path whose
``store-paths`` file lists the closure.

lazystore's own: ``lazystore-profile``, the store paths (basenames, space
separated) an access profile says the image's program reads first, in that
order; containerd limits a label (key and value) to 4096 bytes, so at most
``PROFILE_BYTES`` of them.
"""

PREFIX = "containerd.io/snapshot/"
NIX_LAYER = PREFIX + "nix-layer"
NIX_STORE_PATH = PREFIX + "nix-store-path."
NIX_CLOSURE = PREFIX + "nix-closure"
LAZYSTORE_PROFILE = PREFIX + "lazystore-profile"
PROFILE_BYTES = 4096 - len(LAZYSTORE_PROFILE)
