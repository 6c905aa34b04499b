"""
The row-key and ref-signing fuzz harness runs briefly in `make test` (long runs: `make fuzz`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def test_fuzz_keys_runs_briefly() -> None:
    """S4-1, S4-6 (see the harness's `# Invariant tested:` line)."""
    harness = _load("fuzz_keys")
    assert (FUZZ / "fuzz_keys.py").read_text().startswith("# Invariant tested: S4-1, S4-6")
    assert harness.run(1.0) > 100


def test_fuzz_keys_reports_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness raises when the key ignores types (a top-level str() key would)."""
    harness = _load("fuzz_keys")
    monkeypatch.setattr(harness, "canonical_encode", lambda value: repr(value).encode())
    with pytest.raises(AssertionError, match="S4-1"):
        # {0: None, 1: None} vs {1: None, 0: None} reordered: repr changes with order.
        harness.TestOneInput(bytes.fromhex("0802060000060100") + b"\x00" * 8)
