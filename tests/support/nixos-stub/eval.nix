# Evaluate nixos-module/ with a given configuration against the stub module
# system, as a NixOS system would:
#
#   nix-instantiate --eval --strict --json --expr \
#     'import ./eval.nix { config = { services.lazystore.enable = true; }; }'
#
# Returns { options (declared under services.lazystore), values, assertions (failed
# ones' messages), systemd.services, virtualisation.containerd.settings,
# environment.systemPackages, package }.
{ config ? { }, module ? ../../../nixos-module }:
let
  lib = import ./lib.nix;
  inherit (import ./modules.nix lib) evalModules;
  inherit (lib) mkOption types;

  fakeDerivation = pname: version: extra: {
    type = "derivation";
    inherit pname version;
    name = "${pname}-${version}";
    outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" pname)}-${pname}-${version}";
    meta = { mainProgram = pname; };
  } // extra;

  python3Packages = builtins.listToAttrs (map (name: { inherit name; value = fakeDerivation name "1.0" { }; }) [
    "pyfuse3" "trio" "httpx" "h2" "h11" "zstandard" "brotli" "lz4" "cachetools" "msgpack"
    "cryptography" "grpcio" "protobuf" "prometheus-client" "setuptools" "wheel"
  ]) // {
    # Records its arguments so the tests can check the package's dependencies.
    buildPythonApplication = args:
      fakeDerivation args.pname args.version {
        inherit (args) meta;
        dependencies = map (d: d.pname) args.dependencies;
        buildSystem = map (d: d.pname) args.build-system;
        pythonImportsCheck = args.pythonImportsCheck or [ ];
        doCheck = args.doCheck or true;
        makeWrapperArgs = args.makeWrapperArgs or [ ];
      } // (args.passthru or { });
  };

  pkgs = {
    inherit python3Packages;
    fuse3 = fakeDerivation "fuse3" "3.14.0" { };
    util-linux = fakeDerivation "util-linux" "2.39" { };
    coreutils = fakeDerivation "coreutils" "9.4" { };
    nix = fakeDerivation "nix" "2.18.1" { };
    containerd = fakeDerivation "containerd" "1.7.27" { };
    bash = fakeDerivation "bash" "5.2" { };
    findutils = fakeDerivation "findutils" "4.9" { };
    gnutar = fakeDerivation "gnutar" "1.35" { };
    gzip = fakeDerivation "gzip" "1.13" { };
    stdenv.hostPlatform.system = "x86_64-linux";
    callPackage = fn: overrides:
      let f = import fn; in
      f (builtins.intersectAttrs (builtins.functionArgs f) (pkgs // { inherit lib pkgs; }) // overrides);
  };

  # NixOS' utils.escapeSystemdExecArg(s): a JSON string is a systemd
  # double-quoted word once `%` (specifiers) and `$` (variables) are doubled.
  utils = rec {
    escapeSystemdExecArg = arg:
      builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON (toString arg));
    escapeSystemdExecArgs = args: builtins.concatStringsSep " " (map escapeSystemdExecArg args);
  };

  # The NixOS options the module reads or defines, with nixpkgs' defaults.
  host = {
    options = {
      assertions = mkOption { type = types.listOf types.anything; default = [ ]; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      nix.settings.substituters = mkOption {
        type = types.listOf types.str;
        default = [ "https://cache.nixos.org/" ];
      };
      nix.settings.trusted-public-keys = mkOption {
        type = types.listOf types.str;
        default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      };
      systemd.services = mkOption { type = types.anything; default = { }; };
      virtualisation.containerd.enable = mkOption { type = types.bool; default = false; };
      virtualisation.containerd.settings = mkOption { type = types.anything; default = { }; };
    };
  };

  result = evalModules {
    modules = [ host module config ];
    specialArgs = { inherit pkgs utils; };
  };
  cfg = result.config;
in
{
  options = result.options.services.lazystore;
  # Every value (so that bad definitions are type-checked), the package as its path.
  values = cfg.services.lazystore;
  assertions = map (a: a.message) (builtins.filter (a: !a.assertion) cfg.assertions);
  systemd.services = cfg.systemd.services;
  virtualisation.containerd = { inherit (cfg.virtualisation.containerd) enable settings; };
  environment.systemPackages = map (p: p.outPath) cfg.environment.systemPackages;
  fuse3 = pkgs.fuse3.outPath;
  tools = builtins.listToAttrs (map (name: { inherit name; value = pkgs.${name}.outPath; })
    [ "bash" "coreutils" "findutils" "gnutar" "gzip" ]);
  package = {
    inherit (cfg.services.lazystore.package) name;
    path = cfg.services.lazystore.package.outPath;
    dependencies = cfg.services.lazystore.package.dependencies or null;
    buildSystem = cfg.services.lazystore.package.buildSystem or null;
    doCheck = cfg.services.lazystore.package.doCheck or null;
    makeWrapperArgs = cfg.services.lazystore.package.makeWrapperArgs or null;
    mainProgram = cfg.services.lazystore.package.meta.mainProgram;
    # What buildImage's builder runs with (its derivation, not built).
    buildImage = let
      package = cfg.services.lazystore.package;
      image = package.buildImage { name = "probe"; };
    in if package ? buildImage then { inherit (image) builder PATH system name; } else null;
  };
}
