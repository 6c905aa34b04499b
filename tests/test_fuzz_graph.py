"""
Smoke run of `fuzz/fuzz_graph.py` so the harness stays runnable under `make test`
(the invariants it checks are listed at the top of the harness).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_graph.py"


def test_fuzz_graph_runs_briefly() -> None:
    """Runs the seed corpus and one second of random inputs; a finding raises."""
    spec = importlib.util.spec_from_file_location("fuzz_graph", HARNESS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    count = module.run(1.0, seed=7)
    assert count > len(list((HARNESS.parent / "corpus" / "graph").iterdir()))
