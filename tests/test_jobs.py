"""
The job queue (`open_job_queue`, `JobQueue`, `JobHandle`): states, the concurrency limit,
retries, ``run_after``, cancellation, stream subscribers, streaming outputs. Ids:
spec/S8-jobs.md.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import tracemalloc
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing

import trio_taskgraph as tg
from trio_taskgraph import wire
from trio_taskgraph._jobs import JobRunner, JobWork

# --- tasks ----------------------------------------------------------------------------------

BIN_OUT: dict[str, object] = {"properties": {"data": {"x-stream": "binary"}}}


class Echo(tg.Task):
    type = "test_jobs.Echo"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        await trio.lowlevel.checkpoint()
        return {"x": inputs.get("x")}


GATES: dict[str, trio.Event] = {}
LOG: list[str] = []


class Gate(tg.Task):
    """Parks until ``GATES[name]`` is set; logs start/end."""

    type = "test_jobs.Gate"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"name": {"type": "string"}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"name": {"type": "string"}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        name = inputs["name"]
        assert isinstance(name, str)
        LOG.append(f"start {name} {trio.current_time():.1f}")
        try:
            await GATES.setdefault(name, trio.Event()).wait()
        finally:
            LOG.append(f"end {name}")
        return {"name": name}


FLAKY: dict[str, int] = {}


class Flaky(tg.Task):
    """Fails with OSError the first ``fail`` times (per ``key``), then succeeds."""

    type = "test_jobs.Flaky"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"key": {"type": "string"}, "fail": {"type": "integer"}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"attempts": {"type": "integer"}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        key, fail = inputs["key"], inputs["fail"]
        assert isinstance(key, str)
        assert isinstance(fail, int)
        FLAKY[key] = FLAKY.get(key, 0) + 1
        LOG.append(f"flaky {key} {trio.current_time():.1f}")
        if FLAKY[key] <= fail:
            raise OSError(f"flaky failure {FLAKY[key]}")
        return {"attempts": FLAKY[key]}


class Refuse(tg.Task):
    type = "test_jobs.Refuse"
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        FLAKY["refuse"] = FLAKY.get("refuse", 0) + 1
        raise tg.PermanentJobError("this input can never work")


class Chatty(tg.Task):
    """Streams text, an object, binary chunks and a phase."""

    type = "test_jobs.Chatty"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {
            "log": {"type": "string", "x-stream": "append"},
            "state": {"x-stream": "object"},
            "data": {"x-stream": "binary", "format": "binary"},
        }
    }

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        n = inputs["n"]
        assert isinstance(n, int)
        yield tg.Phase("begin")
        for i in range(n):
            yield tg.TextDelta("log", f"{i};")
            yield tg.ObjectDelta("state", {"i": i})
            yield tg.BinaryDelta("data", bytes([i % 256]) * 100)
            await trio.lowlevel.checkpoint()


class Blobby(tg.Task):
    """Returns ``size`` bytes at one blob port."""

    type = "test_jobs.Blobby"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"size": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary"}, "note": {}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        size = inputs["size"]
        assert isinstance(size, int)
        return {"data": _pattern(size), "note": "ok"}


class TwoBlobs(tg.Task):
    type = "test_jobs.TwoBlobs"
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"a": {"x-stream": "binary"}, "b": {"x-stream": "binary"}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        return {"a": b"A", "b": b"B"}


class BigStream(tg.Task):
    """Cacheable: streams ``size`` bytes of `_pattern` blocks at one binary port."""

    type = "test_jobs.BigStream"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {"type": "integer"}, "chunk": {"type": "integer"}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }
    cacheable = True

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        size, chunk = inputs["size"], inputs.get("chunk", 1 << 20)
        assert isinstance(size, int)
        assert isinstance(chunk, int)
        block = _pattern(chunk)
        sent = 0
        while sent < size:
            piece = block[: min(chunk, size - sent)]
            sent += len(piece)
            if "gate" in GATES and sent > chunk:
                await GATES["gate"].wait()
            yield tg.BinaryDelta("data", piece)


class Upper(tg.Task):
    type = "test_jobs.Upper"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {"type": "string"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"x": {"type": "string"}, "raw": {"x-stream": "binary"}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        x = inputs["x"]
        assert isinstance(x, str)
        return {"x": x.upper(), "raw": x.encode()}


def _pattern(size: int, seed: int = 7) -> bytes:
    block = bytes((seed * 31 + i) % 251 for i in range(4096))
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def _root(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@pytest.fixture(autouse=True)
def _reset() -> None:
    GATES.clear()
    LOG.clear()
    FLAKY.clear()


# --- basics ---------------------------------------------------------------------------------


async def test_submit_run_complete() -> None:
    """S8-1: pending -> running -> completed, observable on the handle; result is the output."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Gate(), {"name": "g"})
        assert handle.state == "pending"
        assert queue.handle(handle.id) is handle
        await trio.testing.wait_all_tasks_blocked()
        assert handle.state == "running"
        assert queue.statistics().running == 1
        GATES["g"].set()
        assert await handle.result() == {"name": "g"}
        assert handle.state == "completed"
        assert handle.record.attempt == 1
        assert queue.store.load(handle.id) == handle.record
    stats = queue.statistics()
    assert (stats.completed, stats.running, stats.pending) == (1, 0, 0)


async def test_result_and_wait_are_checkpoints() -> None:
    """STYLE 8: public async methods checkpoint even when the job is already finished."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Echo(), {"x": 1})
        await handle.result()
        with trio.testing.assert_checkpoints():
            await handle.result()
        with trio.testing.assert_checkpoints():
            assert await handle.wait() == "completed"


@pytest.mark.parametrize("workers", [1, 3])
async def test_concurrency_limit_is_never_exceeded(workers: int) -> None:
    """S8-6: at most ``workers`` jobs run at once; the rest wait pending (FIFO)."""
    async with tg.open_job_queue(workers=workers) as queue:
        handles = [queue.submit(Gate(), {"name": f"g{i}"}) for i in range(8)]
        for step in range(8):
            await trio.testing.wait_all_tasks_blocked()
            running = [i for i, h in enumerate(handles) if h.state == "running"]
            assert running == list(range(step, min(step + workers, 8)))
            assert queue.statistics().running == len(running)
            assert queue.statistics().pending == 8 - step - len(running)
            GATES[f"g{step}"].set()
            await handles[step].wait()
        assert [h.state for h in handles] == ["completed"] * 8
    assert queue.statistics().peak_running == workers


async def test_fifo_order_with_one_worker() -> None:
    """S8-3: due jobs start in submission order."""
    async with tg.open_job_queue(workers=1) as queue:
        handles = [queue.submit(Gate(), {"name": f"g{i}"}) for i in range(4)]
        for i in range(4):
            GATES[f"g{i}"] = trio.Event()
            GATES[f"g{i}"].set()
        for h in handles:
            await h.result()
    assert [line.split()[1] for line in LOG if line.startswith("start")] == [
        "g0",
        "g1",
        "g2",
        "g3",
    ]


# --- retries --------------------------------------------------------------------------------


async def test_retryable_error_retries_then_completes() -> None:
    """S8-2: a retryable failure runs again while attempts <= max_retries."""
    async with tg.open_job_queue(workers=2) as queue:
        handle = queue.submit(Flaky(), {"key": "k", "fail": 2}, max_retries=2)
        assert await handle.result() == {"attempts": 3}
        assert handle.record.attempt == 3
        assert handle.record.error is not None
        assert "flaky failure 2" in handle.record.error


async def test_retries_exhausted_fail_with_the_last_error() -> None:
    """S8-2: after max_retries, the job fails; result() raises the last attempt's error."""
    async with tg.open_job_queue(workers=2) as queue:
        handle = queue.submit(Flaky(), {"key": "k", "fail": 5}, max_retries=1)
        with pytest.raises(Exception) as info:  # noqa: PT011 - the cause is checked below
            await handle.result()
        assert isinstance(_root(info.value), OSError)
        assert "flaky failure 2" in str(_root(info.value))
        assert handle.state == "failed"
        assert FLAKY["k"] == 2
    assert queue.statistics().failed == 1


async def test_permanent_error_is_never_retried() -> None:
    """S8-2: a PermanentJobError fails the job at once, whatever max_retries says."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Refuse(), max_retries=5)
        with pytest.raises(Exception) as info:  # noqa: PT011 - the cause is checked below
            await handle.result()
        assert isinstance(_root(info.value), tg.PermanentJobError)
        assert FLAKY["refuse"] == 1
        assert handle.state == "failed"


async def test_retry_delay_backs_off(autojump_clock: trio.abc.Clock) -> None:
    """S8-2: retries are due delay * backoff**(n-1) after each failure (autojump clock)."""
    async with tg.open_job_queue(workers=1) as queue:
        t0 = trio.current_time()
        handle = queue.submit(
            Flaky(), {"key": "d", "fail": 3}, max_retries=3, retry_delay=1.0, retry_backoff=3.0
        )
        await handle.result()
    times = [float(line.split()[2]) - t0 for line in LOG if line.startswith("flaky d")]
    assert times == pytest.approx([0.0, 1.0, 4.0, 13.0], abs=0.05)


# --- run_after ------------------------------------------------------------------------------


async def test_run_after_is_honoured(autojump_clock: trio.abc.Clock) -> None:
    """S8-3: a job never starts before its run_after; due jobs go by (run_after, sequence)."""
    async with tg.open_job_queue(workers=1) as queue:
        t0 = trio.current_time()
        for name in ("c", "a", "b", "now"):
            GATES[name] = trio.Event()
            GATES[name].set()
        late = queue.submit(Gate(), {"name": "c"}, run_after=t0 + 30)
        first = queue.submit(Gate(), {"name": "a"}, run_after=t0 + 10)
        second = queue.submit(Gate(), {"name": "b"}, run_after=t0 + 20)
        now = queue.submit(Gate(), {"name": "now"})
        await trio.testing.wait_all_tasks_blocked()
        assert late.state == first.state == second.state == "pending"
        for h in (late, first, second, now):
            await h.result()
    starts = [(line.split()[1], float(line.split()[2]) - t0) for line in LOG if "start" in line]
    assert [s[0] for s in starts] == ["now", "a", "b", "c"]
    assert [s[1] for s in starts] == pytest.approx([0.0, 10.0, 20.0, 30.0], abs=0.05)


async def test_run_after_in_the_past_is_due_now(autojump_clock: trio.abc.Clock) -> None:
    """S8-3: a past run_after sorts ahead of jobs submitted later without one."""
    async with tg.open_job_queue(workers=1) as queue:
        busy = queue.submit(Gate(), {"name": "busy"})
        await trio.testing.wait_all_tasks_blocked()
        later = queue.submit(Gate(), {"name": "later"})
        past = queue.submit(Gate(), {"name": "past"}, run_after=trio.current_time() - 5)
        for name in ("busy", "later", "past"):
            GATES.setdefault(name, trio.Event()).set()
        for h in (busy, later, past):
            await h.result()
    assert [line.split()[1] for line in LOG if line.startswith("start")] == [
        "busy",
        "past",
        "later",
    ]


async def test_an_earlier_submission_wakes_an_idle_worker(autojump_clock: trio.abc.Clock) -> None:
    """S8-3: a worker parked until a far run_after is woken for an earlier job."""
    async with tg.open_job_queue(workers=1) as queue:
        t0 = trio.current_time()
        far = queue.submit(Echo(), {"x": "far"}, run_after=t0 + 100)
        await trio.testing.wait_all_tasks_blocked()
        soon = queue.submit(Echo(), {"x": "soon"}, run_after=t0 + 1)
        await soon.result()
        assert trio.current_time() - t0 == pytest.approx(1.0, abs=0.05)
        assert far.state == "pending"
        far.cancel()


# --- cancellation ---------------------------------------------------------------------------


async def test_cancel_pending_job() -> None:
    """S8-10: a pending job is cancelled at once and never runs."""
    async with tg.open_job_queue(workers=1) as queue:
        blocker = queue.submit(Gate(), {"name": "block"})
        waiting = queue.submit(Gate(), {"name": "never"})
        await trio.testing.wait_all_tasks_blocked()
        waiting.cancel()
        assert waiting.state == "cancelled"
        with pytest.raises(tg.JobCancelledError, match=waiting.id):
            await waiting.result()
        GATES["block"].set()
        await blocker.result()
        waiting.cancel()  # a finished job is left alone
        assert waiting.state == "cancelled"
    assert not any("never" in line for line in LOG)
    assert queue.statistics().cancelled == 1


async def test_cancel_running_job() -> None:
    """S8-10: a running job's scope is cancelled; its finally runs; it ends cancelled."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Gate(), {"name": "run"})
        after = queue.submit(Echo(), {"x": 2})
        await trio.testing.wait_all_tasks_blocked()
        assert handle.state == "running"
        handle.cancel()
        assert await handle.wait() == "cancelled"
        assert len(LOG) == 2
        assert LOG[0].startswith("start run")
        assert LOG[1] == "end run"
        # The worker goes on with the next job.
        assert await after.result() == {"x": 2}
        handle.cancel()
        assert handle.state == "cancelled"


async def test_cancel_running_job_is_never_retried() -> None:
    """S8-10: cancel beats max_retries."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Gate(), {"name": "r"}, max_retries=3)
        await trio.testing.wait_all_tasks_blocked()
        handle.cancel()
        assert await handle.wait() == "cancelled"
        assert handle.record.attempt == 1


async def test_closing_cancels_pending_and_waits_for_running() -> None:
    """S8-13: leaving the block cancels pending jobs, lets running ones finish."""
    async with tg.open_job_queue(workers=1) as queue:
        running = queue.submit(Gate(), {"name": "r"})
        pending = queue.submit(Gate(), {"name": "p"})
        await trio.testing.wait_all_tasks_blocked()
        GATES["r"].set()
    assert (running.state, pending.state) == ("completed", "cancelled")
    with pytest.raises(trio.ClosedResourceError):
        queue.submit(Echo())


async def test_an_error_in_the_block_cancels_every_job_and_propagates_as_itself() -> None:
    """S8-13: the body's exception is raised as itself, not in a group; jobs are cancelled."""
    handles: list[tg.JobHandle] = []

    async def body() -> None:
        async with tg.open_job_queue(workers=2) as queue:
            handles.append(queue.submit(Gate(), {"name": "a"}))
            handles.append(queue.submit(Gate(), {"name": "b"}, run_after=math.inf))
            await trio.testing.wait_all_tasks_blocked()
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await body()
    assert [h.state for h in handles] == ["cancelled", "cancelled"]
    assert "end a" in LOG


async def test_outer_cancellation_leaves_nothing_running() -> None:
    """S8-13: cancelling the queue's block cancels every job and returns promptly."""
    handles: list[tg.JobHandle] = []
    with trio.CancelScope() as scope:
        async with tg.open_job_queue(workers=2) as queue:
            handles.extend(queue.submit(Gate(), {"name": f"g{i}"}) for i in range(3))
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.sleep_forever()
    assert [h.state for h in handles] == ["cancelled"] * 3
    assert LOG.count("end g0") == 1


async def test_submit_and_cancel_at_each_checkpoint() -> None:
    """S8-10, S8-13, S7: a submit/cancel scenario cancelled at each checkpoint leaves no task,
    every job terminal, counts consistent."""
    from trio_taskgraph.testing import cancel_at_each_checkpoint, torture_max_points

    seen: list[tg.JobQueue] = []
    handles: list[tg.JobHandle] = []
    runs = itertools.count()

    async def scenario() -> None:
        seen.clear()
        handles.clear()
        async with tg.open_job_queue(workers=2) as queue:
            seen.append(queue)
            a = queue.submit(Echo(), {"x": 1})
            b = queue.submit(Flaky(), {"key": f"t{next(runs)}", "fail": 1}, max_retries=1)
            c = queue.submit(Echo(), {"x": 3})
            handles.extend((a, b, c))
            c.cancel()
            await a.result()
            await b.result()

    def check() -> None:
        assert all(h.record.terminal for h in handles), [h.state for h in handles]
        stats = seen[0].statistics()
        assert stats.running == stats.pending == 0
        assert stats.completed + stats.failed + stats.cancelled == len(handles)

    report = await cancel_at_each_checkpoint(
        scenario, check=check, max_points=torture_max_points(25)
    )
    assert report.steps > 0


# --- subscribers ----------------------------------------------------------------------------


async def test_stream_events_reach_every_listener_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S8-9: every listener sees the same events in order; a raising one is logged and
    dropped alone (the seed's per-listener try/catch)."""
    got: dict[str, list[tg.StreamEvent]] = {"a": [], "b": [], "c": []}

    def bad(event: tg.StreamEvent) -> None:
        got["b"].append(event)
        if len(got["b"]) == 3:
            raise RuntimeError("listener b broke")

    async def slow_ok(event: tg.StreamEvent) -> None:
        await trio.lowlevel.checkpoint()
        got["c"].append(event)

    with caplog.at_level(logging.ERROR, logger="trio_taskgraph.jobs"):
        async with tg.open_job_queue(workers=1) as queue:
            handle = queue.submit(Chatty(), {"n": 20})
            handle.on_stream(got["a"].append)
            handle.on_stream(bad)
            handle.on_stream(slow_ok)
            output = await handle.result()
    assert got["a"] == got["c"]
    events = got["a"]
    assert events[0] == tg.Phase("begin")
    assert isinstance(events[-1], tg.Finish)
    assert events[-1].data == output
    text = "".join(e.text for e in events if isinstance(e, tg.TextDelta))
    assert text == "".join(f"{i};" for i in range(20)) == output["log"]
    chunks = b"".join(bytes(e.chunk) for e in events if isinstance(e, tg.BinaryDelta))
    assert chunks == output["data"]
    assert len(events) == 1 + 3 * 20 + 1
    assert got["b"] == events[:3]
    assert "listener b broke" in caplog.text
    assert queue.statistics().subscribers_dropped == 1


async def test_listener_added_while_running_gets_the_rest() -> None:
    """S8-9: a subscriber added mid-run receives events from then on, in order."""
    got: list[tg.StreamEvent] = []
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Gate(), {"name": "late"})
        await trio.testing.wait_all_tasks_blocked()
        handle.on_stream(got.append)
        GATES["late"].set()
        await handle.result()
        handle.on_stream(got.append)  # finished: nothing more is delivered
    assert got == [tg.Finish({"name": "late"})]


async def test_failed_attempts_end_with_a_stream_error() -> None:
    """S8-9: a failed attempt's last event is a StreamError; the retry's events follow."""
    got: list[tg.StreamEvent] = []
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Flaky(), {"key": "s", "fail": 1}, max_retries=1)
        handle.on_stream(got.append)
        await handle.result()
    assert len(got) == 2
    assert isinstance(got[0], tg.StreamError)
    assert isinstance(_root(got[0].error), OSError)
    assert got[1] == tg.Finish({"attempts": 2})


async def test_slow_lossy_subscriber_is_dropped_with_a_clear_error() -> None:
    """S8-7, S8-8: a lossy subscriber that falls more than its budget behind is dropped: it
    gets what was buffered, then StreamError(SubscriberOverflowError); memory stays bounded;
    the job and the other subscribers are unaffected."""
    release = trio.Event()
    slow: list[tg.StreamEvent] = []
    fast: list[tg.StreamEvent] = []

    async def slow_cb(event: tg.StreamEvent) -> None:
        await release.wait()
        slow.append(event)

    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Chatty(), {"n": 200})
        handle.on_stream(slow_cb, high_water_bytes=2000, lossy=True)
        handle.on_stream(fast.append)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        output = await handle.result()
    assert isinstance(fast[-1], tg.Finish)
    assert fast[-1].data == output
    assert isinstance(slow[-1], tg.StreamError)
    assert isinstance(slow[-1].error, tg.SubscriberOverflowError)
    assert "2000 bytes" in str(slow[-1].error)
    assert slow[:-1] == fast[: len(slow) - 1]
    # Bounded: the dropped one received at most its budget's worth of events (plus one).
    assert len(slow) - 1 <= 2000 // 64 + 1
    assert queue.statistics().subscribers_dropped == 1


class Burst(tg.Task):
    """Yields ``n`` 1 KiB chunks without ever awaiting."""

    type = "test_jobs.Burst"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"data": {"x-stream": "binary"}}}

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        n = inputs["n"]
        assert isinstance(n, int)
        for i in range(n):
            yield tg.BinaryDelta("data", bytes([i % 256]) * 1024)


async def test_slow_subscriber_applies_backpressure() -> None:
    """S8-7, S8-8 (default mode): a slow subscriber makes the task wait instead of losing
    events: while it is stuck the task produces at most about its budget; once released,
    it receives every event in order."""
    release = trio.Event()
    slow: list[tg.StreamEvent] = []
    fast: list[tg.StreamEvent] = []

    async def slow_cb(event: tg.StreamEvent) -> None:
        await release.wait()
        slow.append(event)

    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Chatty(), {"n": 200})
        handle.on_stream(slow_cb, high_water_bytes=2000)
        handle.on_stream(fast.append)
        await trio.testing.wait_all_tasks_blocked()
        assert handle.state == "running"  # parked on the slow subscriber, not finished
        # Budget 2000 bytes at >= 64 bytes an event, plus the events between two pacing
        # points (one) and the one the delivery task holds.
        assert len(fast) <= 2000 // 64 + 3
        release.set()
        output = await handle.result()
    assert slow == fast
    assert len(fast) == 1 + 3 * 200 + 1
    assert isinstance(fast[-1], tg.Finish)
    assert fast[-1].data == output
    assert queue.statistics().subscribers_dropped == 0


@pytest.mark.parametrize("lossy", [False, True])
async def test_a_subscriber_that_keeps_up_is_never_dropped(lossy: bool) -> None:
    """S8-8: a task that never awaits still pauses after each event while someone listens,
    so a subscriber that keeps up sees everything even with a small budget."""
    got: list[tg.StreamEvent] = []
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Burst(), {"n": 500})
        handle.on_stream(got.append, high_water_bytes=8 * 1024, lossy=lossy)
        output = await handle.result()
    chunks = [e for e in got if isinstance(e, tg.BinaryDelta)]
    assert len(chunks) == 500
    data = output["data"]
    assert isinstance(data, tg.Blob)
    assert b"".join(bytes(c.chunk) for c in chunks) == bytes(data.data)
    assert queue.statistics().subscribers_dropped == 0


async def test_backpressure_in_a_graph_job() -> None:
    """S8-8: graph jobs are paced too (the graph is rebuilt over paced copies of its tasks,
    same node ids); a slow subscriber loses nothing."""
    graph = tg.TaskGraph()
    a = graph.add(Burst(), inputs={"n": 300})
    b = graph.add(Chatty(), inputs={"n": 50})
    got: list[tg.StreamEvent] = []

    async def slowish(event: tg.StreamEvent) -> None:
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        got.append(event)

    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(graph)
        handle.on_stream(slowish, high_water_bytes=4096)
        result = await handle.result()
    assert set(result) == {a, b}
    assert len([e for e in got if isinstance(e, tg.BinaryDelta) and e.port == "data"]) == 350
    assert queue.statistics().subscribers_dropped == 0


async def test_on_stream_checks_its_arguments() -> None:
    """S8-7: a bad subscriber is refused at once."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Echo())
        with pytest.raises(TypeError):
            handle.on_stream("not callable")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="high_water_bytes"):
            handle.on_stream(print, high_water_bytes=0)
        with pytest.raises(TypeError):
            handle.on_stream(print, high_water_bytes=1.5)  # type: ignore[arg-type]
        await handle.result()


# --- outputs --------------------------------------------------------------------------------


async def _read_all(handle: tg.JobHandle, port: str | None = None) -> bytes:
    async with handle.open_output_stream(port) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def test_open_output_stream_inline_value() -> None:
    """S8-12: an inline binary value is streamed too, in bounded chunks (never one huge
    chunk: the seed's M-6 applied to readers)."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Blobby(), {"size": 300_000})
        async with handle.open_output_stream() as chunks:
            sizes = [len(chunk) async for chunk in chunks]
        assert sum(sizes) == 300_000
        assert max(sizes) <= 64 * 1024
        assert await _read_all(handle, "data") == _pattern(300_000)


async def test_open_output_stream_refuses_ambiguous_or_undeclared_ports() -> None:
    """S8-12 (the seed's M-1): portless only with exactly one declared binary port; an
    explicit port must be a declared binary port."""
    async with tg.open_job_queue(workers=1) as queue:
        two = queue.submit(TwoBlobs())
        with pytest.raises(tg.JobOutputError, match="exactly one binary"):
            await _read_all(two)
        assert await _read_all(two, "b") == b"B"
        blob = queue.submit(Blobby(), {"size": 3})
        with pytest.raises(tg.JobOutputError, match="not a declared binary"):
            await _read_all(blob, "note")
        echo = queue.submit(Echo(), {"x": b"bytes"})
        with pytest.raises(tg.JobOutputError, match=r"exactly one binary .*\[\]"):
            await _read_all(echo)


async def test_open_output_stream_of_failed_or_cancelled_job() -> None:
    """S8-12: waiting for completion raises the job's failure or JobCancelledError."""
    async with tg.open_job_queue(workers=1) as queue:
        failed = queue.submit(Refuse())
        with pytest.raises(Exception) as info:  # noqa: PT011 - checked below
            await _read_all(failed)
        assert isinstance(_root(info.value), tg.PermanentJobError)
        cancelled = queue.submit(Echo(), run_after=math.inf)
        cancelled.cancel()
        with pytest.raises(tg.JobCancelledError):
            await _read_all(cancelled)


def _cache_runner(size: int, chunk: int = 1 << 20, *, gate: trio.Event | None = None) -> JobRunner:
    """A stand-in for the runner: streams ``size`` bytes into the run's cache, returns the ref."""

    async def runner(work: JobWork, emit: Callable[[tg.StreamEvent], None]) -> dict[str, object]:
        cache = work.config.cache
        assert isinstance(cache, tg.FsOutputRepository | tg.MemoryOutputRepository)

        async def chunks() -> AsyncIterator[bytes]:
            block = _pattern(chunk)
            sent = 0
            while sent < size:
                piece = block[: min(chunk, size - sent)]
                sent += len(piece)
                if gate is not None and sent > chunk:
                    await gate.wait()
                yield piece

        ref = await cache.save_output_stream("test_jobs.Blobby", {}, "data", chunks())
        return {"data": ref, "note": "big"}

    return runner


def _expected_digest(size: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    block = _pattern(chunk)
    sent = 0
    while sent < size:
        piece = block[: min(chunk, size - sent)]
        sent += len(piece)
        h.update(piece)
    return h.hexdigest()


async def test_record_keeps_refs_and_resolve_job_output_hydrates(tmp_path: Path) -> None:
    """S8-5: the stored output holds the CacheRef (small); resolve_job_output hydrates it."""
    cache = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=cache)
    async with tg.open_job_queue(config, workers=1, _runner=_cache_runner(3_000_000)) as queue:
        handle = queue.submit(Blobby(), {"size": 3_000_000})
        output = await handle.result()
        assert tg.is_cache_ref(output["data"])
        assert handle.record.output is output
        assert len(wire.packb(dict(output))) < 1024
        hydrated = await tg.resolve_job_output(output, cache, ports=["data"])
        assert isinstance(hydrated, dict)
        assert hydrated["data"] == tg.Blob(_full(3_000_000))
        assert await _read_all(handle) == _full(3_000_000)


def _full(size: int, chunk: int = 1 << 20) -> bytes:
    block = _pattern(chunk)
    out = bytearray()
    while len(out) < size:
        out += block[: min(chunk, size - len(out))]
    return bytes(out)


async def test_open_output_stream_needs_a_cache_for_refs() -> None:
    """S8-12: a ref in the output with no cache in the run is a JobOutputError."""

    async def runner(work: JobWork, emit: Callable[[tg.StreamEvent], None]) -> dict[str, object]:
        await trio.lowlevel.checkpoint()
        return {"data": tg.make_cache_ref("nowhere", size=1)}

    async with tg.open_job_queue(workers=1, _runner=runner) as queue:
        handle = queue.submit(Blobby(), {"size": 1})
        with pytest.raises(tg.JobOutputError, match="no cache"):
            await _read_all(handle)


async def test_cancel_running_job_leaves_no_temp_blob(tmp_path: Path) -> None:
    """S8-10: a job cancelled while streaming into the cache leaves no temp file, no blob."""
    cache = tg.FsOutputRepository(tmp_path / "cache")
    try:
        gate = trio.Event()
        config = tg.RunConfig(cache=cache)
        runner = _cache_runner(8 << 20, 1 << 20, gate=gate)
        async with tg.open_job_queue(config, workers=1, _runner=runner) as queue:
            handle = queue.submit(Blobby(), {"size": 8 << 20})
            await trio.testing.wait_all_tasks_blocked()
            assert handle.state == "running"
            handle.cancel()
            assert await handle.wait() == "cancelled"
        leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert not [n for n in leftovers if n.endswith((".tmp", ".blob"))], leftovers
        assert (await cache.stats()).blobs == 0
    finally:
        await cache.aclose()


# --- arguments ------------------------------------------------------------------------------


async def test_arguments_are_checked() -> None:
    """S8-6: bad workers, configs, stores, targets, inputs and deadlines are refused."""
    with pytest.raises(ValueError, match="workers"):
        async with tg.open_job_queue(workers=0):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="workers"):
        async with tg.open_job_queue(workers=True):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="RunConfig"):
        async with tg.open_job_queue(None):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="JobStore"):
        async with tg.open_job_queue(store=object()):  # type: ignore[arg-type]
            pass  # pragma: no cover
    async with tg.open_job_queue(workers=1, store=tg.MemoryJobStore()) as queue:
        with pytest.raises(TypeError, match="Task instance or a TaskGraph"):
            queue.submit(Echo)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="mapping"):
            queue.submit(Echo(), [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="no inputs"):
            queue.submit(tg.TaskGraph(), {})
        with pytest.raises(TypeError, match="run_after"):
            queue.submit(Echo(), run_after="soon")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="NaN"):
            queue.submit(Echo(), run_after=math.nan)
        with pytest.raises(ValueError, match="max_retries"):
            queue.submit(Echo(), max_retries=-1)
        with pytest.raises(KeyError):
            queue.handle("job-999")
        assert queue.statistics().pending == 0


async def test_memory_store_forgets_only_finished_jobs() -> None:
    """S8-11: the memory store keeps every record until forget() (finished jobs only)."""
    store = tg.MemoryJobStore()
    async with tg.open_job_queue(workers=1, store=store) as queue:
        done = queue.submit(Echo(), {"x": 1})
        await done.result()
        waiting = queue.submit(Echo(), run_after=math.inf)
        assert len(store) == 2
        store.forget(waiting.id)
        store.forget(done.id)
        assert store.load(done.id) is None
        assert store.load(waiting.id) == waiting.record
        assert isinstance(store, tg.JobStore)


# --- with the real runner -------------------------------------------------------------------


@pytest.mark.slow
async def test_256_mib_job_through_the_runner_streams_out_of_the_cache(tmp_path: Path) -> None:
    """S8-5, S8-12: a cacheable task streams 256 MiB into the cache (a ref in the output);
    open_output_stream reads it back exactly with bounded reader memory (M-6: bounded chunks);
    the record is small (the seed's queue-row bloat, Spec 2)."""
    size = 256 * 1024 * 1024
    cache = tg.FsOutputRepository(tmp_path / "cache", read_chunk_bytes=1 << 20)
    try:
        async with tg.open_job_queue(tg.RunConfig(cache=cache), workers=2) as queue:
            handle = queue.submit(BigStream(), {"size": size})
            output = await handle.result()
            ref = output["data"]
            assert isinstance(ref, tg.CacheRef)
            assert ref.size == size
            assert len(wire.packb(dict(handle.record.output or {}))) < 1024
            digest = hashlib.sha256()
            total = 0
            tracemalloc.start()
            try:
                async with handle.open_output_stream() as chunks:
                    async for chunk in chunks:
                        digest.update(chunk)
                        total += len(chunk)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert total == size
        assert digest.hexdigest() == _expected_digest(size)
        assert peak < 8 * 1024 * 1024, peak
    finally:
        await cache.aclose()


async def test_cancel_running_streaming_job_leaves_no_temp_file_or_blob(tmp_path: Path) -> None:
    """S8-10 (S6-49): a job cancelled mid-stream into the cache ends cancelled with no temp
    file, no blob and no row left."""
    cache = tg.FsOutputRepository(tmp_path / "cache")
    try:
        GATES["gate"] = trio.Event()
        async with tg.open_job_queue(tg.RunConfig(cache=cache), workers=1) as queue:
            handle = queue.submit(BigStream(), {"size": 8 << 20, "chunk": 1 << 20})
            await trio.testing.wait_all_tasks_blocked()
            assert handle.state == "running"
            handle.cancel()
            assert await handle.wait() == "cancelled"
        names = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert not [n for n in names if n.endswith((".tmp", ".blob"))], names
        stats = await cache.stats()
        assert (stats.blobs, stats.rows) == (0, 0)
    finally:
        await cache.aclose()


async def test_task_failure_is_a_task_failed_error() -> None:
    """S8-2: through the runner, result() raises TaskFailedError naming the task; the task's
    own error is the cause; a PermanentJobError cause is not retried."""
    async with tg.open_job_queue(workers=1) as queue:
        flaky = queue.submit(Flaky(), {"key": "tf", "fail": 9}, max_retries=1)
        with pytest.raises(tg.TaskFailedError, match=r"test_jobs\.Flaky") as info:
            await flaky.result()
        assert isinstance(info.value.__cause__, OSError)
        assert FLAKY["tf"] == 2
        refuse = queue.submit(Refuse(), max_retries=3)
        with pytest.raises(tg.TaskFailedError):
            await refuse.result()
        assert FLAKY["refuse"] == 1


async def test_graph_job() -> None:
    """S8-12: a graph job's result is {node id: output}; its output streams by 'node.port'."""
    graph = tg.TaskGraph()
    first = graph.add(Upper(), inputs={"x": "abc"})
    second = graph.add(Upper())
    graph.connect(first, "x", second, "x")
    got: list[tg.StreamEvent] = []
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(graph)
        handle.on_stream(got.append)
        result = await handle.result()
        assert result[first] == {"x": "ABC", "raw": tg.Blob(b"abc")}
        assert result[second] == {"x": "ABC", "raw": tg.Blob(b"ABC")}
        assert await _read_all(handle, f"{second}.raw") == b"ABC"
        with pytest.raises(tg.JobOutputError, match="name the port"):
            await _read_all(handle)
        with pytest.raises(tg.JobOutputError, match="no node"):
            await _read_all(handle, "n9.raw")
    assert [e for e in got if isinstance(e, tg.Finish)] == [
        tg.Finish({"x": "ABC", "raw": b"abc"}),
        tg.Finish({"x": "ABC", "raw": b"ABC"}),
    ]


# --- cancelling the park points -------------------------------------------------------------


async def test_cancelling_a_result_wait_leaves_the_job_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    """S8-10, STYLE 9: a cancelled ``result()``/``wait()`` leaves the job running."""
    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Gate(), {"name": "w"})
        with trio.move_on_after(5) as scope:
            await handle.result()
        assert scope.cancelled_caught
        assert handle.state == "running"
        GATES["w"].set()
        assert await handle.result() == {"name": "w"}


async def test_cancel_while_a_subscriber_is_parked() -> None:
    """S8-9, S8-10: a job cancelled while an async subscriber is parked ends cancelled and its
    delivery task is gone with it."""
    entered = trio.Event()

    async def stuck(event: tg.StreamEvent) -> None:
        entered.set()
        await trio.sleep_forever()

    async with tg.open_job_queue(workers=1) as queue:
        handle = queue.submit(Chatty(), {"n": 3})
        handle.on_stream(stuck)
        await entered.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert handle.state == "running"  # not terminal until subscribers drain (S8-9)
        handle.cancel()
        assert await handle.wait() == "cancelled"
        assert queue.statistics().running == 0


async def test_cancel_while_reading_an_output_stream(tmp_path: Path) -> None:
    """S8-12, STYLE 9: a reader cancelled mid-stream closes the blob reader; the job and the
    blob stay intact and can be read again."""
    cache = tg.FsOutputRepository(tmp_path / "cache", read_chunk_bytes=1 << 16)
    try:
        async with tg.open_job_queue(tg.RunConfig(cache=cache), workers=1) as queue:
            handle = queue.submit(BigStream(), {"size": 1 << 20, "chunk": 1 << 16})
            await handle.result()
            with trio.CancelScope() as scope:
                async with handle.open_output_stream() as chunks:
                    async for _ in chunks:
                        scope.cancel()
            assert scope.cancelled_caught
            assert handle.state == "completed"
            assert await _read_all(handle) == _full(1 << 20, 1 << 16)
    finally:
        await cache.aclose()


# --- observing and forgetting ---------------------------------------------------------------


async def test_every_transition_is_observable(caplog: pytest.LogCaptureFixture) -> None:
    """S8-1: on_transition sees each record: submit, start, retry, start, succeed, in order;
    a raising observer is logged and dropped."""
    seen: list[tuple[str, str, int]] = []

    def broken(record: tg.JobRecord) -> None:
        raise RuntimeError("observer broke")

    async with tg.open_job_queue(workers=1) as queue:
        queue.on_transition(lambda r: seen.append((r.id, r.state.value, r.attempt)))
        queue.on_transition(broken)
        handle = queue.submit(Flaky(), {"key": "obs", "fail": 1}, max_retries=1)
        await handle.result()
        gone = queue.submit(Echo(), run_after=math.inf)
        gone.cancel()
        with pytest.raises(TypeError):
            queue.on_transition(42)  # type: ignore[arg-type]
    assert seen == [
        (handle.id, "pending", 0),
        (handle.id, "running", 1),
        (handle.id, "pending", 1),
        (handle.id, "running", 2),
        (handle.id, "completed", 2),
        (gone.id, "pending", 0),
        (gone.id, "cancelled", 0),
    ]
    assert "observer broke" in caplog.text
    assert len([r for r in caplog.records if "on_transition" in r.getMessage()]) == 1


async def test_forget_drops_finished_jobs_only() -> None:
    """S8-11: forget() removes a finished job from the queue and the store; a held handle keeps
    working; an unfinished job cannot be forgotten."""
    store = tg.MemoryJobStore()
    async with tg.open_job_queue(workers=1, store=store) as queue:
        done = queue.submit(Echo(), {"x": 5})
        await done.result()
        waiting = queue.submit(Echo(), run_after=math.inf)
        with pytest.raises(ValueError, match="pending"):
            queue.forget(waiting.id)
        queue.forget(done.id)
        with pytest.raises(KeyError):
            queue.handle(done.id)
        with pytest.raises(KeyError):
            queue.forget(done.id)
        assert store.load(done.id) is None
        assert await done.result() == {"x": 5}
        assert len(store) == 1


async def test_a_ref_planted_outside_the_binary_port_is_never_streamed() -> None:
    """S8-12 (the seed's M-1): a producer that plants a branded CacheRef in another field
    cannot make open_output_stream read it, with or without a port."""
    cache = tg.MemoryOutputRepository()
    secret = await cache.save_output_stream("other", {}, "data", _one(b"secret"))

    async def runner(work: JobWork, emit: Callable[[tg.StreamEvent], None]) -> dict[str, object]:
        await trio.lowlevel.checkpoint()
        return {"data": b"public", "note": secret}

    async with tg.open_job_queue(tg.RunConfig(cache=cache), workers=1, _runner=runner) as queue:
        handle = queue.submit(Blobby(), {"size": 6})
        assert await _read_all(handle) == b"public"
        with pytest.raises(tg.JobOutputError, match="not a declared binary"):
            await _read_all(handle, "note")
    await cache.aclose()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    await trio.lowlevel.checkpoint()
    yield data


async def test_backpressured_job_cancelled_at_each_checkpoint() -> None:
    """S8-8, S8-10, S7: a streaming job whose subscribers push back (and one lossy one),
    cancelled at each checkpoint, leaves no task behind and every job terminal."""
    from trio_taskgraph.testing import cancel_at_each_checkpoint, torture_max_points

    handles: list[tg.JobHandle] = []

    async def scenario() -> None:
        handles.clear()

        async def slow(event: tg.StreamEvent) -> None:
            await trio.lowlevel.checkpoint()

        async with tg.open_job_queue(workers=1) as queue:
            handle = queue.submit(Chatty(), {"n": 4})
            handles.append(handle)
            handle.on_stream(slow, high_water_bytes=200)
            handle.on_stream(lambda e: None, high_water_bytes=100, lossy=True)
            await handle.result()

    def check() -> None:
        assert all(h.record.terminal for h in handles), [h.state for h in handles]

    report = await cancel_at_each_checkpoint(
        scenario, check=check, max_points=torture_max_points(25)
    )
    assert report.steps > 0


@attrs.frozen
class FrozenBurst(tg.Task):
    """A frozen attrs task: pacing must not need plain attribute assignment."""

    type = "test_jobs.FrozenBurst"
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"data": {"x-stream": "binary"}}}
    n: int = 50

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        for i in range(self.n):
            yield tg.BinaryDelta("data", bytes([i]) * 512)


class Uncopyable(tg.Task):
    type = "test_jobs.Uncopyable"
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"data": {"x-stream": "binary"}}}

    def __copy__(self) -> Uncopyable:
        raise TypeError("no copies")

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        yield tg.BinaryDelta("data", b"x")


async def test_frozen_and_uncopyable_tasks_run_with_subscribers() -> None:
    """S8-8: a frozen attrs task is paced like any other; a task that cannot be copied runs
    unpaced (its subscribers still get every event while they keep up)."""
    got: list[tg.StreamEvent] = []
    other: list[tg.StreamEvent] = []
    async with tg.open_job_queue(workers=1) as queue:
        frozen = queue.submit(FrozenBurst(n=50))
        frozen.on_stream(got.append, high_water_bytes=2048)
        await frozen.result()
        odd = queue.submit(Uncopyable())
        odd.on_stream(other.append)
        assert await odd.result() == {"data": tg.Blob(b"x")}
    assert len([e for e in got if isinstance(e, tg.BinaryDelta)]) == 50
    assert [type(e) for e in other] == [tg.BinaryDelta, tg.Finish]
