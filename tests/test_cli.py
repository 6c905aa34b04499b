"""
The command line: `python -m trio_taskgraph demo` runs a real self-check.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from trio_taskgraph._cli import main


def test_demo_self_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--self-check"]) == 0
    out = capsys.readouterr().out
    assert "self-check: ok" in out
    assert "typo 'Blob' refused" in out


def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trio_taskgraph", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert proc.stdout.strip()
