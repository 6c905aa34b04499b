"""
The cancellation torture toolkit (``trio_taskgraph.testing``): it finds leaks, passes correct
scenarios at every point, counts deterministically, and cleans up after itself.

Invariants: spec/S7-verification.md (S7-1 .. S7-7).
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import settings, strategies as st

from tests.typed_hypothesis import given
from trio_taskgraph import TaskGraphError
from trio_taskgraph.testing import (
    TORTURE_MAX_POINTS_ENV,
    CancellationLeak,
    TortureReport,
    cancel_at_each_checkpoint,
    cancel_at_random_checkpoints,
    spread_points,
    torture_max_points,
    torture_statistics,
)
from trio_taskgraph.testing._torture import _schedule_random

# --- correct scenarios -----------------------------------------------------------------------


class ChannelScenario:
    """A producer/consumer pair over a trio memory channel, built afresh on every call."""

    def __init__(self, buffer: int, items: int = 4) -> None:
        self.buffer = buffer
        self.items = items
        self.send: trio.MemorySendChannel[int] | None = None
        self.received: list[int] = []

    async def __call__(self) -> None:
        send, recv = trio.open_memory_channel[int](self.buffer)
        self.send = send
        self.received = []

        async def producer() -> None:
            async with send:
                for i in range(self.items):
                    await send.send(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer, name="producer")
            async with recv:
                async for item in recv:
                    self.received.append(item)

    def check(self) -> None:
        assert self.send is not None
        stats = self.send.statistics()
        assert stats.tasks_waiting_send == 0, stats
        assert stats.tasks_waiting_receive == 0, stats
        assert stats.open_send_channels == 0, stats
        assert stats.open_receive_channels == 0, stats
        # Nothing is received twice or out of order, whatever the cancel point.
        assert self.received == list(range(len(self.received)))


class WorkerScenario:
    """A nursery of workers that register themselves while they run."""

    def __init__(self, workers: int = 3) -> None:
        self.workers = workers
        self.running: set[int] = set()
        self.finished: list[int] = []

    async def __call__(self) -> None:
        self.finished = []

        async def worker(i: int) -> None:
            self.running.add(i)
            try:
                for _ in range(i + 1):
                    await trio.sleep(0.1 * (i + 1))
                self.finished.append(i)
            finally:
                self.running.discard(i)

        async with trio.open_nursery() as nursery:
            for i in range(self.workers):
                nursery.start_soon(worker, i, name=f"worker-{i}")

    def check(self) -> None:
        assert not self.running, f"workers still registered: {self.running}"


@pytest.mark.parametrize("buffer", [0, 1, 3])
async def test_memory_channel_passes_every_point(buffer: int) -> None:
    """S7-1, S7-6: a correct producer/consumer survives a cancel at every one of its points."""
    scenario = ChannelScenario(buffer)
    report = await cancel_at_each_checkpoint(scenario, check=scenario.check)
    assert isinstance(report, TortureReport)
    assert report.steps >= 2 * scenario.items
    assert report.points == tuple(range(report.steps))
    assert report.points_exercised == report.steps
    assert report.unreached == ()
    assert report.drifted == ()


async def test_nursery_of_workers_passes_every_point(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """S7-1, S7-3, S7-6: a nursery of workers leaves nothing registered at any point."""
    scenario = WorkerScenario()
    report = await cancel_at_each_checkpoint(scenario, check=scenario.check)
    assert report.points == tuple(range(report.steps))
    assert report.steps >= 1 + sum(i + 2 for i in range(scenario.workers))
    assert report.unreached == ()
    assert report.drifted == ()


async def test_async_check_is_awaited() -> None:
    """S7-6: ``check`` may be async; it is awaited after each run."""
    calls: list[int] = []

    async def check() -> None:
        await trio.lowlevel.checkpoint()
        calls.append(1)

    scenario = ChannelScenario(0, items=2)
    report = await cancel_at_each_checkpoint(scenario, check=check)
    assert len(calls) == 1 + report.points_exercised


# --- leaky scenarios -------------------------------------------------------------------------


async def test_task_escaping_into_outer_nursery_is_a_leak(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """S7-3: a task spawned into an outer nursery on cancellation outlives the scenario."""
    async with trio.open_nursery() as outer:

        async def scenario() -> None:
            try:
                await trio.sleep(1)
            except trio.Cancelled:
                # "Finish the upload later": escapes the cancellation into a long-lived nursery.
                outer.start_soon(trio.sleep_forever, name="escaped-uploader")
                raise

        with pytest.raises(CancellationLeak) as info:
            await cancel_at_each_checkpoint(scenario, check=lambda: None)
        outer.cancel_scope.cancel()
    err = info.value
    assert err.point == 0
    assert err.kinds == ("leaked-task",)
    assert "escaped-uploader" in str(err)
    assert isinstance(err, AssertionError)
    assert isinstance(err, TaskGraphError)


async def test_leak_in_the_baseline_run_is_reported() -> None:
    """S7-3: a task that outlives even an uncancelled run is a leak of the baseline run."""
    async with trio.open_nursery() as outer:

        async def scenario() -> None:
            outer.start_soon(trio.sleep_forever, name="fire-and-forget")
            await trio.lowlevel.checkpoint()

        with pytest.raises(CancellationLeak) as info:
            await cancel_at_each_checkpoint(scenario, check=lambda: None)
        outer.cancel_scope.cancel()
    assert info.value.point is None
    assert "baseline run" in str(info.value)
    assert "fire-and-forget" in str(info.value)


async def test_system_task_spawned_by_the_scenario_is_tracked() -> None:
    """S7-1, S7-3: a system task spawned by a scenario task is the scenario's too."""
    release = trio.Event()

    async def lingering() -> None:
        with trio.CancelScope(shield=True):
            await release.wait()

    async def scenario() -> None:
        trio.lowlevel.spawn_system_task(lingering, name="lingering-system-task")
        await trio.lowlevel.checkpoint()

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=lambda: None)
    release.set()
    assert "lingering-system-task" in str(info.value)


async def test_temp_file_left_when_cancelled_between_create_and_remove(tmp_path: Path) -> None:
    """S7-6: a temp file removed outside ``finally`` leaks when cancelled at step 1 only."""
    part = tmp_path / "blob.part"

    async def scenario() -> None:
        await trio.lowlevel.checkpoint()
        part.write_bytes(b"partial")
        await trio.lowlevel.checkpoint()  # cancelled here, the file stays behind
        part.unlink()

    def check() -> None:
        leftovers = sorted(p.name for p in tmp_path.iterdir())
        assert not leftovers, f"temp files left: {leftovers}"

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=check)
    part.unlink()
    err = info.value
    # Step 1 ends at the first checkpoint; step 2 writes the file and parks at the second.
    assert (err.point, err.steps, err.kinds) == (2, 3, ("check",))
    assert (
        err.task == "test_temp_file_left_when_cancelled_between_create_and_remove.<locals>.scenario"
    )
    text = str(err)
    assert "k=2 of 3" in text
    assert "blob.part" in text
    assert "points=[2], seed=0" in text


async def test_reproduce_one_point(tmp_path: Path) -> None:
    """S7-1: ``points=[k]`` re-runs exactly the reported point and fails the same way."""
    part = tmp_path / "blob.part"

    async def scenario() -> None:
        await trio.lowlevel.checkpoint()
        part.write_bytes(b"partial")
        await trio.lowlevel.checkpoint()
        part.unlink()

    def check() -> None:
        assert not part.exists()

    report = await cancel_at_each_checkpoint(scenario, check=check, points=[0, 1])
    assert report.points == (0, 1)
    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=check, points=[2])
    part.unlink()
    assert info.value.point == 2
    with pytest.raises(ValueError, match="outside"):
        await cancel_at_each_checkpoint(scenario, check=check, points=[3])


async def test_swallowed_cancellation_is_found(autojump_clock: trio.testing.MockClock) -> None:
    """S7-4: a Cancelled caught by a shielded "graceful" wait and not re-raised is a finding."""
    log: list[str] = []

    async def scenario() -> None:
        try:
            await trio.sleep(1)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.1)  # flush politely...
            # ...and forget to re-raise: the caller believes the operation completed.
        log.append("completed")

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=lambda: None)
    # Point 0: the Cancelled arrives at the first sleep, in the task's own step.
    assert info.value.point == 0
    assert info.value.kinds == ("swallowed",)
    # Point 1: the task is parked in the sleep; the cancel call itself wakes it.
    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=lambda: None, points=[1])
    assert info.value.kinds == ("swallowed",)


async def test_shielded_wait_ignoring_the_cancel_is_unresponsive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """S7-5: a shielded wait that outlasts ``cancel_timeout`` after the cancel is a finding."""

    async def scenario() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(30)

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=lambda: None, cancel_timeout=1.0)
    assert info.value.point == 0
    assert info.value.kinds == ("unresponsive",)
    # A short shielded cleanup within the limit is fine.

    async def polite() -> None:
        try:
            await trio.sleep(30)
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.5)

    report = await cancel_at_each_checkpoint(polite, check=lambda: None, cancel_timeout=1.0)
    assert report.points == (0, 1, 2)


async def test_other_exception_when_cancelled_is_a_finding() -> None:
    """S7-2: a scenario whose cleanup raises when cancelled is reported with its point."""

    async def scenario() -> None:
        try:
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            raise RuntimeError("cleanup failed") from None

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=lambda: None)
    err = info.value
    assert err.point == 0
    assert err.kinds == ("raised",)
    assert "RuntimeError: cleanup failed" in str(err)
    assert isinstance(err.__cause__, RuntimeError)


async def test_baseline_error_propagates_as_is() -> None:
    """A scenario that fails without any cancellation fails the test with its own error."""

    async def scenario() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError("broken scenario")

    with pytest.raises(KeyError, match="broken scenario"):
        await cancel_at_each_checkpoint(scenario, check=lambda: None)


async def test_check_failing_after_the_baseline_run() -> None:
    """S7-6: ``check`` runs after the baseline run too."""

    def check() -> None:
        raise AssertionError("invariant broken")

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(trio.lowlevel.checkpoint, check=check)
    assert info.value.point is None
    assert info.value.kinds == ("check",)


# --- counting, points, determinism -----------------------------------------------------------


async def test_counts_are_deterministic(autojump_clock: trio.testing.MockClock) -> None:
    """S7-1: the same scenario counts the same steps and exercises the same points each time."""
    reports = []
    for _ in range(3):
        scenario = WorkerScenario(workers=4)
        reports.append(await cancel_at_each_checkpoint(scenario, check=scenario.check))
    assert len({(r.steps, r.points, r.drifted, r.unreached) for r in reports}) == 1
    channel_steps = set()
    for _ in range(3):
        channel = ChannelScenario(1)
        report = await cancel_at_each_checkpoint(channel, check=channel.check, max_points=2)
        channel_steps.add(report.steps)
    assert len(channel_steps) == 1


async def test_only_the_scenarios_tasks_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """S7-1: steps of unrelated tasks running beside the scenario are not counted."""
    scenario = WorkerScenario()
    alone = await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=2)

    async def busy_neighbour(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:  # noqa: ASYNC110 - periodic work beside the scenario, not a wait
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(busy_neighbour)
        beside = await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=2)
        nursery.cancel_scope.cancel()
    assert beside.steps == alone.steps


async def test_max_points_spreads_first_and_last() -> None:
    """S7-1: ``max_points`` bounds the runs; the first and last points are always included."""
    scenario = ChannelScenario(0, items=5)
    full = await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=0)
    assert full.points == tuple(range(full.steps))
    three = await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=3)
    assert three.points == spread_points(full.steps, 3)
    assert len(three.points) == 3
    assert (three.points[0], three.points[-1]) == (0, full.steps - 1)
    one = await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=1)
    assert one.points == (0,)
    many = await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=10_000)
    assert many.points == full.points


@pytest.mark.parametrize(
    ("steps", "max_points", "expected"),
    [
        (5, None, (0, 1, 2, 3, 4)),
        (5, 0, (0, 1, 2, 3, 4)),
        (5, 5, (0, 1, 2, 3, 4)),
        (5, 9, (0, 1, 2, 3, 4)),
        (11, 3, (0, 5, 10)),
        (11, 2, (0, 10)),
        (11, 1, (0,)),
        (1, 3, (0,)),
    ],
)
def test_spread_points(steps: int, max_points: int | None, expected: tuple[int, ...]) -> None:
    """S7-1: evenly spread points, first and last included."""
    assert spread_points(steps, max_points) == expected


@given(steps=st.integers(1, 500), max_points=st.integers(2, 600))
def test_spread_points_properties(steps: int, max_points: int) -> None:
    """S7-1: never more than asked, distinct, sorted, in range, ends included."""
    points = spread_points(steps, max_points)
    assert len(points) == min(steps, max_points)
    assert list(points) == sorted(set(points))
    assert points[0] == 0
    assert points[-1] == steps - 1


def test_spread_points_rejects_negative() -> None:
    with pytest.raises(ValueError, match="max_points"):
        spread_points(3, -1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, 20), ("", 20), ("0", None), ("all", None), ("ALL", None), ("7", 7)],
)
def test_torture_max_points_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: int | None
) -> None:
    """``make torture`` sets TORTURE_MAX_POINTS=0: every point."""
    if raw is None:
        monkeypatch.delenv(TORTURE_MAX_POINTS_ENV, raising=False)
    else:
        monkeypatch.setenv(TORTURE_MAX_POINTS_ENV, raw)
    assert torture_max_points(20) == expected


@pytest.mark.parametrize("raw", ["-1", "many", "1.5"])
def test_torture_max_points_rejects_garbage(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(TORTURE_MAX_POINTS_ENV, raw)
    with pytest.raises(ValueError, match=TORTURE_MAX_POINTS_ENV):
        torture_max_points(20)


# --- the toolkit cleans up after itself ------------------------------------------------------


class InstrumentLedger:
    """Records every instrument the toolkit adds and removes (trio has no public listing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.added: list[trio.abc.Instrument] = []
        self.removed: list[trio.abc.Instrument] = []
        add, remove = trio.lowlevel.add_instrument, trio.lowlevel.remove_instrument

        def recording_add(instrument: trio.abc.Instrument) -> None:
            self.added.append(instrument)
            add(instrument)

        def recording_remove(instrument: trio.abc.Instrument) -> None:
            remove(instrument)
            self.removed.append(instrument)

        monkeypatch.setattr(trio.lowlevel, "add_instrument", recording_add)
        monkeypatch.setattr(trio.lowlevel, "remove_instrument", recording_remove)

    def assert_balanced(self) -> None:
        assert self.added, "no instrument was installed at all"
        assert self.added == self.removed
        for instrument in self.added:
            with pytest.raises(KeyError):  # trio no longer knows it: really removed
                trio.lowlevel.remove_instrument(instrument)


async def test_no_instrument_left_after_success(monkeypatch: pytest.MonkeyPatch) -> None:
    """S7-7: one instrument per run, each removed."""
    ledger = InstrumentLedger(monkeypatch)
    scenario = ChannelScenario(0, items=2)
    report = await cancel_at_each_checkpoint(scenario, check=scenario.check)
    assert len(ledger.added) == 1 + report.points_exercised
    ledger.assert_balanced()


async def test_no_instrument_left_after_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """S7-7: a finding, a failing baseline and a failing check all remove the instrument."""
    ledger = InstrumentLedger(monkeypatch)

    async def raising() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError("x")

    with pytest.raises(KeyError):
        await cancel_at_each_checkpoint(raising, check=lambda: None)

    def failing_check() -> None:
        raise AssertionError("no")

    with pytest.raises(CancellationLeak):
        await cancel_at_each_checkpoint(trio.lowlevel.checkpoint, check=failing_check)
    ledger.assert_balanced()


async def test_no_instrument_left_when_the_caller_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S7-7: cancelling the caller mid-campaign removes the instrument and restores the RNG."""
    ledger = InstrumentLedger(monkeypatch)
    rng = _schedule_random()
    before = rng.getstate() if rng is not None else None
    started = trio.Event()

    async def scenario() -> None:
        started.set()
        await trio.sleep_forever()

    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(cancel_at_each_checkpoint, scenario, check=lambda: None))
            await started.wait()
            await trio.testing.wait_all_tasks_blocked()
            outer.cancel()
    assert outer.cancelled_caught
    ledger.assert_balanced()
    if rng is not None:
        assert rng.getstate() == before


async def test_scheduler_rng_is_restored() -> None:
    """S7-7: the private scheduler RNG is seeded per run and restored afterwards."""
    rng = _schedule_random()
    assert rng is not None  # trio 0.35 has one; if a later trio drops it, revisit the toolkit
    scenario = ChannelScenario(1, items=2)
    before = rng.getstate()
    report = await cancel_at_each_checkpoint(scenario, check=scenario.check, seed=1234)
    assert rng.getstate() == before
    assert report.seed == 1234


# --- schedule perturbation and the Hypothesis variant ----------------------------------------


class InterleavingScenario:
    """Three tasks taking turns at checkpoints; records the interleaving it saw."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def __call__(self) -> None:
        self.order = []

        async def step(name: str) -> None:
            for _ in range(3):
                self.order.append(name)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(step, name, name=name)


async def test_seed_fixes_and_perturbs_the_schedule() -> None:
    """S7-1: one seed gives one interleaving every time; different seeds give others."""
    # If a future trio drops its private scheduler RNG, this fails: revisit _schedule_random.
    assert _schedule_random() is not None
    scenario = InterleavingScenario()
    seen: dict[int, list[str]] = {}
    for seed in range(8):
        await cancel_at_each_checkpoint(scenario, check=lambda: None, points=[], seed=seed)
        seen[seed] = list(scenario.order)
        await cancel_at_each_checkpoint(scenario, check=lambda: None, points=[], seed=seed)
        assert scenario.order == seen[seed]
    assert len({tuple(order) for order in seen.values()}) > 1


@settings(max_examples=15)
@given(data=st.data())
async def test_random_points_pass_a_correct_scenario(data: st.DataObject) -> None:
    """S7-1, S7-6: the Hypothesis variant draws seed and points; a correct scenario passes."""
    scenario = ChannelScenario(data.draw(st.integers(0, 2), label="buffer"), items=3)
    perturb = data.draw(st.booleans(), label="perturb")
    report = await cancel_at_random_checkpoints(
        scenario, check=scenario.check, data=data, points=2, perturb_schedule=perturb
    )
    if not perturb:
        assert report.seed == 0
    assert report.points_exercised == 2
    assert all(0 <= k < report.steps for k in report.points)
    assert report.unreached == ()


def test_hypothesis_variant_finds_and_shrinks_a_leak(tmp_path: Path) -> None:
    """S7-6: Hypothesis finds the one bad point of a temp-file leak and reports seed and k."""
    part = tmp_path / "blob.part"

    async def scenario() -> None:
        await trio.lowlevel.checkpoint()
        part.write_bytes(b"partial")
        await trio.lowlevel.checkpoint()
        part.unlink()

    def check() -> None:
        assert not part.exists(), "temp file left"

    @settings(max_examples=200, database=None, derandomize=True, deadline=None)
    @given(data=st.data())
    def campaign(data: st.DataObject) -> None:
        try:
            trio.run(
                lambda: cancel_at_random_checkpoints(scenario, check=check, data=data, points=1)
            )
        finally:
            part.unlink(missing_ok=True)

    with pytest.raises(CancellationLeak) as info:
        campaign()
    assert info.value.point == 2
    assert info.value.seed == 0  # shrunk to the simplest schedule
    assert "seed 0" in str(info.value)


async def test_random_variant_validates_points() -> None:
    class NoDraws:
        def draw(self, strategy: object, label: object = None) -> object:
            raise AssertionError("must not draw")

    with pytest.raises(ValueError, match="points"):
        await cancel_at_random_checkpoints(
            trio.lowlevel.checkpoint,
            check=lambda: None,
            data=NoDraws(),  # type: ignore[arg-type]
            points=0,
        )


def test_seeded_runs_do_not_disturb_other_randomness() -> None:
    """S7-7: the toolkit never touches the global ``random`` module."""
    random.seed(42)
    expected = random.random()
    random.seed(42)

    async def main() -> None:
        scenario = ChannelScenario(0, items=2)
        await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=3)

    trio.run(main)
    assert random.random() == expected


async def test_consumer_closing_only_on_success_is_found() -> None:
    """
    S7-6, seed late HIGH 2: a consumer that dies must release its producer on every path.

    Here the receive side is closed only when the loop ends normally; a cancel leaves it open
    (and a producer outside the nursery would park forever). check() sees the open end.
    """
    holder: list[trio.MemorySendChannel[int]] = []

    async def scenario() -> None:
        send, recv = trio.open_memory_channel[int](0)
        holder[:] = [send]

        async def producer() -> None:
            async with send:
                for i in range(3):
                    await send.send(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            async for _ in recv:
                pass
            await recv.aclose()  # BUG: not in a finally / `async with`

    def check() -> None:
        stats = holder[0].statistics()
        assert stats.open_receive_channels == 0, "receive channel left open"
        assert stats.tasks_waiting_send == 0, "producer left parked"

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=check)
    assert info.value.kinds == ("check",)
    assert "receive channel left open" in str(info.value)


async def test_nondeterministic_scenario_reports_unreached_points() -> None:
    """S7-1: a scenario that takes fewer steps than its baseline lists the points it missed."""
    runs: list[int] = []

    async def scenario() -> None:
        runs.append(1)
        for _ in range(3 if len(runs) == 1 else 1):  # only the baseline takes 3 checkpoints
            await trio.lowlevel.checkpoint()

    report = await cancel_at_each_checkpoint(scenario, check=lambda: None)
    assert report.steps == 4
    assert report.points == (0, 1, 2, 3)
    # Later runs take 2 steps: point 3 (right after a third step) never comes.
    assert report.unreached == (3,)


async def test_nondeterministic_scenario_reports_drifted_points() -> None:
    """S7-1: a point whose step another task takes than in the baseline is reported."""
    runs: list[int] = []

    async def scenario() -> None:
        runs.append(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.lowlevel.checkpoint, name=f"child-of-run-{len(runs)}")

    report = await cancel_at_each_checkpoint(scenario, check=lambda: None)
    assert report.unreached == ()
    child_steps = [k for k in report.points if k in report.drifted]
    assert child_steps, report


async def test_pytest_fail_in_check_and_scenario_is_a_finding() -> None:
    """S7-2, S7-6: pytest's BaseException outcomes are findings too, with their point."""

    def failing_check() -> None:
        pytest.fail("invariant broken")

    with pytest.raises(CancellationLeak, match="invariant broken") as info:
        await cancel_at_each_checkpoint(trio.lowlevel.checkpoint, check=failing_check)
    assert info.value.kinds == ("check",)

    async def scenario() -> None:
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            pytest.fail("cleanup path failed")

    with pytest.raises(CancellationLeak, match="cleanup path failed") as info:
        await cancel_at_each_checkpoint(scenario, check=lambda: None)
    assert info.value.kinds == ("raised",)


def test_caller_cancellation_passes_through_groups() -> None:
    """S7-7: a Cancelled inside a group is the caller's and is never turned into a finding."""
    from trio_taskgraph.testing._torture import _must_propagate

    assert _must_propagate(KeyboardInterrupt())
    assert not _must_propagate(ValueError())
    assert not _must_propagate(ExceptionGroup("g", [ValueError()]))
    assert _must_propagate(BaseExceptionGroup("g", [ValueError(), KeyboardInterrupt()]))
    nested = BaseExceptionGroup("g", [ExceptionGroup("h", [ValueError()]), SystemExit()])
    assert _must_propagate(nested)


# --- the README's "Test your own cancellation" example ---------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
SHIELDED_CLEANUP = (
    "        with trio.CancelScope(shield=True):\n            await tmp.unlink(missing_ok=True)\n"
)


def readme_example() -> str:
    section = README.read_text().split("## Test your own cancellation", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def _run_readme_test(code: str, folder: Path) -> None:
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    test = namespace["test_upload_cancels_cleanly"]
    assert callable(test)
    await trio.Path(folder).mkdir()
    await test(folder)


async def test_readme_example_passes(tmp_path: Path) -> None:
    """S7-6: the README's example is correct at every point the suite asks for."""
    await _run_readme_test(readme_example(), tmp_path / "fixed")


async def test_readme_example_first_draft_is_caught(tmp_path: Path) -> None:
    """S7-6: without the shield, the cleanup's own await raises Cancelled and the file stays."""
    code = readme_example()
    assert SHIELDED_CLEANUP in code
    draft = code.replace(SHIELDED_CLEANUP, "        await tmp.unlink(missing_ok=True)\n")
    with pytest.raises(CancellationLeak, match="temp file left behind") as info:
        await _run_readme_test(draft, tmp_path / "draft")
    assert info.value.kinds == ("check",)


async def test_statistics_count_campaigns_points_and_findings() -> None:
    """The process-wide tally grows by exactly what a campaign did."""
    before = torture_statistics()
    scenario = ChannelScenario(0, items=2)
    report = await cancel_at_each_checkpoint(scenario, check=scenario.check, max_points=3)
    with pytest.raises(CancellationLeak):
        await cancel_at_each_checkpoint(trio.lowlevel.checkpoint, check=pytest.fail)
    after = torture_statistics()
    assert after.campaigns - before.campaigns == 2
    assert after.points - before.points == report.points_exercised
    # checkpoint() alone takes 2 steps: up to its schedule point, then to the end.
    assert after.baseline_steps - before.baseline_steps == report.steps + 2
    assert after.findings - before.findings == 1


async def test_swallowed_at_the_next_checkpoint_is_found() -> None:
    """
    S7-4: a Cancelled delivered at the stepping task's own next checkpoint (not by the cancel
    call) and swallowed is found too (through trio's private ``Task._next_send``, guarded).
    """

    log: list[str] = []

    async def scenario() -> None:
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            log.append("cancelled, carrying on")

    with pytest.raises(CancellationLeak) as info:
        await cancel_at_each_checkpoint(scenario, check=lambda: None, points=[0])
    assert log == ["cancelled, carrying on"]
    assert info.value.kinds == ("swallowed",)


async def test_shielded_cleanup_with_its_own_timeout_is_not_swallowing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """S7-4: a Cancelled from another scope (a shielded cleanup's own timeout) is not ours."""

    async def scenario() -> None:
        try:
            await trio.sleep(1)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                await trio.sleep_forever()  # a flush that gives up after 0.5 s

    report = await cancel_at_each_checkpoint(scenario, check=lambda: None)
    assert report.points == (0, 1, 2)


def test_cancellation_leak_pickles() -> None:
    """A finding survives pickling (pytest-xdist, multiprocessing) with its fields."""
    import pickle

    err = CancellationLeak(
        point=3, steps=9, seed=7, task="consumer", findings=[("check", "check() raised X")]
    )
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is CancellationLeak
    assert str(again) == str(err)
    assert (again.point, again.steps, again.seed, again.task) == (3, 9, 7, "consumer")
    assert (again.kinds, again.details) == (("check",), ("check() raised X",))


async def test_cancel_timeout_can_be_disabled(autojump_clock: trio.testing.MockClock) -> None:
    """S7-5: ``cancel_timeout=math.inf`` accepts a long shielded wait."""
    import math

    async def scenario() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(3600)

    report = await cancel_at_each_checkpoint(scenario, check=lambda: None, cancel_timeout=math.inf)
    assert report.points == (0, 1)
