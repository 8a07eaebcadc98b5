"""FUSE operations and inode table over the store."""
