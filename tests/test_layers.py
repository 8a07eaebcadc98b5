"""The layer table of README.rst's Layout section is true: it lists every part
of the package, and every module imports only what its layer's entry allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lazystore"
ANYONE = {"errors", "nix"}  # any layer may import these
ENTRY = re.compile(r"^``(?P<name>[a-z_]+)(?:/|\.py)``\n(?P<body>(?: {4}.*\n)+)", re.MULTILINE)
IMPORTS = re.compile(r"imports: (?P<what>[^.]*)\.\s*$")


def layout() -> dict[str, set[str] | None]:
    """Layer name -> the layers it may import (None: everything), from README.rst."""
    text = (ROOT / "README.rst").read_text()
    section = text.split("\nLayout\n======\n", 1)[1].split("\n=====", 1)[0]
    table: dict[str, set[str] | None] = {}
    for m in ENTRY.finditer(section):
        body = " ".join(line.strip() for line in m["body"].splitlines())
        what = IMPORTS.search(body)
        assert what, f"README Layout: {m['name']} does not say what it imports"
        words = what["what"].strip()
        if words == "everything":
            table[m["name"]] = None
        elif words == "nothing else":
            table[m["name"]] = set()
        else:
            table[m["name"]] = set(re.findall(r"``([a-z_]+)``", words))
    return table


def layers_in_tree() -> set[str]:
    names = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    names |= {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    return names


def imported_layers(path: Path, source: str | None = None) -> set[str]:
    """The other lazystore layers module *path* imports (absolute or relative
    imports, anywhere in it); *source* instead of the file's text."""
    rel = path.relative_to(PACKAGE).parts
    layer = rel[0].removesuffix(".py")
    found = set()
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's own package
                parts = rel[:-node.level]
                modules = [".".join(filter(None, ("lazystore", *parts, node.module)))]
            else:
                modules = [node.module or ""]
            if modules[0] == "lazystore":  # from lazystore import x
                modules = [f"lazystore.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "lazystore" and len(parts) > 1 and parts[1] != layer:
                found.add(parts[1])
    return found


def test_layout_lists_every_part_of_the_package() -> None:
    table = layout()
    assert {"cli", "daemon", "fs", "control", "store", "substituter", "nix"} <= set(table)
    assert sorted(layers_in_tree() - set(table)) == [], "add them to README.rst's Layout"
    assert sorted(set(table) - layers_in_tree()) == [], "README.rst's Layout lists these"


def test_every_module_imports_only_what_its_layer_may() -> None:
    table = layout()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        allowed = table.get(layer, set())
        if allowed is None or layer.startswith("__"):
            continue
        for other in sorted(imported_layers(path) - allowed - ANYONE):
            wrong.append(f"{path.relative_to(ROOT)} imports lazystore.{other}")
    assert wrong == []


def test_fs_imports_nothing_from_control_or_the_daemon() -> None:
    found = set().union(*(imported_layers(p) for p in (PACKAGE / "fs").glob("*.py")))
    assert "store" in found and not found & {"control", "daemon", "cli", "snapshotter"}


def test_every_spelling_of_an_import_is_seen() -> None:
    probe = PACKAGE / "fs" / "probe.py"
    source = (
        "import lazystore.control.client\n"
        "from lazystore import daemon\n"
        "from ..snapshotter import service\n"
        "from . import vfs\n"
        "from .. import store\n"
        "def f():\n    from lazystore.cli import main\n"
    )
    assert imported_layers(probe, source) == {"control", "daemon", "snapshotter", "cli", "store"}
