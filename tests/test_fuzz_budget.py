"""
The byte-budget fuzz harness runs briefly in `make test` (long runs: `make fuzz`).
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


def test_fuzz_budget_runs_briefly() -> None:
    """S2-2 .. S2-12 (see the harness's `# Invariant tested:` line)."""
    harness = _load("fuzz_budget")
    assert (FUZZ / "fuzz_budget.py").read_text().startswith("# Invariant tested: S2-")
    assert harness.run(1.0) > 100


def test_fuzz_budget_reports_a_finding() -> None:
    """The harness raises on a broken invariant, naming the input."""
    harness = _load("fuzz_budget")

    class Broken(harness.ByteBudget):  # type: ignore[misc,name-defined]
        def cancel_sender(self, token: object) -> tuple[object, ...]:
            del self._senders[token]
            return ()  # forgets to admit the senders behind: a lost wake-up

    original = harness.ByteBudget
    harness.ByteBudget = Broken
    try:
        with pytest.raises(AssertionError, match="S2-5"):
            harness.TestOneInput(bytes.fromhex("090005001900010400020002000200"))
    finally:
        harness.ByteBudget = original


def test_run_all_summarises_and_fails_on_a_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fuzz/run_all.py: one row per harness, non-zero exit on a finding or a missing count."""
    run_all = _load("run_all")
    (tmp_path / "fuzz_fine.py").write_text("print('inputs run: 7')\n")
    (tmp_path / "fuzz_finds.py").write_text(
        "print('inputs run: 3')\nraise AssertionError('S9-9')\n"
    )
    (tmp_path / "fuzz_silent.py").write_text("pass\n")
    (tmp_path / "fuzz_libfuzzer.py").write_text(  # an atheris run whose own count was lost
        "import sys\nprint('Done 42 runs in 1 second(s)', file=sys.stderr)\n"
    )
    assert run_all.main(["--seconds", "0.1", "--dir", str(tmp_path), "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "fuzz_fine" in out
    assert "FINDING" in out
    assert "NO COUNT" in out
    assert "S9-9" in out
    assert any("fuzz_libfuzzer" in line and " 42 " in line for line in out.splitlines())
    assert run_all.main(["--seconds", "0.1", "--dir", str(tmp_path), "fine"]) == 0
