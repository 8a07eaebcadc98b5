"""Pure Nix formats: nix-base32, hashes, store paths, NAR, narinfo, signatures."""
