"""
Smoke test: the `fuzz/fuzz_server.py` harness fuzzes a live server for one second without a
finding (its invariants are listed on its first line).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_server.py"


def test_fuzz_server_runs_briefly() -> None:
    """S5-10: mutated frames never crash the server; a healthy client keeps working."""
    spec = importlib.util.spec_from_file_location("fuzz_server", HARNESS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert HARNESS.read_text().startswith("# Invariant tested:")
        count = module.run(1.0, seed=1)
    finally:
        del sys.modules[spec.name]
    assert count > 20
