"""Substituter settings, with defaults as Nix's and a reader for nix.conf."""

from __future__ import annotations

import dataclasses
import logging
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazystore.errors import SubstituterError

log = logging.getLogger(__name__)

NIX_CONF = Path("/etc/nix/nix.conf")
CACHE_NIXOS_ORG = "https://cache.nixos.org"
NEGATIVE_TTL = 3600.0  # Nix's narinfo-cache-negative-ttl; the store keeps these answers
CACHE_NIXOS_ORG_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="


@dataclass(frozen=True)
class SpeedLimit:
    """As curl's ``--speed-limit``/``--speed-time``: a body that arrives slower
    than *bytes_per_second*, averaged over the last *seconds*, is cut off
    (a trickle the stall timeout, which only counts silence, lets through)."""

    bytes_per_second: float
    seconds: float


@dataclass
class SubstituterConfig:
    """How to reach and trust binary caches. Durations are in seconds."""

    urls: list[str] = field(default_factory=lambda: [CACHE_NIXOS_ORG])
    trusted_public_keys: list[str] = field(default_factory=lambda: [CACHE_NIXOS_ORG_KEY])
    require_sigs: bool = True
    store_dir: str = "/nix/store"
    max_connections: int = 25  # Nix's http-connections
    attempts: int = 5  # Nix's download-attempts
    connect_timeout: float = 30.0
    stall_timeout: float = 300.0  # Nix's stalled-download-timeout
    # curl's --speed-limit/--speed-time: a body slower than this many bytes/s
    # over low_speed_time (None: stall_timeout, the window Nix gives curl's
    # LOW_SPEED_TIME, whose LOW_SPEED_LIMIT it sets to 1) fails; 0: no limit.
    low_speed_limit: float = 1024.0
    low_speed_time: float | None = None
    netrc_file: Path | None = Path("/etc/nix/netrc")  # Nix's netrc-file; absent is fine
    ssl_cert_file: Path | None = None  # Nix's ssl-cert-file; None: the default CAs
    positive_ttl: float = 30 * 24 * 3600.0  # narinfo-cache-positive-ttl
    negative_ttl: float = NEGATIVE_TTL  # narinfo-cache-negative-ttl (for the store)
    backoff_base: float = 0.25  # first retry waits up to this (full jitter), doubling
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # never wait longer than this for a Retry-After
    cache_info_retry: float = 60.0  # re-read an unreachable cache's nix-cache-info after
    max_parallel_queries: int = 25  # narinfo lookups in flight during a closure walk
    max_parallel_fetches: int = 8  # NAR downloads in flight in `lazystore fetch`
    worker_threads: int = 4  # threads decompressing/hashing/unpacking at once
    narinfo_cache_size: int = 100_000

    def speed_limit(self) -> SpeedLimit | None:
        """The low-speed limit HTTP bodies are held to, or None when off."""
        if self.low_speed_limit <= 0:
            return None
        window = self.low_speed_time if self.low_speed_time is not None else self.stall_timeout
        return SpeedLimit(self.low_speed_limit, window)

    @classmethod
    def from_nix_conf(cls, path: Path | str = NIX_CONF, **overrides: Any) -> SubstituterConfig:
        """Settings from *path* (missing file: defaults), then *overrides* (None ignored)."""
        settings = read_nix_conf(Path(path))
        values = _from_settings(settings)
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise TypeError(f"unknown substituter settings: {sorted(unknown)}")
        return cls(**values)


def read_nix_conf(path: Path) -> dict[str, str]:
    """``name = value`` settings of a nix.conf (``include``, ``!include``, ``extra-``)."""
    settings: dict[str, str] = {}
    for name, value in _assignments(path, 0):
        if name.startswith("extra-"):
            base = name[len("extra-") :]
            settings[base] = f"{settings.get(base, '')} {value}".strip()
        else:
            settings[name] = value
    return settings


def _assignments(path: Path, depth: int) -> Iterator[tuple[str, str]]:
    """(name, value) in file order, included files inlined where they are included."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SubstituterError(f"cannot read {path}: {exc.strerror}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] in ("include", "!include") and len(words) == 2:
            target = path.parent / words[1]
            if depth > 10:
                raise SubstituterError(f"{path}:{lineno}: includes nested too deeply")
            if words[0] == "include" and not target.exists():
                raise SubstituterError(f"{path}:{lineno}: included file {target} does not exist")
            yield from _assignments(target, depth + 1)
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise SubstituterError(f"{path}:{lineno}: expected 'name = value'")
        yield name.strip(), value.strip()


def _from_settings(settings: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "substituters" in settings:
        values["urls"] = settings["substituters"].split()
    if "trusted-public-keys" in settings:
        values["trusted_public_keys"] = settings["trusted-public-keys"].split()
    if "require-sigs" in settings:
        values["require_sigs"] = _bool(settings["require-sigs"], "require-sigs")
    if "netrc-file" in settings:
        values["netrc_file"] = Path(settings["netrc-file"]) if settings["netrc-file"] else None
    if settings.get("ssl-cert-file"):
        values["ssl_cert_file"] = Path(settings["ssl-cert-file"])
    if "store" in settings and settings["store"].startswith("/"):
        values["store_dir"] = settings["store"].rstrip("/")
    numbers = {
        "http-connections": ("max_connections", int),
        "download-attempts": ("attempts", int),
        "connect-timeout": ("connect_timeout", float),
        "stalled-download-timeout": ("stall_timeout", float),
        "narinfo-cache-positive-ttl": ("positive_ttl", float),
        "narinfo-cache-negative-ttl": ("negative_ttl", float),
    }
    for key, (attr, kind) in numbers.items():
        if key in settings:
            try:
                number = kind(settings[key])
            except ValueError:
                raise SubstituterError(
                    f"nix.conf: {key} is not a number: {settings[key]!r}") from None
            if number > 0:  # Nix: 0 means "no limit"/"default"
                values[attr] = number
    return values


def _bool(value: str, name: str) -> bool:
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise SubstituterError(f"nix.conf: {name} is not a boolean: {shlex.quote(value)}")
