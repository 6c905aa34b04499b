"""
The stream processor: drives one task's event stream (the trio shell over `OutputAccumulator`).

Rules (spec/S6-runner.md):

- Every event goes through `OutputAccumulator.feed` (S6-1 ... S6-8); the listener sees each
  accepted event, in order.
- A binary chunk goes to every streaming edge of the port (S6-41), each through its own
  byte-budget channel, and to the port's cache sink when its route says ``sink`` or ``tee``:
  the producer parks while any of them is full, so the bytes are never all in memory (S6-42).
- A sink is opened lazily at its port's first chunk (S6-5). With *one* sink port the sink
  pulls: ``save_output_stream`` iterates a generator that runs the task's stream up to its
  next chunk for that port (no channel, no extra task switch per chunk). With several, each
  port's sink runs in a task of the processor's nursery, reading the receive side of its own
  byte channel. When a sink fails, before or during reading, or returns before the stream
  ended, the processor raises the sink's error and nothing is left parked (S6-44, the seed's
  late HIGH 2): a pulled stream simply stops being pulled and is closed; a channel-fed one
  is cancelled.
- A streaming edge whose consumer stopped reading (it closed its `BinaryInputStream`) is
  dropped: the producer keeps going for its other consumers.
- Whatever ends the stream early (the task's error, a `StreamError`, a sink's error,
  cancellation), every blob a sink already returned is deleted under a shielded scope before
  the exception leaves (no orphan blob, S6-49).

Theory of operation: `StreamProcessor.run(events)` either hands the stream to the one pulled
sink, or opens one nursery whose body pulls events from the task, feeds them and routes the
chunks, with sink tasks beside it. A failure anywhere is recorded and cancels the nursery;
after it closes, the first recorded error is raised as itself (never an exception group; a
task's error raised while a pulled sink iterates it comes out as itself, too).
"""

from __future__ import annotations

from contextlib import aclosing
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import trio

from ._byte_channel import ByteReceiveChannel, ByteSendChannel, open_byte_channel
from ._core._accumulate import AccumulatedOutput, BinaryRoute, OutputAccumulator
from ._core._cache_policy import replay_chunk_size, split_chunk
from ._core._events import BinaryDelta, Blob, BytesLike
from ._core._refs import CacheRef
from ._errors import RepositoryError, StreamProtocolError

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        AsyncIterable,
        AsyncIterator,
        Callable,
        Mapping,
        Sequence,
    )

    from ._core._budget import ByteChannelStatistics
    from ._core._ports import PortSpec

__all__ = [
    "BinaryInputStream",
    "BlobSink",
    "ProcessedStream",
    "StreamEdge",
    "StreamProcessor",
]


class BlobSink(Protocol):
    """
    Where a task's binary ports stream to (the runner adapts an `OutputRepository`).
    """

    async def save(self, port: str, chunks: AsyncIterable[BytesLike]) -> CacheRef:
        """Store the chunks of ``port`` as a blob; return its ref."""
        ...

    async def delete(self, ref: CacheRef) -> None:
        """Delete a blob this sink stored."""
        ...


@final
class BinaryInputStream:
    """
    What a task receives at a streamed binary input port (``"x-stream": "binary"`` fed by a
    ``stream`` edge): an async iterator of the producer's chunks, in order, as they are
    produced.

    ``async for chunk in inputs["image"]: ...``. It ends when the producer finished; if the
    producer failed, iteration raises `trio.BrokenResourceError` instead of ending, so a
    consumer never mistakes a truncated stream for a whole one. A consumer that does not need
    the rest may ``aclose()`` it (the runner closes it when the task ends); the producer then
    stops sending to it.
    """

    def __init__(self, edge: StreamEdge) -> None:
        self._edge = edge

    def __aiter__(self) -> BinaryInputStream:
        return self

    async def __anext__(self) -> BytesLike:
        try:
            return await self._edge.receive_channel.receive()
        except trio.EndOfChannel:
            if self._edge.failed:
                raise trio.BrokenResourceError(
                    f"the producer of this stream ({self._edge.label}) failed"
                ) from None
            raise StopAsyncIteration from None

    async def receive(self) -> BytesLike:
        """
        Receive the next chunk.

        Raises:
            trio.EndOfChannel: the producer finished and every chunk was received.
            trio.BrokenResourceError: the producer failed.

        Cancellation: atomic, as `ByteReceiveChannel.receive`.
        """
        try:
            return await self._edge.receive_channel.receive()
        except trio.EndOfChannel:
            if self._edge.failed:
                raise trio.BrokenResourceError(
                    f"the producer of this stream ({self._edge.label}) failed"
                ) from None
            raise

    def statistics(self) -> ByteChannelStatistics:
        """
        A snapshot of the edge behind this stream (S6-55): the bytes buffered on it now and
        at peak against its budget (``high_water_bytes``), and who is parked on it.

        The counts are the edge's own, for this consumer only: with a fan-out, each consumer
        has its own edge and budget.
        """
        return self._edge.receive_channel.statistics()

    async def aclose(self) -> None:
        """
        Stop reading: the producer stops sending to this consumer.

        Cancellation: closed even when cancelled.
        """
        await self._edge.receive_channel.aclose()


@final
@attrs.define(eq=False)
class StreamEdge:
    """
    One ``stream`` edge: a byte-budget channel from a producer's binary port to a consumer.

    Attributes:
        label: ``"src.port -> dst.port"``, for messages.
        send_channel, receive_channel: the channel (``binary_high_water_bytes``).
        failed: set by the producer before closing when it failed (the consumer then sees
            `trio.BrokenResourceError`, not a clean end).
        dropped: the consumer closed its end; the producer no longer sends to it.
    """

    label: str
    send_channel: ByteSendChannel[BytesLike]
    receive_channel: ByteReceiveChannel[BytesLike]
    failed: bool = False
    dropped: bool = False

    @classmethod
    def open(cls, label: str, high_water_bytes: int) -> StreamEdge:
        """Open an edge with a fresh byte-budget channel of ``high_water_bytes``."""
        send, receive = open_byte_channel(high_water_bytes)
        return cls(label, send, receive)

    def reader(self) -> BinaryInputStream:
        """The consumer's view of the edge."""
        return BinaryInputStream(self)

    async def send(self, chunk: BytesLike) -> None:
        """
        Send ``chunk`` to the consumer, parking while its budget is full; a consumer that
        stopped reading is dropped silently.

        Cancellation: atomic (the chunk was enqueued or not).
        """
        if self.dropped:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self.send_channel.send(chunk)
        except trio.BrokenResourceError:
            self.dropped = True

    def finish(self, *, failed: bool) -> None:
        """Close the producer's end (``failed``: the consumer sees a broken stream)."""
        if failed:
            self.failed = True
        self.send_channel.close()

    def close_reader(self) -> None:
        """Close the consumer's end (the producer's sends are dropped from now on)."""
        self.receive_channel.close()


@final
@attrs.frozen(kw_only=True)
class ProcessedStream:
    """
    What `StreamProcessor.run` produced.

    Attributes:
        accumulated: the accumulator's result (`AccumulatedOutput`).
        refs: the sink's `CacheRef` for every port in ``accumulated.ref_ports``.
        streamed: every ref a sink returned during the run (the runner deletes them all if
            the row is not saved, S6-26), the discarded ones excluded (already deleted).
    """

    accumulated: AccumulatedOutput
    refs: Mapping[str, CacheRef]
    streamed: tuple[CacheRef, ...]

    def stored_output(self) -> dict[str, object]:
        """The output as it is stored: ref ports hold their refs (S6-21)."""
        return self.accumulated.with_refs(self.refs)


@attrs.define(eq=False)
class _OpenSink:
    send: ByteSendChannel[BytesLike]
    receive: ByteReceiveChannel[BytesLike]
    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None
    ended: bool = False


@attrs.define(eq=False)
class _Driven:
    """The state of a pulled sink's driver generator."""

    done: bool = False
    task_error: Exception | None = None


#: The default listener: nothing to tell.
def _no_listener(_event: object) -> None:
    return None


_STOPPED_EARLY: Final = "the cache sink of port {port!r} returned before the stream ended"


@final
@attrs.define(eq=False)
class StreamProcessor:
    """
    Runs one task's event stream (see the module docstring).

    Args:
        ports: the task's output ports.
        routes: the `BinaryRoute` of each binary port (`binary_routes`); ports routed to a
            sink need ``sink``.
        sink: where sunk ports stream to, or ``None`` (then no route may sink).
        edges: the streaming edges of each binary output port (fan-out: several per port).
        high_water_bytes: the byte budget of each sink channel (and of explicit values
            replayed to edges, in chunks of `replay_chunk_size`).
        on_event: called with every accepted event, in order; it must not block.
        edge_only: binary ports whose chunks only go to their streaming edges: neither kept
            nor sunk (S6-51), so a pass-through never holds its whole payload. They are
            absent from the output.
    """

    ports: Mapping[str, PortSpec]
    routes: Mapping[str, BinaryRoute]
    sink: BlobSink | None
    edges: Mapping[str, Sequence[StreamEdge]]
    high_water_bytes: int
    on_event: Callable[[object], None] = _no_listener
    edge_only: frozenset[str] = frozenset()
    _accumulator: OutputAccumulator = attrs.field(init=False)
    _sinks: dict[str, _OpenSink] = attrs.field(factory=dict, init=False)
    _errors: list[BaseException] = attrs.field(factory=list, init=False)
    _streamed: list[CacheRef] = attrs.field(factory=list, init=False)
    _refs: dict[str, CacheRef] = attrs.field(factory=dict, init=False)
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.sink is None and any(r.sink for r in self.routes.values()):
            raise ValueError("a route sinks a port but the processor has no sink")
        routes = dict(self.routes)
        for port in self.edge_only:
            if self.routes.get(port, BinaryRoute()).sink:
                raise ValueError(f"port {port!r} cannot be both sunk and edge-only")
            # The accumulator keeps no bytes of a sink-only port; here the "sink" is the edges.
            routes[port] = BinaryRoute(sink=True, accumulate=False)
        self._accumulator = OutputAccumulator(self.ports, routes)

    def _fail(self, error: BaseException) -> None:
        self._errors.append(error)
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, events: AsyncIterator[object]) -> ProcessedStream:
        """
        Consume ``events`` (an async generator is closed at the end, however it ends) and
        return the output, with the sinks' refs.

        Raises:
            StreamProtocolError: an event broke the port rules (S6-2, S6-8), or a
                `StreamError` arrived (its error chained as the cause, S6-7).
            Exception: the task's own error, or a sink's error (S6-44), as itself.

        Cancellation: every sink is cancelled and waited for, every blob a sink already
        stored is deleted (shielded), and the event generator is closed, before `Cancelled`
        propagates; nothing is left parked.
        """
        try:
            async with aclosing(events) as stream:  # type: ignore[type-var]
                pulled = self._pulled_port()
                if pulled is not None:
                    await self._run_pulled(stream, pulled)
                else:
                    async with trio.open_nursery() as nursery:
                        self._scope = nursery.cancel_scope
                        try:
                            await self._pump(stream, nursery)
                        except Exception as exc:
                            self._fail(exc)
            if self._errors:
                raise self._errors[0]
            result = self._accumulator.result()
            if self.edge_only:
                result = attrs.evolve(
                    result,
                    ref_ports=result.ref_ports - self.edge_only,
                    discarded_sink_ports=result.discarded_sink_ports - self.edge_only,
                )
            refs = {port: self._ref_of(port) for port in result.ref_ports}
            # Blobs no output points to: overridden by an explicit value (S6-6).
            unused = [ref for port, ref in self._refs.items() if port not in result.ref_ports]
            if unused:
                assert self.sink is not None
                for ref in unused:
                    await self.sink.delete(ref)
                    self._streamed.remove(ref)
            await self._replay_explicit_values(result)
        except BaseException:
            await self._delete_streamed()
            raise
        return ProcessedStream(accumulated=result, refs=refs, streamed=tuple(self._streamed))

    def _pulled_port(self) -> str | None:
        # One sink port: the sink pulls the chunks straight from the task (no channel, no
        # extra task switch per chunk). Several: one sink task and channel per port.
        if self.sink is None:
            return None
        ports = [p for p, r in self.routes.items() if r.sink and p not in self.edge_only]
        return ports[0] if len(ports) == 1 else None

    async def _step(self, event: object) -> BytesLike | None:
        """Feed one event, tell the listener, send a chunk to the edges; return a chunk the
        sink must get (pulled mode), else None."""
        route = self._accumulator.feed(event)
        self.on_event(event)
        if route == "error":
            error = self._accumulator.error
            raise StreamProtocolError("the task reported a StreamError") from error
        if type(event) is BinaryDelta:
            chunk = event.chunk
            for edge in self.edges.get(event.port, ()):
                await edge.send(chunk)
            if route != "accumulated" and event.port not in self.edge_only:
                return chunk
        return None

    async def _run_pulled(self, stream: AsyncIterator[object], port: str) -> None:
        first: BytesLike | None = None
        async for event in stream:
            first = await self._step(event)
            if first is not None:
                break
        if first is None:
            return  # no chunk for the sink port: no sink is opened (S6-5)
        state = _Driven()
        assert self.sink is not None
        try:
            async with aclosing(self._drive(stream, first, state)) as chunks:
                ref = await self.sink.save(port, chunks)
        except Exception:
            if state.task_error is not None:
                raise state.task_error from None  # the task's own error, as itself
            raise
        if not isinstance(ref, CacheRef):
            raise RepositoryError(
                f"the cache sink of port {port!r} returned {type(ref).__name__}, not a CacheRef"
            )
        self._streamed.append(ref)
        if not state.done:
            raise RepositoryError(_STOPPED_EARLY.format(port=port))
        self._refs[port] = ref

    async def _drive(
        self, stream: AsyncIterator[object], first: BytesLike, state: _Driven
    ) -> AsyncGenerator[BytesLike, None]:
        # The sink iterates this: each chunk it asks for runs the task up to its next chunk
        # for the sink port. If the sink fails, it closes this generator (`iterate_closing`),
        # and the task's stream is closed by `run`: nothing is left parked (S6-44).
        try:
            yield first
            async for event in stream:
                chunk = await self._step(event)
                if chunk is not None:
                    yield chunk
        except Exception as exc:
            state.task_error = exc
            raise
        state.done = True

    def _ref_of(self, port: str) -> CacheRef:
        return self._refs[port]  # every sink that ended without an error set its ref

    async def _delete_streamed(self) -> None:
        if not self._streamed or self.sink is None:
            return
        with trio.CancelScope(shield=True):
            for ref in self._streamed:
                try:
                    await self.sink.delete(ref)
                except Exception:  # best effort: the first error is raised
                    continue
        self._streamed.clear()

    async def _pump(self, stream: AsyncIterator[object], nursery: trio.Nursery) -> None:
        accumulator = self._accumulator
        emit = self.on_event
        edges = self.edges
        edge_only = self.edge_only
        try:
            async for event in stream:
                route = accumulator.feed(event)
                emit(event)
                if route == "error":
                    error = accumulator.error
                    raise StreamProtocolError("the task reported a StreamError") from error
                if type(event) is BinaryDelta:
                    chunk = event.chunk
                    if route != "accumulated" and event.port not in edge_only:
                        await self._send_to_sink(event.port, chunk, nursery)
                    for edge in edges.get(event.port, ()):
                        await edge.send(chunk)
        except BaseException:
            # The stream did not end: a sink must not publish what it got so far, so its
            # reading end is closed under it (it fails with ClosedResourceError).
            for sink in self._sinks.values():
                sink.receive.close()
            raise
        for sink in self._sinks.values():
            sink.ended = True
            sink.send.close()

    async def _send_to_sink(self, port: str, chunk: BytesLike, nursery: trio.Nursery) -> None:
        sink = self._sinks.get(port)
        if sink is None:
            send, receive = open_byte_channel(self.high_water_bytes)
            sink = _OpenSink(send, receive)
            self._sinks[port] = sink
            nursery.start_soon(self._run_sink, port, sink, receive, name=f"sink {port}")
        try:
            await sink.send.send(chunk)
        except trio.BrokenResourceError:
            # The sink closed its end: wait for its verdict (its failure cancels us).
            await sink.done.wait()
            raise RepositoryError(_STOPPED_EARLY.format(port=port)) from sink.error

    async def _run_sink(
        self, port: str, sink: _OpenSink, receive: ByteReceiveChannel[BytesLike]
    ) -> None:
        assert self.sink is not None
        try:
            with receive:
                ref = await self.sink.save(port, receive)
            if not isinstance(ref, CacheRef):
                raise RepositoryError(
                    f"the cache sink of port {port!r} returned {type(ref).__name__}, not a CacheRef"
                )
            self._streamed.append(ref)
            if not sink.ended:
                raise RepositoryError(_STOPPED_EARLY.format(port=port))
            self._refs[port] = ref
        except Exception as exc:
            # Invariant (S6-44): a failing sink fails the producer promptly.
            sink.error = exc
            self._fail(exc)
        finally:
            sink.done.set()

    async def _replay_explicit_values(self, result: AccumulatedOutput) -> None:
        # An explicit value (an ``execute`` result, a Finish payload) at a port whose streaming
        # consumers got no chunk is sent to them now, in budget-sized chunks.
        size = replay_chunk_size(self.high_water_bytes)
        for port, port_edges in self.edges.items():
            if not port_edges or result.binary_sizes.get(port, 0):
                continue
            value = result.output.get(port)
            if isinstance(value, Blob):
                data: BytesLike = value.data
            elif isinstance(value, bytes | bytearray | memoryview):
                data = value
            else:
                continue  # nothing (or a ref, resolved by the runner) to replay here
            for piece in split_chunk(data, size):
                for edge in port_edges:
                    await edge.send(piece)
