"""
The sans-io rule: nothing under ``trio_taskgraph/_core/`` imports trio, os, socket,
subprocess, threading or asyncio (STYLE.md convention 1).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "trio_taskgraph" / "_core"
FORBIDDEN = {"trio", "os", "socket", "subprocess", "threading", "asyncio", "anyio", "selectors"}


def _imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            roots.add("__import__")
    return roots


CORE_FILES = sorted(CORE.rglob("*.py"))


def test_core_has_modules() -> None:
    assert len(CORE_FILES) >= 4


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_is_pure(path: Path) -> None:
    bad = _imported_roots(path.read_text()) & (FORBIDDEN | {"__import__"})
    assert not bad, f"{path.name} imports {sorted(bad)}: _core/ must stay sans-io"


def test_checker_catches_forbidden_imports() -> None:
    assert _imported_roots("import os.path\nfrom trio import lowlevel\n") == {"os", "trio"}
    assert _imported_roots("from . import x\nimport attrs\n") == {"attrs"}
    assert "__import__" in _imported_roots("__import__('socket')")
