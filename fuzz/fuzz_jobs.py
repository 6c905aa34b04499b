# Invariant tested: S8-1, S8-2, S8-3, S8-4
"""
Fuzz the job queue's pure core (`trio_taskgraph._core._jobs`) from raw bytes.

Each input is read as a program driving what the trio shell does with the core: submit jobs
(with or without ``run_after``), advance a clock, claim due jobs (``pop_due`` + ``start``),
finish running ones (succeed, fail with a retryable or a permanent error: the retry policy
decides, a retry is pushed back), cancel jobs in any state. A plain model (a dict of live
``(run_after, sequence)`` entries) checks every pop (S8-3: the smallest due entry, never one
before its time; S8-4: a cancelled job never), every transition goes through the table
(S8-1: terminal states are never left, illegal events raise `JobStateError` and change
nothing), and no job runs more than ``max_retries + 1`` times or after a permanent error
(S8-2).

    python fuzz/fuzz_jobs.py --seconds 60

Uses atheris when it is importable, otherwise random bytes and mutations of the corpus in
``fuzz/corpus/jobs/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _harness  # noqa: E402

from trio_taskgraph._core._jobs import (  # noqa: E402
    TRANSITIONS,
    JobEvent,
    JobRecord,
    JobSchedule,
    JobState,
    RetryPolicy,
)
from trio_taskgraph._errors import JobStateError, PermanentJobError  # noqa: E402

EVENTS = list(JobEvent)


def TestOneInput(data: bytes) -> None:
    schedule = JobSchedule()
    model: dict[str, tuple[float, int]] = {}
    records: dict[str, JobRecord] = {}
    policies: dict[str, RetryPolicy] = {}
    permanent_seen: set[str] = set()
    now = 0.0
    seq = 0
    ids = 0
    i = 0
    while i + 2 < len(data):
        op, a, b = data[i] % 7, data[i + 1], data[i + 2]
        i += 3
        if op == 0:  # submit
            ids += 1
            job = f"j{ids}"
            run_after = None if a % 3 == 0 else now + (a % 16) - 4
            policies[job] = RetryPolicy(max_retries=b % 4, delay=float(b % 3))
            records[job] = JobRecord(id=job, kind="task", task_type="t", max_retries=b % 4)
            seq += 1
            due = now if run_after is None else run_after
            model[job] = (due, seq)
            schedule.push(job, due)
        elif op == 1:  # advance the clock
            now += a % 8
        elif op == 2:  # a worker claims the first due job
            due_entries = [(t, q, j) for j, (t, q) in model.items() if t <= now]
            expected = min(due_entries)[2] if due_entries else None
            got = schedule.pop_due(now)
            assert got == expected, f"S8-3: popped {got}, model says {expected}"
            if got is not None:
                assert model[got][0] <= now, "S8-3: popped before its run_after"
                del model[got]
                assert records[got].state is JobState.PENDING, "S8-4: popped a non-pending job"
                records[got] = records[got].apply(JobEvent.START)
                assert got not in permanent_seen, "S8-2: ran again after a permanent error"
                assert records[got].attempt <= policies[got].max_retries + 1, "S8-2: too many"
        elif op in (3, 4) and records:  # finish a job: succeed or fail
            job = sorted(records)[a % len(records)]
            rec = records[job]
            if rec.state is not JobState.RUNNING:
                _must_refuse(rec, JobEvent.SUCCEED if op == 3 else JobEvent.FAIL)
                continue
            if op == 3:
                records[job] = rec.apply(JobEvent.SUCCEED, output={"n": 1})
                continue
            error: Exception = PermanentJobError("p") if b % 4 == 0 else OSError("r")
            decision = policies[job].decide(rec.attempt, error)
            if decision.retry:
                assert not isinstance(error, PermanentJobError), "S8-2: retried a permanent"
                due = now + decision.delay
                records[job] = rec.apply(JobEvent.RETRY, error="e", run_after=due)
                seq += 1
                model[job] = (due, seq)
                schedule.push(job, due)
            else:
                if isinstance(error, PermanentJobError):
                    permanent_seen.add(job)
                records[job] = rec.apply(JobEvent.FAIL, error="e")
        elif op == 5 and records:  # cancel (the shell's rule: only pending or running)
            job = sorted(records)[a % len(records)]
            rec = records[job]
            if rec.terminal:
                _must_refuse(rec, JobEvent.CANCEL)
                continue
            if rec.state is JobState.PENDING:
                assert schedule.discard(job) == (job in model)
                model.pop(job, None)
            records[job] = rec.apply(JobEvent.CANCEL)
        elif op == 6 and records:  # any event on any job: the table decides
            job = sorted(records)[a % len(records)]
            rec = records[job]
            event = EVENTS[b % len(EVENTS)]
            if (rec.state, event) not in TRANSITIONS:
                _must_refuse(rec, event)
        assert len(schedule) == len(model), "S8-4: schedule and model disagree on size"
        expected_next = min(t for t, _ in model.values()) if model else None
        assert schedule.next_due() == expected_next, "S8-3: next_due disagrees"
    for job, rec in records.items():
        if rec.terminal:
            assert job not in model, "S8-1: a terminal job is still scheduled"


def _must_refuse(rec: JobRecord, event: JobEvent) -> None:
    try:
        rec.apply(event)
    except JobStateError:
        return
    raise AssertionError(f"S8-1: {rec.state.value} accepted {event.value}")


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz for about ``seconds`` (corpus first); return the number of inputs run."""
    return _harness.run_inputs(TestOneInput, name="jobs", seconds=seconds, seed=seed, max_len=600)


if __name__ == "__main__":
    sys.exit(_harness.main(name="jobs", description=__doc__, check=TestOneInput, run=run))
