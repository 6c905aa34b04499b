"""
Cancelling a run from outside (S6-49): chain, fan-out and fan-in graphs cancelled at every
checkpoint (bounded campaign) and at Hypothesis-chosen moments, with Hypothesis-chosen chunk
sizes and budgets; and a filesystem cache cancelled mid-stream.

After every run: no task of the run is left (the torture toolkit checks it, S7-3), no byte
channel has a parked sender or receiver, and the cache holds no blob without a row (and, on
disk, no temp file).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import trio
import trio.testing
from hypothesis import settings, strategies as st

import trio_taskgraph as tg
import trio_taskgraph._stream_processor as sp
from tests.graph_tasks import Join, Relay
from tests.typed_hypothesis import given
from trio_taskgraph import BytesLike
from trio_taskgraph.testing import (
    cancel_at_each_checkpoint,
    cancel_at_random_checkpoints,
    torture_max_points,
)

Shape = Literal["chain", "fan-out", "fan-in"]


class Source(tg.Task):
    type = "test_runner_cancellation.Source"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {"type": "integer"}, "chunk": {"type": "integer"}, "tag": {}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }
    cacheable = True

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        size = inputs["size"]
        chunk = inputs["chunk"]
        assert isinstance(size, int)
        assert isinstance(chunk, int)
        for start in range(0, size, chunk):
            yield tg.BinaryDelta("data", b"s" * min(chunk, size - start))


class Total(tg.Task):
    type = "test_runner_cancellation.Total"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {}},
        "required": ["data"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {"type": "integer"}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        data = inputs["data"]
        assert isinstance(data, bytes)
        return {"n": len(data)}


def build(shape: Shape, size: int, chunk: int) -> tuple[tg.TaskGraph, int]:
    """The graph of ``shape`` and the number of bytes its sink stage ends with."""
    graph = tg.TaskGraph()
    src = graph.add(Source(), inputs={"size": size, "chunk": chunk, "tag": 1})
    if shape == "chain":
        relay = graph.add(Relay())
        graph.connect(src, "data", relay, "data")
        total = graph.add(Total())
        graph.connect(relay, "data", total, "data")
        return graph, size
    if shape == "fan-out":
        for tag in range(2):
            # Distinct keys: two nodes with one key would replace each other's row.
            relay = graph.add(Relay(), inputs={"tag": tag})
            graph.connect(src, "data", relay, "data")
        total = graph.add(Total())
        graph.connect(src, "data", total, "data")
        return graph, size
    other = graph.add(Source(), inputs={"size": size, "chunk": chunk, "tag": 2})
    join = graph.add(Join())
    graph.connect(src, "data", join, "a")
    graph.connect(other, "data", join, "b")
    return graph, 2 * size


class RunScenario:
    """One run of a graph with a fresh memory cache; `check` inspects what it left."""

    def __init__(self, shape: Shape, size: int, chunk: int, budget: int, threshold: int) -> None:
        self.shape: Shape = shape
        self.size = size
        self.chunk = chunk
        self.budget = budget
        self.threshold = threshold
        self.channels: list[tg.ByteSendChannel[BytesLike]] = []
        self.repo = tg.MemoryOutputRepository()

    async def __call__(self) -> None:
        self.channels = []
        self.repo = tg.MemoryOutputRepository()
        graph, _ = build(self.shape, self.size, self.chunk)
        config = tg.RunConfig(
            cache=self.repo,
            binary_high_water_bytes=self.budget,
            reference_threshold_bytes=self.threshold,
        )
        real = tg.open_byte_channel  # the function _stream_processor imported
        channels = self.channels

        def recording(
            high_water_bytes: int,
        ) -> tuple[tg.ByteSendChannel[BytesLike], tg.ByteReceiveChannel[BytesLike]]:
            send, receive = real(high_water_bytes)
            channels.append(send)
            return send, receive

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sp, "open_byte_channel", recording)
            await tg.run_graph(graph, config=config)

    async def check(self) -> None:
        for channel in self.channels:
            stats = channel.statistics()
            assert stats.parked_senders == 0, stats
            assert stats.parked_receivers == 0, stats
            assert stats.peak_buffered_bytes <= self.budget + self.chunk, stats
        # No blob without a row: collecting every unreferenced blob finds none.
        with trio.CancelScope(shield=True):
            report = await self.repo.gc(min_age=0)
        assert report.blobs == 0, report


@pytest.mark.parametrize("shape", ["chain", "fan-out", "fan-in"])
async def test_cancel_at_each_checkpoint(shape: Shape) -> None:
    """S6-49, S7-1 ... S7-6: every (spread) checkpoint of a run, per graph shape."""
    scenario = RunScenario(shape, size=4096, chunk=512, budget=1024, threshold=0)
    report = await cancel_at_each_checkpoint(
        scenario, check=scenario.check, max_points=torture_max_points(20)
    )
    assert report.steps > 10


@settings(max_examples=25)
@given(
    data=st.data(),
    shape=st.sampled_from(["chain", "fan-out", "fan-in"]),
    chunk=st.integers(1, 2048),
    budget=st.integers(1, 4096),
    chunks=st.integers(1, 8),
    threshold=st.sampled_from([0, 1024, 64 * 1024]),
)
async def test_cancellation_matrix(
    data: st.DataObject, shape: Shape, chunk: int, budget: int, chunks: int, threshold: int
) -> None:
    """S6-49: Hypothesis picks the shape, chunk size, budget, size and the moment to cancel."""
    scenario = RunScenario(
        shape, size=chunk * chunks, chunk=chunk, budget=budget, threshold=threshold
    )
    await cancel_at_random_checkpoints(scenario, check=scenario.check, data=data, points=2)


@pytest.mark.parametrize("after_chunks", [0, 1, 5, 40])
async def test_cancel_a_filesystem_run_mid_stream(tmp_path: Path, after_chunks: int) -> None:
    """S6-49: cancel a chain writing to a FsOutputRepository after N chunks were produced: no
    temp file, no blob without a row, nothing parked."""
    repo = tg.FsOutputRepository(tmp_path / "cache")
    try:
        graph, _ = build("chain", size=64 * 64 * 1024, chunk=64 * 1024)
        seen = 0
        scope = trio.CancelScope()

        def listener(event: tg.RunEvent) -> None:
            nonlocal seen
            if isinstance(event.event, tg.BinaryDelta):
                seen += 1
            if seen >= after_chunks:
                scope.cancel()

        with scope:
            await tg.run_graph(
                graph,
                config=tg.RunConfig(cache=repo, binary_high_water_bytes=128 * 1024),
                on_event=listener,
            )
        assert scope.cancelled_caught
        assert not list((tmp_path / "cache" / "blobs").glob("*.tmp"))
        report = await repo.gc(min_age=0)
        assert report.blobs == 0
        assert report.temp_files == 0
    finally:
        await repo.aclose()


async def test_cancel_with_move_on_after_while_parked(autojump_clock: trio.abc.Clock) -> None:
    """S6-49: `move_on_after` around a run whose consumer never reads releases the producer."""
    release = trio.Event()

    class Sleepy(tg.Task):
        type = "test_runner_cancellation.Sleepy"
        input_schema: ClassVar[Mapping[str, object]] = {
            "properties": {"data": {"x-stream": "binary"}}
        }
        output_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {}}}

        async def execute(
            self, inputs: Mapping[str, object], ctx: tg.TaskContext
        ) -> dict[str, object]:
            await release.wait()
            return {"n": 0}  # pragma: no cover

    graph = tg.TaskGraph()
    src = graph.add(Source(), inputs={"size": 1 << 20, "chunk": 1024, "tag": 0})
    sleepy = graph.add(Sleepy())
    graph.connect(src, "data", sleepy, "data")
    with trio.move_on_after(10) as scope:
        await tg.run_graph(graph, config=tg.RunConfig(binary_high_water_bytes=4096))
    assert scope.cancelled_caught
    assert not release.is_set()
