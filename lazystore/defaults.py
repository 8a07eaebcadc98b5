"""The default paths of a lazystore host, defined once: what the commands'
options default to and what ``lazystore install-systemd`` writes (the NixOS
module's option defaults are the same; tests/test_deploy_nixos.py compares)."""

MOUNT_POINT = "/run/lazystore"
CONTROL_SOCKET = "/run/lazystore.sock"
CACHE_DIR = "/var/cache/lazystore"
SNAPSHOTTER_SOCKET = "/run/lazystore-snapshotter.sock"
SNAPSHOTTER_ROOT = "/var/lib/lazystore/snapshotter"
IMAGE_SERVICE_SOCKET = "/run/lazystore-image.sock"
REGISTRY_CACHE_DIR = "/var/cache/lazystore-registry"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
