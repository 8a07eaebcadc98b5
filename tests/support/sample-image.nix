# The sample program (lazystore/testing/sample.nix) as an image built by
# nixos-module/build-image.nix: entrypoint prog, prog's files linked at /.
{ tag ? "" }:
let
  prog = import ../../lazystore/testing/sample.nix { inherit tag; };
  buildImage = import ../../nixos-module/build-image.nix { };
in
buildImage {
  name = "sample-image";
  config = { entrypoint = [ "${prog}/bin/prog" ]; env = [ "PATH=/bin" ]; };
  copyToRoot = [ prog ];
}
