# The `wide` closure (wide.nix) as a buildImage image (nixos-module/build-image.nix).
{ blobs ? "20" }:
let
  wide = import ./wide.nix { inherit blobs; };
  buildImage = import ../../nixos-module/build-image.nix { };
in
buildImage { name = "wide-image"; config = { entrypoint = [ "${wide}/bin/wide" ]; }; }
