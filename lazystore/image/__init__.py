"""OCI images of Nix closures (nix-snapshotter compatible) and registry push."""
