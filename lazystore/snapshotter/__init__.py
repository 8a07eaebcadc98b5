"""containerd Snapshots gRPC service backed by overlayfs and daemon views."""
