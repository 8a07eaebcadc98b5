# buildImage: a container image of a closure, as an image archive that is
# itself a store path, runnable through the lazystore snapshotter and image
# service (`nix:0/<the archive's store path>`) and through nix-snapshotter.
#
#   buildImage = import ./build-image.nix { };        # tools of the host
#   buildImage = pkgs.lazystore.buildImage;           # tools from nixpkgs (package.nix)
#   buildImage {
#     name = "hello"; tag = "latest";
#     config = { entrypoint = [ "${pkgs.hello}/bin/hello" ]; };
#     copyToRoot = [ pkgs.busybox ];                   # links at / to their files
#   }
#
# The archive is an OCI image layout tar with one nix layer: an empty
# placeholder per store path of the closure (of `config`'s store paths and of
# `copyToRoot`) plus the `copyToRoot` links, annotated the way
# nix-snapshotter v0.3 does: `containerd.io/snapshot/nix-closure` names a
# closureInfo store path whose `store-paths` file lists the closure. That path
# references the whole closure and the archive references it, so `nix copy`
# of the archive carries everything the image runs.
#
# The builder is a POSIX shell script over coreutils, GNU tar, gzip and find
# (`shell` and `path`); the defaults take them from the host (/bin/sh,
# /usr/bin:/bin), which only works with `sandbox = false`.
{ system ? builtins.currentSystem, shell ? "/bin/sh", path ? "/usr/bin:/bin" }:

{ name, tag ? "latest", config ? { }, copyToRoot ? [ ] }:

let
  # nix-snapshotter's config keys (lower camel case) -> the OCI config's.
  ociKeys = {
    entrypoint = "Entrypoint"; cmd = "Cmd"; env = "Env"; workingDir = "WorkingDir";
    user = "User"; exposedPorts = "ExposedPorts"; volumes = "Volumes";
    labels = "Labels"; stopSignal = "StopSignal";
  };
  ociConfig = builtins.listToAttrs (map
    (key: { name = ociKeys.${key} or key; value = config.${key}; })
    (builtins.attrNames config));
  architectures = { x86_64-linux = "amd64"; aarch64-linux = "arm64"; i686-linux = "386"; };
  hasDomain = first: builtins.match ".*[.:].*" first != null || first == "localhost";
  parts = builtins.split "/" name;
  fullName =
    if builtins.length parts == 1 then "docker.io/library/${name}"
    else if hasDomain (builtins.head parts) then name
    else "docker.io/${name}";

  run = drvName: script: attrs: derivation ({
    name = drvName;
    inherit system;
    builder = shell;
    args = [ "-c" script ];
    PATH = path;
  } // attrs);

  # A file naming every root of the image; its references are those roots.
  roots = run "${name}-roots" ''
    printf '%s\n' "$configJSON" $copyToRoot > "$out"
  '' {
    configJSON = builtins.toJSON ociConfig;
    inherit copyToRoot;
  };

  # closureInfo: the closure of the roots in `store-paths`, one path a line.
  closureInfo = run "${name}-closure-info" ''
    set -eu
    mkdir "$out"
    # exportReferencesGraph: per path its name, deriver, count, references.
    while read -r p; do
      read -r deriver; read -r n
      while [ "$n" -gt 0 ]; do read -r ref; n=$((n - 1)); done
      [ "$p" = "$rootsPath" ] || printf '%s\n' "$p"
    done < graph | sort > "$out/store-paths"
  '' {
    exportReferencesGraph = [ "graph" roots ];
    rootsPath = roots;
  };
in
run "${name}.tar" (builtins.readFile ./build-image.sh) {
  inherit tag copyToRoot closureInfo;
  imageName = "${fullName}:${tag}";
  configJSON = builtins.toJSON ociConfig;
  architecture = architectures.${system} or system;
}
