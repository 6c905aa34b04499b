"""
S9-6, the README never lies: every ``python`` block in it runs, as it is, in a fresh namespace
(its ``test_*`` coroutine functions are run too); every ``python -m trio_taskgraph ...`` line
in its ``sh`` blocks parses; every relative link names a file that exists.
"""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest
import trio

from trio_taskgraph._cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)
BLOCKS = [(lang, code) for lang, code in _BLOCK.findall(README)]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def test_the_readme_has_the_tour() -> None:
    assert len(PYTHON) >= 7
    for heading in ("A streaming task", "A graph", "Refs and the cache", "The cache server"):
        assert f"### {heading}" in README
    for heading in ("Cancellation", "Embedding in a trio application", "Guarantees"):
        assert heading in README
    assert README.index("make demo") < README.index("## What it is for")


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=lambda i: f"block{i}")
def test_python_block_runs(index: int, tmp_path: Path) -> None:
    code = PYTHON[index]
    # One module name for every block (as tests/test_runner.py uses for its block): a task
    # class re-created under the same module and name replaces its registry entry (S6-29).
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    for name, value in list(namespace.items()):
        if name.startswith("test_") and inspect.iscoroutinefunction(value):
            wants = inspect.signature(value).parameters
            args = [tmp_path] if "tmp_path" in wants else []
            trio.run(value, *args)


def _cli_lines() -> list[str]:
    lines = []
    for lang, code in BLOCKS:
        if lang != "sh":
            continue
        for line in code.splitlines():
            command = line.split("#", 1)[0].strip()
            if command.startswith("python -m trio_taskgraph "):
                lines.append(command)
    return lines


@pytest.mark.parametrize("line", _cli_lines())
def test_command_lines_parse(line: str) -> None:
    args = build_parser().parse_args(shlex.split(line)[3:])
    assert callable(args.handler)


def test_relative_links_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local
    for link in local:
        assert (ROOT / link).exists(), link
