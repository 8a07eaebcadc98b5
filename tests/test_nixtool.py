"""The project's private Nix settings (lazystore.nixtool) work on any machine:
with or without a ``nixbld`` group, with or without a nix.conf of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazystore import nixtool
from lazystore.testing import nixcache

pytestmark = pytest.mark.skipif(not nixcache.have_nix(), reason="nix-bin is not installed")

EXPR = """
derivation {
  name = "nixtool-probe";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo built > $out" ];
  salt = "%s";
}
"""


def test_config_overrides_replace_base_settings() -> None:
    text = nixtool.nix_config({"substituters": "http://127.0.0.1:1", "extra": "x"})
    lines = text.splitlines()
    assert "substituters = http://127.0.0.1:1" in lines
    assert "substituters =" not in lines
    assert "build-users-group =" in lines
    assert lines[-1] == "extra = x"


def test_shell_entry_point_prints_the_same_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lazystore.nixtool", "require-sigs=true"],
        capture_output=True, text=True, check=True,
    )
    assert proc.stdout.rstrip("\n") == nixtool.nix_config({"require-sigs": "true"})


def test_shell_entry_point_rejects_a_bare_word() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lazystore.nixtool", "sandbox"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "KEY=VALUE" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="Nix defaults build users only for root")
def test_build_succeeds_with_an_empty_nix_conf_dir_whatever_groups_exist(tmp_path: Path) -> None:
    # An empty NIX_CONF_DIR: no nix.conf at all, as on a new machine. Nix 2.8 as
    # root then defaults build-users-group to "nixbld"; without that group the
    # build fails unless the project's settings clear it.
    conf_dir = tmp_path / "etc-nix"
    conf_dir.mkdir()
    expr = tmp_path / "probe.nix"
    expr.write_text(EXPR % os.urandom(8).hex())
    env = nixtool.nix_env()
    env["NIX_CONF_DIR"] = str(conf_dir)
    proc = subprocess.run(
        ["nix-build", str(expr), "--no-out-link"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()[-1]
    assert Path(out).read_text() == "built\n"
