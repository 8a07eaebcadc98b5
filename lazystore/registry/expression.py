"""``--expression FILE``: images of attributes of a Nix attribute set.

The name ``a/b/c`` stands for the attributes a, b and c of the set FILE
evaluates to; each is built (or substituted) with real Nix, with
lazystore.nixtool's settings and the registry's substituters. Answers are
cached per version of the file (its content hash): a changed file is evaluated
again. An image of attributes holds their closures and a small real layer of
``bin/`` symlinks to their programs (the first attribute to provide a name
wins), as Nixery's images do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import trio

from lazystore import nixtool
from lazystore.image import oci
from lazystore.registry.errors import NameUnknown, Unavailable

log = logging.getLogger(__name__)

BIN_MODE = 0o755


class Expression:
    def __init__(self, file: Path, settings: Mapping[str, str] | None = None) -> None:
        self.file = file.resolve()
        self.settings = dict(settings or {})
        self._names: dict[str, list[str]] = {}  # version -> attribute names
        self._outputs: dict[tuple[str, str], list[str]] = {}  # (version, attr) -> outputs
        self._lock = trio.Lock()  # one Nix run at a time: evaluations are CPU bound

    def version(self) -> str:
        try:
            return hashlib.sha256(self.file.read_bytes()).hexdigest()
        except OSError as exc:
            raise Unavailable(f"cannot read {self.file}: {exc.strerror}") from None

    async def outputs(self, attrs: Sequence[str]) -> tuple[str, list[list[str]]]:
        """(file version, the output store paths of each attribute of *attrs*)."""
        version = self.version()
        async with self._lock:
            names = await self._attribute_names(version)
            resolved = [_resolve(a, names, self.file) for a in attrs]
            missing = [a for a in resolved if (version, a) not in self._outputs]
            if missing:
                built = await self._build(missing)
                for attr, paths in zip(missing, built, strict=True):
                    self._outputs[version, attr] = paths
        return version, [self._outputs[version, a] for a in resolved]

    async def _attribute_names(self, version: str) -> list[str]:
        if version not in self._names:
            expr = f"builtins.attrNames (import {_nix_string(str(self.file))})"
            out = await self._nix("nix-instantiate", "--eval", "--strict", "--json", "-E", expr)
            try:
                names = json.loads(out)
            except ValueError:
                raise NameUnknown(f"{self.file} did not evaluate to an attribute set") from None
            self._names = {version: [str(n) for n in names]}
        return self._names[version]

    async def _build(self, attrs: Sequence[str]) -> list[list[str]]:
        """nix-build each attribute: its outputs (one line each, in -A order)."""
        result = []
        for attr in attrs:
            out = await self._nix("nix-build", str(self.file), "--no-out-link", "-A", attr)
            result.append(out.split())
        return result

    async def _nix(self, *argv: str) -> str:
        log.info("running %s", " ".join(argv[:2]))
        try:
            proc = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True,
                                          check=False, env=nixtool.nix_env(self.settings))
        except OSError as exc:
            raise Unavailable(f"cannot run {argv[0]}: {exc.strerror}") from None
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            last = lines[-1] if lines else f"exit status {proc.returncode}"
            raise NameUnknown(f"{argv[0]} of {self.file} failed: {last[:500]}")
        return proc.stdout.decode()


def _resolve(component: str, names: Sequence[str], file: Path) -> str:
    """The attribute a (lower-case) name component means: itself, else the one
    attribute equal to it ignoring case."""
    if component in names:
        return component
    folded = [n for n in names if n.lower() == component]
    if len(folded) == 1:
        return folded[0]
    raise NameUnknown(f"no attribute {component!r} in {file}")


def _nix_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def bin_entries(outputs: Sequence[str]) -> Iterator[oci.Entry]:
    """``bin/`` with a symlink per program of *outputs* (local store paths)."""
    links: dict[str, str] = {}
    for out in outputs:
        try:
            programs = sorted(os.listdir(f"{out}/bin"))
        except OSError:
            continue
        for program in programs:
            links.setdefault(program, f"{out}/bin/{program}")
    yield oci.Entry("bin", "dir", BIN_MODE)
    for program in sorted(links):
        yield oci.Entry(f"bin/{program}", "symlink", 0o777, linkname=links[program])

