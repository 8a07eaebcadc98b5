"""Deployment on systemd hosts without NixOS: unit files and containerd wiring.

The units are the ones nixos-module/default.nix defines (same ordering, same
hardening); the containerd config gains the ``[proxy_plugins.lazystore]``
stanza. Rendering is pure (strings in, strings out); :func:`install` writes
the files, only when their content changes, backing up what it replaces.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import re
import shutil
import tomllib
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazystore import defaults
from lazystore.errors import LazystoreError
from lazystore.nix.signing import PublicKey

log = logging.getLogger(__name__)

DAEMON_UNIT = "lazystore.service"
FDSTORE_MAX = 4
SNAPSHOTTER_UNIT = "lazystore-snapshotter.service"
REGISTRY_UNIT = "lazystore-registry.service"
IMAGE_SERVICE_UNIT = "lazystore-image-service.service"
CONTAINERD_DROPIN = "containerd.service.d/lazystore.conf"
PLUGIN_NAME = "lazystore"
LISTEN = re.compile(r"(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")  # HOST:PORT
STANZA_HEADER = "# Added by `lazystore install-systemd`.\n"
HEADER = "# Written by `lazystore install-systemd`; run it again to change this file.\n"

# Kept equal to `hardening` in nixos-module/default.nix (a test compares them).
# No option that gives the service its own mount namespace (ProtectSystem,
# PrivateTmp, ReadWritePaths...): systemd cuts mount propagation from such a
# namespace to the host, which would hide the FUSE mount from containerd.
HARDENING: dict[str, str | bool | list[str]] = {
    "DevicePolicy": "closed",
    "NoNewPrivileges": True,
    "LockPersonality": True,
    "ProtectClock": True,
    "ProtectHostname": True,
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"],
    "RestrictNamespaces": True,
    "RestrictRealtime": True,
    "RestrictSUIDSGID": True,
    "SystemCallArchitectures": "native",
    "SystemCallFilter": ["@system-service", "@mount"],
    "SystemCallErrorNumber": "EPERM",
    "UMask": "0022",
}
# The snapshotter mounts nothing itself (containerd mounts what it describes),
# so it gets a read-only view of the system in a mount namespace of its own.
SNAPSHOTTER_SANDBOX: dict[str, str | bool | list[str]] = {
    "ProtectSystem": "strict",
    "ProtectHome": True,
    "PrivateTmp": True,
    "ProtectKernelTunables": True,
    "ProtectKernelModules": True,
    "ProtectKernelLogs": True,
    "ProtectControlGroups": True,
}
# What ProtectHome= and PrivateTmp= hide from the snapshotter (or give it a
# private copy of): the paths it shares with the daemon and containerd cannot
# be below them.
SNAPSHOTTER_HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")
DAEMON_CAPABILITIES = ["CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER"]
SNAPSHOTTER_CAPABILITIES = [*DAEMON_CAPABILITIES, "CAP_CHOWN"]


class DeployError(LazystoreError):
    """Installing the units or wiring containerd failed (nothing was half-written)."""


@dataclass
class DeployConfig:
    """What the units run; defaults as in the NixOS module."""

    executable: str
    mount_point: str = defaults.MOUNT_POINT
    substituters: list[str] = field(default_factory=list)
    trusted_public_keys: list[str] = field(default_factory=list)
    cache_dir: str = defaults.CACHE_DIR
    cache_size: str | None = None
    control_socket: str = defaults.CONTROL_SOCKET
    allow_other: bool = True
    metrics_address: str | None = None
    extra_args: list[str] = field(default_factory=list)
    snapshotter: bool = True
    snapshotter_address: str = defaults.SNAPSHOTTER_SOCKET
    snapshotter_root: str = defaults.SNAPSHOTTER_ROOT
    snapshotter_metrics_address: str | None = None
    snapshotter_extra_args: list[str] = field(default_factory=list)
    containerd: bool = True
    cri_default_snapshotter: bool = False
    registry: bool = False
    registry_listen: str = "127.0.0.1:5000"
    registry_expression: str | None = None
    registry_cache_dir: str = defaults.REGISTRY_CACHE_DIR
    registry_metrics_address: str | None = None
    image_service: bool = False
    image_service_address: str = defaults.IMAGE_SERVICE_SOCKET
    runtime_endpoint: str = defaults.CONTAINERD_SOCKET
    image_service_metrics_address: str | None = None

    def __post_init__(self) -> None:
        for what, address in (("registry listen", self.registry_listen),
                              ("metrics", self.metrics_address),
                              ("snapshotter metrics", self.snapshotter_metrics_address),
                              ("registry metrics", self.registry_metrics_address),
                              ("image service metrics", self.image_service_metrics_address)):
            if address is not None and not LISTEN.fullmatch(address):
                raise DeployError(f"{what} address {address!r}: expected HOST:PORT")
        if self.registry_expression is not None and not os.path.isabs(self.registry_expression):
            raise DeployError("registry expression must be an absolute path, "
                              f"not {self.registry_expression!r}")
        for name in ("executable", "mount_point", "cache_dir", "control_socket",
                     "snapshotter_address", "snapshotter_root", "registry_cache_dir",
                     "image_service_address", "runtime_endpoint"):
            if not os.path.isabs(getattr(self, name)):
                raise DeployError(f"{name.replace('_', ' ')} must be an absolute path, "
                                  f"not {getattr(self, name)!r}")
        if self.cri_default_snapshotter and not (self.containerd and self.snapshotter):
            raise DeployError("making lazystore the CRI snapshotter needs the snapshotter "
                              "and the containerd wiring")
        if self.containerd and not self.snapshotter:
            raise DeployError("the containerd wiring needs the snapshotter")
        if self.image_service and not self.cri_default_snapshotter:
            raise DeployError("the image service needs lazystore as the CRI snapshotter "
                              "(--cri-default-snapshotter): nix images are unpacked on it")
        if self.snapshotter:
            shared = ["snapshotter_address", "snapshotter_root", "control_socket", "mount_point"]
            if self.image_service:
                shared += ["image_service_address", "runtime_endpoint"]
            for name in shared:
                path = os.path.normpath(getattr(self, name))
                hidden = [d for d in SNAPSHOTTER_HIDDEN if path == d or path.startswith(d + "/")]
                if hidden:
                    raise DeployError(
                        f"{name.replace('_', ' ')} {path} is below {hidden[0]}, which the "
                        "snapshotter's sandbox (ProtectHome, PrivateTmp) hides from it")
        # What the daemon would refuse at every start is refused now.
        for url in self.substituters:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https", "file") or (
                    parts.scheme != "file" and not parts.netloc):
                raise DeployError(f"substituter {url!r} is not an http, https or file URL")
        for key in self.trusted_public_keys:
            try:
                PublicKey.parse(key)
            except LazystoreError as exc:
                raise DeployError(f"trusted public key {key!r}: {exc}") from None


# ---------------------------------------------------------------- unit files


def daemon_argv(cfg: DeployConfig) -> list[str]:
    argv = [cfg.executable, "mount", cfg.mount_point, "--cache-dir", cfg.cache_dir,
            "--control-socket", cfg.control_socket]
    for url in cfg.substituters:
        argv += ["--substituter", url]
    for key in cfg.trusted_public_keys:
        argv += ["--trusted-public-key", key]
    if cfg.cache_size is not None:
        argv += ["--cache-size", cfg.cache_size]
    if cfg.allow_other:
        argv.append("--allow-other")
    return argv + _metrics_flag(cfg.metrics_address) + cfg.extra_args


def snapshotter_argv(cfg: DeployConfig) -> list[str]:
    argv = [cfg.executable, "snapshotter", "--address", cfg.snapshotter_address,
            "--root", cfg.snapshotter_root, "--control-socket", cfg.control_socket,
            "--mount-point", cfg.mount_point]
    return argv + _metrics_flag(cfg.snapshotter_metrics_address) + cfg.snapshotter_extra_args


def registry_argv(cfg: DeployConfig) -> list[str]:
    argv = [cfg.executable, "registry", "--listen", cfg.registry_listen,
            "--cache-dir", cfg.registry_cache_dir]
    for url in cfg.substituters:
        argv += ["--substituter", url]
    for key in cfg.trusted_public_keys:
        argv += ["--trusted-public-key", key]
    if cfg.registry_expression is not None:
        argv += ["--expression", cfg.registry_expression]
    return argv + _metrics_flag(cfg.registry_metrics_address)


def image_service_argv(cfg: DeployConfig) -> list[str]:
    return [cfg.executable, "image-service", "--address", cfg.image_service_address,
            "--runtime-endpoint", cfg.runtime_endpoint, "--control-socket", cfg.control_socket,
            "--mount-point", cfg.mount_point,
            *_metrics_flag(cfg.image_service_metrics_address)]


def _metrics_flag(address: str | None) -> list[str]:
    return [] if address is None else ["--metrics-address", address]


def exec_quote(arg: str) -> str:
    """One word of a systemd command line (ExecStart=), quoted only when needed.

    systemd expands ``%`` specifiers and ``$`` variables everywhere, so both are
    doubled; quoting follows C-style escapes inside double quotes.
    """
    if "\n" in arg or "\0" in arg:
        raise DeployError(f"an argument cannot contain a newline or NUL: {arg!r}")
    if arg == ";":  # a lone semicolon would separate commands, quoted or not
        return "\\;"
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def path_quote(path: str) -> str:
    """A path in a space-separated path list (ReadWritePaths=): specifiers
    are expanded there, environment variables are not."""
    escaped = path.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Iterable[str]) -> str:
    return " ".join(exec_quote(a) for a in argv)


def _value(value: str | bool | int | list[str]) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def _section(name: str, entries: dict[str, Any]) -> str:
    lines = [f"[{name}]"]
    for key, value in entries.items():
        if isinstance(value, list) and key == "DeviceAllow":
            lines += [f"{key}={item}" for item in value]  # one device per line
        else:
            lines.append(f"{key}={_value(value)}")
    return "\n".join(lines) + "\n"


def _managed_dir(base: str, path: str) -> str | None:
    """*path* relative to *base* (for StateDirectory= etc.), when below it."""
    prefix = base + "/"
    if path.startswith(prefix) and ".." not in path.split("/"):
        return path[len(prefix):].rstrip("/")
    return None


def _unit_file(unit: dict[str, Any], service: dict[str, Any]) -> str:
    """A unit file of these [Unit] and [Service] entries, wanted by multi-user.target."""
    install = {"WantedBy": "multi-user.target"}
    return "\n".join([HEADER + _section("Unit", unit), _section("Service", service),
                      _section("Install", install)])


def daemon_unit(cfg: DeployConfig) -> str:
    service: dict[str, Any] = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": exec_line(daemon_argv(cfg)),
        "Restart": "on-failure",
        "RestartSec": 2,
        "TimeoutStopSec": 30,
        "LimitNOFILE": 1048576,
        # The /dev/fuse descriptor waits in systemd's store while the daemon
        # restarts (systemctl restart, Restart=): the mount never goes away.
        # FDSTORE= is what systemd 254 and later set themselves.
        "FileDescriptorStoreMax": FDSTORE_MAX,
        "Environment": f"FDSTORE={FDSTORE_MAX}",
        "DeviceAllow": ["/dev/fuse rw"],
        "CapabilityBoundingSet": DAEMON_CAPABILITIES,
        **HARDENING,
    }
    if (cache := _managed_dir("/var/cache", cfg.cache_dir)) is not None:
        service |= {"CacheDirectory": cache, "CacheDirectoryMode": "0700"}
    unit = {
        "Description": "lazystore: lazily fetched Nix store (FUSE)",
        "Wants": "network-online.target",
        "After": "network-online.target",
    }
    return _unit_file(unit, service)


def snapshotter_unit(cfg: DeployConfig) -> str:
    service: dict[str, Any] = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": exec_line(snapshotter_argv(cfg)),
        "Restart": "on-failure",
        "RestartSec": 2,
        "TimeoutStopSec": 30,
        "CapabilityBoundingSet": SNAPSHOTTER_CAPABILITIES,
        **HARDENING,
        **SNAPSHOTTER_SANDBOX,
    }
    socket_dir = os.path.dirname(cfg.snapshotter_address)
    writable = [socket_dir]
    # ReadWritePaths= needs its directories before the namespace is set up: an
    # ExecStartPre= outside the sandbox (`+`) makes those systemd does not.
    made = [socket_dir] if socket_dir != "/run" else []
    if (state := _managed_dir("/var/lib", cfg.snapshotter_root)) is not None:
        service |= {"StateDirectory": state, "StateDirectoryMode": "0700"}
    else:
        writable.append(cfg.snapshotter_root)
        made.append(cfg.snapshotter_root)
    if made:
        mkdir = shutil.which("mkdir") or "/bin/mkdir"
        service["ExecStartPre"] = "+" + exec_line([mkdir, "-p", *made])
    service["ReadWritePaths"] = " ".join(path_quote(p) for p in writable)
    unit = {
        "Description": "lazystore: containerd snapshotter for lazily fetched Nix store paths",
        # Wants=, not Requires=: a restart of the daemon must not restart the
        # snapshotter (the mount stays through it).
        "Wants": DAEMON_UNIT,
        "After": DAEMON_UNIT,
        "Before": "containerd.service",
    }
    return _unit_file(unit, service)


def registry_unit(cfg: DeployConfig) -> str:
    """The registry needs no privilege, unless it builds an expression with Nix
    (as root: /nix/store, /tmp): then it is not sandboxed beyond HARDENING."""
    service: dict[str, Any] = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": exec_line(registry_argv(cfg)),
        "Restart": "on-failure",
        "RestartSec": 2,
        "TimeoutStopSec": 30,
        **HARDENING,
    }
    if cfg.registry_expression is None:
        service |= {"CapabilityBoundingSet": [], **SNAPSHOTTER_SANDBOX}
    if (cache := _managed_dir("/var/cache", cfg.registry_cache_dir)) is not None:
        service |= {"CacheDirectory": cache, "CacheDirectoryMode": "0700"}
    elif cfg.registry_expression is None:
        mkdir = shutil.which("mkdir") or "/bin/mkdir"
        service["ExecStartPre"] = "+" + exec_line([mkdir, "-p", cfg.registry_cache_dir])
        service["ReadWritePaths"] = path_quote(cfg.registry_cache_dir)
    unit = {
        "Description": "lazystore: OCI registry of Nix closures' images, made on request",
        "Wants": "network-online.target",
        "After": "network-online.target",
    }
    return _unit_file(unit, service)


def image_service_unit(cfg: DeployConfig) -> str:
    """The image service needs no capability: it reads the mount, talks to
    sockets root owns and runs ``ctr``; sandboxed like the snapshotter."""
    service: dict[str, Any] = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": exec_line(image_service_argv(cfg)),
        "Restart": "on-failure",
        "RestartSec": 2,
        "TimeoutStopSec": 30,
        "CapabilityBoundingSet": [],
        **HARDENING,
        **SNAPSHOTTER_SANDBOX,
    }
    socket_dir = os.path.dirname(cfg.image_service_address)
    if socket_dir != "/run":
        mkdir = shutil.which("mkdir") or "/bin/mkdir"
        service["ExecStartPre"] = "+" + exec_line([mkdir, "-p", socket_dir])
    service["ReadWritePaths"] = path_quote(socket_dir)
    return _unit_file({
        "Description": "lazystore: CRI image service (nix:0 images) for the kubelet",
        "Requires": DAEMON_UNIT,
        "Wants": "containerd.service",
        "After": f"{DAEMON_UNIT} {SNAPSHOTTER_UNIT} containerd.service",
        "Before": "kubelet.service",
    }, service)


def containerd_dropin() -> str:
    """containerd wants the snapshotter and starts after it (but still starts
    when it fails: other snapshotters keep working)."""
    return HEADER + _section("Unit", {"Wants": SNAPSHOTTER_UNIT, "After": SNAPSHOTTER_UNIT})


# ---------------------------------------------------------- containerd config


def _cri_path(data: dict[str, Any]) -> tuple[str, ...]:
    """The table holding the CRI plugin's ``snapshotter`` in this config version."""
    # containerd reads a config without `version` as version 1 ("cri" plugin id).
    version = data.get("version", 1)
    if isinstance(version, bool) or version not in (1, 2, 3):
        raise DeployError(f"containerd config: unknown version {version!r} (1, 2 or 3)")
    if version == 3:  # containerd 2: the images half of the split CRI plugin
        return ("plugins", "io.containerd.cri.v1.images")
    if version == 2:
        return ("plugins", "io.containerd.grpc.v1.cri", "containerd")
    return ("plugins", "cri", "containerd")


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for i, key in enumerate(path[:-1]):
        child = data.setdefault(key, {})
        if not isinstance(child, dict):
            raise DeployError(f"containerd config: {_dotted(path[:i + 1])} is not a table")
        data = child
    data[path[-1]] = value


def _cri_settings(cri_default: bool, cri_annotations: bool) -> dict[str, Any]:
    """What the CRI plugin's snapshotter table must hold."""
    wanted: dict[str, Any] = {"snapshotter": PLUGIN_NAME} if cri_default else {}
    if cri_annotations:  # layer annotations reach the snapshotter as labels
        wanted["disable_snapshot_annotations"] = False
    return wanted


def _wanted(data: dict[str, Any], address: str, cri: dict[str, Any]) -> dict[str, Any]:
    """*data* with the lazystore proxy plugin (and the CRI settings *cri*) set."""
    want = copy.deepcopy(data)
    plugin = _get(data, ("proxy_plugins", PLUGIN_NAME))
    if plugin is not None and not isinstance(plugin, dict):
        raise DeployError(f"containerd config: proxy_plugins.{PLUGIN_NAME} is not a table")
    plugin = dict(plugin or {}) | {"type": "snapshot", "address": address}
    _set(want, ("proxy_plugins", PLUGIN_NAME), plugin)
    for key, value in cri.items():
        _set(want, (*_cri_path(data), key), value)
    return want


def _stanzas(data: dict[str, Any], address: str, cri: dict[str, Any]) -> str | None:
    """TOML text to append that defines only tables *data* does not have, or
    None when appending cannot express the change."""
    parts = []
    plugin = _get(data, ("proxy_plugins", PLUGIN_NAME))
    if plugin is None:
        parts.append(proxy_plugin_stanza(address))
    elif plugin.get("type") != "snapshot" or plugin.get("address") != address:
        return None
    if any(_get(data, (*_cri_path(data), k)) != v for k, v in cri.items()):
        if _get(data, _cri_path(data)) is not None:
            return None
        parts.append(f"[{_dotted(_cri_path(data))}]\n" + "".join(
            f"  {k} = {_toml_value(v)}\n" for k, v in cri.items()))
    return "\n".join(parts)


def merge_containerd_config(text: str, address: str, cri_default: bool = False,
                            cri_annotations: bool = False) -> str | None:
    """containerd's config.toml *text* with the lazystore proxy plugin (and,
    with *cri_default*, as the CRI plugin's snapshotter; with *cri_annotations*,
    ``disable_snapshot_annotations = false`` beside it); None if it already is.

    Existing settings are kept. The stanza is appended when that is valid TOML
    (comments and layout survive); otherwise the document is written anew from
    its parsed form. Either way the result is parsed back and compared.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeployError(f"not valid TOML ({exc}); nothing changed") from None
    _cri_path(data)  # a version containerd knows
    cri = _cri_settings(cri_default, cri_annotations)
    want = _wanted(data, address, cri)
    if want == data:
        return None
    if not data:  # no file, or only comments: a version 2 config
        want = _wanted({"version": 2}, address, cri)
        kept = text.rstrip("\n") + "\n\n" if text.strip() else ""
        candidate = kept + "version = 2\n\n" + STANZA_HEADER + (
            _stanzas({"version": 2}, address, cri) or "")
    elif (extra := _stanzas(data, address, cri)) is not None:
        candidate = text.rstrip("\n") + "\n\n" + STANZA_HEADER + extra
    else:
        candidate = toml_dumps(want)
    try:
        if tomllib.loads(candidate) == want:
            return candidate
    except tomllib.TOMLDecodeError:
        pass
    candidate = toml_dumps(want)
    if tomllib.loads(candidate) != want:
        raise DeployError("cannot express the merged containerd config as TOML")
    return candidate


def proxy_plugin_stanza(address: str, name: str = PLUGIN_NAME) -> str:
    """The containerd config.toml stanza that makes *address* the snapshotter
    proxy plugin *name* (a bare key); *address* is written as a TOML string."""
    return f'[proxy_plugins.{name}]\n  type = "snapshot"\n  address = {_toml_string(address)}\n'


# A TOML writer for what tomllib reads (containerd configs need no more).


def _toml_string(text: str) -> str:
    # JSON string escapes are TOML basic-string escapes; DEL must be escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _dotted(path: Iterable[str]) -> str:
    return ".".join(_toml_key(k) for k in path)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise DeployError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit(lines: list[str], path: tuple[str, ...], table: dict[str, Any], array: bool) -> None:
    plain = {k: v for k, v in table.items()
             if not isinstance(v, dict) and not _is_table_array(v)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in table.items() if _is_table_array(v)}
    header = None
    if array:
        header = f"[[{_dotted(path)}]]"
    elif path and (plain or not (tables or arrays)):
        header = f"[{_dotted(path)}]"  # else the table is defined by its subtables
    if header:
        lines += [""] if lines else []
        lines.append(header)
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items()]
    for key, sub in tables.items():
        _emit(lines, (*path, key), sub, array=False)
    for key, items in arrays.items():
        for item in items:
            _emit(lines, (*path, key), item, array=True)


def toml_dumps(data: dict[str, Any]) -> str:
    lines: list[str] = []
    _emit(lines, (), data, array=False)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ install


@dataclass
class Change:
    path: Path
    action: str  # "created", "updated", "unchanged" (or "would be ..." in a dry run)
    backup: Path | None = None
    note: str = ""

    def __str__(self) -> str:
        details = [d for d in (self.note, self.backup and f"previous version: {self.backup}") if d]
        return f"{self.action} {self.path}" + (f" ({'; '.join(details)})" if details else "")


def _backup_name(path: Path) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak-{stamp}.{n}")
        n += 1
    return candidate


def _write(path: Path, content: str, dry_run: bool) -> Change:
    """Write *content* to *path* atomically unless it is there already; keep
    the previous version next to it. A symlink's target is written, not the link."""
    if path.is_symlink():
        path = path.resolve()
    try:
        old = path.read_bytes() if path.exists() else None
    except OSError as exc:
        raise DeployError(f"cannot read {path}: {exc.strerror}") from None
    if old == content.encode():
        return Change(path, "unchanged")
    action = "created" if old is None else "updated"
    backup = _backup_name(path) if old is not None else None
    if dry_run:
        return Change(path, f"would be {action}", backup=None)
    tmp = path.with_name(f".{path.name}.lazystore-tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if old is not None else 0o644
        if backup is not None:
            backup.write_bytes(old or b"")
            os.chmod(backup, mode)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DeployError(f"cannot write {path}: {exc.strerror}") from None
    log.info("%s %s", action, path)
    return Change(path, action, backup)


@dataclass
class Targets:
    """Where the files go; ``Targets.under(root)`` for a staging root, below
    which every file written must stay (symlinks included)."""

    unit_dir: Path
    containerd_config: Path
    root: Path = Path("/")

    @classmethod
    def under(cls, root: Path, unit_dir: str = "/etc/systemd/system",
              containerd_config: str = defaults.CONTAINERD_CONFIG) -> Targets:
        """The targets below *root*; absolute paths are taken relative to it."""
        return cls(root / unit_dir.lstrip("/"), root / containerd_config.lstrip("/"), root)

    def check(self, paths: Iterable[Path]) -> None:
        """Refuse *paths* that are, or lead through a symlink, outside the root,
        and existing ones that are not regular files (a FIFO would block)."""
        root = self.root.resolve()
        for path in paths:
            real = path.resolve()
            if not real.is_relative_to(root):
                raise DeployError(f"{path} leads to {real}, outside {self.root}; nothing changed")
            if real.exists() and not real.is_file():
                raise DeployError(f"{path} is not a regular file; nothing changed")


def install(cfg: DeployConfig, targets: Targets, dry_run: bool = False) -> list[Change]:
    """Write the units (and wire containerd); the list of what was done."""
    paths = [targets.unit_dir / DAEMON_UNIT]
    if cfg.snapshotter:
        paths.append(targets.unit_dir / SNAPSHOTTER_UNIT)
    if cfg.containerd:
        paths += [targets.unit_dir / CONTAINERD_DROPIN, targets.containerd_config]
    if cfg.registry:
        paths.append(targets.unit_dir / REGISTRY_UNIT)
    if cfg.image_service:
        paths.append(targets.unit_dir / IMAGE_SERVICE_UNIT)
    targets.check(paths)
    config_text = ""
    if cfg.containerd and targets.containerd_config.exists():
        try:
            config_text = targets.containerd_config.read_bytes().decode()
        except OSError as exc:
            raise DeployError(f"cannot read {targets.containerd_config}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise DeployError(f"{targets.containerd_config}: not UTF-8 text, as TOML must be; "
                              "nothing changed") from None
    # Check the containerd config before writing anything.
    merged = None
    if cfg.containerd:
        try:
            merged = merge_containerd_config(config_text, cfg.snapshotter_address,
                                             cfg.cri_default_snapshotter, cfg.image_service)
        except DeployError as exc:
            raise DeployError(f"{targets.containerd_config}: {exc}") from None
    changes = [_write(targets.unit_dir / DAEMON_UNIT, daemon_unit(cfg), dry_run)]
    if cfg.snapshotter:
        changes.append(_write(targets.unit_dir / SNAPSHOTTER_UNIT, snapshotter_unit(cfg), dry_run))
    if cfg.containerd:
        changes.append(_write(targets.unit_dir / CONTAINERD_DROPIN, containerd_dropin(), dry_run))
        if merged is None:
            changes.append(Change(targets.containerd_config, "unchanged"))
        else:
            change = _write(targets.containerd_config, merged, dry_run)
            if config_text.strip() and not merged.startswith(config_text.rstrip("\n")):
                change.note = "rewritten from its parsed form, comments not kept"
            changes.append(change)
    if cfg.registry:
        changes.append(_write(targets.unit_dir / REGISTRY_UNIT, registry_unit(cfg), dry_run))
    if cfg.image_service:
        changes.append(_write(targets.unit_dir / IMAGE_SERVICE_UNIT, image_service_unit(cfg),
                              dry_run))
    return changes
