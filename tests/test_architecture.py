"""Structural rules: imports flow one way, and lorakit never imports PEFT."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "lorakit"

# Lower layers never import higher ones:
# CLI -> training -> hub/estimate -> model API -> persistence/injection -> layers -> config/errors.
RANK = {
    "lorakit.errors": 0,
    "lorakit.cpu_blas": 0,
    "lorakit.io": 1,
    "lorakit.config": 2,
    "lorakit.layers": 3,
    "lorakit.targeting": 4,
    "lorakit.kbit": 4,
    "lorakit.tuner": 5,
    "lorakit.adalora": 5,
    "lorakit.combine": 5,
    "lorakit.persistence": 6,
    "lorakit.model": 7,
    "lorakit.tasks": 7,
    "lorakit.hub": 8,
    "lorakit.estimate": 8,
    "lorakit.training": 9,
    "lorakit.cli": 10,
    "lorakit": 99,
}


def rank_of(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in RANK:
            return RANK[name]
    raise AssertionError(f"module {module} has no rank in tests/test_architecture.py; add it")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_imports(tree: ast.AST) -> list[str]:
    """Absolute lorakit imports, skipping those under `if TYPE_CHECKING:`."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_imports_flow_one_way():
    problems = []
    for path in SRC.rglob("*.py"):
        me = module_name(path)
        for imported in runtime_imports(ast.parse(path.read_text())):
            if imported.split(".")[0] == "peft":
                problems.append(f"{me} imports {imported}")
            if imported.startswith("lorakit") and rank_of(imported) > rank_of(me):
                problems.append(f"{me} (rank {rank_of(me)}) imports upward {imported} (rank {rank_of(imported)})")
    assert not problems, "\n".join(problems)


def test_import_lorakit_does_not_load_peft():
    code = "import sys, lorakit; print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_files_stay_small():
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not big, f"files over 600 lines (probably two ideas): {big}"
