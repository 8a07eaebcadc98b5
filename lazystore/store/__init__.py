"""Local cache on disk: materialised store paths, index, quota and eviction."""
