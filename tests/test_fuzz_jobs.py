"""
The job-core fuzz harness runs briefly in `make test` (long runs: `make fuzz`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trio_taskgraph._core._jobs import JobSchedule

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def test_fuzz_jobs_runs_briefly() -> None:
    """S8-1, S8-2, S8-3, S8-4 (see the harness's `# Invariant tested:` line)."""
    harness = _load("fuzz_jobs")
    text = (FUZZ / "fuzz_jobs.py").read_text()
    assert text.startswith("# Invariant tested: S8-1, S8-2, S8-3, S8-4")
    assert harness.run(1.0) > 100


def test_fuzz_jobs_reports_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness raises when the schedule ignores run_after (the seed's stores did)."""
    harness = _load("fuzz_jobs")

    class IgnoresRunAfter(JobSchedule):
        def pop_due(self, now: float) -> str | None:
            return super().pop_due(float("inf"))

    monkeypatch.setattr(harness, "JobSchedule", IgnoresRunAfter)
    with pytest.raises(AssertionError, match="S8-3"):
        # submit with run_after = now + 6, then claim at now: nothing may be popped.
        harness.TestOneInput(bytes([0, 10, 1, 2, 0, 0]))
