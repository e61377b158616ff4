"""The checkpoint package is a layer: nothing under ftrain/checkpoint/ imports the recipe above it."""

from __future__ import annotations

import ast
from pathlib import Path

import ftrain.checkpoint

PACKAGE = Path(ftrain.checkpoint.__file__).parent
# The recipe and what sits above the checkpoint package; the package reaches none of them.
FORBIDDEN = (
    "omegaconf",
    "ftrain.config",
    "ftrain.trainer",
    "ftrain.model",
    "ftrain.data",
    "ftrain.cli",
    "ftrain.preflight",
    "ftrain.distributed",
    "ftrain.checkpointer",
)


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_the_checkpoint_package_imports_nothing_above_it():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    problems = [
        f"{path.relative_to(PACKAGE.parent.parent)}:{line} imports {name}"
        for path in files
        for line, name in _imported(ast.parse(path.read_text(), str(path)))
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    ]
    assert not problems, "\n".join(problems)
