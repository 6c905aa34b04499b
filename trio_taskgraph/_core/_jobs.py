"""
The job queue's pure core: job states and their transitions, the retry policy, the schedule
keyed by ``(run_after, sequence)`` and the byte size a stream event counts for in a
subscriber's budget.

Rules (spec/S8-jobs.md):

- S8-1 states and transitions: a job is ``pending``, ``running``, ``completed``, ``failed`` or
  ``cancelled``; the last three are terminal. Only the transitions of `TRANSITIONS` exist;
  anything else raises `JobStateError` and changes nothing. `JobRecord.apply` is the only way
  a record changes state.

  =========  ========  ===========  ========================================
  from       event     to           when
  =========  ========  ===========  ========================================
  pending    start     running      a worker claims the job (attempt += 1)
  pending    cancel    cancelled    ``cancel()`` before a worker claimed it
  running    succeed   completed    the run returned its output
  running    fail      failed       permanent error, or retries exhausted
  running    retry     pending      retryable error, retries left
  running    cancel    cancelled    ``cancel()`` (or queue shutdown) mid-run
  =========  ========  ===========  ========================================

- S8-2 retries: after the ``n``-th failed attempt (``n >= 1``), a job retries when the error is
  retryable and ``n <= max_retries``; the retry is due ``delay * backoff ** (n - 1)`` seconds
  later (capped at ``max_delay``). An error is permanent when it, or an exception in its
  ``__cause__`` chain, is a `PermanentJobError`, a `PortSchemaError` or a
  `TaskDefinitionError` (another attempt would fail the same way). Every other ``Exception``
  is retryable.
- S8-3 schedule order: `JobSchedule.pop_due(now)` returns the due entry (``run_after <=
  now``) with the smallest ``(run_after, sequence)``; a job without ``run_after`` is due at
  its submission time. Sequences increase with every push, so due jobs with equal times
  leave in push order (FIFO), and a retry goes behind jobs already waiting at its time.
  Nothing is ever returned before its ``run_after``.
- S8-4 removal: `JobSchedule.discard` removes a job at once (a cancelled pending job is never
  popped); a discarded or popped job is not counted by ``len``.
- S8-7 subscriber budget: `event_budget_size` is what a stream event counts for in a
  subscriber's byte budget: a `BinaryDelta` its chunk size, a `TextDelta` its UTF-8 length
  upper bound (4 bytes a character), every event at least `EVENT_OVERHEAD_BYTES`, so a
  budget bounds both the bytes and the number of events buffered.

Theory of operation: the trio shell (``trio_taskgraph/_jobs.py``) holds one `JobRecord` per
job in a job store and one `JobSchedule` for the pending ones. A worker pops a due id and
applies ``start`` without a checkpoint in between, so a job is claimed by exactly one worker
and a cancel either finds it pending (and discards it) or running (and cancels its scope).
"""

from __future__ import annotations

import enum
import heapq
from typing import TYPE_CHECKING, Final, final

import attrs

from .._errors import (
    JobStateError,
    PermanentJobError,
    PortSchemaError,
    TaskDefinitionError,
)
from ._events import BinaryDelta, TextDelta

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "EVENT_OVERHEAD_BYTES",
    "PERMANENT_ERRORS",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "JobEvent",
    "JobRecord",
    "JobSchedule",
    "JobState",
    "RetryDecision",
    "RetryPolicy",
    "event_budget_size",
    "is_permanent",
    "transition",
]


class JobState(enum.StrEnum):
    """A job's state; compares equal to its string value (``JobState.PENDING == "pending"``)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobEvent(enum.StrEnum):
    """What happens to a job (the input of the transition table)."""

    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    RETRY = "retry"
    CANCEL = "cancel"


#: States a job never leaves.
TERMINAL_STATES: Final = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

# Invariant (S8-1): these are the only transitions.
TRANSITIONS: Final[Mapping[tuple[JobState, JobEvent], JobState]] = {
    (JobState.PENDING, JobEvent.START): JobState.RUNNING,
    (JobState.PENDING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.RUNNING, JobEvent.SUCCEED): JobState.COMPLETED,
    (JobState.RUNNING, JobEvent.FAIL): JobState.FAILED,
    (JobState.RUNNING, JobEvent.RETRY): JobState.PENDING,
    (JobState.RUNNING, JobEvent.CANCEL): JobState.CANCELLED,
}


def transition(state: JobState, event: JobEvent) -> JobState:
    """
    Return the state ``event`` moves a job in ``state`` to (S8-1).

    Raises:
        JobStateError: the table has no such transition.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise JobStateError(f"no transition from {state.value!r} on {event.value!r}") from None


#: Exception types that make a job fail at once, whatever its ``max_retries`` (S8-2).
PERMANENT_ERRORS: Final = (PermanentJobError, PortSchemaError, TaskDefinitionError)


def is_permanent(error: BaseException) -> bool:
    """
    True when ``error`` or an exception in its ``__cause__`` chain is permanent (S8-2).

    The chain is followed through ``__cause__`` only (a `TaskFailedError` chains the task's
    own exception there), with cycle protection.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, PERMANENT_ERRORS):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def _check_non_negative_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_non_negative_float(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


@final
@attrs.frozen(kw_only=True)
class RetryDecision:
    """
    What to do after a failed attempt.

    Attributes:
        retry: True to run the job again, False to fail it.
        delay: seconds until the retry is due (0 when not retrying).
        reason: why (``"retryable"``, ``"permanent"``, ``"exhausted"``).
    """

    retry: bool
    delay: float
    reason: str


@final
@attrs.frozen(kw_only=True)
class RetryPolicy:
    """
    How often and how soon a failed job runs again (S8-2).

    Attributes:
        max_retries: retries after the first attempt (``0``: never retry).
        delay: seconds before the first retry.
        backoff: factor applied to the delay for each further retry (>= 1).
        max_delay: upper bound of any delay.
    """

    max_retries: int = attrs.field(default=0)
    delay: float = attrs.field(default=0.0)
    backoff: float = attrs.field(default=2.0)
    max_delay: float = attrs.field(default=300.0)

    def __attrs_post_init__(self) -> None:
        _check_non_negative_int("max_retries", self.max_retries)
        _check_non_negative_float("delay", self.delay)
        _check_non_negative_float("backoff", self.backoff)
        _check_non_negative_float("max_delay", self.max_delay)
        if self.backoff < 1:
            raise ValueError(f"backoff must be >= 1, got {self.backoff}")

    def decide(self, attempt: int, error: BaseException) -> RetryDecision:
        """
        Decide what follows the failure of attempt number ``attempt`` (1-based) with ``error``.
        """
        if is_permanent(error):
            return RetryDecision(retry=False, delay=0.0, reason="permanent")
        # Invariant (S8-2): attempt n retries while n <= max_retries.
        if attempt > self.max_retries:
            return RetryDecision(retry=False, delay=0.0, reason="exhausted")
        delay = min(self.max_delay, self.delay * self.backoff ** (attempt - 1))
        return RetryDecision(retry=True, delay=delay, reason="retryable")


@final
@attrs.frozen(kw_only=True)
class JobRecord:
    """
    What a job store keeps of a job: small whatever the size of the job's output (S8-5).

    Attributes:
        id: the job id.
        kind: ``"task"`` or ``"graph"``.
        task_type: the task's type (for a graph: ``"graph"``).
        state: the current `JobState`.
        attempt: attempts started so far.
        max_retries: as submitted.
        run_after: when the job is due next (trio clock), or ``None`` for "when submitted".
        output: the output of a completed job, refs kept as `CacheRef` (never hydrated).
        error: ``"TypeName: message"`` of the last failure, if any.
        error_traceback: the last failure's formatted traceback (its cause chain included),
            if any, so that another process can show it (S8-24).
    """

    id: str
    kind: str
    task_type: str
    state: JobState = JobState.PENDING
    attempt: int = 0
    max_retries: int = 0
    run_after: float | None = None
    output: Mapping[str, object] | None = None
    error: str | None = None
    error_traceback: str | None = None

    @property
    def terminal(self) -> bool:
        """True in ``completed``, ``failed`` and ``cancelled``."""
        return self.state in TERMINAL_STATES

    def apply(
        self,
        event: JobEvent,
        *,
        output: Mapping[str, object] | None = None,
        error: str | None = None,
        run_after: float | None = None,
        error_traceback: str | None = None,
    ) -> JobRecord:
        """
        Return the record after ``event`` (S8-1); ``self`` is unchanged.

        ``start`` counts an attempt; ``succeed`` stores ``output``; ``fail`` and ``retry``
        store ``error`` and ``error_traceback``; ``retry`` stores the new ``run_after``.

        Raises:
            JobStateError: the transition does not exist.
        """
        state = transition(self.state, event)
        # Built directly (not attrs.evolve): this runs twice per job on the queue's hot path.
        attempt, kept_output, kept_error, kept_run_after, kept_traceback = (
            self.attempt,
            self.output,
            self.error,
            self.run_after,
            self.error_traceback,
        )
        if event is JobEvent.START:
            attempt += 1
        elif event is JobEvent.SUCCEED:
            kept_output = output
        elif event is JobEvent.RETRY:
            kept_error, kept_run_after, kept_traceback = error, run_after, error_traceback
        elif event is JobEvent.FAIL:
            kept_error, kept_traceback = error, error_traceback
        return JobRecord(
            id=self.id,
            kind=self.kind,
            task_type=self.task_type,
            state=state,
            attempt=attempt,
            max_retries=self.max_retries,
            run_after=kept_run_after,
            output=kept_output,
            error=kept_error,
            error_traceback=kept_traceback,
        )


@final
class JobSchedule:
    """
    The pending jobs, ordered by ``(run_after, sequence)`` (S8-3, S8-4).

    A heap with lazy deletion: `discard` forgets an id at once; its heap entry is skipped
    when it surfaces.
    """

    __slots__ = ("_heap", "_live", "_sequence")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, int] = {}
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live

    def push(self, job_id: str, run_after: float) -> int:
        """
        Schedule ``job_id`` to be due at ``run_after``; return its sequence number.

        Pushing an id already scheduled reschedules it (the old entry is dropped).
        """
        self._sequence += 1
        seq = self._sequence
        self._live[job_id] = seq
        heapq.heappush(self._heap, (run_after, seq, job_id))
        return seq

    def discard(self, job_id: str) -> bool:
        """Forget ``job_id``; return True if it was scheduled."""
        # Invariant (S8-4): a discarded id is never popped (its heap entry is stale).
        return self._live.pop(job_id, None) is not None

    def _drop_stale(self) -> None:
        heap = self._heap
        live = self._live
        while heap and live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)

    def next_due(self) -> float | None:
        """The ``run_after`` of the first entry, or None when nothing is scheduled."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> str | None:
        """Remove and return the first entry whose ``run_after <= now``, else None (S8-3)."""
        self._drop_stale()
        heap = self._heap
        if not heap or heap[0][0] > now:
            return None
        _, _, job_id = heapq.heappop(heap)
        del self._live[job_id]
        return job_id


#: The least an event counts for in a subscriber's budget (S8-7).
EVENT_OVERHEAD_BYTES: Final = 64


def event_budget_size(event: object) -> int:
    """The bytes ``event`` counts for in a subscriber's byte budget (S8-7)."""
    if isinstance(event, BinaryDelta):
        return EVENT_OVERHEAD_BYTES + event.size
    if isinstance(event, TextDelta):
        return EVENT_OVERHEAD_BYTES + 4 * len(event.text)
    return EVENT_OVERHEAD_BYTES
