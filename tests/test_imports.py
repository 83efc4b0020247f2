"""The house's rules, read from the source (AST, nothing imported): imports run one way, from
the command line and the simulations down through the server and the client to what they
share, and no production file grows past what one reads in a sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "server", "client", "simulations")
# what each package may import besides itself: shared at the bottom, server and client beside
# each other (never importing one another), simulations and the command line on top
ALLOWED = {
    "shared": set(),
    "server": {"shared"},
    "client": {"shared"},
    "simulations": {"shared", "server", "client"},
}
TOP = "simulations.cli"  # the command line: nothing imports it
DYNAMIC = {"import_module", "__import__", "find_spec"}  # importing a module named in a string
MAX_LINES = 600


def modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every production module."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), path))
    return found


def imported(tree: ast.AST, name: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a module, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = name.split(".")[: -node.level]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # `from package import module` names modules too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def problems_of(name: str, path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    where = path.relative_to(root)
    package = name.split(".")[0]
    problems = []
    for line, target in imported(tree, name):
        other = target.split(".")[0]
        if other in PACKAGES and other != package and other not in ALLOWED[package]:
            problems.append(f"{where}:{line}: {package} imports {other} ({target})")
        if target == TOP or target.startswith(f"{TOP}."):
            problems.append(f"{where}:{line}: imports the command line ({target})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else None
            called = node.func.id if isinstance(node.func, ast.Name) else called
            if called in DYNAMIC:
                problems.append(f"{where}:{node.lineno}: imports a module named in a string")
    lines = len(text.splitlines())
    if lines > MAX_LINES:
        problems.append(f"{where}: {lines} lines (at most {MAX_LINES})")
    return problems


@pytest.mark.parametrize(("name", "path"), modules(), ids=[name for name, _ in modules()])
def test_imports_run_one_way_and_modules_stay_short(name: str, path: Path) -> None:
    assert problems_of(name, path) == []


def test_the_check_sees_every_kind_of_arrow_against_the_flow(tmp_path: Path) -> None:
    module = tmp_path / "shared" / "bad.py"
    module.parent.mkdir()
    module.write_text(
        "import importlib\n"
        "from server.privacy.ledger import PrivacyLedger\n"
        "def lazy():\n"
        "    import simulations.cli\n"
        "    from client import node\n"
        "    return importlib.import_module('server.privacy.audit')\n" + "\n" * MAX_LINES
    )
    found = problems_of("shared.bad", module, tmp_path)
    assert len(found) == 6, found
