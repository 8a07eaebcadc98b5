# lazystore as a Nix package: `pkgs.callPackage ./package.nix { }`.
{ lib, stdenv, python3Packages, fuse3, bash, coreutils, findutils, gnutar, gzip }:

let
  root = ../.;
  init = builtins.readFile (root + "/lazystore/__init__.py");
  version = builtins.head (builtins.match ".*__version__ = \"([^\"]+)\".*" init);
in
python3Packages.buildPythonApplication {
  pname = "lazystore";
  inherit version;
  pyproject = true;

  # Only what the wheel is built from: no .venv, caches or benchmark results.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/lazystore")
      (root + "/setup.cfg")
      (root + "/pyproject.toml")
      (root + "/README.rst")
    ];
  };

  build-system = [ python3Packages.setuptools python3Packages.wheel ];

  # setup.cfg [options] install_requires (httpx[http2] is httpx + h2).
  dependencies = with python3Packages; [
    pyfuse3
    trio
    httpx
    h2
    h11
    zstandard
    brotli
    lz4
    cachetools
    msgpack
    cryptography
    grpcio
    protobuf
    prometheus-client
  ];

  # fusermount3 for clearing a stale mount when the host has none on PATH
  # (NixOS' setuid wrapper in /run/wrappers/bin, if on PATH, comes first).
  makeWrapperArgs = [ "--suffix" "PATH" ":" (lib.makeBinPath [ fuse3 ]) ];

  # The test suite needs root, FUSE, containerd and a working Nix: run it with
  # scripts/test on a machine, not in the build sandbox.
  doCheck = false;
  pythonImportsCheck = [ "lazystore" "lazystore.cli" ];

  # `lazystore.buildImage { name; tag; config; copyToRoot; }` (build-image.nix),
  # its builder's tools from nixpkgs, so it also builds in the sandbox.
  passthru.buildImage = import ./build-image.nix {
    inherit (stdenv.hostPlatform) system;
    shell = "${bash}/bin/sh";
    path = lib.makeBinPath [ coreutils findutils gnutar gzip ];
  };

  meta = {
    description = "A lazily fetched Nix store: FUSE daemon and containerd snapshotter";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "lazystore";
  };
}
