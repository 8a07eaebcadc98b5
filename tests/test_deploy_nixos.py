"""The NixOS module, evaluated by real Nix against the stub module system in
tests/support/nixos-stub (options, units, containerd settings, package)."""

from __future__ import annotations

import argparse
import configparser
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import lazystore
from lazystore import defaults, deploy
from lazystore.cli.daemon import parse_size
from lazystore.testing import nixcache

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "tests" / "support" / "nixos-stub" / "eval.nix"
NIX_FILES = sorted(
    p for p in ROOT.rglob("*.nix")
    if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
)
ENABLED_ALL = """{
  services.lazystore = {
    enable = true;
    snapshotter.enable = true;
    containerd.enable = true;
  };
}"""
CACHE_NIXOS_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
# Options that give a unit its own mount namespace, which would hide the FUSE
# mount from the host.
NAMESPACING = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
    "PrivateUsers", "DynamicUser", "MountFlags", "RootDirectory",
}

# cacheSize's type: what `lazystore mount --cache-size` accepts.
SIZE_PATTERN = "[0-9]+(\\.[0-9]+)?[KMGTkmgt]?([iI]?[bB])?"
LISTEN_PATTERN = "([[][0-9A-Fa-f:]+]|[A-Za-z0-9.-]+):[0-9]{1,5}"

pytestmark = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None, reason="nix-instantiate (nix-bin) is not installed"
)


def run_nix(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=nixcache.nix_env())


@functools.cache
def evaluate(config: str = "{ }") -> dict[str, Any]:
    """eval.nix's result for the module with *config* (a NixOS module in Nix)."""
    proc = run_nix("nix-instantiate", "--eval", "--strict", "--json", "--expr",
                   f"import {STUB} {{ config = {config}; }}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def evaluation_error(config: str) -> str:
    proc = run_nix("nix-instantiate", "--eval", "--strict", "--json", "--expr",
                   f"import {STUB} {{ config = {config}; }}")
    assert proc.returncode != 0, f"evaluation succeeded: {proc.stdout}"
    return proc.stderr


def argv(exec_start: str) -> list[str]:
    """The words of an ExecStart= line (systemd double-quoting, %% and $$)."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_start)]


def services(config: str) -> dict[str, Any]:
    return evaluate(config)["systemd"]["services"]


@pytest.mark.parametrize("path", NIX_FILES, ids=[str(p.relative_to(ROOT)) for p in NIX_FILES])
def test_every_nix_file_parses(path: Path) -> None:
    proc = run_nix("nix-instantiate", "--parse", str(path))
    assert proc.returncode == 0, proc.stderr


def test_module_and_stub_files_are_among_the_parsed() -> None:
    names = {str(p.relative_to(ROOT)) for p in NIX_FILES}
    assert {"nixos-module/default.nix", "nixos-module/package.nix",
            "tests/support/nixos-stub/eval.nix"} <= names


def test_options_declared_with_types_and_defaults() -> None:
    options = evaluate()["options"]

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
        out = {}
        for name, value in tree.items():
            if "typeName" in value:
                out[prefix + name] = value
            else:
                out |= flat(value, f"{prefix}{name}.")
        return out

    got = {name: (o["type"], o["default"]) for name, o in flat(options).items()}
    package_default = got.pop("package")
    assert package_default[0] == "package"
    assert package_default[1].endswith(f"-lazystore-{lazystore.__version__}")
    assert got == {
        "enable": ("boolean", False),
        "mountPoint": ("path", "/run/lazystore"),
        "substituters": ("list of string", ["https://cache.nixos.org/"]),
        "trustedPublicKeys": ("list of string", [CACHE_NIXOS_KEY]),
        "cacheDir": ("path", "/var/cache/lazystore"),
        "cacheSize": ("null or string matching the pattern " + SIZE_PATTERN, None),
        "controlSocket": ("path", "/run/lazystore.sock"),
        "allowOther": ("boolean", True),
        "metricsAddress": ("null or string matching the pattern " + LISTEN_PATTERN, None),
        "extraArgs": ("list of string", []),
        "snapshotter.enable": ("boolean", False),
        "snapshotter.address": ("path", "/run/lazystore-snapshotter.sock"),
        "snapshotter.root": ("path", "/var/lib/lazystore/snapshotter"),
        "snapshotter.metricsAddress": ("null or string matching the pattern "
                                       + LISTEN_PATTERN, None),
        "snapshotter.extraArgs": ("list of string", []),
        "containerd.enable": ("boolean", False),
        "containerd.makeDefaultCriSnapshotter": ("boolean", False),
        "registry.enable": ("boolean", False),
        "registry.listen": ("string matching the pattern " + LISTEN_PATTERN, "127.0.0.1:5000"),
        "registry.expression": ("null or path", None),
        "registry.cacheDir": ("path", "/var/cache/lazystore-registry"),
        "registry.metricsAddress": ("null or string matching the pattern " + LISTEN_PATTERN,
                                    None),
        "imageService.enable": ("boolean", False),
        "imageService.address": ("path", "/run/lazystore-image.sock"),
        "imageService.runtimeEndpoint": ("path", "/run/containerd/containerd.sock"),
        "imageService.metricsAddress": ("null or string matching the pattern "
                                        + LISTEN_PATTERN, None),
    }
    # The same paths as the commands' own defaults and install-systemd's.
    module_paths = ("mountPoint", "cacheDir", "controlSocket", "snapshotter.address",
                    "snapshotter.root", "registry.cacheDir")
    assert [got[name][1] for name in module_paths] == [
        defaults.MOUNT_POINT, defaults.CACHE_DIR, defaults.CONTROL_SOCKET,
        defaults.SNAPSHOTTER_SOCKET, defaults.SNAPSHOTTER_ROOT, defaults.REGISTRY_CACHE_DIR]
    flat_options = flat(options)
    assert flat_options["substituters"]["defaultText"] == "config.nix.settings.substituters"
    assert (flat_options["trustedPublicKeys"]["defaultText"]
            == "config.nix.settings.trusted-public-keys")
    assert all(o["description"] for o in flat_options.values())


def test_disabled_module_defines_nothing() -> None:
    result = evaluate("{ services.lazystore.allowOther = false; }")
    assert result["values"]["allowOther"] is False and result["values"]["enable"] is False
    assert result["systemd"]["services"] == {}
    assert result["virtualisation"]["containerd"] == {"enable": False, "settings": {}}
    assert result["environment"]["systemPackages"] == []
    assert result["assertions"] == []


def test_daemon_unit() -> None:
    result = evaluate("{ services.lazystore.enable = true; }")
    units = result["systemd"]["services"]
    assert set(units) == {"lazystore"}, "snapshotter and containerd wiring are opt-in"
    unit = units["lazystore"]
    sc = unit["serviceConfig"]
    assert sc["Type"] == "notify" and sc["NotifyAccess"] == "main"
    assert sc["Restart"] == "on-failure"
    assert unit["wantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["after"] and "network-online.target" in unit["wants"]
    exe = f"{result['package']['path']}/bin/lazystore"
    assert argv(sc["ExecStart"]) == [
        exe, "mount", "/run/lazystore",
        "--cache-dir", "/var/cache/lazystore",
        "--control-socket", "/run/lazystore.sock",
        "--substituter", "https://cache.nixos.org/",
        "--trusted-public-key", CACHE_NIXOS_KEY,
        "--allow-other",
    ]
    assert result["environment"]["systemPackages"] == [result["package"]["path"]]
    assert sc["CacheDirectory"] == "lazystore"


def test_daemon_hardening_still_allows_fuse() -> None:
    sc = services("{ services.lazystore.enable = true; }")["lazystore"]["serviceConfig"]
    assert sc["DeviceAllow"] == ["/dev/fuse rw"]
    assert sc["DevicePolicy"] == "closed"
    assert "CAP_SYS_ADMIN" in sc["CapabilityBoundingSet"]
    assert "@mount" in sc["SystemCallFilter"]
    assert sc["NoNewPrivileges"] is True
    assert not NAMESPACING & set(sc), "a mount namespace would hide the FUSE mount from the host"


def test_flags_follow_options() -> None:
    sc = services("""{
      services.lazystore = {
        enable = true;
        mountPoint = "/mnt/lazy store";
        substituters = [ "http://127.0.0.1:5000" "https://cache.example.org/100%" ];
        trustedPublicKeys = [ "a-1:AAAA" ];
        cacheDir = "/srv/lazystore";
        cacheSize = "20G";
        controlSocket = "/run/ls.sock";
        allowOther = false;
        metricsAddress = "127.0.0.1:9464";
        extraArgs = [ "--store-dir" "/nix/store" ];
      };
    }""")["lazystore"]["serviceConfig"]
    assert argv(sc["ExecStart"])[1:] == [
        "mount", "/mnt/lazy store",
        "--cache-dir", "/srv/lazystore",
        "--control-socket", "/run/ls.sock",
        "--substituter", "http://127.0.0.1:5000",
        "--substituter", "https://cache.example.org/100%",
        "--trusted-public-key", "a-1:AAAA",
        "--cache-size", "20G",
        "--metrics-address", "127.0.0.1:9464",
        "--store-dir", "/nix/store",
    ]
    assert "CacheDirectory" not in sc, "a cache outside /var/cache is not systemd's to manage"


def test_keys_and_caches_default_to_nix_settings() -> None:
    sc = services("""{
      nix.settings.substituters = [ "http://cache.local" ];
      nix.settings.trusted-public-keys = [ "local-1:BBBB" ];
      services.lazystore.enable = true;
    }""")["lazystore"]["serviceConfig"]
    words = argv(sc["ExecStart"])
    assert words[words.index("--substituter") + 1] == "http://cache.local"
    assert words.count("--substituter") == 1
    assert words[words.index("--trusted-public-key") + 1] == "local-1:BBBB"


def test_snapshotter_and_containerd_ordering() -> None:
    result = evaluate(ENABLED_ALL)
    units = result["systemd"]["services"]
    snap = units["lazystore-snapshotter"]
    sc = snap["serviceConfig"]
    assert sc["Type"] == "notify" and sc["Restart"] == "on-failure"
    # daemon -> snapshotter -> containerd
    assert "lazystore.service" in snap["wants"] and "lazystore.service" in snap["after"]
    assert "lazystore.service" not in snap.get("requires", [])  # daemon restarts leave it
    daemon = units["lazystore"]["serviceConfig"]
    assert daemon["FileDescriptorStoreMax"] == 4 and "FDSTORE=4" in daemon["Environment"]
    assert "containerd.service" in snap["before"]
    assert snap["wantedBy"] == ["multi-user.target"]
    assert "lazystore-snapshotter.service" in units["containerd"]["after"]
    assert "lazystore-snapshotter.service" in units["containerd"]["wants"]
    assert argv(sc["ExecStart"]) == [
        f"{result['package']['path']}/bin/lazystore", "snapshotter",
        "--address", "/run/lazystore-snapshotter.sock",
        "--root", "/var/lib/lazystore/snapshotter",
        "--control-socket", "/run/lazystore.sock",
        "--mount-point", "/run/lazystore",
    ]
    assert sc["StateDirectory"] == "lazystore/snapshotter"
    assert sc["ProtectSystem"] == "strict" and sc["ReadWritePaths"] == ["/run"]


def test_image_service_unit_ordering_and_containerd_settings() -> None:
    result = evaluate("""{
      services.lazystore = { enable = true; snapshotter.enable = true;
        containerd = { enable = true; makeDefaultCriSnapshotter = true; };
        imageService.enable = true; };
    }""")
    unit = result["systemd"]["services"]["lazystore-image-service"]
    sc = unit["serviceConfig"]
    # daemon, snapshotter, containerd -> image service -> kubelet
    assert unit["requires"] == ["lazystore.service"] and unit["wants"] == ["containerd.service"]
    assert set(unit["after"]) == {"lazystore.service", "lazystore-snapshotter.service",
                                  "containerd.service"}
    assert unit["before"] == ["kubelet.service"] and unit["wantedBy"] == ["multi-user.target"]
    assert argv(sc["ExecStart"]) == [
        f"{result['package']['path']}/bin/lazystore", "image-service",
        "--address", "/run/lazystore-image.sock",
        "--runtime-endpoint", "/run/containerd/containerd.sock",
        "--control-socket", "/run/lazystore.sock", "--mount-point", "/run/lazystore",
    ]
    assert sc["Type"] == "notify" and sc["CapabilityBoundingSet"] == []
    assert sc["ProtectSystem"] == "strict" and sc["ReadWritePaths"] == ["/run"]
    assert [p.rsplit("-", 2)[-2] for p in unit["path"]] == ["containerd"]  # ctr
    cri = result["virtualisation"]["containerd"]["settings"]["plugins"][
        "io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "lazystore", "disable_snapshot_annotations": False}


def test_snapshotter_root_outside_var_lib_is_made_writable() -> None:
    sc = services("""{
      services.lazystore = { enable = true; snapshotter.enable = true;
                             snapshotter.root = "/srv/snapshots"; };
    }""")["lazystore-snapshotter"]["serviceConfig"]
    assert "StateDirectory" not in sc
    assert "/srv/snapshots" in sc["ReadWritePaths"]
    assert sc["ExecStartPre"].startswith("+")
    assert argv(sc["ExecStartPre"][1:])[1:] == ["-p", "/srv/snapshots"]


def test_socket_directory_of_its_own_is_made_before_the_sandbox() -> None:
    sc = services("""{
      services.lazystore = { enable = true; snapshotter.enable = true;
                             snapshotter.address = "/run/lazystore-sn/sn.sock";
                             snapshotter.root = "/srv/snapshots"; };
    }""")["lazystore-snapshotter"]["serviceConfig"]
    assert sc["ReadWritePaths"] == ["/run/lazystore-sn", "/srv/snapshots"]
    assert argv(sc["ExecStartPre"][1:])[1:] == ["-p", "/run/lazystore-sn", "/srv/snapshots"]
    cfg = deploy.DeployConfig(executable="/usr/bin/lazystore",
                              snapshotter_address="/run/lazystore-sn/sn.sock",
                              snapshotter_root="/srv/snapshots")
    installed = configparser.ConfigParser(strict=False, interpolation=None)
    installed.optionxform = str  # type: ignore[assignment,method-assign]
    installed.read_string(deploy.snapshotter_unit(cfg))
    assert argv(installed["Service"]["ExecStartPre"][1:])[1:] == argv(sc["ExecStartPre"][1:])[1:]
    assert installed["Service"]["ReadWritePaths"] == " ".join(sc["ReadWritePaths"])


def test_containerd_settings() -> None:
    containerd = evaluate(ENABLED_ALL)["virtualisation"]["containerd"]
    assert containerd["enable"] is True, "the wiring is for a containerd that runs"
    settings = containerd["settings"]
    assert settings == {
        "proxy_plugins": {
            "lazystore": {"type": "snapshot", "address": "/run/lazystore-snapshotter.sock"}
        }
    }


def test_cri_default_snapshotter_and_existing_settings_kept() -> None:
    settings = evaluate("""{
      virtualisation.containerd.settings = {
        plugins."io.containerd.grpc.v1.cri".cni.bin_dir = "/opt/cni/bin";
        proxy_plugins.other = { type = "snapshot"; address = "/run/other.sock"; };
      };
      services.lazystore = {
        enable = true;
        snapshotter.enable = true;
        snapshotter.address = "/run/snap.sock";
        containerd.enable = true;
        containerd.makeDefaultCriSnapshotter = true;
      };
    }""")["virtualisation"]["containerd"]["settings"]
    assert settings["proxy_plugins"] == {
        "other": {"type": "snapshot", "address": "/run/other.sock"},
        "lazystore": {"type": "snapshot", "address": "/run/snap.sock"},
    }
    assert settings["plugins"]["io.containerd.grpc.v1.cri"] == {
        "cni": {"bin_dir": "/opt/cni/bin"},
        "containerd": {"snapshotter": "lazystore"},
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{ services.lazystore.snapshotter.enable = true; }",
         "services.lazystore.snapshotter.enable needs services.lazystore.enable."),
        ("{ services.lazystore = { enable = true; containerd.enable = true; }; }",
         "services.lazystore.containerd.enable needs services.lazystore.snapshotter.enable."),
        ("{ services.lazystore = { enable = true; snapshotter.enable = true; "
         "containerd.enable = true; imageService.enable = true; }; }",
         "services.lazystore.imageService.enable needs "
         "services.lazystore.containerd.makeDefaultCriSnapshotter."),
        ("{ services.lazystore = { enable = true; snapshotter.enable = true; "
         "containerd = { enable = true; makeDefaultCriSnapshotter = true; }; "
         'imageService = { enable = true; address = "/tmp/img.sock"; }; }; }',
         "services.lazystore.imageService.address (/tmp/img.sock) is below a directory "
         "the image service's sandbox (ProtectHome, PrivateTmp) hides from it."),
    ],
)
def test_inconsistent_settings_fail_assertions(config: str, message: str) -> None:
    assert evaluate(config)["assertions"] == [message]


@pytest.mark.parametrize(
    ("option", "path"),
    [("snapshotter.root", "/tmp/snapshots"), ("snapshotter.address", "/var/tmp/sn.sock"),
     ("controlSocket", "/root/ctl.sock"), ("mountPoint", "/home/lazystore")],
)
def test_paths_the_snapshotters_sandbox_hides_fail_assertions(option: str, path: str) -> None:
    config = f"""{{ services.lazystore = {{
      enable = true; snapshotter.enable = true; {option} = "{path}"; }}; }}"""
    assert evaluate(config)["assertions"] == [
        f"services.lazystore.{option} ({path}) is below a directory the snapshotter's "
        "sandbox (ProtectHome, PrivateTmp) hides from it."]
    # Without the snapshotter the daemon alone may use them.
    assert evaluate(config.replace("snapshotter.enable = true;", ""))["assertions"] == []


@pytest.mark.parametrize("hidden", deploy.SNAPSHOTTER_HIDDEN)
def test_module_and_installer_hide_the_same_directories(hidden: str) -> None:
    for root, refused in [(hidden, True), (f"{hidden}/x", True), (f"{hidden}x", False)]:
        failed = evaluate(f"""{{ services.lazystore = {{
          enable = true; snapshotter.enable = true; snapshotter.root = "{root}"; }}; }}""")
        assert bool(failed["assertions"]) == refused, root


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('{ services.lazystore.cacheSize = 20; }',
         "option `services.lazystore.cacheSize' is not of type `null or string matching"),
        ('{ services.lazystore.cacheSize = "20 gigs"; }',
         "option `services.lazystore.cacheSize' is not of type `null or string matching"),
        ('{ services.lazystore.mountPoint = "run/lazystore"; }',
         "option `services.lazystore.mountPoint' is not of type `path'"),
        ("{ services.lazystore.extraArgs = [ 1 ]; }",
         "option `services.lazystore.extraArgs' is not of type `list of string'"),
        ("{ services.lazystore.cachesize = \"1G\"; }",
         "The option `services.lazystore.cachesize' does not exist."),
    ],
)
def test_bad_values_are_rejected(config: str, expected: str) -> None:
    assert expected in evaluation_error(config)


def _requirement_names(spec: str) -> set[str]:
    names = set()
    for line in spec.split("\n"):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", line)
        if m and m.group(1):
            names.add(m.group(1).lower())
            if m.group(3) == "http2":  # httpx[http2]: h2 in nixpkgs
                names.add("h2")
    return names


def test_package_dependencies_match_setup_cfg() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    wanted = _requirement_names(cfg["options"]["install_requires"])
    package = evaluate("{ services.lazystore.enable = true; }")["package"]
    assert set(package["dependencies"]) == wanted
    assert package["name"] == f"lazystore-{lazystore.__version__}"
    assert package["mainProgram"] == "lazystore"
    assert "setuptools" in package["buildSystem"]
    fuse3 = evaluate()["fuse3"]
    assert package["makeWrapperArgs"] == ["--suffix", "PATH", ":", f"{fuse3}/bin"]


def test_package_build_image_builds_with_nixpkgs_tools_not_the_host() -> None:
    result = evaluate()
    image, tools = result["package"]["buildImage"], result["tools"]
    assert image["builder"] == f"{tools['bash']}/bin/sh"
    assert image["PATH"].split(":") == [f"{tools[n]}/bin" for n in
                                        ("coreutils", "findutils", "gnutar", "gzip")]
    assert (image["system"], image["name"]) == ("x86_64-linux", "probe.tar")


@pytest.mark.parametrize("size", ["20G", "512M", "1.5T", "4096", "20GiB", "20gb"])
def test_cache_size_type_accepts_what_the_daemon_reads(size: str) -> None:
    parse_size(size)  # the daemon's parser: raises if it would refuse the size
    words = argv(services(f"""{{
      services.lazystore = {{ enable = true; cacheSize = "{size}"; }};
    }}""")["lazystore"]["serviceConfig"]["ExecStart"])
    assert words[words.index("--cache-size") + 1] == size


@pytest.mark.parametrize("size", ["20 gigs", "G", "-1G", "1.G", ""])
def test_cache_size_type_refuses_what_the_daemon_refuses(size: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(size)
    assert "is not of type `null or string matching" in evaluation_error(
        f'{{ services.lazystore.cacheSize = "{size}"; }}')


def render_unit(unit: dict[str, Any]) -> str:
    """A unit file from a NixOS systemd.services entry, rendered as NixOS does
    (lists as repeated lines, booleans as true/false)."""
    def lines(key: str, value: Any) -> list[str]:
        values = value if isinstance(value, list) else [value]
        return [f"{key}={str(v).lower() if isinstance(v, bool) else v}" for v in values]

    out = ["[Unit]", f"Description={unit['description']}"]
    for key in ("wants", "requires", "after", "before"):
        if unit.get(key):
            out.append(f"{key.capitalize()}={' '.join(unit[key])}")
    out.append("[Service]")
    for key, value in unit["serviceConfig"].items():
        out += lines(key, value)
    out += ["[Install]", f"WantedBy={' '.join(unit['wantedBy'])}"]
    return "\n".join(out) + "\n"


def test_nixos_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    venv = Path(sys.executable).parent.parent  # ExecStart must name a real program
    units = services(f"""{{
      services.lazystore = {{
        enable = true;
        package = {{ type = "derivation"; name = "lazystore"; outPath = "{venv}";
                     meta.mainProgram = "lazystore"; }};
        cacheSize = "20G";
        snapshotter.enable = true;
        containerd.enable = true;
        containerd.makeDefaultCriSnapshotter = true;
        registry.enable = true;
        imageService.enable = true;
      }};
    }}""")
    paths = []
    for name in ("lazystore", "lazystore-snapshotter", "lazystore-registry",
                 "lazystore-image-service"):
        path = tmp_path / f"{name}.service"
        path.write_text(render_unit(units[name]))
        paths.append(str(path))
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def _systemd_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


@pytest.mark.parametrize("registry", [
    "registry.enable = true;",
    'registry = { enable = true; expression = "/etc/images.nix"; listen = "[::1]:5001"; '
    'cacheDir = "/srv/registry"; metricsAddress = "127.0.0.1:9466"; }; '
    'metricsAddress = "[::1]:9464"; snapshotter.metricsAddress = "127.0.0.1:9465"; '
    'imageService.metricsAddress = "127.0.0.1:9467";',
])
def test_nixos_units_match_the_installer(registry: str) -> None:
    """The NixOS units and scripts/install-systemd's carry the same settings."""
    units = services(ENABLED_ALL.replace(
        "containerd.enable = true;",
        "containerd.enable = true; containerd.makeDefaultCriSnapshotter = true; "
        f"imageService.enable = true; {registry}"))
    reg = units["lazystore-registry"]["serviceConfig"]
    words = argv(reg["ExecStart"])

    def metrics_of(unit: str) -> str | None:
        daemon = argv(units[unit]["serviceConfig"]["ExecStart"])
        flag = "--metrics-address"
        return daemon[daemon.index(flag) + 1] if flag in daemon else None

    cfg = deploy.DeployConfig(executable="/usr/bin/lazystore",
                              substituters=["https://cache.nixos.org/"],
                              trusted_public_keys=[CACHE_NIXOS_KEY],
                              registry=True,
                              registry_listen=words[words.index("--listen") + 1],
                              registry_cache_dir=words[words.index("--cache-dir") + 1],
                              registry_expression=("/etc/images.nix" if "--expression" in words
                                                   else None),
                              cri_default_snapshotter=True, image_service=True,
                              metrics_address=metrics_of("lazystore"),
                              snapshotter_metrics_address=metrics_of("lazystore-snapshotter"),
                              registry_metrics_address=metrics_of("lazystore-registry"),
                              image_service_metrics_address=metrics_of(
                                  "lazystore-image-service"))
    assert (cfg.image_service_metrics_address is None) == ("9467" not in registry)
    assert (cfg.metrics_address is None) == ("metricsAddress" not in registry)
    if cfg.registry_expression:
        assert "ProtectSystem" not in reg and "CapabilityBoundingSet" not in reg
    else:
        assert reg["ProtectSystem"] == "strict" and reg["CapabilityBoundingSet"] == []
    for name, expected_argv, text in [
        ("lazystore", deploy.daemon_argv(cfg), deploy.daemon_unit(cfg)),
        ("lazystore-snapshotter", deploy.snapshotter_argv(cfg), deploy.snapshotter_unit(cfg)),
        ("lazystore-registry", deploy.registry_argv(cfg), deploy.registry_unit(cfg)),
        ("lazystore-image-service", deploy.image_service_argv(cfg),
         deploy.image_service_unit(cfg)),
    ]:
        nixos = units[name]["serviceConfig"]
        installed = configparser.ConfigParser(strict=False, interpolation=None)
        installed.optionxform = str  # type: ignore[assignment,method-assign]
        installed.read_string(text)
        service = dict(installed["Service"])
        assert argv(nixos["ExecStart"])[1:] == expected_argv[1:]
        assert argv(service["ExecStart"]) == expected_argv
        nixos.pop("ExecStart")
        service.pop("ExecStart")
        assert {k: _systemd_value(v) for k, v in nixos.items()} == service, name


def test_user_settings_merge_with_the_units_as_in_nixos() -> None:
    unit = services("""{ lib, ... }: {
      services.lazystore.enable = true;
      systemd.services.lazystore.serviceConfig.Restart = lib.mkForce "always";
      systemd.services.lazystore.after = [ "remote-fs.target" ];
    }""")["lazystore"]
    assert unit["serviceConfig"]["Restart"] == "always"
    assert set(unit["after"]) == {"network-online.target", "remote-fs.target"}
    assert unit["serviceConfig"]["Type"] == "notify"


def test_conflicting_user_setting_is_an_error() -> None:
    error = evaluation_error("""{
      services.lazystore.enable = true;
      systemd.services.lazystore.serviceConfig.Restart = "always";
    }""")
    assert "systemd.services.lazystore.serviceConfig.Restart' has conflicting definition" in error


def test_real_containerd_reads_the_nixos_settings(tmp_path: Path) -> None:
    """As nixpkgs checks the generated config.toml with `containerd config dump`."""
    if shutil.which("containerd") is None:
        pytest.skip("containerd is not installed")
    settings = evaluate(ENABLED_ALL.replace(
        "containerd.enable = true;",
        "containerd.enable = true; containerd.makeDefaultCriSnapshotter = true;",
    ))["virtualisation"]["containerd"]["settings"]
    path = tmp_path / "config.toml"
    path.write_text(deploy.toml_dumps({"version": 2, **settings}))
    proc = subprocess.run(["containerd", "--config", str(path), "config", "dump"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    dumped = tomllib.loads(proc.stdout)
    assert dumped["proxy_plugins"]["lazystore"] == {
        "type": "snapshot", "address": "/run/lazystore-snapshotter.sock"}
    assert dumped["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == (
        "lazystore")
