"""
The runner: run_graph / run_task (S6-40 ... S6-50), with the seed's cases.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest
import trio
import trio.testing

import trio_taskgraph as tg
from tests.graph_tasks import Relay
from trio_taskgraph import BytesLike, wire

KIB = 1024
MIB = 1024 * KIB


class Produce(tg.Task):
    """Streams ``size`` bytes in ``chunk``-sized pieces at its binary port ``data``."""

    type = "test_runner.Produce"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {"type": "integer"}, "chunk": {"type": "integer"}},
        "required": ["size"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {
            "data": {"x-stream": "binary", "format": "binary"},
            "log": {"type": "string", "x-stream": "append"},
        }
    }
    cacheable = True
    runs = 0

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        type(self).runs += 1
        size = inputs["size"]
        chunk = inputs.get("chunk", 64 * KIB)
        assert isinstance(size, int)
        assert isinstance(chunk, int)
        ctx.phase("produce")
        sent = 0
        while sent < size:
            n = min(chunk, size - sent)
            yield tg.BinaryDelta("data", bytes([sent // chunk % 251]) * n)
            sent += n
        yield tg.TextDelta("log", "made ")
        yield tg.TextDelta("log", f"{size}")


def expected(size: int, chunk: int = 64 * KIB) -> bytes:
    out = bytearray()
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        out += bytes([sent // chunk % 251]) * n
        sent += n
    return bytes(out)


class Image(tg.Task):
    """A blob-format binary port, streamed; Finish may override it."""

    type = "test_runner.Image"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"parts": {"type": "array"}, "explicit": {}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"image": {"x-stream": "binary", "contentMediaType": "image/png"}}
    }
    cacheable = True

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        parts = inputs.get("parts", [])
        assert isinstance(parts, list)
        for part in parts:
            yield tg.BinaryDelta("image", part)
        if "explicit" in inputs:
            yield tg.Finish({"image": inputs["explicit"]})


class Measure(tg.Task):
    """A materialising consumer: gets the whole value."""

    type = "test_runner.Measure"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {}},
        "required": ["data"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {"type": "integer"}, "head": {}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        data = inputs["data"]
        raw = data.data if isinstance(data, tg.Blob) else data
        assert isinstance(raw, bytes), type(raw)
        return {"size": len(raw), "head": raw[:4]}


class Count(tg.Task):
    """A streaming consumer that counts bytes."""

    type = "test_runner.Count"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary"}},
        "required": ["data"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {"type": "integer"}, "md": {}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        stream = inputs["data"]
        assert isinstance(stream, tg.BinaryInputStream)
        size = 0
        joined = bytearray()
        async for chunk in stream:
            size += len(chunk)
            joined += chunk
        return {"size": size, "md": bytes(joined)}


def into_count(
    source: tg.Task, inputs: Mapping[str, object], port: str = "data"
) -> tuple[tg.TaskGraph, str, str]:
    """A graph of ``source`` streaming its ``port`` into a `Count`: the graph and both ids."""
    graph = tg.TaskGraph()
    s = graph.add(source, inputs=inputs)
    c = graph.add(Count())
    graph.connect(s, port, c, "data")
    return graph, s, c


class SlowStats(tg.Task):
    """A streaming consumer that lets its edge fill before every receive, noting its stats."""

    type = "test_runner.SlowStats"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary"}},
        "required": ["data"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {}, "max": {}, "last": {}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        stream = inputs["data"]
        assert isinstance(stream, tg.BinaryInputStream)
        size = most = 0
        while True:
            await trio.testing.wait_all_tasks_blocked()
            stats = stream.statistics()
            most = max(most, stats.buffered_bytes)
            try:
                chunk = await stream.receive()
            except trio.EndOfChannel:
                break
            size += len(chunk)
        last = stream.statistics()
        return {
            "size": size,
            "max": most,
            "last": [last.buffered_bytes, last.peak_buffered_bytes, last.high_water_bytes],
        }


class Boom(tg.Task):
    type = "test_runner.Boom"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"data": {"x-stream": "binary"}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        raise ValueError("boom")


class Returns(tg.Task):
    """An ``execute`` task returning a binary value."""

    type = "test_runner.Returns"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"size": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}, "note": {}}
    }
    cacheable = True

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        size = inputs["size"]
        assert isinstance(size, int)
        return {"data": b"r" * size, "note": {"$ref": "not a ref"}}


# --- accumulation and plain runs ----------------------------------------------------------


async def test_run_task_accumulates_without_cache() -> None:
    """S6-3, S6-5, S6-40: text concatenates, binary materialises per format."""
    out = await tg.run_task(Produce(), {"size": 200_000, "chunk": 70_000})
    assert out["data"] == expected(200_000, 70_000)
    assert out["log"] == "made 200000"


async def test_explicit_finish_wins_over_chunks() -> None:
    """S6-6 (seed: explicit-finish-payload precedence): the Finish value wins, as a Blob."""
    out = await tg.run_task(Image(), {"parts": [b"aa", b"bb"], "explicit": b"final"})
    assert out["image"] == tg.Blob(b"final", "image/png")
    out = await tg.run_task(Image(), {"parts": [b"aa", b"bb"]})
    assert out["image"] == tg.Blob(b"aabb", "image/png")


async def test_explicit_finish_wins_with_a_sink_and_deletes_the_streamed_blob() -> None:
    """S6-6, S6-26: the blob streamed for an overridden port is deleted."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=0)
    out = await tg.run_task(Image(), {"parts": [b"aa"], "explicit": b"final!"}, config=config)
    ref = out["image"]
    assert isinstance(ref, tg.CacheRef)
    assert await repo.get_output_by_ref(ref) == b"final!"
    assert (await repo.stats()).blobs == 1  # the streamed b"aa" blob is gone


# --- refs, thresholds, rows ------------------------------------------------------------------


async def test_force_ref_with_threshold_zero() -> None:
    """S6-19, S6-42 (seed: force-ref): threshold 0 keeps every binary output a ref."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=0)
    out = await tg.run_task(Produce(), {"size": 10}, config=config)
    ref = out["data"]
    assert isinstance(ref, tg.CacheRef)
    assert ref.size == 10
    assert await repo.get_output_by_ref(ref) == expected(10)
    assert out["log"] == "made 10"


@pytest.mark.parametrize(("fmt_task", "kind"), [(Produce, bytes), (Image, tg.Blob)])
async def test_threshold_hydration_blob_and_binary(fmt_task: type[tg.Task], kind: type) -> None:
    """S6-19, S6-43 (seed: symmetric rehydration): below the threshold a ref hydrates back
    inline per the port's format (blob -> Blob, binary -> bytes); at or above it stays a ref."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=1000)
    small_inputs: dict[str, object] = (
        {"size": 999} if fmt_task is Produce else {"parts": [b"x" * 999]}
    )
    big_inputs: dict[str, object] = (
        {"size": 1000} if fmt_task is Produce else {"parts": [b"x" * 1000]}
    )
    small = await tg.run_task(fmt_task(), small_inputs, config=config)
    port = "data" if fmt_task is Produce else "image"
    assert isinstance(small[port], kind)
    big = await tg.run_task(fmt_task(), big_inputs, config=config)
    assert isinstance(big[port], tg.CacheRef)
    # The row saved holds the ref in both cases (S6-21).
    row = await repo.get_output(fmt_task.type, small_inputs)
    assert row is not None
    assert isinstance(row[port], tg.CacheRef)


async def test_saved_row_stays_small_and_survives_the_wire() -> None:
    """S6-21, S6-43 (seed: saved-row size; cross-process round trip): a 10 MiB output
    leaves a row under 1 KiB, and the row survives wire.packb/unpackb with its ref branded."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo)
    out = await tg.run_task(Produce(), {"size": 10 * MIB, "chunk": MIB}, config=config)
    row = await repo.get_output(Produce.type, {"size": 10 * MIB, "chunk": MIB})
    assert row is not None
    packed = wire.packb(row)
    assert len(packed) < 1024
    again = wire.unpackb(packed)
    assert again == row
    assert isinstance(again, dict)
    assert tg.is_cache_ref(again["data"])
    assert out["data"] == row["data"]


async def test_dollar_ref_dict_at_another_port_is_data() -> None:
    """S6-20: a dict with a "$ref" key at a non-binary port is data; big inline values are
    stored as refs when a sink would exist (S6-19)."""
    repo = tg.MemoryOutputRepository()
    out = await tg.run_task(
        Returns(), {"size": 100}, config=tg.RunConfig(cache=repo, reference_threshold_bytes=50)
    )
    assert out["note"] == {"$ref": "not a ref"}
    assert isinstance(out["data"], tg.CacheRef)
    assert await repo.get_output_by_ref(out["data"]) == b"r" * 100


# --- graphs: streaming edges, tee, fan-out ----------------------------------------------------


async def test_tee_gives_edges_bytes_and_the_row_a_ref() -> None:
    """S6-42, S6-18 (seed: tee for the graph + materialising consumer)."""
    repo = tg.MemoryOutputRepository()
    graph = tg.TaskGraph()
    p = graph.add(Produce(), inputs={"size": 300_000})
    m = graph.add(Measure())
    graph.connect(p, "data", m, "data")
    outs = await tg.run_graph(graph, config=tg.RunConfig(cache=repo))
    assert outs[m] == {"size": 300_000, "head": expected(4)}
    assert isinstance(outs[p]["data"], tg.CacheRef)
    row = await repo.get_output(Produce.type, {"size": 300_000})
    assert row is not None
    assert isinstance(row["data"], tg.CacheRef)


async def test_fan_out_streams_the_same_bytes_to_every_consumer() -> None:
    """S6-41, S6-16: every consumer gets the whole ordered stream, under a small budget."""
    graph = tg.TaskGraph()
    p = graph.add(Produce(), inputs={"size": 100_000, "chunk": 3000})
    consumers = [graph.add(Count()) for _ in range(3)]
    for c in consumers:
        graph.connect(p, "data", c, "data")
    outs = await tg.run_graph(graph, config=tg.RunConfig(binary_high_water_bytes=8000))
    for c in consumers:
        assert outs[c] == {"size": 100_000, "md": expected(100_000, 3000)}


async def test_binary_input_stream_reports_its_own_edge() -> None:
    """
    S6-55, S2-2: each fan-out consumer's `BinaryInputStream.statistics()` shows its own edge
    filling to the budget, never past budget + one chunk, and empty at the end.
    """
    graph = tg.TaskGraph()
    p = graph.add(Produce(), inputs={"size": 100_000, "chunk": 3000})
    consumers = [graph.add(SlowStats()) for _ in range(2)]
    for c in consumers:
        graph.connect(p, "data", c, "data")
    outs = await tg.run_graph(graph, config=tg.RunConfig(binary_high_water_bytes=8000))
    for c in consumers:
        out = outs[c]
        assert out["size"] == 100_000
        last, most = out["last"], out["max"]
        assert isinstance(last, list)
        assert isinstance(most, int)
        buffered, peak, high_water = last
        assert (buffered, high_water) == (0, 8000)
        # The consumer waited for the producer to park before each receive: the edge was full.
        assert 8000 <= most <= peak <= 8000 + 3000


async def test_chain_streams_under_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """S6-41, S6-42: produce -> pass-through -> cache sink with a 256 KiB budget: no channel
    holds more than the budget plus one chunk (the 1 GiB / 4 MiB case is bench_pipeline);
    both tasks have one sink port, which the sink pulls without a channel."""
    import trio_taskgraph._stream_processor as sp

    channels: list[tg.ByteSendChannel[BytesLike]] = []
    real = tg.open_byte_channel  # the function _stream_processor imported

    def recording(
        high_water_bytes: int,
    ) -> tuple[tg.ByteSendChannel[BytesLike], tg.ByteReceiveChannel[BytesLike]]:
        send, receive = real(high_water_bytes)
        channels.append(send)
        return send, receive

    monkeypatch.setattr(sp, "open_byte_channel", recording)
    repo = tg.FsOutputRepository(tmp_path / "cache")
    try:
        graph = tg.TaskGraph()
        p = graph.add(Produce(), inputs={"size": 16 * MIB, "chunk": 64 * KIB})
        t = graph.add(Relay())
        graph.connect(p, "data", t, "data")
        budget = 256 * KIB
        config = tg.RunConfig(cache=repo, binary_high_water_bytes=budget)
        outs = await tg.run_graph(graph, config=config)
        ref = outs[t]["data"]
        assert isinstance(ref, tg.CacheRef)
        assert ref.size == 16 * MIB
        assert await repo.get_output_by_ref(ref) == expected(16 * MIB)
        assert channels  # the edge; the single sink port pulls without a channel
        for ch in channels:
            stats = ch.statistics()
            assert stats.peak_buffered_bytes <= budget + 64 * KIB
            assert stats.parked_senders == 0
            assert stats.parked_receivers == 0
    finally:
        await repo.aclose()


async def test_execute_result_streams_to_a_streaming_consumer() -> None:
    """S6-41: an explicit binary value (an execute result) reaches stream edges as chunks."""
    graph, _, c = into_count(Returns(), {"size": 200_000})
    outs = await tg.run_graph(graph, config=tg.RunConfig(binary_high_water_bytes=4096))
    assert outs[c]["size"] == 200_000


# --- cache hits ------------------------------------------------------------------------------


async def test_cache_hit_skips_execution_and_replays_under_budget() -> None:
    """S6-45, S6-24 (seed M-6): a hit skips the task; refs replay as chunks no bigger than the
    consumer's budget; the hit returns what the fresh run returned (S6-21)."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, binary_high_water_bytes=10_000)

    def build() -> tg.TaskGraph:
        return into_count(Produce(), {"size": 500_000})[0]

    graph = build()
    Produce.runs = 0
    first = await tg.run_graph(graph, config=config)
    assert Produce.runs == 1
    events: list[tg.RunEvent] = []
    graph = build()
    second = await tg.run_graph(graph, config=config, on_event=events.append)
    assert Produce.runs == 1
    assert second == first
    replayed = [e.event for e in events if isinstance(e.event, tg.BinaryDelta)]
    assert replayed
    assert max(d.size for d in replayed) <= 10_000
    assert any(isinstance(e.event, tg.TaskStatus) and e.event.state == "cached" for e in events)


async def test_dangling_ref_turns_the_hit_into_a_miss() -> None:
    """S6-23, S6-45 (seed: dangling-ref best effort): the task runs again, the row is rewritten."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=0)
    Produce.runs = 0
    first = await tg.run_task(Produce(), {"size": 1000}, config=config)
    ref = first["data"]
    assert isinstance(ref, tg.CacheRef)
    await repo.delete_output_by_ref(ref)
    second = await tg.run_task(Produce(), {"size": 1000}, config=config)
    assert Produce.runs == 2
    assert second["data"] != ref
    row = await repo.get_output(Produce.type, {"size": 1000})
    assert row is not None
    assert row["data"] == second["data"]
    # And now it hits.
    third = await tg.run_task(Produce(), {"size": 1000}, config=config)
    assert Produce.runs == 2
    assert third == second


async def test_hit_hydrates_for_materialising_consumers() -> None:
    """S6-24: materialising consumers get the value, never the ref, whatever the threshold."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=0)
    await tg.run_task(Produce(), {"size": 5000}, config=config)
    graph = tg.TaskGraph()
    p = graph.add(Produce(), inputs={"size": 5000})
    m = graph.add(Measure())
    graph.connect(p, "data", m, "data")
    Produce.runs = 0
    outs = await tg.run_graph(graph, config=config)
    assert Produce.runs == 0
    assert outs[m]["size"] == 5000


# --- refs at inputs --------------------------------------------------------------------------


async def test_input_refs_are_inlined_before_validation_and_keying() -> None:
    """S6-25, S6-46: a ref at an input is read and inlined per the port's format."""
    repo = tg.MemoryOutputRepository()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"hello"

    ref = await repo.save_output_stream("x", {}, "p", chunks())
    out = await tg.run_task(Measure(), {"data": ref}, config=tg.RunConfig(cache=repo))
    assert out == {"size": 5, "head": b"hell"}


async def test_unresolvable_input_ref_names_the_port() -> None:
    """S6-25: a ref no repository resolves fails the task naming the port."""
    repo = tg.MemoryOutputRepository()
    other = tg.MemoryOutputRepository()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"hello"

    ref = await other.save_output_stream("x", {}, "p", chunks())
    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(Measure(), {"data": ref}, config=tg.RunConfig(cache=repo))
    assert isinstance(info.value.__cause__, tg.DanglingRefError)
    assert "'data'" in str(info.value.__cause__)


async def test_run_private_first_then_backing() -> None:
    """S6-25: refs resolve through the run-private area, then the shared backing."""
    backing = tg.MemoryOutputRepository()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"shared"

    ref = await backing.save_output_stream("x", {}, "p", chunks())
    private = tg.RunPrivateRepository(backing, "run-1")
    out = await tg.run_task(Measure(), {"data": ref}, config=tg.RunConfig(cache=private))
    assert out["size"] == 6


# --- errors ----------------------------------------------------------------------------------


async def test_task_error_names_type_and_node_and_chains_the_cause() -> None:
    """S6-48: TaskFailedError names the task type and node id; the producer is released."""
    graph = tg.TaskGraph()
    p = graph.add(Produce(), inputs={"size": 10 * MIB})
    b = graph.add(Boom())
    graph.connect(p, "data", b, "data")
    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_graph(graph, config=tg.RunConfig(binary_high_water_bytes=1024))
    assert info.value.task_type == Boom.type
    assert info.value.node_id == b
    assert isinstance(info.value.__cause__, ValueError)


async def test_stream_protocol_error_fails_the_task() -> None:
    """S6-48, S6-2: a protocol error is the cause of a TaskFailedError."""

    class Bad(tg.Task):
        type = "test_runner.Bad"
        output_schema: ClassVar[Mapping[str, object]] = {
            "properties": {"t": {"x-stream": "append"}}
        }

        async def execute_stream(
            self, inputs: Mapping[str, object], ctx: tg.TaskContext
        ) -> AsyncIterator[tg.StreamEvent]:
            yield tg.BinaryDelta("t", b"x")

    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(Bad(), {})
    assert isinstance(info.value.__cause__, tg.StreamProtocolError)


async def test_execute_returning_a_non_mapping_fails_the_task() -> None:
    """S6-9, S6-48: ``execute`` must return a mapping; anything else names what it got."""

    class ReturnsList(tg.Task):
        type = "test_runner.ReturnsList"
        output_schema: ClassVar[Mapping[str, object]] = {"properties": {"v": {}}}

        async def execute(
            self, inputs: Mapping[str, object], ctx: tg.TaskContext
        ) -> dict[str, object]:
            return [("v", 1)]  # type: ignore[return-value]

    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(ReturnsList(), {})
    assert info.value.task_type == ReturnsList.type
    assert isinstance(info.value.__cause__, tg.StreamProtocolError)
    assert "mapping, not list" in str(info.value.__cause__)


class OverMemory:
    """A memory repository behind a wrapper: subclasses override the methods they change."""

    def __init__(self) -> None:
        self.inner = tg.MemoryOutputRepository()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class FailingSaveRepo(OverMemory):
    """A memory repository whose save_output fails (after blobs were streamed)."""

    async def save_output(self, task_type: str, inputs: object, output: object) -> None:
        await trio.lowlevel.checkpoint()
        raise tg.RepositoryError("disk full")


async def test_failed_row_save_deletes_streamed_blobs() -> None:
    """S6-47, S6-26 (seed: orphan cleanup when the row commit fails)."""
    repo = FailingSaveRepo()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=0)
    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(Produce(), {"size": 100_000}, config=config)
    assert isinstance(info.value.__cause__, tg.RepositoryError)
    assert (await repo.inner.stats()).blobs == 0


async def test_listener_sees_status_events_and_progress_in_order() -> None:
    """S6-50: statuses, stream events and phases reach the listener in order."""
    events: list[tg.RunEvent] = []
    await tg.run_task(Produce(), {"size": 3, "chunk": 1}, on_event=events.append)
    kinds = [type(e.event).__name__ for e in events]
    assert kinds[0] == "TaskStatus"
    assert kinds[-1] == "TaskStatus"
    assert "Phase" in kinds
    assert kinds.count("BinaryDelta") == 3
    assert all(e.node_id == "n1" and e.task_type == Produce.type for e in events)
    states = [e.event.state for e in events if isinstance(e.event, tg.TaskStatus)]
    assert states == ["started", "completed"]


class Unkeyed(tg.Task):
    """A non-cacheable producer (its bytes can't be named by a key)."""

    type = "test_runner.Unkeyed"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"size": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        size = inputs["size"]
        assert isinstance(size, int)
        for start in range(0, size, 64 * KIB):
            yield tg.BinaryDelta("data", b"u" * min(64 * KIB, size - start))


class Transform(tg.Task):
    """A non-cacheable streaming transform (upper-cases ASCII bytes as they pass)."""

    type = "test_runner.Transform"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"data": {"x-stream": "binary"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        stream = inputs["data"]
        assert isinstance(stream, tg.BinaryInputStream)
        async for chunk in stream:
            yield tg.BinaryDelta("data", bytes(chunk).upper())


async def test_three_tasks_produce_transform_cache_sink_with_a_4_mib_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """S6-41, S6-42, S6-51: produce -> transform -> cache sink (FsOutputRepository) with a
    4 MiB budget. 64 MiB here to keep the suite fast; bench/bench_pipeline.py moves 1 GiB.
    No channel holds more than the budget plus one chunk, the non-cacheable producer keeps
    nothing (its port only feeds a stream), and the transform's row is saved under a
    run-unique key (its input stream can't be named), so it never hits but keeps its blob."""
    import trio_taskgraph._stream_processor as sp

    channels: list[tg.ByteSendChannel[BytesLike]] = []
    real = tg.open_byte_channel  # the function _stream_processor imported

    def recording(
        high_water_bytes: int,
    ) -> tuple[tg.ByteSendChannel[BytesLike], tg.ByteReceiveChannel[BytesLike]]:
        send, receive = real(high_water_bytes)
        channels.append(send)
        return send, receive

    monkeypatch.setattr(sp, "open_byte_channel", recording)
    size = 64 * MIB
    budget = 4 * MIB
    repo = tg.FsOutputRepository(tmp_path / "cache")
    try:
        for _run in range(2):
            graph = tg.TaskGraph()
            p = graph.add(Unkeyed(), inputs={"size": size})
            x = graph.add(Transform())
            t = graph.add(Relay())
            graph.connect(p, "data", x, "data")
            graph.connect(x, "data", t, "data")
            outs = await tg.run_graph(
                graph, config=tg.RunConfig(cache=repo, binary_high_water_bytes=budget)
            )
            assert outs[p] == {}  # S6-51: nothing kept for a stream-only port
            assert outs[x] == {}
            ref = outs[t]["data"]
            assert isinstance(ref, tg.CacheRef)
            assert ref.size == size
        assert isinstance(ref, tg.CacheRef)  # (narrowed inside the loop only)
        async with repo.open_output_stream_by_ref(ref) as chunks:
            async for chunk in chunks:
                assert chunk == b"U" * len(chunk)
        for ch in channels:
            stats = ch.statistics()
            assert stats.peak_buffered_bytes <= budget + 64 * KIB
            assert stats.parked_senders == 0
        stats_after = await repo.stats()
        assert stats_after.rows == 2  # two runs, two run-unique rows, no hit
        assert stats_after.blobs == 2
        assert (await repo.gc(min_age=0)).blobs == 0  # every blob has its row
    finally:
        await repo.aclose()


async def test_keyed_stream_source_makes_the_consumer_hit() -> None:
    """S6-45: a consumer of a keyed (cacheable) stream source is keyed by the source's
    provenance, so a second run hits both and neither task runs."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=0)

    def build() -> tuple[tg.TaskGraph, str]:
        graph = tg.TaskGraph()
        p = graph.add(Produce(), inputs={"size": 70_000})
        t = graph.add(Relay())
        graph.connect(p, "data", t, "data")
        return graph, t

    graph, t = build()
    first = await tg.run_graph(graph, config=config)
    Produce.runs = 0
    events: list[tg.RunEvent] = []
    graph, t = build()
    second = await tg.run_graph(graph, config=config, on_event=events.append)
    assert Produce.runs == 0
    assert second == first
    cached = {e.node_id for e in events if e.event == tg.TaskStatus(state="cached")}
    assert cached == {"n1", "n2"}
    ref = second[t]["data"]
    assert isinstance(ref, tg.CacheRef)
    assert await repo.get_output_by_ref(ref) == expected(70_000)


async def test_checkpoints_and_bad_arguments() -> None:
    """S6-40: run_graph is a checkpoint; wrong argument types are refused."""
    with trio.testing.assert_checkpoints():
        await tg.run_task(Measure(), {"data": b"abc"})
    with pytest.raises(TypeError):
        await tg.run_graph("not a graph")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await tg.run_graph(tg.TaskGraph(), config="x")  # type: ignore[arg-type]
    graph = tg.TaskGraph()
    graph.add(Measure())
    with pytest.raises(tg.PortSchemaError, match="required input 'data'"):
        await tg.run_graph(graph)


class Pair(tg.Task):
    """Takes a stream and a materialised value."""

    type = "test_runner.Pair"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary"}, "size": {"type": "integer"}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"ok": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        return {"ok": True}  # pragma: no cover - never started


async def test_a_graph_that_would_stall_is_refused_before_anything_runs() -> None:
    """S6-53: P streams into C, but C also waits for M to finish, and M waits for P: P
    would park forever on C's budget. Refused with a PortSchemaError naming the edge."""
    graph = tg.TaskGraph()
    p = graph.add(Produce(), inputs={"size": 10 * MIB})
    m = graph.add(Count())
    c = graph.add(Pair())
    graph.connect(p, "data", m, "data")
    graph.connect(m, "size", c, "size")
    graph.connect(p, "data", c, "data")
    Produce.runs = 0
    with pytest.raises(tg.PortSchemaError, match=rf"{p}\.data -> {c}\.data"):
        await tg.run_graph(graph)
    assert Produce.runs == 0


class FailingRowSave:
    """Wraps a repository; its save_output fails after the blobs were streamed."""

    def __init__(self, inner: tg.OutputRepository) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def save_output(self, task_type: str, inputs: object, output: object) -> None:
        await trio.lowlevel.checkpoint()
        raise tg.RepositoryError("row commit failed")


async def test_orphan_cleanup_through_a_run_private_repository(tmp_path: Path) -> None:
    """S6-47 (seed late HIGH 1): with a run-private cache over a filesystem backing, a
    failed row commit deletes the streamed blob on disk (delete_output_by_ref is forwarded)."""
    backing = tg.FsOutputRepository(tmp_path / "cache")
    try:
        private = tg.RunPrivateRepository(backing, "run-7")
        config = tg.RunConfig(cache=FailingRowSave(private), reference_threshold_bytes=0)
        with pytest.raises(tg.TaskFailedError, match="row commit failed"):
            await tg.run_task(Produce(), {"size": 300_000}, config=config)
        assert (await private.stats()).blobs == 0
        assert not list((tmp_path / "cache" / "blobs").glob("*.blob"))
        assert not list((tmp_path / "cache" / "blobs").glob("*.tmp"))
    finally:
        await backing.aclose()


class NoStreaming(OverMemory):
    """A repository without streaming saves (rows only, like a JSON-row backing)."""

    def supports_streaming(self) -> bool:
        return False


async def test_non_streaming_cache_round_trips_inline_binary() -> None:
    """S6-22, S6-45 (seed H-1): on a backing that can't stream, the row holds the inline
    Blob, never "{}", and a hit returns the same bytes and MIME type."""
    repo = NoStreaming()
    config = tg.RunConfig(cache=repo)
    first = await tg.run_task(Image(), {"parts": [b"\x89PNG", b"data"]}, config=config)
    assert first["image"] == tg.Blob(b"\x89PNGdata", "image/png")
    row = await repo.inner.get_output(Image.type, {"parts": [b"\x89PNG", b"data"]})
    assert row == {"image": tg.Blob(b"\x89PNGdata", "image/png")}
    events: list[tg.RunEvent] = []
    second = await tg.run_task(
        Image(), {"parts": [b"\x89PNG", b"data"]}, config=config, on_event=events.append
    )
    assert second == first
    assert tg.TaskStatus(state="cached") in [e.event for e in events]


class SizelessRefs(OverMemory):
    """A repository whose refs carry no size (a third-party sink that never sets it)."""

    async def save_output_stream(
        self,
        task_type: str,
        inputs: object,
        port: str,
        chunks: AsyncIterable[BytesLike],
        *,
        mime: str | None = None,
    ) -> tg.CacheRef:
        ref = await self.inner.save_output_stream(task_type, inputs, port, chunks, mime=mime)
        return tg.make_cache_ref(ref.ref, mime=ref.mime)


async def test_ref_of_unknown_size_is_never_hydrated_blindly() -> None:
    """S6-19 (seed L-1): a ref without a size stays a ref, however small the blob."""
    out = await tg.run_task(Produce(), {"size": 10}, config=tg.RunConfig(cache=SizelessRefs()))
    assert isinstance(out["data"], tg.CacheRef)
    assert out["data"].size is None


async def test_a_listener_that_raises_fails_the_node() -> None:
    """S6-50: an exception from on_event fails the node it was receiving events for."""

    def listener(event: tg.RunEvent) -> None:
        if isinstance(event.event, tg.BinaryDelta):
            raise RuntimeError("listener broke")

    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(Produce(), {"size": 10}, on_event=listener)
    assert isinstance(info.value.__cause__, RuntimeError)


class RefusingSink(OverMemory):
    """A repository whose streaming save fails before reading a byte (EACCES)."""

    async def save_output_stream(
        self, task_type: str, inputs: object, port: str, chunks: object, *, mime: object = None
    ) -> tg.CacheRef:
        await trio.lowlevel.checkpoint()
        raise tg.RepositoryError("EACCES: cannot open the temp file")


async def test_sink_failing_before_reading_fails_the_task_promptly() -> None:
    """S6-44 (seed late HIGH 2), through the runner: 10 MiB against a 1 MiB budget into a
    sink that never reads; the task fails with the sink's error instead of parking."""
    config = tg.RunConfig(cache=RefusingSink(), binary_high_water_bytes=MIB)
    with trio.fail_after(10), pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(Produce(), {"size": 10 * MIB}, config=config)
    assert info.value.node_id == "n1"
    assert isinstance(info.value.__cause__, tg.RepositoryError)
    assert "EACCES" in str(info.value.__cause__)


async def test_a_value_at_a_streamed_input_arrives_as_a_stream() -> None:
    """S6-54: run_task with bytes (or a Blob, or a ref) at a streamed binary input: the task
    still receives a BinaryInputStream, and the value (not the stream) is keyed."""
    repo = tg.MemoryOutputRepository()
    config = tg.RunConfig(cache=repo, reference_threshold_bytes=0, binary_high_water_bytes=1000)
    data = bytes(range(256)) * 20
    out = await tg.run_task(Relay(), {"data": data}, config=config)
    ref = out["data"]
    assert isinstance(ref, tg.CacheRef)
    assert await repo.get_output_by_ref(ref) == data
    events: list[tg.RunEvent] = []
    again = await tg.run_task(Relay(), {"data": data}, config=config, on_event=events.append)
    assert again == out
    assert tg.TaskStatus(state="cached") in [e.event for e in events]
    blob = await tg.run_task(Relay(), {"data": tg.Blob(data)}, config=config)
    blob_ref = blob["data"]
    assert isinstance(blob_ref, tg.CacheRef)
    assert await repo.get_output_by_ref(blob_ref) == data
    counted = await tg.run_task(Count(), {"data": ref}, config=config)
    assert counted == {"size": len(data), "md": data}


async def test_a_listener_that_raises_on_failure_does_not_mask_it() -> None:
    """S6-50, S6-48: a listener raising on the "failed" status leaves the TaskFailedError."""

    def listener(event: tg.RunEvent) -> None:
        if isinstance(event.event, tg.TaskStatus) and event.event.state != "started":
            raise RuntimeError("listener broke on the status")

    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(Boom(), {}, on_event=listener)
    assert isinstance(info.value.__cause__, ValueError)


def test_readme_run_a_graph_example(capsys: pytest.CaptureFixture[str]) -> None:
    """S6-40, S6-42, S6-50: the README's "Run a graph" example runs as written."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    section = readme.read_text().split("## Run a graph", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, str(readme), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.split("\n")
    assert "n1 readme.Render completed" in printed
    assert "n2 readme.Measure completed" in printed


class HandsARef(tg.Task):
    """Returns a ref it was given at its binary port (an explicit CacheRef value)."""

    type = "test_runner.HandsARef"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"ref": {"type": "string"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }
    refs: dict[str, tg.CacheRef] = {}  # noqa: RUF012 - a test's shared table

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        name = inputs["ref"]
        assert isinstance(name, str)
        return {"data": type(self).refs[name]}


async def test_an_explicit_ref_replays_to_streaming_consumers() -> None:
    """S6-41, S6-24: a ref given as a task's binary value reaches its streaming consumers as
    chunks read from the run's cache, within their budget."""
    repo = tg.MemoryOutputRepository()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"q" * 5000

    HandsARef.refs["a"] = await repo.save_output_stream("x", {}, "p", chunks())
    graph, h, c = into_count(HandsARef(), {"ref": "a"})
    outs = await tg.run_graph(graph, config=tg.RunConfig(cache=repo, binary_high_water_bytes=700))
    assert outs[c] == {"size": 5000, "md": b"q" * 5000}
    assert outs[h]["data"] == b"q" * 5000  # below the threshold: hydrated (S6-19)


class NoStreamingReads(NoStreaming):
    """Neither streaming saves nor streaming reads."""

    def supports_streaming_reads(self) -> bool:
        return False


async def test_hit_with_inline_values_and_no_streaming_reads_replays_to_consumers() -> None:
    """S6-24, S6-45: on a cache that stores inline values and can't stream reads, a hit still
    replays the inline bytes to streaming consumers in budget-sized chunks."""
    repo = NoStreamingReads()
    config = tg.RunConfig(cache=repo, binary_high_water_bytes=1000)

    def build() -> tuple[tg.TaskGraph, str]:
        graph, _, c = into_count(Produce(), {"size": 4500, "chunk": 1000})
        return graph, c

    graph, c = build()
    first = await tg.run_graph(graph, config=config)
    Produce.runs = 0
    events: list[tg.RunEvent] = []
    graph, c = build()
    second = await tg.run_graph(graph, config=config, on_event=events.append)
    assert Produce.runs == 0
    assert second[c] == first[c] == {"size": 4500, "md": expected(4500, 1000)}
    sizes = [e.event.size for e in events if isinstance(e.event, tg.BinaryDelta)]
    assert sizes == [1000, 1000, 1000, 1000, 500]


async def test_hit_replays_an_inline_blob_to_consumers() -> None:
    """S6-24, S6-45: a cached row holding an inline `Blob` (a blob-format port on a cache
    that can't stream) replays the Blob's bytes, not the Blob, to streaming consumers."""
    repo = NoStreamingReads()
    config = tg.RunConfig(cache=repo, binary_high_water_bytes=1000)
    parts = [b"\x89PNG", b"z" * 2500]

    def build() -> tuple[tg.TaskGraph, str]:
        graph, _, c = into_count(Image(), {"parts": parts}, "image")
        return graph, c

    graph, c = build()
    first = await tg.run_graph(graph, config=config)
    row = await repo.inner.get_output(Image.type, {"parts": parts})
    assert row == {"image": tg.Blob(b"".join(parts), "image/png")}
    events: list[tg.RunEvent] = []
    graph, c = build()
    second = await tg.run_graph(graph, config=config, on_event=events.append)
    assert tg.TaskStatus(state="cached") in [e.event for e in events]
    assert second[c] == first[c] == {"size": 2504, "md": b"".join(parts)}
    sizes = [e.event.size for e in events if isinstance(e.event, tg.BinaryDelta)]
    assert sizes == [1000, 1000, 504]


class StreamsWritesOnly(OverMemory):
    """Streaming saves, but reads only whole blobs (no streaming reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.whole_reads = 0

    def supports_streaming_reads(self) -> bool:
        return False

    async def get_output_by_ref(self, ref: tg.CacheRef) -> bytes:
        self.whole_reads += 1
        return await self.inner.get_output_by_ref(ref)


async def test_hit_replays_a_ref_read_whole_when_the_cache_cannot_stream_reads() -> None:
    """S6-24: a hit whose row holds a ref, on a cache without streaming reads, reads the blob
    whole and replays it to consumers in budget-sized chunks."""
    repo = StreamsWritesOnly()
    config = tg.RunConfig(cache=repo, binary_high_water_bytes=1000, reference_threshold_bytes=0)

    def build() -> tuple[tg.TaskGraph, str]:
        graph, _, c = into_count(Produce(), {"size": 2100, "chunk": 700})
        return graph, c

    graph, c = build()
    first = await tg.run_graph(graph, config=config)
    Produce.runs = 0
    repo.whole_reads = 0
    events: list[tg.RunEvent] = []
    graph, c = build()
    second = await tg.run_graph(graph, config=config, on_event=events.append)
    assert Produce.runs == 0
    assert repo.whole_reads >= 1
    assert second[c] == first[c] == {"size": 2100, "md": expected(2100, 700)}
    sizes = [e.event.size for e in events if isinstance(e.event, tg.BinaryDelta)]
    assert sizes == [1000, 1000, 100]


async def test_a_task_reporting_stream_error_fails_with_its_error_chained() -> None:
    """S6-2, S6-48: a task that yields `StreamError` fails: a TaskFailedError whose cause is a
    StreamProtocolError chaining the task's own exception."""

    class ReportsError(tg.Task):
        type = "test_runner.ReportsError"
        output_schema: ClassVar[Mapping[str, object]] = {
            "properties": {"t": {"x-stream": "append"}}
        }

        async def execute_stream(
            self, inputs: Mapping[str, object], ctx: tg.TaskContext
        ) -> AsyncIterator[tg.StreamEvent]:
            yield tg.TextDelta("t", "partial")
            yield tg.StreamError(LookupError("the model is gone"))

    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(ReportsError(), {})
    cause = info.value.__cause__
    assert isinstance(cause, tg.StreamProtocolError)
    assert isinstance(cause.__cause__, LookupError)
    assert str(cause.__cause__) == "the model is gone"


async def test_explicit_blob_with_no_chunks_is_replayed_to_stream_consumers() -> None:
    """S6-6, S6-24: a Finish value at a port that streamed nothing reaches its streaming
    consumers, as the Blob's bytes in budget-sized chunks."""
    explicit = tg.Blob(b"e" * 2500, "image/png")
    graph, i, c = into_count(Image(), {"parts": [], "explicit": explicit}, "image")
    outs = await tg.run_graph(graph, config=tg.RunConfig(binary_high_water_bytes=1000))
    assert outs[c] == {"size": 2500, "md": b"e" * 2500}
    assert outs[i]["image"] == tg.Blob(b"e" * 2500, "image/png")


class HandsBackAString(OverMemory):
    """A broken third-party repository: its streamed save returns a str, not a CacheRef."""

    async def save_output_stream(
        self, task_type: str, inputs: object, port: str, chunks: object, *, mime: object = None
    ) -> object:
        await self.inner.save_output_stream(task_type, inputs, port, chunks, mime=mime)  # type: ignore[arg-type]
        return "blobs/not-a-ref"


async def test_a_sink_returning_a_non_ref_fails_the_task_by_name() -> None:
    """S6-26, S6-48: a cache whose streamed save returns something other than a CacheRef
    fails the task with a RepositoryError naming the port and what came back."""
    config = tg.RunConfig(cache=HandsBackAString(), reference_threshold_bytes=0)
    with pytest.raises(tg.TaskFailedError) as info:
        await tg.run_task(Produce(), {"size": 3000, "chunk": 1000}, config=config)
    cause = info.value.__cause__
    assert isinstance(cause, tg.RepositoryError)
    assert "'data'" in str(cause)
    assert "returned str, not a CacheRef" in str(cause)


class _SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


@pytest.mark.parametrize("cached", [False, True])
async def test_a_one_node_run_spawns_no_task(cached: bool) -> None:
    """S6-56: run_task of an ``execute`` task, with or without a cache, spawns no task."""
    counter = _SpawnCounter()
    config = tg.RunConfig(cache=tg.MemoryOutputRepository() if cached else None)
    trio.lowlevel.add_instrument(counter)
    try:
        out = await tg.run_task(Returns(), {"size": 100}, config=config)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert len(out["data"]) == 100  # type: ignore[arg-type]
    assert counter.spawned == 0
