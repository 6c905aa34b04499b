"""
Cancellation torture: cancel a scenario at every checkpoint it reaches and check what is left.

Rules (spec/S7-verification.md):

- S7-1: a *cancel point* is a place where the scenario's tasks stand still. The scenario's
  tasks are the task that runs ``scenario()`` and every task spawned, directly or not, by one
  of them or from a context copied from one of them, wherever it was spawned (an outer
  nursery, a system task). Point ``k = 0`` cancels before the scenario starts; point ``k >= 1``
  cancels immediately after the ``k``-th scheduler step of those tasks ends, that is, when a
  task has just parked at a checkpoint (or finished). A baseline run counts ``N`` steps, so
  there are ``N`` points: ``0 .. N-1`` (after step ``N`` there is nothing left to cancel).
- S7-2: after a cancelled run, the scenario either raised ``Cancelled`` (caught by the
  toolkit's own cancel scope) or returned normally; any other exception is a finding.
- S7-3: no scenario task outlives the scenario: every task counted by S7-1 has exited when
  ``scenario()`` returns or raises. A survivor is a leak, in the baseline run as in any other.
- S7-4: a scenario task that received the toolkit's ``Cancelled`` (woken by the cancel call,
  or at its own next checkpoint) must let it propagate: if the scenario then returns
  normally, someone swallowed it.
- S7-5: a cancelled scenario finishes within ``cancel_timeout`` seconds of trio's clock (a
  shielded wait that ignores the cancel, a cleanup that hangs, are findings).
- S7-6: the user's ``check()`` holds after the baseline run and after every cancelled run.
- S7-7: the toolkit leaves no instrument installed and trio's scheduler RNG as it found it,
  whatever happens (also when a finding or the caller's own cancellation interrupts it).

Theory of operation: each run spawns the scenario in a nursery of the caller's trio run with a
`trio.abc.Instrument` installed. The instrument tracks the scenario's tasks (``task_spawned``:
the new task's ``Task.context`` carries a run-private `contextvars.ContextVar`, or the spawning
task is tracked), counts their steps (``after_task_step``), and at point ``k`` calls
``cancel()`` on the scope wrapped around ``scenario()`` with a reason string unique to the
run. For S7-4, ``task_scheduled`` records the scenario tasks rescheduled during that call
(they were parked: they resume with ``Cancelled``) and, later, those rescheduled with a
``Cancelled`` carrying that reason (read from trio's private ``Task._next_send``, guarded:
without it only the first kind is seen). A watchdog task gets a deadline ``cancel_timeout``
after the cancel, for S7-5.

Reproducibility: the run is deterministic when the scenario is (no real I/O, no real clock:
use the ``autojump_clock`` fixture), except for trio's scheduler, which shuffles every batch
of runnable tasks with a module-level ``random.Random``. Trio exposes no public way to seed
it, so the toolkit seeds that private object (``trio._core._run._r``) with ``seed`` for each
run and restores its state afterwards. The access is guarded: when a future trio has no such
object, the toolkit runs unseeded and `TortureReport.seed` is ``None``. Under Hypothesis
(which trio registers a plugin with) trio shuffles each batch fully, so different seeds give
different interleavings: `cancel_at_random_checkpoints` draws the seed from Hypothesis, which
both perturbs the schedule and shrinks it. A point whose step ``k`` is taken by another task
than in the baseline is listed in `TortureReport.drifted` (the scenario is not deterministic).

Bounded and full campaigns: suites pass ``max_points=torture_max_points(20)``. That returns
the default (a bounded number of evenly spread points, first and last included) unless the
environment variable ``TORTURE_MAX_POINTS`` is set: ``0`` (or ``all``) means every point, a
positive integer means that many. ``make torture`` runs the suite with
``TORTURE_MAX_POINTS=0``.

Limits: a scenario that never finishes after the cancel (a shielded wait on something that never comes) cannot
be stopped from outside: the watchdog writes the finding to stderr (so a hung test shows
why), and the toolkit raises it if the scenario ever finishes.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import os
import random
import sys
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from .._errors import TaskGraphError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from hypothesis.strategies import DataObject

__all__ = [
    "DEFAULT_CANCEL_TIMEOUT",
    "TORTURE_MAX_POINTS_ENV",
    "CancellationLeak",
    "TortureReport",
    "cancel_at_each_checkpoint",
    "cancel_at_random_checkpoints",
    "TortureStatistics",
    "spread_points",
    "torture_max_points",
    "torture_statistics",
]

#: The environment variable suites read (through `torture_max_points`) to size campaigns.
TORTURE_MAX_POINTS_ENV: Final = "TORTURE_MAX_POINTS"

#: Seconds of trio's clock a cancelled scenario may take to finish (S7-5).
DEFAULT_CANCEL_TIMEOUT: Final = 5.0

#: Finding kinds, in the order a report lists them.
RAISED: Final = "raised"
LEAKED_TASK: Final = "leaked-task"
UNRESPONSIVE: Final = "unresponsive"
SWALLOWED: Final = "swallowed"
CHECK: Final = "check"


@final
class CancellationLeak(TaskGraphError, AssertionError):
    """
    The torture toolkit found a cancellation bug; the message says how to reproduce it.

    An `AssertionError`, so pytest reports it as a failed test, and a `TaskGraphError`, like
    everything the library raises on purpose.

    Attributes:
        point: the cancel point (``None`` for the baseline run, which is not cancelled).
        steps: the scenario's step count in the baseline run.
        seed: the scheduler seed of the run (``None`` when unseeded).
        task: the name of the task whose step ``point`` ended, if any.
        kinds: the kinds of finding (``"raised"``, ``"leaked-task"``, ``"unresponsive"``,
            ``"swallowed"``, ``"check"``), first the most fundamental.
        details: one line per finding.
    """

    point: int | None
    steps: int
    seed: int | None
    task: str | None
    kinds: tuple[str, ...]
    details: tuple[str, ...]

    def __init__(
        self,
        *,
        point: int | None,
        steps: int,
        seed: int | None,
        task: str | None,
        findings: list[tuple[str, str]],
    ) -> None:
        self.point = point
        self.steps = steps
        self.seed = seed
        self.task = task
        self.kinds = tuple(kind for kind, _ in findings)
        self.details = tuple(detail for _, detail in findings)
        if point is None:
            where = f"baseline run (not cancelled; {steps} steps, schedule seed {seed})"
        elif point == 0:
            where = f"cancel point k=0 of {steps} (cancelled before the first step; seed {seed})"
        else:
            where = (
                f"cancel point k={point} of {steps} (cancelled right after step {point}, "
                f"taken by task {task!r}; seed {seed})"
            )
        lines = [f"{where}:"]
        lines.extend(f"  [{kind}] {detail}" for kind, detail in findings)
        if point is not None:
            lines.append(
                f"  reproduce: await cancel_at_each_checkpoint(scenario, check=check, "
                f"points=[{point}], seed={seed})"
            )
        super().__init__("\n".join(lines))
        self._findings = list(findings)

    def __reduce__(
        self,
    ) -> tuple[
        Callable[[int | None, int, int | None, str | None, list[tuple[str, str]]], object],
        tuple[int | None, int, int | None, str | None, list[tuple[str, str]]],
    ]:
        # Keyword-only __init__: pickle through a helper (pytest-xdist, multiprocessing).
        return (_rebuild_leak, (self.point, self.steps, self.seed, self.task, self._findings))


def _rebuild_leak(
    point: int | None,
    steps: int,
    seed: int | None,
    task: str | None,
    findings: list[tuple[str, str]],
) -> CancellationLeak:
    return CancellationLeak(point=point, steps=steps, seed=seed, task=task, findings=findings)


@final
@attrs.frozen(kw_only=True)
class TortureReport:
    """
    What a torture campaign exercised (it raised `CancellationLeak` otherwise).

    Attributes:
        steps: the scheduler steps the scenario's tasks took in the baseline run.
        points: the cancel points exercised, in order.
        unreached: points at which the scenario had already finished (fewer steps than the
            baseline: it is not deterministic).
        drifted: points whose step was taken by another task than in the baseline.
        seed: the scheduler seed (``None`` when trio's scheduler could not be seeded).
    """

    steps: int
    points: tuple[int, ...]
    unreached: tuple[int, ...] = ()
    drifted: tuple[int, ...] = ()
    seed: int | None = None

    @property
    def points_exercised(self) -> int:
        """How many cancelled runs were made (``len(points)``)."""
        return len(self.points)


@final
@attrs.frozen(kw_only=True)
class TortureStatistics:
    """
    What the toolkit has done in this process so far (for campaign figures).

    Attributes:
        campaigns: calls of `cancel_at_each_checkpoint` / `cancel_at_random_checkpoints`.
        baseline_steps: scheduler steps counted over all baseline runs.
        points: cancelled runs made (cancel points exercised).
        findings: `CancellationLeak` raised (including deliberate ones in self-tests).
    """

    campaigns: int = 0
    baseline_steps: int = 0
    points: int = 0
    findings: int = 0


_tally = TortureStatistics()


def torture_statistics() -> TortureStatistics:
    """The process-wide `TortureStatistics` (``make torture`` prints them at the end)."""
    return _tally


def _count(**increments: int) -> None:
    global _tally
    _tally = attrs.evolve(
        _tally, **{name: getattr(_tally, name) + n for name, n in increments.items()}
    )


def torture_max_points(default: int | None) -> int | None:
    """
    The ``max_points`` a suite should use: ``default`` unless ``TORTURE_MAX_POINTS`` is set.

    Args:
        default: the suite's bounded number of points (``None`` means every point).

    Returns:
        ``None`` (every point) when the variable is ``0`` or ``all``, its integer value when
        positive, ``default`` when it is unset or empty.

    Raises:
        ValueError: the variable holds anything else.
    """
    raw = os.environ.get(TORTURE_MAX_POINTS_ENV, "").strip()
    if not raw:
        return default
    if raw.lower() == "all":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"{TORTURE_MAX_POINTS_ENV}={raw!r}: expected 0 or 'all' (every point) or a "
            "positive integer"
        ) from None
    if value < 0:
        raise ValueError(f"{TORTURE_MAX_POINTS_ENV}={raw!r} must not be negative")
    return None if value == 0 else value


def spread_points(steps: int, max_points: int | None) -> tuple[int, ...]:
    """
    The cancel points to exercise among ``0 .. steps-1``.

    Every point when ``max_points`` is ``None``, ``0`` or at least ``steps``; otherwise
    ``max_points`` points spread evenly, the first (``0``) and the last (``steps - 1``)
    always included (a single point is the first).

    Raises:
        ValueError: ``max_points`` is negative.
    """
    if max_points is not None and max_points < 0:
        raise ValueError(f"max_points must be None or >= 0, got {max_points}")
    if max_points is None or max_points == 0 or max_points >= steps:
        return tuple(range(steps))
    if max_points == 1:
        return (0,)
    last = steps - 1
    return tuple(sorted({round(i * last / (max_points - 1)) for i in range(max_points)}))


# --- one run ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class _RunState:
    cancel_at: int | None
    cancel_timeout: float
    record_trace: bool
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    watchdog: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    tracked: set[trio.lowlevel.Task] = attrs.Factory(set)
    live: set[trio.lowlevel.Task] = attrs.Factory(set)
    root: trio.lowlevel.Task | None = None
    steps: int = 0
    trace: list[str] = attrs.Factory(list)
    cancelled: bool = False
    cancel_task: str | None = None
    cancel_time: float = math.inf
    finish_time: float = math.inf
    cancelling: bool = False
    woken_by_cancel: list[str] = attrs.Factory(list)
    unresponsive: bool = False
    error: BaseException | None = None
    leaked: list[str] = attrs.Factory(list)

    def cancel(self, task: trio.lowlevel.Task | None) -> None:
        # Invariant (S7-1): called at most once, at the chosen point, from the instrument.
        self.cancelled = True
        self.cancel_task = None if task is None else task.name
        self.cancel_time = trio.current_time()
        self.watchdog.deadline = self.cancel_time + self.cancel_timeout
        self.cancelling = True
        try:
            self.scope.cancel(reason=self.reason)
        finally:
            self.cancelling = False

    @property
    def reason(self) -> str:
        # Unique per run, so that _delivers_our_cancel recognises this run's Cancelled only.
        return f"cancel_at_each_checkpoint: point {self.cancel_at} (run {id(self):#x})"


#: Which run a task belongs to: set in the context the scenario's first task is spawned from.
_SCENARIO: contextvars.ContextVar[_RunState | None] = contextvars.ContextVar(
    "trio_taskgraph_torture_scenario", default=None
)


def _must_propagate(exc: BaseException) -> bool:
    """The caller's cancellation and interpreter exits pass through; everything else is data."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(_passes_through) is not None
    return _passes_through(exc)


def _passes_through(exc: BaseException) -> bool:
    # A leaf test (False for groups, so that `subgroup` looks inside them).
    return isinstance(exc, trio.Cancelled | KeyboardInterrupt | SystemExit | GeneratorExit)


def _delivers_our_cancel(task: trio.lowlevel.Task, reason: str) -> bool:
    """
    Whether ``task`` was just rescheduled to receive a `trio.Cancelled` with our ``reason``.

    Reads ``task._next_send`` (private to trio: the outcome the task resumes with), guarded:
    on a trio without it this is always False, and S7-4 then covers only the tasks woken by
    the cancel call itself. The reason string is unique to one run, so a Cancelled from any
    other scope (a shielded cleanup's own timeout) never matches.
    """
    error = getattr(getattr(task, "_next_send", None), "error", None)
    return isinstance(error, trio.Cancelled) and getattr(error, "reason", None) == reason


def _current_task_or_none() -> trio.lowlevel.Task | None:
    try:
        return trio.lowlevel.current_task()
    except RuntimeError:  # called from the run loop itself, outside any task
        return None


@final
class _StepCounter(trio.abc.Instrument):
    """Counts the scenario's steps and cancels at the chosen point (never raises)."""

    def __init__(self, state: _RunState) -> None:
        self._state = state

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        state = self._state
        # Invariant (S7-1): a task belongs to the scenario if its context was copied from a
        # scenario task, or a scenario task spawned it (system tasks get a fresh context).
        if task.context.get(_SCENARIO) is state or _current_task_or_none() in state.tracked:
            state.tracked.add(task)
            state.live.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._state.live.discard(task)

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        state = self._state
        if not state.cancelled or task not in state.tracked:
            return
        if state.cancelling or _delivers_our_cancel(task, state.reason):
            # Invariant (S7-4): this task is about to receive the toolkit's Cancelled.
            state.woken_by_cancel.append(task.name)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        state = self._state
        if task not in state.tracked:
            return
        state.steps += 1
        if state.record_trace:
            state.trace.append(task.name)
        if state.steps == state.cancel_at:
            state.cancel(task)


async def _root(scenario: Callable[[], Awaitable[object]], state: _RunState) -> None:
    state.root = trio.lowlevel.current_task()
    try:
        with state.scope:
            await scenario()
    except BaseException as exc:
        # Our own scope has absorbed its Cancelled; a Cancelled still here is the caller's.
        if _must_propagate(exc):
            raise
        state.error = exc  # judged by the harness (S7-2); pytest.fail() outcomes included
    finally:
        state.finish_time = trio.current_time()
        # Invariant (S7-3): every scenario task other than this one must be gone by now.
        state.leaked = sorted(t.name for t in state.live if t is not state.root)
        state.done.set()


async def _watchdog(state: _RunState) -> None:
    with state.watchdog:
        await state.done.wait()
    if state.watchdog.cancelled_caught:
        # Invariant (S7-5): the deadline was set when the cancel arrived.
        state.unresponsive = True
        sys.stderr.write(
            f"cancel_at_each_checkpoint: the scenario is still running {state.cancel_timeout}s"
            f" after the cancel at point {state.cancel_at}; live tasks: "
            f"{sorted(t.name for t in state.live)}\n"
        )
        await state.done.wait()


def _schedule_random() -> random.Random | None:
    """Trio's scheduler RNG (private: ``trio._core._run._r``), or ``None`` if absent."""
    try:
        from trio._core import _run
    except ImportError:  # pragma: no cover - a trio without this private module
        return None
    rng = getattr(_run, "_r", None)
    return rng if isinstance(rng, random.Random) else None


async def _run_once(
    scenario: Callable[[], Awaitable[object]],
    *,
    cancel_at: int | None,
    seed: int | None,
    cancel_timeout: float,
    record_trace: bool = False,
) -> _RunState:
    state = _RunState(cancel_at=cancel_at, cancel_timeout=cancel_timeout, record_trace=record_trace)
    instrument = _StepCounter(state)
    rng = _schedule_random() if seed is not None else None
    saved = rng.getstate() if rng is not None else None
    if rng is not None:
        rng.seed(seed)
    trio.lowlevel.add_instrument(instrument)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watchdog, state, name="cancel_at_each_checkpoint.watchdog")
            if cancel_at == 0:
                state.cancel(None)
            token = _SCENARIO.set(state)
            try:
                nursery.start_soon(_root, scenario, state, name=_name_of(scenario))
            finally:
                _SCENARIO.reset(token)
    finally:
        # Invariant (S7-7): always removed, always restored.
        try:
            trio.lowlevel.remove_instrument(instrument)
        except KeyError:  # pragma: no cover - trio disabled it after a hook raised (a bug)
            raise AssertionError("cancel_at_each_checkpoint: its instrument failed") from None
        finally:
            if rng is not None and saved is not None:
                rng.setstate(saved)
    return state


def _name_of(scenario: object) -> str:
    name = getattr(scenario, "__qualname__", None)
    return name if isinstance(name, str) else repr(scenario)


async def _call_check(check: Callable[[], object]) -> str | None:
    try:
        result = check()
        if inspect.isawaitable(result):
            await result
    except BaseException as exc:
        if _must_propagate(exc):
            raise
        return f"check() raised {type(exc).__name__}: {exc}"  # a finding (S7-6)
    return None


async def _judge(
    state: _RunState,
    check: Callable[[], object],
    *,
    steps: int,
    seed: int | None,
) -> None:
    findings: list[tuple[str, str]] = []
    if state.error is not None and state.cancel_at is not None:
        findings.append(
            (
                RAISED,
                "the cancelled scenario raised "
                f"{type(state.error).__name__}: {state.error} (expected Cancelled or a return)",
            )
        )
    if state.leaked:
        findings.append(
            (LEAKED_TASK, f"tasks still running after the scenario exited: {state.leaked}")
        )
    if state.cancelled and (
        state.unresponsive or state.finish_time - state.cancel_time > state.cancel_timeout
    ):
        took = state.finish_time - state.cancel_time
        findings.append(
            (
                UNRESPONSIVE,
                f"the scenario took {took:.3g}s of trio's clock to finish after the cancel "
                f"(limit {state.cancel_timeout}s): a shielded wait ignores it",
            )
        )
    if state.woken_by_cancel and state.error is None and not state.scope.cancelled_caught:
        findings.append(
            (
                SWALLOWED,
                f"tasks {sorted(set(state.woken_by_cancel))} received the cancel's Cancelled, "
                "yet the scenario returned normally: a Cancelled was caught and not re-raised",
            )
        )
    problem = await _call_check(check)
    if problem is not None:
        findings.append((CHECK, problem))
    if findings:
        _count(findings=1)
        raise CancellationLeak(
            point=state.cancel_at,
            steps=steps,
            seed=seed,
            task=state.cancel_task,
            findings=findings,
        ) from state.error


async def _baseline(
    scenario: Callable[[], Awaitable[object]],
    check: Callable[[], object],
    *,
    seed: int | None,
    cancel_timeout: float,
) -> _RunState:
    _count(campaigns=1)
    state = await _run_once(
        scenario, cancel_at=None, seed=seed, cancel_timeout=cancel_timeout, record_trace=True
    )
    _count(baseline_steps=state.steps)
    if state.error is not None:
        # The scenario fails without any cancellation: that is its own bug, shown as is.
        raise state.error
    await _judge(state, check, steps=state.steps, seed=seed)
    return state


async def _torture(
    scenario: Callable[[], Awaitable[object]],
    check: Callable[[], object],
    points: Iterable[int],
    baseline: _RunState,
    *,
    seed: int | None,
    cancel_timeout: float,
) -> TortureReport:
    exercised: list[int] = []
    unreached: list[int] = []
    drifted: list[int] = []
    for k in points:
        state = await _run_once(scenario, cancel_at=k, seed=seed, cancel_timeout=cancel_timeout)
        exercised.append(k)
        _count(points=1)
        if not state.cancelled:
            unreached.append(k)
        elif k >= 1 and (k > len(baseline.trace) or state.cancel_task != baseline.trace[k - 1]):
            drifted.append(k)
        await _judge(state, check, steps=baseline.steps, seed=seed)
    return TortureReport(
        steps=baseline.steps,
        points=tuple(exercised),
        unreached=tuple(unreached),
        drifted=tuple(drifted),
        seed=seed,
    )


async def cancel_at_each_checkpoint(
    scenario: Callable[[], Awaitable[object]],
    *,
    check: Callable[[], object],
    max_points: int | None = None,
    points: Iterable[int] | None = None,
    seed: int | None = 0,
    cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT,
) -> TortureReport:
    """
    Run ``scenario()`` once to count its steps, then once per cancel point, cancelled there.

    Call it from inside a trio run (a pytest-trio test). ``scenario`` must build everything it
    uses afresh on each call (it runs ``1 + points`` times); ``check`` inspects what the last
    run left behind (temp files, parked tasks, channel statistics, rows, blobs).

    Args:
        scenario: ``async () -> object``; run in its own task under a cancel scope the toolkit
            cancels.
        check: ``() -> object``, sync or returning an awaitable; raises (typically
            ``AssertionError``) when an invariant is broken. Called after every run.
        max_points: how many points to exercise: ``None`` or ``0`` means every point;
            otherwise that many spread evenly, first and last included. Suites pass
            ``torture_max_points(default)`` so ``make torture`` can ask for all of them.
        points: exactly these points instead (e.g. ``[k]`` to reproduce a finding).
        seed: the scheduler seed for every run (``None``: leave trio's scheduler alone).
        cancel_timeout: seconds of trio's clock a cancelled scenario may take to finish
            (``math.inf`` disables the check). Under ``autojump_clock`` the clock jumps
            while a worker thread runs (``trio.to_thread``, file I/O): there, pass
            ``math.inf`` or use the real clock.

    Returns:
        A `TortureReport`: steps counted and points exercised.

    Raises:
        CancellationLeak: at the first failing point (or in the baseline run): ``check()``
            failed, a task outlived the scenario, the cancelled scenario raised something
            other than ``Cancelled``, swallowed a ``Cancelled``, or finished too late.
        Exception: whatever the scenario raises in the baseline (uncancelled) run.
        ValueError: ``max_points`` is negative or a point is out of range.

    Cancellation:
        Cancelling the caller cancels the current run like any nursery; the instrument is
        removed and the scheduler's RNG restored either way.
    """
    if seed is not None and _schedule_random() is None:  # pragma: no cover - future trio
        seed = None
    baseline = await _baseline(scenario, check, seed=seed, cancel_timeout=cancel_timeout)
    if points is None:
        chosen = spread_points(baseline.steps, max_points)
    else:
        chosen = tuple(points)
        bad = [k for k in chosen if not 0 <= k < baseline.steps]
        if bad:
            raise ValueError(f"points {bad} are outside 0..{baseline.steps - 1}")
    return await _torture(
        scenario, check, chosen, baseline, seed=seed, cancel_timeout=cancel_timeout
    )


async def cancel_at_random_checkpoints(
    scenario: Callable[[], Awaitable[object]],
    *,
    check: Callable[[], object],
    data: DataObject,
    points: int = 1,
    perturb_schedule: bool = True,
    cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT,
) -> TortureReport:
    """
    The Hypothesis-driven variant: draw the schedule seed and the cancel points from ``data``.

    Use inside ``@given(data=st.data())``: Hypothesis explores seeds and points, and shrinks a
    failure towards seed 0 and point 0. The seed is drawn first, then the baseline run counts
    the steps under that seed, then ``points`` cancel points are drawn among ``0 .. steps-1``.

    Args:
        scenario: as for `cancel_at_each_checkpoint`.
        check: as for `cancel_at_each_checkpoint`.
        data: the ``st.data()`` object of the Hypothesis test.
        points: how many cancel points to draw (each one re-runs the scenario).
        perturb_schedule: draw the scheduler seed (``False``: always seed 0).
        cancel_timeout: as for `cancel_at_each_checkpoint`.

    Returns:
        A `TortureReport` (its ``seed`` is the drawn one).

    Raises:
        CancellationLeak: as for `cancel_at_each_checkpoint`; the message names seed and point.

    Cancellation:
        As for `cancel_at_each_checkpoint`.
    """
    from hypothesis import strategies as st

    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    seed: int | None = (
        data.draw(st.integers(0, 2**32 - 1), label="schedule seed") if perturb_schedule else 0
    )
    if _schedule_random() is None:  # pragma: no cover - a future trio: nothing to seed
        seed = None
    baseline = await _baseline(scenario, check, seed=seed, cancel_timeout=cancel_timeout)
    chosen = [
        data.draw(st.integers(0, baseline.steps - 1), label="cancel point") for _ in range(points)
    ]
    return await _torture(
        scenario, check, chosen, baseline, seed=seed, cancel_timeout=cancel_timeout
    )
