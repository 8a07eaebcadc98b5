# NixOS module for lazystore: the FUSE daemon (a lazily fetched view of the
# binary caches' store at /run/lazystore), its containerd proxy snapshotter,
# and the containerd wiring.
#
#   imports = [ /path/to/lazystore/nixos-module ];
#   services.lazystore = {
#     enable = true;
#     snapshotter.enable = true;
#     containerd.enable = true;
#     registry.enable = true;   # `lazystore registry` (no daemon needed)
#     imageService.enable = true;   # kubelet: --image-service-endpoint=unix:///run/lazystore-image.sock
#   };
{ config, lib, pkgs, utils, ... }:

let
  cfg = config.services.lazystore;
  inherit (lib) mkEnableOption mkIf mkMerge mkOption literalExpression optional optionals types;

  exe = lib.getExe cfg.package;

  daemonArgs =
    [ exe "mount" cfg.mountPoint "--cache-dir" cfg.cacheDir "--control-socket" cfg.controlSocket ]
    ++ lib.concatMap (url: [ "--substituter" url ]) cfg.substituters
    ++ lib.concatMap (key: [ "--trusted-public-key" key ]) cfg.trustedPublicKeys
    ++ optionals (cfg.cacheSize != null) [ "--cache-size" cfg.cacheSize ]
    ++ optional cfg.allowOther "--allow-other"
    ++ optionals (cfg.metricsAddress != null) [ "--metrics-address" cfg.metricsAddress ]
    ++ cfg.extraArgs;

  snapshotterArgs =
    [ exe "snapshotter"
      "--address" cfg.snapshotter.address
      "--root" cfg.snapshotter.root
      "--control-socket" cfg.controlSocket
      "--mount-point" cfg.mountPoint ]
    ++ optionals (cfg.snapshotter.metricsAddress != null)
      [ "--metrics-address" cfg.snapshotter.metricsAddress ]
    ++ cfg.snapshotter.extraArgs;

  # Hardening that keeps FUSE working. Deliberately absent for the daemon:
  # every option that gives a service a mount namespace of its own
  # (ProtectSystem, ProtectHome, PrivateTmp, PrivateDevices, ReadWritePaths,
  # ProtectKernelTunables, ProtectKernelModules, ProtectKernelLogs,
  # ProtectControlGroups, ProtectProc, PrivateMounts...). systemd cuts mount
  # propagation from such a namespace to the host, so the FUSE mount (and the
  # views under it that containers use as overlay lowerdirs) would be
  # invisible to containerd and to users. The capability bounding set and the
  # system call filter take away what those options would.
  # HOST:PORT, as the daemons' --listen / --metrics-address read it.
  listenType = types.strMatching "([[][0-9A-Fa-f:]+]|[A-Za-z0-9.-]+):[0-9]{1,5}";
  metricsOption = what: mkOption {
    type = types.nullOr listenType;
    default = null;
    example = "127.0.0.1:9464";
    description = "HOST:PORT where ${what} serves Prometheus metrics (plain HTTP); `null`: off.";
  };

  hardening = {
    DevicePolicy = "closed";
    NoNewPrivileges = true;
    LockPersonality = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "@mount" ];
    SystemCallErrorNumber = "EPERM";
    UMask = "0022";
  };

  # The snapshotter mounts nothing itself (containerd mounts what it
  # describes), so it can have a read-only view of the system in a mount
  # namespace of its own; host mounts (the daemon's) still propagate into it.
  snapshotterSandbox = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ReadWritePaths = [ socketDir ] ++ optional (!(stateDirectory ? dir)) cfg.snapshotter.root;
  };
  socketDir = dirOf cfg.snapshotter.address;
  # ReadWritePaths= needs its directories before the namespace is set up: an
  # ExecStartPre= outside the sandbox (`+`) makes those systemd does not.
  snapshotterDirs = optional (socketDir != "/run") socketDir
    ++ optional (!(stateDirectory ? dir)) cfg.snapshotter.root;

  # What ProtectHome= and PrivateTmp= hide from the snapshotter (kept equal to
  # SNAPSHOTTER_HIDDEN in lazystore/deploy.py): the paths it shares with the
  # daemon and containerd cannot be below them.
  snapshotterHidden = [ "/home" "/root" "/run/user" "/tmp" "/var/tmp" ];
  hiddenFromSnapshotter = path:
    lib.any (dir: path == dir || lib.hasPrefix "${dir}/" path) snapshotterHidden;
  sharedWithSnapshotter = {
    "snapshotter.address" = cfg.snapshotter.address;
    "snapshotter.root" = cfg.snapshotter.root;
    controlSocket = cfg.controlSocket;
    mountPoint = cfg.mountPoint;
  };

  # StateDirectory=/CacheDirectory= take paths relative to /var/lib, /var/cache.
  managedDir = base: path:
    lib.optionalAttrs (lib.hasPrefix "${base}/" path) {
      dir = lib.removePrefix "${base}/" path;
    };
  cacheDirectory = managedDir "/var/cache" cfg.cacheDir;
  registryCacheDirectory = managedDir "/var/cache" cfg.registry.cacheDir;

  registryArgs =
    [ exe "registry" "--listen" cfg.registry.listen "--cache-dir" cfg.registry.cacheDir ]
    ++ lib.concatMap (url: [ "--substituter" url ]) cfg.substituters
    ++ lib.concatMap (key: [ "--trusted-public-key" key ]) cfg.trustedPublicKeys
    ++ optionals (cfg.registry.expression != null) [ "--expression" (toString cfg.registry.expression) ]
    ++ optionals (cfg.registry.metricsAddress != null)
      [ "--metrics-address" cfg.registry.metricsAddress ];
  # Without an expression the registry needs no privilege and writes only its
  # cache; building an expression runs Nix as root (/nix/store, /tmp).
  registrySandbox = lib.optionalAttrs (cfg.registry.expression == null) (
    removeAttrs snapshotterSandbox [ "ReadWritePaths" ] // {
    CapabilityBoundingSet = [ ];
  } // lib.optionalAttrs (!(registryCacheDirectory ? dir)) {
    ExecStartPre = "+" + utils.escapeSystemdExecArgs
      [ "${pkgs.coreutils}/bin/mkdir" "-p" cfg.registry.cacheDir ];
    ReadWritePaths = [ cfg.registry.cacheDir ];
  });
  stateDirectory = managedDir "/var/lib" cfg.snapshotter.root;

  imageServiceArgs =
    [ exe "image-service"
      "--address" cfg.imageService.address
      "--runtime-endpoint" cfg.imageService.runtimeEndpoint
      "--control-socket" cfg.controlSocket
      "--mount-point" cfg.mountPoint ]
    ++ optionals (cfg.imageService.metricsAddress != null)
      [ "--metrics-address" cfg.imageService.metricsAddress ];
  imageServiceSocketDir = dirOf cfg.imageService.address;
  sharedWithImageService = {
    "imageService.address" = cfg.imageService.address;
    "imageService.runtimeEndpoint" = cfg.imageService.runtimeEndpoint;
  };
in
{
  options.services.lazystore = {
    enable = mkEnableOption "the lazystore FUSE daemon, a lazily fetched view of the binary caches' Nix store";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The lazystore package to run.";
    };

    mountPoint = mkOption {
      type = types.path;
      default = "/run/lazystore";
      description = "Where the daemon mounts the lazy store.";
    };

    substituters = mkOption {
      type = types.listOf types.str;
      default = config.nix.settings.substituters;
      defaultText = literalExpression "config.nix.settings.substituters";
      description = "Binary caches to serve store paths from, in priority order.";
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = config.nix.settings.trusted-public-keys;
      defaultText = literalExpression "config.nix.settings.trusted-public-keys";
      description = "Keys (`name:base64`) whose signature a narinfo must carry.";
    };

    cacheDir = mkOption {
      type = types.path;
      default = "/var/cache/lazystore";
      description = "Local cache of fetched store paths and their metadata.";
    };

    cacheSize = mkOption {
      # As `lazystore mount --cache-size` reads it (powers of 1024).
      type = types.nullOr (types.strMatching "[0-9]+(\\.[0-9]+)?[KMGTkmgt]?([iI]?[bB])?");
      default = null;
      example = "20G";
      description = ''
        Size limit of the local cache; least recently used store paths are
        evicted beyond it (and fetched again when read). `null`: no limit.
      '';
    };

    controlSocket = mkOption {
      type = types.path;
      default = "/run/lazystore.sock";
      description = "The daemon's control socket (used by the CLI and the snapshotter).";
    };

    allowOther = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Let every user (and containers running as non-root users) read the
        mount, as everyone can read /nix/store.
      '';
    };

    metricsAddress = metricsOption "the daemon";

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--verbose" ];
      description = "Further arguments for `lazystore mount`.";
    };

    snapshotter = {
      enable = mkEnableOption "the lazystore containerd proxy snapshotter";

      address = mkOption {
        type = types.path;
        default = "/run/lazystore-snapshotter.sock";
        description = "The snapshotter's gRPC socket, which containerd connects to.";
      };

      root = mkOption {
        type = types.path;
        default = "/var/lib/lazystore/snapshotter";
        description = "The snapshotter's state: metadata and overlay directories.";
      };

      metricsAddress = metricsOption "the snapshotter";

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Further arguments for `lazystore snapshotter`.";
      };
    };

    registry = {
      enable = mkEnableOption "`lazystore registry`, an OCI registry of images of the substituters' store paths, made on request";

      listen = mkOption {
        type = listenType;
        default = "127.0.0.1:5000";
        description = "HOST:PORT the registry serves on (plain HTTP).";
      };

      expression = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = literalExpression "./images.nix";
        description = ''
          A Nix file evaluating to an attribute set: image name `a/b` is an
          image of its attributes a and b, built with Nix. Their outputs must
          be in one of `substituters` for lazystore nodes to fetch them.
        '';
      };

      cacheDir = mkOption {
        type = types.path;
        default = "/var/cache/lazystore-registry";
        description = "Blobs and built layers of the registry's images.";
      };

      metricsAddress = metricsOption "the registry";
    };

    imageService = {
      enable = mkEnableOption ''
        `lazystore image-service`, the CRI image service the kubelet's
        `--image-service-endpoint` points at: `nix:0/<store path>` images
        through the daemon, every other image through containerd's CRI'';

      address = mkOption {
        type = types.path;
        default = "/run/lazystore-image.sock";
        description = "The image service's gRPC socket (the kubelet's --image-service-endpoint).";
      };

      runtimeEndpoint = mkOption {
        type = types.path;
        default = "/run/containerd/containerd.sock";
        description = "The CRI it forwards to and imports into (containerd's socket).";
      };

      metricsAddress = metricsOption "the image service";
    };

    containerd = {
      enable = mkEnableOption "the lazystore snapshotter as containerd proxy plugin `lazystore`";

      makeDefaultCriSnapshotter = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Make `lazystore` the snapshotter of containerd's CRI plugin
          (Kubernetes pods then use it without further configuration).
        '';
      };
    };
  };

  config = mkMerge [
    {
      assertions = [
        {
          assertion = cfg.snapshotter.enable -> cfg.enable;
          message = "services.lazystore.snapshotter.enable needs services.lazystore.enable.";
        }
        {
          assertion = cfg.containerd.enable -> cfg.snapshotter.enable;
          message = "services.lazystore.containerd.enable needs services.lazystore.snapshotter.enable.";
        }
      ] ++ lib.mapAttrsToList (name: path: {
        assertion = cfg.snapshotter.enable -> !(hiddenFromSnapshotter (toString path));
        message = "services.lazystore.${name} (${toString path}) is below a directory "
          + "the snapshotter's sandbox (ProtectHome, PrivateTmp) hides from it.";
      }) sharedWithSnapshotter ++ [
        {
          assertion = cfg.containerd.makeDefaultCriSnapshotter -> cfg.containerd.enable;
          message = "services.lazystore.containerd.makeDefaultCriSnapshotter needs services.lazystore.containerd.enable.";
        }
        {
          assertion = cfg.imageService.enable -> cfg.containerd.makeDefaultCriSnapshotter;
          message = "services.lazystore.imageService.enable needs services.lazystore.containerd.makeDefaultCriSnapshotter.";
        }
      ] ++ lib.mapAttrsToList (name: path: {
        assertion = cfg.imageService.enable -> !(hiddenFromSnapshotter (toString path));
        message = "services.lazystore.${name} (${toString path}) is below a directory "
          + "the image service's sandbox (ProtectHome, PrivateTmp) hides from it.";
      }) sharedWithImageService;
    }

    (mkIf cfg.enable {
      environment.systemPackages = [ cfg.package ];

      systemd.services.lazystore = {
        description = "lazystore: lazily fetched Nix store (FUSE)";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # Clearing a stale mount left by a killed daemon: fusermount3, else umount.
        path = [ pkgs.fuse3 pkgs.util-linux ];
        serviceConfig = hardening // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = utils.escapeSystemdExecArgs daemonArgs;
          DeviceAllow = [ "/dev/fuse rw" ];
          # Mounting; reading and evicting read-only (0444/0555) cached trees.
          CapabilityBoundingSet = [ "CAP_SYS_ADMIN" "CAP_DAC_OVERRIDE" "CAP_DAC_READ_SEARCH" "CAP_FOWNER" ];
          Restart = "on-failure";
          RestartSec = 2;
          TimeoutStopSec = 30;
          LimitNOFILE = 1048576;
          # /dev/fuse waits in systemd's descriptor store while the daemon
          # restarts: the mount, and the containers on it, never notice.
          FileDescriptorStoreMax = 4;
          Environment = [ "FDSTORE=4" ];
        } // lib.optionalAttrs (cacheDirectory ? dir) {
          CacheDirectory = cacheDirectory.dir;
          CacheDirectoryMode = "0700";
        };
      };
    })

    (mkIf (cfg.enable && cfg.snapshotter.enable) {
      systemd.services.lazystore-snapshotter = {
        description = "lazystore: containerd snapshotter for lazily fetched Nix store paths";
        wantedBy = [ "multi-user.target" ];
        # wants, not requires: a daemon restart must not restart the snapshotter
        wants = [ "lazystore.service" ];
        after = [ "lazystore.service" ];
        before = [ "containerd.service" ];
        serviceConfig = hardening // snapshotterSandbox // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = utils.escapeSystemdExecArgs snapshotterArgs;
          Restart = "on-failure";
          RestartSec = 2;
          TimeoutStopSec = 30;
          # Overlay mounts; creating and removing snapshot trees of any owner and mode.
          CapabilityBoundingSet = [ "CAP_SYS_ADMIN" "CAP_DAC_OVERRIDE" "CAP_DAC_READ_SEARCH" "CAP_FOWNER" "CAP_CHOWN" ];
        } // lib.optionalAttrs (stateDirectory ? dir) {
          StateDirectory = stateDirectory.dir;
          StateDirectoryMode = "0700";
        } // lib.optionalAttrs (snapshotterDirs != [ ]) {
          ExecStartPre = "+" + utils.escapeSystemdExecArgs
            ([ "${pkgs.coreutils}/bin/mkdir" "-p" ] ++ snapshotterDirs);
        };
      };
    })

    (mkIf (cfg.enable && cfg.snapshotter.enable && cfg.containerd.enable) {
      virtualisation.containerd.enable = true;
      virtualisation.containerd.settings.proxy_plugins.lazystore = {
        type = "snapshot";
        address = cfg.snapshotter.address;
      };
      # containerd still starts when lazystore fails: other snapshotters keep working.
      systemd.services.containerd = {
        wants = [ "lazystore-snapshotter.service" ];
        after = [ "lazystore-snapshotter.service" ];
      };
    })

    (mkIf cfg.registry.enable {
      systemd.services.lazystore-registry = {
        description = "lazystore: OCI registry of Nix closures' images, made on request";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        path = optional (cfg.registry.expression != null) pkgs.nix;
        serviceConfig = hardening // registrySandbox // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = utils.escapeSystemdExecArgs registryArgs;
          Restart = "on-failure";
          RestartSec = 2;
          TimeoutStopSec = 30;
        } // lib.optionalAttrs (registryCacheDirectory ? dir) {
          CacheDirectory = registryCacheDirectory.dir;
          CacheDirectoryMode = "0700";
        };
      };
    })

    (mkIf (cfg.enable && cfg.imageService.enable) {
      # Nix layers' annotations reach the snapshotter as labels (remote snapshots).
      virtualisation.containerd.settings.plugins."io.containerd.grpc.v1.cri".containerd.disable_snapshot_annotations = false;
      systemd.services.lazystore-image-service = {
        description = "lazystore: CRI image service (nix:0 images) for the kubelet";
        wantedBy = [ "multi-user.target" ];
        requires = [ "lazystore.service" ];
        wants = [ "containerd.service" ];
        after = [ "lazystore.service" "lazystore-snapshotter.service" "containerd.service" ];
        before = [ "kubelet.service" ];
        path = [ pkgs.containerd ];  # ctr, for imports
        # No capability: it reads the mount, talks to root's sockets and runs ctr.
        serviceConfig = hardening // snapshotterSandbox // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = utils.escapeSystemdExecArgs imageServiceArgs;
          Restart = "on-failure";
          RestartSec = 2;
          TimeoutStopSec = 30;
          CapabilityBoundingSet = [ ];
          ReadWritePaths = [ imageServiceSocketDir ];
        } // lib.optionalAttrs (imageServiceSocketDir != "/run") {
          ExecStartPre = "+" + utils.escapeSystemdExecArgs
            [ "${pkgs.coreutils}/bin/mkdir" "-p" imageServiceSocketDir ];
        };
      };
    })

    (mkIf (cfg.enable && cfg.snapshotter.enable && cfg.containerd.enable && cfg.containerd.makeDefaultCriSnapshotter) {
      virtualisation.containerd.settings.plugins."io.containerd.grpc.v1.cri".containerd.snapshotter = "lazystore";
    })
  ];
}
