"""Settings for running real Nix (nix-build, nix copy, nix-store) privately.

Every place in the project that runs Nix's own tools — the test support, the
benchmarks and their harness, scripts/demo — takes its settings from here, so
they work the same on a machine with or without a ``nixbld`` group and with or
without an /etc/nix/nix.conf of its own (which is never changed).

Nix 2.8 run as root defaults ``build-users-group`` to ``nixbld`` and refuses to
build when that group does not exist. These are private, unsandboxed builds of
small test closures, so they build as root with ``build-users-group =`` rather
than creating system users and groups on the machine (as Nix's installer
would): nothing outside the project's own folders changes.

``python -m lazystore.nixtool [KEY=VALUE ...]`` prints the NIX_CONFIG text for
shell scripts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# Settings every private Nix invocation gets. Later settings (NIX_CONFIG lines)
# override earlier ones and the machine's nix.conf, so these win over both.
BASE_SETTINGS: dict[str, str] = {
    "build-users-group": "",
    "sandbox": "false",
    "substituters": "",
    "experimental-features": "nix-command",
    "require-sigs": "false",
}


def nix_config(overrides: Mapping[str, str] | None = None) -> str:
    """NIX_CONFIG text: the base settings with *overrides* applied on top."""
    settings = dict(BASE_SETTINGS)
    settings.update(overrides or {})
    return "\n".join(f"{key} = {value}".rstrip() for key, value in settings.items())


def nix_env(
    overrides: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """An environment (a copy of *base*, default os.environ) with NIX_CONFIG set."""
    env = dict(os.environ if base is None else base)
    env["NIX_CONFIG"] = nix_config(overrides)
    return env


def substituting(url: str, public_key: str) -> dict[str, str]:
    """Overrides for Nix substituting from *url*, trusting only *public_key*."""
    return {
        "substituters": url,
        "trusted-public-keys": public_key,
        "require-sigs": "true",
    }


def main(argv: list[str] | None = None) -> int:
    overrides: dict[str, str] = {}
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            print(f"nixtool: expected KEY=VALUE, got {arg!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value.strip()
    print(nix_config(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
