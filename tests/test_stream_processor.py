"""
The stream processor (S6-41, S6-42, S6-44, S6-49): routing, tee, fan-out edges, sink failures
and cancellation at every park point.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import pytest
import trio
import trio.testing
from hypothesis import settings, strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph._core._accumulate import BinaryRoute, OutputAccumulator
from trio_taskgraph._core._events import BytesLike
from trio_taskgraph._stream_processor import StreamEdge, StreamProcessor

PORTS = tg.parse_ports(
    {
        "properties": {
            "a": {"x-stream": "binary", "format": "binary"},
            "b": {"x-stream": "binary", "contentMediaType": "image/png"},
            "t": {"x-stream": "append"},
        }
    }
)
SINK_BOTH = {"a": BinaryRoute(sink=True, accumulate=False), "b": BinaryRoute(sink=True)}


class MemorySink:
    """A BlobSink over a MemoryOutputRepository; counts what it did."""

    def __init__(self, *, fail_before: bool = False, fail_after: int | None = None) -> None:
        self.repo = tg.MemoryOutputRepository()
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.started = 0

    async def save(self, port: str, chunks: AsyncIterable[BytesLike]) -> tg.CacheRef:
        self.started += 1
        if self.fail_before:
            await trio.lowlevel.checkpoint()
            raise tg.RepositoryError(f"EACCES on {port}")
        if self.fail_after is None:
            return await self.repo.save_output_stream("t", {}, port, chunks)
        limit = self.fail_after

        async def limited() -> AsyncIterator[BytesLike]:
            seen = 0
            async for chunk in chunks:
                seen += 1
                if seen > limit:
                    raise tg.RepositoryError("ENOSPC")
                yield chunk

        return await self.repo.save_output_stream("t", {}, port, limited())

    async def delete(self, ref: tg.CacheRef) -> None:
        await self.repo.delete_output_by_ref(ref)

    async def blobs(self) -> int:
        return (await self.repo.stats()).blobs


async def events_of(*events: tg.StreamEvent) -> AsyncIterator[tg.StreamEvent]:
    for event in events:
        await trio.lowlevel.checkpoint()
        yield event


async def many_chunks(port: str, n: int, size: int) -> AsyncIterator[tg.StreamEvent]:
    for i in range(n):
        yield tg.BinaryDelta(port, bytes([i % 256]) * size)


async def test_each_binary_port_gets_its_own_sink_and_tee_keeps_bytes() -> None:
    """S6-42, S6-18: two binary ports, two sinks; the tee port is materialised for edges, the
    stored output holds refs (better than the seed's single-port fallback)."""
    sink = MemorySink()
    seen: list[object] = []
    processor = StreamProcessor(
        ports=PORTS,
        routes=SINK_BOTH,
        sink=sink,
        edges={},
        high_water_bytes=64,
        on_event=seen.append,
    )
    result = await processor.run(
        events_of(
            tg.BinaryDelta("a", b"aa"),
            tg.BinaryDelta("b", b"bb"),
            tg.TextDelta("t", "x"),
            tg.BinaryDelta("a", b"AA"),
        )
    )
    assert result.accumulated.output == {"b": tg.Blob(b"bb", "image/png"), "t": "x"}
    stored = result.stored_output()
    assert isinstance(stored["a"], tg.CacheRef)
    assert isinstance(stored["b"], tg.CacheRef)
    assert await sink.repo.get_output_by_ref(stored["a"]) == b"aaAA"
    assert await sink.repo.get_output_by_ref(stored["b"]) == b"bb"
    assert len(seen) == 4
    assert sink.started == 2


async def test_stream_error_fails_with_the_cause_and_deletes_blobs() -> None:
    """S6-7, S6-49: a StreamError fails the stream; blobs already stored are deleted."""
    sink = MemorySink()
    processor = StreamProcessor(
        ports=PORTS, routes=SINK_BOTH, sink=sink, edges={}, high_water_bytes=64
    )
    with pytest.raises(tg.StreamProtocolError) as info:
        await processor.run(events_of(tg.BinaryDelta("a", b"aa"), tg.StreamError(KeyError("gone"))))
    assert isinstance(info.value.__cause__, KeyError)
    assert await sink.blobs() == 0


@pytest.mark.parametrize("mode", ["pulled", "channel"])
@pytest.mark.parametrize("fail_before", [True, False])
async def test_failing_sink_fails_the_parked_producer_promptly(
    fail_before: bool, mode: str
) -> None:
    """S6-44 (seed late HIGH 2): a sink that fails before reading, or after a few chunks,
    fails the producer with the sink's error even while the producer is parked on a full
    budget: 10 MiB in 64 KiB chunks through a 1 MiB budget never hangs. ``pulled``: one sink
    port, which pulls from the task; ``channel``: two sink ports, each fed through its own
    byte-budget channel by a sink task."""
    sink = MemorySink(fail_before=fail_before, fail_after=None if fail_before else 3)
    routes = {"a": BinaryRoute(sink=True, accumulate=False)}
    if mode == "channel":
        routes["b"] = BinaryRoute(sink=True, accumulate=False)
    processor = StreamProcessor(
        ports=PORTS,
        routes=routes,
        sink=sink,
        edges={},
        high_water_bytes=1024 * 1024,
    )
    with trio.fail_after(5):
        with pytest.raises(tg.RepositoryError, match="EACCES" if fail_before else "ENOSPC"):
            await processor.run(many_chunks("a", 160, 64 * 1024))
    assert await sink.blobs() == 0


@pytest.mark.parametrize("mode", ["pulled", "channel"])
async def test_sink_that_returns_early_fails_the_producer(mode: str) -> None:
    """S6-44: a sink that returns a ref before the stream ended is an error, its blob goes."""

    class Early(MemorySink):
        async def save(self, port: str, chunks: AsyncIterable[BytesLike]) -> tg.CacheRef:
            async def first() -> AsyncIterator[BytesLike]:
                async for chunk in chunks:
                    yield chunk
                    return

            return await self.repo.save_output_stream("t", {}, port, first())

    sink = Early()
    routes = {"a": BinaryRoute(sink=True, accumulate=False)}
    if mode == "channel":
        routes["b"] = BinaryRoute(sink=True, accumulate=False)
    processor = StreamProcessor(
        ports=PORTS,
        routes=routes,
        sink=sink,
        edges={},
        high_water_bytes=10,
    )
    with trio.fail_after(5), pytest.raises(tg.RepositoryError, match="before the stream ended"):
        await processor.run(many_chunks("a", 50, 10))
    assert await sink.blobs() == 0


async def test_sink_that_returns_a_non_ref_is_an_error() -> None:
    """S6-42: the sink must hand back a CacheRef."""

    class NotARef(MemorySink):
        async def save(self, port: str, chunks: AsyncIterable[BytesLike]) -> tg.CacheRef:
            async for _ in chunks:
                pass
            return {"$ref": "x"}  # type: ignore[return-value]

    processor = StreamProcessor(
        ports=PORTS,
        routes={"a": BinaryRoute(sink=True, accumulate=False)},
        sink=NotARef(),
        edges={},
        high_water_bytes=10,
    )
    with pytest.raises(tg.RepositoryError, match="not a CacheRef"):
        await processor.run(events_of(tg.BinaryDelta("a", b"x")))


async def test_fan_out_edges_and_a_consumer_that_stops_reading() -> None:
    """S6-41: every edge gets the chunks in order; an edge whose reader closed is dropped."""
    edges = [StreamEdge.open(f"e{i}", 16) for i in range(2)]
    processor = StreamProcessor(
        ports=PORTS, routes={}, sink=None, edges={"a": edges}, high_water_bytes=16
    )
    got: list[bytes] = []

    async def reader() -> None:
        got.extend([bytes(chunk) async for chunk in edges[0].reader()])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        edges[1].close_reader()  # this consumer stops at once
        result = await processor.run(many_chunks("a", 20, 8))
        for edge in edges:
            edge.finish(failed=False)
    assert got == [bytes([i]) * 8 for i in range(20)]
    assert edges[1].dropped
    assert result.accumulated.output["a"] == b"".join(got)


async def test_consumer_of_a_failed_producer_sees_a_broken_stream() -> None:
    """S6-48: a truncated stream is never mistaken for a whole one."""
    edge = StreamEdge.open("p.a -> c.a", 100)
    await edge.send_channel.send(b"x")
    edge.finish(failed=True)
    reader = edge.reader()
    assert await reader.receive() == b"x"
    with pytest.raises(trio.BrokenResourceError, match=r"p\.a -> c\.a"):
        await reader.receive()
    with pytest.raises(trio.BrokenResourceError):
        await reader.__anext__()


async def test_explicit_value_replays_to_edges_in_budget_chunks() -> None:
    """S6-41, S6-24: an explicit value reaches stream edges in chunks within the budget."""
    edge = StreamEdge.open("e", 1000)
    processor = StreamProcessor(
        ports=PORTS, routes={}, sink=None, edges={"a": [edge]}, high_water_bytes=1000
    )
    sizes: list[int] = []

    async def reader() -> None:
        sizes.extend([len(chunk) async for chunk in edge.reader()])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await processor.run(events_of(tg.Finish({"a": b"z" * 4500})))
        edge.finish(failed=False)
    assert sizes == [1000, 1000, 1000, 1000, 500]


@pytest.mark.parametrize("where", ["sink", "channel-sink", "edge"])
async def test_cancel_while_parked(where: str) -> None:
    """S6-49: cancel the producer while it is parked on a full sink or edge channel: nothing
    stays parked, no blob is left."""
    sink = MemorySink()
    stuck = trio.Event()

    class StuckSink(MemorySink):
        async def save(self, port: str, chunks: AsyncIterable[BytesLike]) -> tg.CacheRef:
            await stuck.wait()  # never reads: the producer parks on the full budget
            raise AssertionError("unreachable")

    edge = StreamEdge.open("e", 10)
    if where != "edge":
        sink = StuckSink()
        routes = {"a": BinaryRoute(sink=True, accumulate=False)}
        if where == "channel-sink":
            routes["b"] = BinaryRoute(sink=True, accumulate=False)
        processor = StreamProcessor(
            ports=PORTS,
            routes=routes,
            sink=sink,
            edges={},
            high_water_bytes=10,
        )
    else:
        processor = StreamProcessor(
            ports=PORTS, routes={}, sink=None, edges={"a": [edge]}, high_water_bytes=10
        )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(processor.run, many_chunks("a", 100, 10))
        await trio.testing.wait_all_tasks_blocked()
        if where == "edge":
            assert edge.send_channel.statistics().parked_senders == 1
        if where == "channel-sink":
            assert processor._sinks["a"].send.statistics().parked_senders == 1
        nursery.cancel_scope.cancel()
    if where == "channel-sink":
        assert processor._sinks["a"].send.statistics().parked_senders == 0
    assert edge.send_channel.statistics().parked_senders == 0
    assert await sink.blobs() == 0


async def test_processor_requires_a_sink_for_sinking_routes() -> None:
    """S6-42: a route that sinks needs a sink."""
    with pytest.raises(ValueError, match="no sink"):
        StreamProcessor(ports=PORTS, routes=SINK_BOTH, sink=None, edges={}, high_water_bytes=1)
    await trio.lowlevel.checkpoint()


async def test_pulled_sink_gets_the_task_error_as_itself() -> None:
    """S6-44, S6-49: in pulled mode a task error raised while the sink pulls is raised as
    itself (not as the sink's wrapping), and the partial blob is never published."""

    async def failing() -> AsyncIterator[tg.StreamEvent]:
        yield tg.BinaryDelta("a", b"x" * 10)
        yield tg.BinaryDelta("a", b"y" * 10)
        raise KeyError("task broke")

    sink = MemorySink()
    processor = StreamProcessor(
        ports=PORTS,
        routes={"a": BinaryRoute(sink=True, accumulate=False)},
        sink=sink,
        edges={},
        high_water_bytes=10,
    )
    with pytest.raises(KeyError, match="task broke"):
        await processor.run(failing())
    assert await sink.blobs() == 0


async def test_a_sink_port_without_chunks_opens_no_sink() -> None:
    """S6-5: a sink is opened at its port's first chunk; a port with none opens nothing."""
    sink = MemorySink()
    processor = StreamProcessor(
        ports=PORTS,
        routes={"a": BinaryRoute(sink=True, accumulate=False)},
        sink=sink,
        edges={},
        high_water_bytes=10,
    )
    result = await processor.run(events_of(tg.TextDelta("t", "only text")))
    assert sink.started == 0
    assert result.stored_output() == {"t": "only text"}


_ROUTES = st.sampled_from(
    [
        None,
        BinaryRoute(sink=False, accumulate=True),
        BinaryRoute(sink=True, accumulate=False),
        BinaryRoute(sink=True, accumulate=True),
    ]
)
_EVENT = st.one_of(
    st.builds(tg.BinaryDelta, st.sampled_from(["a", "b"]), st.binary(max_size=40)),
    st.builds(tg.TextDelta, st.just("t"), st.text(max_size=5)),
)


@settings(max_examples=40)
@given(
    route_a=_ROUTES,
    route_b=_ROUTES,
    events=st.lists(_EVENT, max_size=12),
    finish=st.one_of(st.none(), st.fixed_dictionaries({}, optional={"a": st.binary(max_size=8)})),
    budget=st.integers(1, 64),
)
async def test_processor_agrees_with_the_accumulator(
    route_a: BinaryRoute | None,
    route_b: BinaryRoute | None,
    events: list[tg.StreamEvent],
    finish: dict[str, object] | None,
    budget: int,
) -> None:
    """S6-1 ... S6-6, S6-42: whatever the routes and budget, the processor's output is the
    pure accumulator's, every sunk port's blob holds exactly its chunks, and no blob is left
    that the output does not point to."""
    routes = {p: r for p, r in (("a", route_a), ("b", route_b)) if r is not None}
    stream = [*events, *([tg.Finish(finish)] if finish is not None else [])]
    oracle = OutputAccumulator(PORTS, routes)
    for event in stream:
        oracle.feed(event)
    expected_out = oracle.result()
    sink = MemorySink()
    processor = StreamProcessor(
        ports=PORTS,
        routes=routes,
        sink=sink if any(r.sink for r in routes.values()) else None,
        edges={},
        high_water_bytes=budget,
    )
    result = await processor.run(events_of(*stream))
    assert result.accumulated == expected_out
    stored = result.stored_output()
    for port in expected_out.ref_ports:
        ref = stored[port]
        assert isinstance(ref, tg.CacheRef)
        chunks = [
            bytes(e.chunk) for e in events if isinstance(e, tg.BinaryDelta) and e.port == port
        ]
        assert await sink.repo.get_output_by_ref(ref) == b"".join(chunks)
    assert await sink.blobs() == len(expected_out.ref_ports)
