"""
Every ``fuzz/fuzz_*.py`` harness runs briefly in `make test` (long runs: `make fuzz`), each
one can report a finding, and ``fuzz/run_all.py`` summarises and fails on one.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
HARNESSES = sorted(p.stem for p in FUZZ.glob("fuzz_*.py"))


@pytest.fixture(autouse=True)
def _fuzz_on_path() -> Iterator[None]:
    # Harnesses run as scripts, with fuzz/ first on sys.path (for `import _harness`).
    sys.path.insert(0, str(FUZZ))
    try:
        yield
    finally:
        sys.path.remove(str(FUZZ))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_every_harness_is_listed() -> None:
    assert {
        "fuzz_budget",
        "fuzz_codec",
        "fuzz_walker",
        "fuzz_keys",
        "fuzz_server",
        "fuzz_client",
    } <= set(HARNESSES)


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_runs_briefly(name: str) -> None:
    """Each harness names the invariants it checks and runs its corpus plus fresh inputs
    for a second without a finding (fuzz_server: S5-10, mutated frames never crash a live
    server while a healthy client keeps working)."""
    source = (FUZZ / f"{name}.py").read_text()
    assert source.startswith("# Invariant tested: S"), "first line must cite spec ids"
    harness = _load(name)
    corpus = harness._harness.load_corpus(name.removeprefix("fuzz_"))
    assert harness.run(1.0, seed=1) > len(corpus) + 10


def test_harness_main_prints_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    harness = _load("fuzz_graph")
    argv = ["--seconds", "0.2", "--no-atheris"]
    assert (
        harness._harness.main(
            name="graph", description="", check=harness.TestOneInput, run=harness.run, argv=argv
        )
        == 0
    )
    assert "inputs run: " in capsys.readouterr().out


def test_a_finding_carries_its_input() -> None:
    harness = _load("fuzz_graph")

    def check(data: bytes) -> None:
        if data:
            raise AssertionError("S0-0 broken")

    with pytest.raises(AssertionError, match="S0-0") as info:
        harness._harness.run_inputs(check, name="none-such", seconds=1.0)
    assert any("input (hex)" in note for note in info.value.__notes__)


def test_fuzz_budget_reports_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget harness raises on a broken invariant (a lost wake-up), naming S2-5."""
    from trio_taskgraph._core._budget import ByteBudget

    harness = _load("fuzz_budget")
    assert vars(harness)["ByteBudget"] is ByteBudget

    # Deliberately subclasses the final ByteBudget: a broken core for the harness to catch.
    class Broken(ByteBudget[int, int]):  # type: ignore[misc]
        def cancel_sender(self, token: int) -> tuple[int, ...]:
            del self._senders[token]
            return ()  # forgets to admit the senders behind: a lost wake-up

    monkeypatch.setattr(harness, "ByteBudget", Broken)
    with pytest.raises(AssertionError, match="S2-5"):
        harness.TestOneInput(bytes.fromhex("090005001900010400020002000200"))


def test_fuzz_keys_reports_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys harness raises when the key ignores order/types (a repr() key would)."""
    harness = _load("fuzz_keys")
    monkeypatch.setattr(harness, "canonical_encode", lambda value: repr(value).encode())
    with pytest.raises(AssertionError, match="S4-1"):
        # {0: None, 1: None} vs {1: None, 0: None} reordered: repr changes with order.
        harness.TestOneInput(bytes.fromhex("0802060000060100") + b"\x00" * 8)


def test_fuzz_jobs_reports_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs harness raises when the schedule ignores run_after (the seed's stores did)."""
    from trio_taskgraph._core._jobs import JobSchedule

    harness = _load("fuzz_jobs")

    # Deliberately subclasses the final JobSchedule: a broken schedule for the harness to catch.
    class IgnoresRunAfter(JobSchedule):  # type: ignore[misc]
        def pop_due(self, now: float) -> str | None:
            return super().pop_due(float("inf"))

    monkeypatch.setattr(harness, "JobSchedule", IgnoresRunAfter)
    with pytest.raises(AssertionError, match="S8-3"):
        # submit with run_after = now + 6, then claim at now: nothing may be popped.
        harness.TestOneInput(bytes([0, 10, 1, 2, 0, 0]))


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
