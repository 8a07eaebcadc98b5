"""Generated protobuf/gRPC modules for containerd's Snapshots API (scripts/gen-proto)."""
