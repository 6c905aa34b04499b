"""
The job queue's pure core (`trio_taskgraph._core._jobs`): transitions, retries, the schedule,
subscriber budget sizes. Ids: spec/S8-jobs.md.
"""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import strategies as st

from tests.typed_hypothesis import given
from trio_taskgraph import (
    BinaryDelta,
    Finish,
    JobStateError,
    PermanentJobError,
    PortSchemaError,
    TaskDefinitionError,
    TaskFailedError,
    TextDelta,
)
from trio_taskgraph._core._jobs import (
    EVENT_OVERHEAD_BYTES,
    TERMINAL_STATES,
    TRANSITIONS,
    JobEvent,
    JobRecord,
    JobSchedule,
    JobState,
    RetryPolicy,
    event_budget_size,
    is_permanent,
    transition,
)


def test_states_compare_to_their_strings() -> None:
    """S8-1: ``handle.state == "pending"`` holds (StrEnum)."""
    state: str = JobState.PENDING  # what a caller holds: a str
    assert state == "pending"
    assert {s.value for s in JobState} == {
        "pending",
        "running",
        "completed",
        "failed",
        "cancelled",
    }
    assert {s.value for s in TERMINAL_STATES} == {"completed", "failed", "cancelled"}


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(list(JobState), list(JobEvent)))
)
def test_transition_table_is_the_whole_policy(state: JobState, event: JobEvent) -> None:
    """S8-1: every (state, event) pair either is in the table or raises JobStateError."""
    if (state, event) in TRANSITIONS:
        assert transition(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(JobStateError, match=state.value):
            transition(state, event)


def test_terminal_states_have_no_way_out() -> None:
    """S8-1: nothing leaves completed, failed or cancelled."""
    assert not [key for key in TRANSITIONS if key[0] in TERMINAL_STATES]


def test_record_apply_counts_attempts_and_keeps_the_rest() -> None:
    """S8-1, S8-5: start counts an attempt; retry stores error and run_after; succeed output."""
    rec = JobRecord(id="job-1", kind="task", task_type="t", max_retries=1)
    running = rec.apply(JobEvent.START)
    assert (running.state, running.attempt) == (JobState.RUNNING, 1)
    again = running.apply(JobEvent.RETRY, error="OSError: x", run_after=5.0)
    assert (again.state, again.error, again.run_after) == (JobState.PENDING, "OSError: x", 5.0)
    done = again.apply(JobEvent.START).apply(JobEvent.SUCCEED, output={"a": 1})
    assert (done.state, done.attempt, done.output, done.terminal) == (
        JobState.COMPLETED,
        2,
        {"a": 1},
        True,
    )
    failed = running.apply(JobEvent.FAIL, error="E: no")
    assert (failed.state, failed.error) == (JobState.FAILED, "E: no")
    assert rec.apply(JobEvent.CANCEL).state is JobState.CANCELLED
    assert rec.state is JobState.PENDING  # frozen: apply never mutates
    with pytest.raises(JobStateError):
        done.apply(JobEvent.CANCEL)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        rec.state = JobState.RUNNING  # type: ignore[misc]


def test_permanent_errors_follow_the_cause_chain() -> None:
    """S8-2: PermanentJobError, PortSchemaError, TaskDefinitionError (also as a cause)."""
    assert is_permanent(PermanentJobError("no"))
    assert is_permanent(PortSchemaError("bad port"))
    assert is_permanent(TaskDefinitionError("bad task"))
    wrapped = TaskFailedError("t", "n1", "boom")
    wrapped.__cause__ = PermanentJobError("inner")
    assert is_permanent(wrapped)
    assert not is_permanent(TaskFailedError("t", "n1"))
    assert not is_permanent(OSError("flaky"))
    # A cycle in the chain terminates.
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_permanent(a)


def test_retry_policy_counts_and_backs_off() -> None:
    """S8-2: attempt n retries while n <= max_retries; delay * backoff**(n-1), capped."""
    policy = RetryPolicy(max_retries=3, delay=1.0, backoff=2.0, max_delay=3.0)
    err = OSError("flaky")
    decisions = [policy.decide(n, err) for n in (1, 2, 3, 4)]
    assert [d.retry for d in decisions] == [True, True, True, False]
    assert [d.delay for d in decisions[:3]] == [1.0, 2.0, 3.0]
    assert decisions[3].reason == "exhausted"
    permanent = policy.decide(1, PermanentJobError("no"))
    assert (permanent.retry, permanent.reason) == (False, "permanent")
    assert not RetryPolicy().decide(1, err).retry


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"max_retries": -1}, ValueError),
        ({"max_retries": True}, TypeError),
        ({"max_retries": 1.5}, TypeError),
        ({"delay": -1.0}, ValueError),
        ({"delay": float("nan")}, ValueError),
        ({"delay": "1"}, TypeError),
        ({"backoff": 0.5}, ValueError),
        ({"max_delay": -2}, ValueError),
    ],
)
def test_retry_policy_checks_its_arguments(kwargs: dict[str, object], exc: type) -> None:
    """S8-2: a bad policy cannot be built."""
    with pytest.raises(exc):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_schedule_orders_by_time_then_sequence() -> None:
    """S8-3: (run_after, sequence) order; nothing before its time; FIFO on ties."""
    s = JobSchedule()
    s.push("late", 10.0)
    s.push("a", 1.0)
    s.push("b", 1.0)
    s.push("early", 0.5)
    assert len(s) == 4
    assert s.next_due() == 0.5
    assert s.pop_due(0.4) is None
    assert [s.pop_due(1.0), s.pop_due(1.0), s.pop_due(1.0), s.pop_due(1.0)] == [
        "early",
        "a",
        "b",
        None,
    ]
    assert s.next_due() == 10.0
    assert s.pop_due(10.0) == "late"
    assert s.next_due() is None
    assert s.pop_due(100.0) is None
    assert len(s) == 0


def test_schedule_discard_and_reschedule() -> None:
    """S8-4: a discarded id is never popped; pushing again reschedules."""
    s = JobSchedule()
    s.push("x", 1.0)
    s.push("y", 2.0)
    assert "x" in s
    assert s.discard("x")
    assert not s.discard("x")
    assert "x" not in s
    assert s.next_due() == 2.0
    s.push("y", 0.5)  # rescheduled earlier: the old entry is stale
    assert len(s) == 1
    assert s.pop_due(0.5) == "y"
    assert s.pop_due(5.0) is None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 7), st.integers(0, 20)),
        st.tuples(st.just("discard"), st.integers(0, 7), st.just(0)),
        st.tuples(st.just("pop"), st.just(0), st.integers(0, 25)),
    ),
    max_size=60,
)


@given(ops)
def test_schedule_matches_a_sorted_model(script: list[tuple[str, int, int]]) -> None:
    """S8-3, S8-4: the heap agrees with a plain model (min over live entries)."""
    s = JobSchedule()
    model: dict[str, tuple[float, int]] = {}
    seq = 0
    for op, key, value in script:
        job = f"j{key}"
        if op == "push":
            seq += 1
            model[job] = (float(value), seq)
            s.push(job, float(value))
        elif op == "discard":
            assert s.discard(job) == (job in model)
            model.pop(job, None)
        else:
            due = [(t, q, j) for j, (t, q) in model.items() if t <= value]
            expected = min(due)[2] if due else None
            assert s.pop_due(float(value)) == expected
            if expected is not None:
                del model[expected]
        assert len(s) == len(model)
        assert s.next_due() == (min(t for t, _ in model.values()) if model else None)


def test_event_budget_sizes() -> None:
    """S8-7: binary counts its bytes, text 4 bytes a character, every event the overhead."""
    assert event_budget_size(BinaryDelta("b", b"x" * 1000)) == EVENT_OVERHEAD_BYTES + 1000
    assert event_budget_size(TextDelta("t", "abc")) == EVENT_OVERHEAD_BYTES + 12
    assert event_budget_size(Finish({"a": b"x" * 10**6})) == EVENT_OVERHEAD_BYTES
