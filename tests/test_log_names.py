"""graced's log lines name their component once: the formatter puts the logger's name
below ``graced`` first (``fleet: forwarding to ...``), so a message must not say it again
(``fleet: fleet: forwarding ...`` was in the log)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import graced
from graced.cli import _Format

LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _loggers(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = logging.getLogger("graced.X")``: NAME -> X."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and isinstance(node.value.func, ast.Attribute) \
                and node.value.func.attr == "getLogger" and node.value.args \
                and isinstance(node.value.args[0], ast.Constant) \
                and str(node.value.args[0].value).startswith("graced."):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = str(node.value.args[0].value).removeprefix("graced.")
    return found


def test_no_log_message_repeats_the_name_the_formatter_gives_it() -> None:
    root = Path(graced.__file__).parent
    repeats, checked = [], 0
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        loggers = _loggers(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in loggers and node.func.attr in LEVELS):
                continue
            args = node.args[1:] if node.func.attr == "log" else node.args
            first = args[0] if args else None
            if isinstance(first, ast.JoinedStr) and first.values:
                first = first.values[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            checked += 1
            name = loggers[node.func.value.id]
            if first.value.startswith((f"{name}:", f"{name} (")):
                repeats.append(f"{path.relative_to(root)}:{node.lineno}: {first.value[:50]!r}")
    assert checked > 30  # the scan found graced's log calls
    assert repeats == []


def test_the_formatter_names_the_component_once() -> None:
    record = logging.LogRecord("graced.fleet", logging.INFO, __file__, 1,
                               "forwarding to %s", ("nats://127.0.0.1:4222",), None)
    assert _Format(journal=True).format(record) == "<6>fleet: forwarding to nats://127.0.0.1:4222"
