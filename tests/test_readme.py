"""README.rst is the user's manual: it renders cleanly and documents every command."""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import pytest

from lazystore.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.rst"


def _commands(parser: argparse.ArgumentParser, prefix: str = "lazystore") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix} {name}")
                found += nested or [f"{prefix} {name}"]
    return found


def test_readme_renders_without_warnings() -> None:
    core = pytest.importorskip("docutils.core")
    warnings = io.StringIO()
    core.publish_doctree(
        README.read_text(),
        source_path=str(README),
        settings_overrides={"warning_stream": warnings, "report_level": 2, "halt_level": 5},
    )
    assert warnings.getvalue() == ""


def test_every_command_is_documented() -> None:
    text = README.read_text()
    commands = _commands(build_parser())
    assert "lazystore nar pack" in commands and "lazystore mount" in commands
    missing = [c for c in commands if f"``{c}" not in text]
    assert missing == []


def test_every_control_operation_is_documented_with_its_arguments() -> None:
    from lazystore.control.protocol import OPERATIONS

    section = README.read_text().split("\nControl protocol\n====", 1)[1].split("\n=====", 1)[0]
    entries = dict(re.findall(r"^``([a-z_]+)`` \((.*)\)$", section, re.MULTILINE))
    assert sorted(entries) == sorted(OPERATIONS)
    for name, op in OPERATIONS.items():
        assert re.findall(r"``([a-z_]+)``: ", entries[name]) == list(op.arg_names), name
