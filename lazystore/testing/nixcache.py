"""Real Nix for tests: build closures from files on the machine and write
signed binary caches with ``nix copy`` (as a user's cache would be written)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lazystore import nixtool

SAMPLE_NIX = Path(__file__).with_name("sample.nix")
KEY_NAME = "lazystore-test-1"


def nix_env() -> dict[str, str]:
    """Environment for Nix commands: the project's private settings (nixtool)."""
    return nixtool.nix_env()


def have_nix() -> bool:
    # /nix/store itself appears on first use, so only the tools are checked.
    return shutil.which("nix-build") is not None


def run_nix(*argv: str | os.PathLike[str], input: bytes | None = None) -> bytes:
    """Run a Nix command, returning stdout; raise with its stderr on failure."""
    proc = subprocess.run(
        [str(a) for a in argv], input=input, capture_output=True, env=nix_env()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout


def build(expr: Path = SAMPLE_NIX, **argstr: str) -> str:
    """nix-build *expr* with ``--argstr`` arguments; return the output store path."""
    args: list[str] = []
    for key, value in argstr.items():
        args += ["--argstr", key, value]
    out = run_nix("nix-build", str(expr), "--no-out-link", *args)
    return out.decode().strip().splitlines()[-1]


def closure(path: str) -> list[str]:
    """The closure of *path* (full store paths), as ``nix-store -qR`` gives it."""
    return run_nix("nix-store", "-qR", path).decode().split()


def references(path: str) -> list[str]:
    return run_nix("nix-store", "-q", "--references", path).decode().split()


def nar_hash(path: str) -> str:
    """``sha256:<nix32>`` of the NAR serialisation of *path*, by Nix.

    Nix 2.8 prints the bare nix32 digest; newer Nix prefixes the algorithm.
    """
    out = run_nix("nix", "hash", "path", "--type", "sha256", "--base32", path).decode().strip()
    return out if out.startswith("sha256:") else f"sha256:{out}"


@dataclass
class KeyPair:
    secret_file: Path
    public_key: str  # "name:base64"

    @classmethod
    def generate(cls, directory: Path, name: str = KEY_NAME) -> KeyPair:
        directory.mkdir(parents=True, exist_ok=True)
        secret, public = directory / f"{name}.sec", directory / f"{name}.pub"
        if not secret.exists():
            run_nix("nix-store", "--generate-binary-cache-key", name, secret, public)
        return cls(secret, public.read_text().strip())


@dataclass
class BinaryCache:
    """A binary cache folder written by ``nix copy --to file://``."""

    root: Path
    key: KeyPair
    top: str  # the store path the closure was built for
    paths: list[str] = field(default_factory=list)  # its closure, full store paths

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def narinfo_path(self, store_path: str) -> Path:
        return self.root / f"{Path(store_path).name[:32]}.narinfo"


def make_cache(
    top: str,
    dest: Path,
    key: KeyPair,
    compression: str = "zstd",
    listing: bool = True,
) -> BinaryCache:
    """Sign the closure of *top* with *key* and copy it into a file:// cache at *dest*."""
    paths = closure(top)
    run_nix("nix", "store", "sign", "--key-file", key.secret_file, "-r", top)
    params = f"compression={compression}&write-nar-listing={'true' if listing else 'false'}"
    run_nix("nix", "copy", "--to", f"file://{dest}?{params}", top)
    return BinaryCache(dest, key, top, paths)
