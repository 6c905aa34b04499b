"""
The runner: `run_graph` and `run_task`, a thin trio shell over the graph model and the cache
policy (spec/S6-runner.md, S6-40 ... S6-54).

Theory of operation:

- One nursery per run (S6-40). Every node gets a task at once; it waits until the graph model's
  readiness rule holds for it (its ``materialize`` sources finished, its ``stream`` sources
  started: S6-15), so a task starts exactly when `GraphModel.ready_nodes` would list it.
- Every ``stream`` edge is a `StreamEdge`: a byte-budget channel of
  ``config.binary_high_water_bytes`` (S6-41). A consumer receives a `BinaryInputStream` at the
  port; the producer's `StreamProcessor` sends each chunk to every consumer of the port in
  order (fan-out: the same ordered, loss-free stream each).
- Before a node runs, `CacheRef` values at its inputs are read through the run's repositories
  (the run-private one first, then the shared backing) and inlined per the input port's
  format, then the inputs are checked (S6-25, S6-33, S6-46); the cache key is computed from
  the resolved inputs.
- A node is *keyed* (cacheable in this run) when its task is cacheable and the run has a
  cache. A streamed input enters the key as its provenance (source task type, source key,
  source port), never as bytes; from an unkeyed source it enters as a run-unique name, so the
  row is saved (keeping its blobs alive) but never looked up (S6-52).
- A binary port of an unkeyed node that only streaming consumers read is not accumulated:
  its bytes went to the consumers (S6-51). A value given at a streamed input arrives as a
  `BinaryInputStream` too (S6-54).
- A graph where a streaming producer would wait for a consumer that waits for it is refused
  before anything starts (S6-53).
- A keyed node looks its row up first (S6-45): a usable row with no dangling ref is a hit; the
  task is skipped, refs replay as `BinaryDelta` chunks to streaming consumers under their
  budget (S6-24) and hydrate for materialising ones. Otherwise the task runs: its stream goes
  through a `StreamProcessor` (sinks and tees per `binary_routes`, S6-42, S6-44); inline
  binary values at or above the threshold are stored as refs too (S6-19); the row is saved
  with refs; if the save fails, every blob streamed for it is deleted (S6-47); the returned
  output hydrates refs below the threshold (S6-43).
- A task's error (or a `StreamError`, or a sink's error) is recorded as a `TaskFailedError`
  naming the task type and node id with the cause chained, and cancels the run; every edge is
  closed (a consumer of a failed producer sees `trio.BrokenResourceError`) (S6-48). After the
  nursery closes, the first failure is raised as itself.
- Cancelling the caller cancels the nursery: every task stops, parked producers are woken,
  sinks delete their blobs under a shielded scope (S6-49).
- Listener (S6-50): ``on_event(RunEvent)`` is called synchronously, in order, for each node's
  status changes (`TaskStatus`), every stream event the task yields (replayed chunks of a hit
  included), and every `Phase`/`TaskProgress` it reports through its context.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, TypeAlias, cast, final

import attrs
import trio

from ._core._cache_policy import (
    binary_routes,
    check_cached_row,
    decide_hit,
    hydrate_value,
    inline_ports_to_ref,
    input_format,
    input_ref_error,
    input_refs,
    plan_hydration,
    refs_to_delete,
    replay_chunk_size,
    replay_plan,
    split_chunk,
)
from ._core._events import BinaryDelta, Blob, BytesLike, Finish, Phase, chunk_size
from ._core._graph import check_input_values
from ._core._refs import CacheRef
from ._errors import (
    DanglingRefError,
    PortSchemaError,
    RefError,
    StreamProtocolError,
    TaskFailedError,
)
from ._repository._run_private import RunPrivateRepository
from ._stream_processor import StreamEdge, StreamProcessor
from ._task import RunConfig, Task, TaskContext, TaskGraph, TaskProgress

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator

    from ._core._events import StreamEvent
    from ._core._graph import NodeSpec
    from ._core._ports import PortSpec
    from ._repository._protocol import OutputRepository

__all__ = ["RunEvent", "RunListener", "TaskState", "TaskStatus", "run_graph", "run_task"]

#: The states a node goes through, as `TaskStatus` reports them.
TaskState: TypeAlias = Literal["started", "cached", "completed", "failed", "cancelled"]


@final
@attrs.frozen(kw_only=True)
class TaskStatus:
    """
    A node changed state.

    Attributes:
        state: ``"started"`` (inputs ready, about to look up the cache or run),
            ``"cached"`` (a cache hit: the task is skipped and its row replayed),
            ``"completed"`` (its output is final), ``"failed"`` (``error`` says why) or
            ``"cancelled"`` (the run was cancelled while the node was running).
        error: the `TaskFailedError` of a failed node.
    """

    state: TaskState
    error: BaseException | None = None


@final
@attrs.frozen(kw_only=True)
class RunEvent:
    """
    What a run listener receives: one event of one node, in the node's order.

    Attributes:
        node_id: the node (``run_task`` runs a single node, ``"n1"``).
        task_type: the node's task type.
        event: a stream event the task yielded (`TextDelta`, `ObjectDelta`, `Snapshot`,
            `BinaryDelta`, `Finish`, `StreamError`, `Phase`; for a cache hit, the replayed
            `BinaryDelta` chunks), a `Phase` or `TaskProgress` the task reported through its
            context, or a `TaskStatus`.
    """

    node_id: str
    task_type: str
    event: StreamEvent | TaskProgress | TaskStatus


#: ``(RunEvent) -> None``: called synchronously; it must not block.
RunListener: TypeAlias = Callable[[RunEvent], None]


@attrs.define(eq=False)
class _Node:
    node_id: str
    task: Task
    spec: NodeSpec
    fixed: dict[str, object]
    started: trio.Event = attrs.Factory(trio.Event)
    finished: trio.Event = attrs.Factory(trio.Event)
    key: dict[str, object] | None = None
    lookup: bool = True
    edge_output: Mapping[str, object] = attrs.Factory(dict)
    out_edges: dict[str, list[StreamEdge]] = attrs.Factory(dict)
    in_edges: dict[str, StreamEdge] = attrs.Factory(dict)

    @property
    def task_type(self) -> str:
        return self.spec.task_type


@final
@attrs.frozen
class _RepositorySink:
    """Adapts the run's cache to the processor's `BlobSink` for one keyed node."""

    cache: OutputRepository
    task_type: str
    key: Mapping[str, object]
    ports: Mapping[str, PortSpec]

    async def save(self, port: str, chunks: AsyncIterable[BytesLike]) -> CacheRef:
        return await self.cache.save_output_stream(
            self.task_type, self.key, port, chunks, mime=self.ports[port].mime
        )

    async def delete(self, ref: CacheRef) -> None:
        await self.cache.delete_output_by_ref(ref)


async def _execute_events(
    task: Task, inputs: Mapping[str, object], ctx: TaskContext
) -> AsyncIterator[StreamEvent]:
    # Invariant (S6-9): an ``execute`` result is a stream holding one Finish.
    result = await task.execute(inputs, ctx)
    if not isinstance(result, Mapping):
        raise StreamProtocolError(f"execute() must return a mapping, not {type(result).__name__}")
    yield Finish(result)


async def _chunks_of(data: BytesLike, size: int) -> AsyncIterator[BytesLike]:
    for piece in split_chunk(data, size):
        await trio.lowlevel.checkpoint()
        yield piece


def _failure(node: _Node, exc: BaseException) -> TaskFailedError:
    failure = TaskFailedError(node.task_type, node.node_id, f"{type(exc).__name__}: {exc}")
    failure.__cause__ = exc
    return failure


@attrs.define(eq=False)
class _Run:
    graph: TaskGraph
    config: RunConfig
    listener: Callable[[RunEvent], None] | None
    run_id: str = attrs.field(init=False)
    cache: OutputRepository | None = attrs.field(init=False)
    repositories: list[OutputRepository] = attrs.field(init=False)
    nodes: dict[str, _Node] = attrs.field(factory=dict, init=False)
    outputs: dict[str, dict[str, object]] = attrs.field(factory=dict, init=False)
    failures: list[TaskFailedError] = attrs.field(factory=list, init=False)
    scope: trio.CancelScope | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.run_id = self.config.run_id or secrets.token_hex(8)
        self.cache = cast("OutputRepository | None", self.config.cache)
        repositories: list[OutputRepository] = []
        if self.cache is not None:
            repositories.append(self.cache)
            if isinstance(self.cache, RunPrivateRepository):
                # Refs at inputs: the run-private area first, then the shared backing (S6-25).
                repositories.append(self.cache.backing)
        self.repositories = repositories
        model = self.graph.model
        for node_id in model.topological_order():
            self.nodes[node_id] = _Node(
                node_id=node_id,
                task=self.graph.task(node_id),
                spec=model.nodes[node_id],
                fixed=self.graph.fixed_inputs(node_id),
            )
        budget = self.config.binary_high_water_bytes
        for edge in model.edges:
            if edge.mode != "stream":
                continue
            # Invariant (S6-41): every stream edge is its own byte-budget channel.
            stream = StreamEdge.open(str(edge), budget)
            self.nodes[edge.src].out_edges.setdefault(edge.src_port, []).append(stream)
            self.nodes[edge.dst].in_edges[edge.dst_port] = stream

    # -- listening --

    def emit(self, node: _Node, event: StreamEvent | TaskProgress | TaskStatus) -> None:
        listener = self.listener
        if listener is not None:
            listener(RunEvent(node_id=node.node_id, task_type=node.task_type, event=event))

    def _emitter(self, node: _Node) -> Callable[[object], None]:
        def emit(event: object) -> None:
            self.emit(node, cast("StreamEvent | TaskProgress | TaskStatus", event))

        return emit

    # -- the run --

    async def run(self) -> dict[str, dict[str, object]]:
        await trio.lowlevel.checkpoint()
        if len(self.nodes) == 1:
            # One node (`run_task`, a job): it runs in the caller's task, with no nursery and
            # no task switch to pay for; a failure is recorded and raised below all the same.
            with trio.CancelScope() as self.scope:
                await self._node_task(next(iter(self.nodes.values())))
        else:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                for node in self.nodes.values():
                    nursery.start_soon(
                        self._node_task, node, name=f"{node.node_id} ({node.task_type})"
                    )
        if self.failures:
            # Invariant (S6-48): the first failure, as itself, its cause chained.
            raise self.failures[0]
        return {node_id: self.outputs[node_id] for node_id in self.nodes}

    async def _node_task(self, node: _Node) -> None:
        ok = False
        try:
            try:
                await self._wait_ready(node)
                inputs = await self._inputs(node)
                node.key = self._key(node, inputs)
                node.started.set()
                self.emit(node, TaskStatus(state="started"))
                hit = node.key is not None and node.lookup and await self._try_hit(node)
                if not hit:
                    await self._execute(node, self._as_streams(node, inputs))
                ok = True
                node.finished.set()
                self.emit(node, TaskStatus(state="completed"))
            except Exception as exc:
                failure = _failure(node, exc)
                self.failures.append(failure)
                assert self.scope is not None
                self.scope.cancel()
                # A listener that raises here can't fail the node twice: its error is dropped.
                with contextlib.suppress(Exception):
                    self.emit(node, TaskStatus(state="failed", error=failure))
            except BaseException:
                if node.started.is_set():
                    with contextlib.suppress(Exception):
                        self.emit(node, TaskStatus(state="cancelled"))
                raise
        finally:
            # Invariant (S6-48): no consumer waits forever, no producer stays parked.
            for edges in node.out_edges.values():
                for edge in edges:
                    edge.finish(failed=not ok)
            for edge in node.in_edges.values():
                edge.close_reader()

    async def _wait_ready(self, node: _Node) -> None:
        # Invariant (S6-15, S6-40): materialised sources finished, streamed ones started.
        for edge in self.graph.model.incoming(node.node_id):
            source = self.nodes[edge.src]
            await (source.started if edge.mode == "stream" else source.finished).wait()

    async def _inputs(self, node: _Node) -> dict[str, object]:
        inputs: dict[str, object] = dict(node.fixed)
        for edge in self.graph.model.incoming(node.node_id):
            if edge.mode == "stream":
                inputs[edge.dst_port] = node.in_edges[edge.dst_port].reader()
                continue
            output = self.nodes[edge.src].edge_output
            if edge.src_port in output:
                inputs[edge.dst_port] = output[edge.src_port]
        # Invariant (S6-25, S6-46): refs at inputs are inlined before checks and keying.
        for port, ref in input_refs(inputs).items():
            try:
                data = await self._read_ref(ref)
            except RefError as exc:
                raise input_ref_error(node.task_type, node.node_id, port, ref) from exc
            if input_format(node.spec.input_schema, port) == "binary":
                inputs[port] = data
            else:
                inputs[port] = Blob(data, ref.mime)
        check_input_values(node.node_id, node.task_type, node.spec.input_schema, inputs)
        return inputs

    def _as_streams(self, node: _Node, inputs: dict[str, object]) -> dict[str, object]:
        # Invariant (S6-54): a streamed binary input port always receives a
        # BinaryInputStream; a value given for it (fixed, materialised or an inlined ref)
        # is served as chunks of at most `replay_chunk_size` (views, no copy).
        size = replay_chunk_size(self.config.binary_high_water_bytes)
        for port, spec in node.spec.inputs.items():
            if not spec.is_binary or port in node.in_edges or port not in inputs:
                continue
            value = inputs[port]
            data = value.data if isinstance(value, Blob) else value
            if not isinstance(data, bytes | bytearray | memoryview):
                continue  # anything else (an async iterable of the caller's) is passed as is
            pieces = list(split_chunk(data, size))
            # The bytes are in memory already: a channel that admits them all at once.
            edge = StreamEdge.open(f"{node.node_id}.{port} (value)", max(1, chunk_size(data)))
            for piece in pieces:
                edge.send_channel.send_nowait(piece)
            edge.finish(failed=False)
            node.in_edges[port] = edge
            inputs = {**inputs, port: edge.reader()}
        return inputs

    def _key(self, node: _Node, inputs: Mapping[str, object]) -> dict[str, object] | None:
        if self.cache is None or not node.task.cacheable:
            return None
        key = {port: value for port, value in inputs.items() if port not in node.in_edges}
        for edge in self.graph.model.incoming(node.node_id):
            if edge.mode != "stream":
                continue
            source = self.nodes[edge.src]
            if source.key is None or not source.lookup:
                # The bytes of an unkeyed stream can't be named: the row is stored under a
                # run-unique key (it keeps its blobs alive and its refs valid) and never hits.
                node.lookup = False
                key[edge.dst_port] = {
                    "$stream": ["run", self.run_id, source.node_id, edge.src_port]
                }
            else:
                key[edge.dst_port] = {"$stream": [source.task_type, source.key, edge.src_port]}
        return key

    async def _read_ref(self, ref: CacheRef) -> bytes:
        for repository in self.repositories:
            try:
                return await repository.get_output_by_ref(ref)
            except RefError:
                continue
        await trio.lowlevel.checkpoint()
        raise DanglingRefError(f"no repository of this run resolves ref {ref.ref[:80]!r}")

    async def _ref_alive(self, cache: OutputRepository, ref: CacheRef) -> bool:
        try:
            if cache.supports_streaming_reads():
                async with cache.open_output_stream_by_ref(ref):
                    pass
            else:
                await cache.get_output_by_ref(ref)
        except RefError:
            return False
        return True

    def _consumer_modes(
        self, node: _Node
    ) -> dict[str, frozenset[Literal["stream", "materialize"]]]:
        model = self.graph.model
        return {port: model.consumer_modes(node.node_id, port) for port in node.spec.outputs}

    async def _hydrate(
        self,
        cache: OutputRepository | None,
        output: Mapping[str, object],
        ports: Mapping[str, PortSpec],
    ) -> dict[str, object]:
        returned = dict(output)
        if cache is None:
            return returned
        # Invariant (S6-21, S6-43): the returned output is the row after plan_hydration.
        for port, ref in plan_hydration(
            output, ports, self.config.reference_threshold_bytes
        ).items():
            returned[port] = hydrate_value(ports[port], ref, await cache.get_output_by_ref(ref))
        return returned

    async def _replay(self, node: _Node, port: str, value: object) -> None:
        edges = node.out_edges.get(port, ())
        if not edges:
            return
        size = replay_chunk_size(self.config.binary_high_water_bytes)

        async def send(chunk: BytesLike) -> None:
            # Invariant (S6-24): chunks within the consumer's budget (seed M-6).
            for piece in split_chunk(chunk, size):
                self.emit(node, BinaryDelta(port, piece))
                for edge in edges:
                    await edge.send(piece)

        if isinstance(value, CacheRef):
            cache = self.cache
            if cache is not None and cache.supports_streaming_reads():
                async with cache.open_output_stream_by_ref(value) as chunks:
                    async for chunk in chunks:
                        await send(chunk)
            else:
                await send(await self._read_ref(value))
        elif isinstance(value, Blob):
            await send(value.data)
        elif isinstance(value, bytes | bytearray | memoryview):
            await send(value)

    async def _try_hit(self, node: _Node) -> bool:
        cache = self.cache
        assert cache is not None
        assert node.key is not None
        ports = node.spec.outputs
        row = check_cached_row(await cache.get_output(node.task_type, node.key), ports)
        if row is None:
            return False
        dangling = [ref for ref in row.refs.values() if not await self._ref_alive(cache, ref)]
        # Invariant (S6-23): one dangling ref turns the hit into a miss (the row is rewritten).
        if decide_hit(row, dangling) == "miss":
            return False
        self.emit(node, TaskStatus(state="cached"))
        plan = replay_plan(row, ports, self._consumer_modes(node))
        edge_output = dict(row.output)
        for port, actions in plan.items():
            if "hydrate" in actions:
                ref = row.refs[port]
                edge_output[port] = hydrate_value(
                    ports[port], ref, await cache.get_output_by_ref(ref)
                )
        self.outputs[node.node_id] = await self._hydrate(cache, row.output, ports)
        node.edge_output = edge_output
        for port, actions in plan.items():
            if "stream" in actions:
                await self._replay(node, port, row.output[port])
        self.emit(node, Finish(self.outputs[node.node_id]))
        return True

    async def _execute(self, node: _Node, inputs: dict[str, object]) -> None:
        cache = self.cache
        ports = node.spec.outputs
        keyed = node.key is not None
        streams = keyed and cache is not None and cache.supports_streaming()
        modes = self._consumer_modes(node)
        routes = binary_routes(ports, cacheable=keyed, cache_streams=streams, consumer_modes=modes)
        # Invariant (S6-51): a port no sink stores and only streaming consumers read is not
        # kept: its bytes went to the consumers (a pass-through never holds its payload). A
        # keyed node without a sink keeps it: its row must hold the value (inline).
        edge_only = frozenset(
            port
            for port, route in routes.items()
            if not keyed and not route.sink and modes.get(port) == frozenset({"stream"})
        )
        sink = None
        if streams:
            assert cache is not None
            assert node.key is not None
            sink = _RepositorySink(cache, node.task_type, node.key, ports)
        emit = self._emitter(node)
        ctx = TaskContext(
            node_id=node.node_id,
            run_id=self.run_id,
            task_type=node.task_type,
            report=cast("Callable[[Phase | TaskProgress], None]", emit),
        )
        task = node.task
        events = (
            task.execute_stream(inputs, ctx)
            if task.is_streaming()
            else _execute_events(task, inputs, ctx)
        )
        processor = StreamProcessor(
            ports=ports,
            routes=routes,
            sink=sink,
            edges=node.out_edges,
            high_water_bytes=self.config.binary_high_water_bytes,
            on_event=emit,
            edge_only=edge_only,
        )
        processed = await processor.run(events)
        streamed = list(processed.streamed)
        threshold = self.config.reference_threshold_bytes
        try:
            stored = processed.stored_output()
            for port, value in stored.items():
                spec = ports.get(port)
                if (
                    isinstance(value, CacheRef)
                    and spec is not None
                    and spec.is_binary
                    and processed.accumulated.binary_sizes.get(port, 0) == 0
                ):
                    await self._replay(node, port, value)  # an explicit ref with stream edges
            if streams:
                assert cache is not None
                assert node.key is not None
                # Invariant (S6-19): big inline values are stored as refs too.
                for port in inline_ports_to_ref(
                    stored, ports, threshold, cacheable=True, cache_streams=True
                ):
                    value = stored[port]
                    data = value.data if isinstance(value, Blob) else cast("BytesLike", value)
                    size = replay_chunk_size(self.config.binary_high_water_bytes)
                    ref = await cache.save_output_stream(
                        node.task_type,
                        node.key,
                        port,
                        _chunks_of(data, size),
                        mime=ports[port].mime,
                    )
                    streamed.append(ref)
                    stored[port] = ref
            node.edge_output = processed.accumulated.output
            if keyed:
                assert cache is not None
                await cache.save_output(node.task_type, node.key, stored)
        except BaseException:
            # Invariant (S6-26, S6-47): blobs of a row that was not saved are deleted.
            if streamed and cache is not None:
                with trio.CancelScope(shield=True):
                    for ref in refs_to_delete(streamed):
                        try:
                            await cache.delete_output_by_ref(ref)
                        except Exception:  # best effort; the first error wins
                            continue
            raise
        self.outputs[node.node_id] = await self._hydrate(cache, stored, ports)


def _check_no_stall(graph: TaskGraph) -> None:
    """
    Refuse a graph where a streaming producer would wait forever (S6-53).

    A consumer starts only once its materialised sources finished (S6-15). If one of them
    cannot finish before the producer of one of the consumer's *streamed* inputs finishes,
    that producer fills the consumer's budget and parks, waiting for a consumer that is
    waiting for it. Checked on the graph alone, before anything starts.
    """
    model = graph.model
    order = model.topological_order()
    # finish_needs[x]: the nodes that must finish before x can finish (its ancestors).
    finish_needs: dict[str, frozenset[str]] = {}
    for node in order:
        needs: set[str] = set()
        for edge in model.incoming(node):
            needs.add(edge.src)
            needs |= finish_needs[edge.src]
        finish_needs[node] = frozenset(needs)
    # start_needs[x]: the nodes that must finish before x can start.
    start_needs: dict[str, frozenset[str]] = {}
    for node in order:
        needs = set()
        for edge in model.incoming(node):
            if edge.mode == "materialize":
                needs.add(edge.src)
                needs |= finish_needs[edge.src]
            else:
                needs |= start_needs[edge.src]
        start_needs[node] = frozenset(needs)
    for edge in model.edges:
        if edge.mode == "stream" and edge.src in start_needs[edge.dst]:
            raise PortSchemaError(
                f"edge {edge} would stall: {edge.dst} starts only after {edge.src} finishes, "
                f"but {edge.src} streams into it under a byte budget and waits for it to read"
            )


async def run_graph(
    graph: TaskGraph,
    *,
    config: RunConfig = RunConfig(),  # noqa: B008 - a frozen value, safe as a default
    on_event: Callable[[RunEvent], None] | None = None,
) -> dict[str, dict[str, object]]:
    """
    Run every task of ``graph`` in one nursery and return each node's output.

    Args:
        graph: the graph (its required inputs must all be fed: S6-17).
        config: the cache, the reference threshold, the byte budget and the run id.
        on_event: ``(RunEvent) -> None``, called synchronously with every node's status
            changes, stream events (in order) and progress reports; it must not block. An
            exception it raises fails the node whose event it was receiving.

    Returns:
        ``{node id: output}``. Binary results at declared binary ports are inline below
        ``config.reference_threshold_bytes`` and `CacheRef` at or above it (S6-43).

    Raises:
        PortSchemaError: a required input has no value and no edge, or a streaming
            producer would wait forever for a consumer that waits for it (S6-53); nothing ran.
        TaskFailedError: a task (or its sink, or its row save) failed; it names the task type
            and the node id, the cause is chained (S6-48). The other tasks were cancelled.

    Cancellation:
        Cancelling the caller cancels every task; every parked producer is released, every
        blob streamed for a row that was not saved is deleted (shielded), and no task, temp
        file or orphan blob is left behind (S6-49). Rows already saved stay.
    """
    if not isinstance(graph, TaskGraph):
        raise TypeError(f"run_graph needs a TaskGraph, not {type(graph).__name__}")
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, not {type(config).__name__}")
    graph.model.check_complete()
    _check_no_stall(graph)
    return await _Run(graph, config, on_event).run()


async def run_task(
    task: Task,
    inputs: Mapping[str, object],
    *,
    config: RunConfig = RunConfig(),  # noqa: B008 - a frozen value, safe as a default
    on_event: Callable[[RunEvent], None] | None = None,
) -> dict[str, object]:
    """
    Run one task (a graph of one node, ``"n1"``) and return its output.

    Args:
        task: an instance of a registered `Task` subclass.
        inputs: its input values (refs among them are resolved first: S6-25).
        config: as for `run_graph`.
        on_event: as for `run_graph`.

    Raises:
        TaskFailedError: the task failed (node id ``"n1"``).

    Cancellation:
        As for `run_graph`.
    """
    graph = TaskGraph()
    node_id = graph.add(task, inputs=inputs)
    outputs = await run_graph(graph, config=config, on_event=on_event)
    return outputs[node_id]
