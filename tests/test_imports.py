"""The import rules of DESIGN.md ("Who may import whom"), checked on the source: the pure
cores stay pure, gracectl stays a client, and no gracectl command module reaches back into
the command line's root (an import circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports made absolute), lazy ones included."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def files(where: str) -> list[Path]:
    p = ROOT / where
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


def offending(where: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in files(where):
        for name in imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return sorted(bad)


GRACED_PARTS = ("graced.app", "graced.api", "graced.executor", "graced.wire", "graced.mesh",
                "graced.journal", "graced.learning", "graced.detectors", "graced.config",
                "graced.missions", "graced.fleet")


@pytest.mark.parametrize(("where", "banned"), [
    # The wire format: nothing else of graced.
    ("graced/protocol", (*GRACED_PARTS, "graced.keys", "graced.paths", "graced.errors",
                         "gracectl")),
    # The engine decides and never acts.
    ("graced/missions/engine.py", ("graced.executor", "graced.wire", "graced.app",
                                   "graced.api", "graced.mesh")),
    # Detectors only observe.
    ("graced/detectors", ("graced.executor", "graced.learning", "graced.wire", "graced.app",
                          "graced.api")),
    # Learning advises and never acts.
    ("graced/learning", ("graced.executor", "graced.wire", "graced.app", "graced.api")),
    # The wire carries and never acts; the executor knows no clients.
    ("graced/wire.py", ("graced.executor", "graced.app")),
    ("graced/executor.py", ("graced.wire", "graced.api", "graced.app")),
    # gracectl talks to graced only through the protocol (plus keys, paths, errors).
    ("gracectl", GRACED_PARTS),
])
def test_import_rule(where: str, banned: tuple[str, ...]) -> None:
    assert offending(where, banned) == []


def test_detectors_base_knows_no_detector_kind() -> None:
    kinds = {p.stem for p in files("graced/detectors")} - {"__init__", "base"}
    bad = [n for n in imports(ROOT / "graced/detectors/base.py")
           if n.startswith("graced.detectors.") and n.split(".")[2] in kinds]
    assert bad == []


def test_no_gracectl_module_imports_the_command_line_root() -> None:
    """cli.py puts the command modules together; they share gracectl.command, so none of
    them imports gracectl.cli back (the circle learn.py and top.py once made)."""
    bad = [f"{p.relative_to(ROOT)}" for p in files("gracectl")
           if p.name not in ("cli.py", "__main__.py")
           and any(n == "gracectl.cli" or n.startswith("gracectl.cli.") for n in imports(p))]
    assert bad == []
