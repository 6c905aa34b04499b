"""
The job queue: run tasks and graphs as jobs on a fixed set of workers (spec/S8-jobs.md).

`open_job_queue` opens a nursery that belongs to the caller's ``async with`` block and starts
``workers`` worker tasks in it. `JobQueue.submit` is synchronous: it records a ``pending`` job
in the job store, schedules it by ``(run_after, sequence)`` and returns a `JobHandle`. A worker
claims the first due job (pop and ``start`` with no checkpoint in between, so exactly one
worker claims it), runs it in a cancel scope of its own and records the outcome; the
transitions and the retry policy are the pure core's (``_core/_jobs.py``).

Theory of operation:

- Concurrency (S8-6): only the ``workers`` worker tasks run jobs, one at a time each, so at
  most ``workers`` jobs are ever ``running``; `JobQueue.statistics` reports the peak.
- Waiting for work: an idle worker parks on a `trio.lowlevel.ParkingLot` with a deadline at
  the schedule's next ``run_after``; every push (submit, retry) wakes one worker, which
  recomputes its deadline, so a due job never waits while a worker is idle.
- A running job's stream events reach its subscribers through the runner's listener, which
  is synchronous (it must not block the task): each subscriber has a byte-budget channel of
  its own, filled with ``send_nowait``, and a delivery task that calls its callback in order.
  To let a slow subscriber push back (S8-8), a streaming task runs as a copy whose stream
  stops after each event at `_pace`: a checkpoint (deliveries run), then, for a subscriber
  whose channel was full, the backlog is sent with an awaited ``send`` (the task parks until
  there is room). A ``lossy`` subscriber is dropped instead with `SubscriberOverflowError`.
  Memory per subscriber never exceeds twice its budget plus one event. A callback that
  raises is logged and dropped; the others go on (S8-9). A job is marked terminal only after
  its subscribers have drained, so ``await result()`` returning means every event was
  delivered.
- Cancel (S8-10): a pending job is removed from the schedule and marked ``cancelled`` at once;
  a running job's cancel scope is cancelled, the runner cleans up what it streamed (no temp
  file, no orphan blob: S6-49) and the job ends ``cancelled``. Closing the queue cancels the
  pending jobs and lets the running ones finish; an error or a cancellation of the block
  cancels every job.
- Records stay small (S8-5): the output stored with a completed job is the runner's output,
  where binary results at or above the reference threshold are `CacheRef`; `JobHandle.result`
  returns it as is and `resolve_job_output` hydrates it on demand.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import math
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Protocol, TypeAlias, final, runtime_checkable

import attrs
import trio

from ._byte_channel import ByteReceiveChannel, ByteSendChannel, open_byte_channel
from ._core._constants import DEFAULT_HIGH_WATER_BYTES
from ._core._events import (
    BinaryDelta,
    Blob,
    Finish,
    ObjectDelta,
    Phase,
    Snapshot,
    StreamError,
    TextDelta,
)
from ._core._jobs import (
    JobEvent,
    JobRecord,
    JobSchedule,
    JobState,
    RetryPolicy,
    event_budget_size,
)
from ._core._refs import CacheRef
from ._errors import (
    JobCancelledError,
    JobError,
    JobOutputError,
    JobStateError,
    PermanentJobError,
    RemoteJobError,
    SubscriberOverflowError,
    TaskGraphError,
    UnknownJobError,
)
from ._runner import RunEvent, run_graph, run_task
from ._task import RunConfig, Task, TaskContext, TaskGraph, get_task_class

if TYPE_CHECKING:
    from ._core._events import StreamEvent
    from ._jobs_postgres import ClaimedJob

__all__ = [
    # re-exported from the core and the error module, so the package imports jobs in one block
    "JobCancelledError",
    "JobError",
    "JobOutputError",
    "JobRecord",
    "JobState",
    "JobStateError",
    "PermanentJobError",
    "SubscriberOverflowError",
    # this module
    "JobHandle",
    "JobQueue",
    "JobQueueStatistics",
    "ClaimingJobStore",
    "JobStore",
    "MemoryJobStore",
    "StreamCallback",
    "open_job_queue",
]

logger = logging.getLogger("trio_taskgraph.jobs")

#: ``(event) -> None`` or ``async (event) -> None``: an `JobHandle.on_stream` subscriber.
StreamCallback: TypeAlias = Callable[["StreamEvent"], object]

#: What the runner seam reports a stream event to (synchronous, never blocks).
_Emit: TypeAlias = Callable[["StreamEvent"], None]

#: Chunk size `JobHandle.open_output_stream` uses for inline values.
_INLINE_CHUNK = 64 * 1024

_STREAM_EVENT_TYPES = (TextDelta, ObjectDelta, Snapshot, BinaryDelta, Finish, StreamError, Phase)


@final
@attrs.frozen(kw_only=True)
class JobWork:
    """
    What a job runs: a task with its inputs, or a graph, under a run configuration.

    Attributes:
        target: a `Task` instance or a `TaskGraph`.
        inputs: the task's inputs (``{}`` for a graph).
        config: the run configuration (its ``run_id`` names the job and attempt).
    """

    target: Task | TaskGraph
    inputs: Mapping[str, object]
    config: RunConfig


#: ``async (work, emit) -> output``: the seam between the queue and the runner.
JobRunner: TypeAlias = Callable[[JobWork, _Emit], Awaitable[Mapping[str, object]]]


async def _run_with_runner(work: JobWork, emit: _Emit) -> Mapping[str, object]:
    # The real runner: run_task / run_graph, their listener feeding the job's subscribers.
    def on_event(run_event: RunEvent) -> None:
        event = run_event.event
        if isinstance(event, _STREAM_EVENT_TYPES):
            emit(event)

    target = work.target
    if isinstance(target, Task):
        return await run_task(target, work.inputs, config=work.config, on_event=on_event)
    return await run_graph(target, config=work.config, on_event=on_event)


def _default_runner() -> JobRunner:
    return _run_with_runner


# --- job store ------------------------------------------------------------------------------


@runtime_checkable
class JobStore(Protocol):
    """
    Where job records live (spec S8-11). The queue keeps its schedule and live handles in
    process; the store holds the `JobRecord` of every job, updated at every transition.

    Every method is synchronous and must not block (``submit`` and ``cancel`` are sync): a
    persistent store (a future ``PostgresJobStore``) keeps a write-behind buffer and writes it
    from `flush`, which the queue awaits when it closes.
    """

    def new_id(self) -> str:
        """Return a fresh job id, unique in this store."""
        ...

    def save(self, record: JobRecord) -> None:
        """Store ``record`` (a new job, or the next state of a known one)."""
        ...

    def load(self, job_id: str) -> JobRecord | None:
        """Return the latest record of ``job_id``, or None."""
        ...

    def forget(self, job_id: str) -> None:
        """Drop the record of a finished job (unknown or unfinished ids are left alone)."""
        ...

    async def flush(self) -> None:
        """Write whatever is buffered (a no-op in memory)."""
        ...


@runtime_checkable
class ClaimingJobStore(JobStore, Protocol):
    """
    A job store shared by many processes (spec S8-14): the jobs live in the store, and the
    queue's workers claim them from it instead of from the in-process schedule.
    `PostgresJobStore` is one.
    """

    async def attach(
        self,
        nursery: trio.Nursery,
        *,
        on_record: Callable[[JobRecord, Mapping[str, object]], None],
        on_cancel: Callable[[str], None],
        on_missing: Callable[[str], None],
    ) -> None:
        """
        Start the store's background tasks in ``nursery`` (the queue's service nursery);
        ``on_missing`` receives the ids passed to `watch` that the store does not hold.
        """
        ...

    def submit(self, record: JobRecord, inputs: Mapping[str, object], policy: RetryPolicy) -> None:
        """Buffer a new job (synchronous, never blocks)."""
        ...

    async def claim(self) -> ClaimedJob:
        """Wait for a due job this process can run, and claim it."""
        ...

    def watch(self, job_id: str) -> None:
        """Follow a job run elsewhere: its records reach ``on_record``."""
        ...

    def request_cancel(self, job_id: str) -> None:
        """Cancel a job wherever it runs."""
        ...

    def release(self, job_id: str) -> None:
        """Give back a claimed job unfinished (pending again, its attempt not counted)."""
        ...

    def stop_claiming(self) -> None:
        """Claim nothing more; give back jobs claimed for no worker yet (the queue closes)."""
        ...


@final
@attrs.define(eq=False)
class MemoryJobStore:
    """
    A `JobStore` in process memory (the default). Keeps every record until `forget`.
    """

    _records: dict[str, JobRecord] = attrs.field(factory=dict, init=False)
    _ids: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def new_id(self) -> str:
        """Return ``"job-1"``, ``"job-2"``...: fresh in this store."""
        return f"job-{next(self._ids)}"

    def save(self, record: JobRecord) -> None:
        """Store ``record``."""
        self._records[record.id] = record

    def load(self, job_id: str) -> JobRecord | None:
        """Return the latest record of ``job_id``, or None."""
        return self._records.get(job_id)

    def forget(self, job_id: str) -> None:
        """Drop the record of a finished job (a long-lived queue's janitor calls this)."""
        record = self._records.get(job_id)
        if record is not None and record.terminal:
            del self._records[job_id]

    def __len__(self) -> int:
        return len(self._records)

    async def flush(self) -> None:
        """
        Nothing is buffered. A checkpoint.

        Cancellation: nothing to leave behind.
        """
        await trio.lowlevel.checkpoint()


# --- subscribers ----------------------------------------------------------------------------


@attrs.define(eq=False)
class _Subscriber:
    callback: StreamCallback
    high_water_bytes: int
    lossy: bool = False
    dropped: bool = False
    overflowed: bool = False
    send: ByteSendChannel[StreamEvent] | None = None
    # Backpressure mode: events offered while the channel was full wait here, in order, until
    # the producer's next pacing point sends them (parking it); bounded by S8-8.
    backlog: deque[StreamEvent] = attrs.Factory(deque)
    backlog_bytes: int = 0
    flushing: trio.Lock = attrs.Factory(trio.Lock)


@final
@attrs.define(eq=False)
class _Job:
    record: JobRecord
    work: JobWork | None
    policy: RetryPolicy
    handle: JobHandle | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None
    accepting: bool = False
    cancel_requested: bool = False
    subscribers: list[_Subscriber] = attrs.Factory(list)
    exception: BaseException | None = None
    finished_stream: bool = False
    # Shared store (S8-14): claimed here without a handle asked for here; dropped when done.
    claimed_only: bool = False
    # Shared store (S8-21): `JobQueue.handle` of an id the store turned out not to hold.
    unknown: UnknownJobError | None = None

    @property
    def state(self) -> JobState:
        return self.record.state


@final
@attrs.frozen(kw_only=True)
class JobQueueStatistics:
    """
    A snapshot of a `JobQueue`.

    Attributes:
        workers: the number of workers (the concurrency limit).
        pending, running, completed, failed, cancelled: jobs in each state.
        peak_running: the most jobs ever running at once (never more than ``workers``).
        subscribers_dropped: subscribers dropped (overflow or a raising callback).
    """

    workers: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int
    peak_running: int
    subscribers_dropped: int


@final
class JobHandle:
    """
    A submitted job: watch it, wait for it, cancel it, read its output.

    Made by `JobQueue.submit` (or `JobQueue.handle`); compares by identity.
    """

    __slots__ = ("_job", "_queue")

    def __init__(self, queue: JobQueue, job: _Job) -> None:
        self._queue = queue
        self._job = job

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {self.state.value}>"

    @property
    def id(self) -> str:
        """The job id."""
        return self._job.record.id

    @property
    def state(self) -> JobState:
        """``"pending"``, ``"running"``, ``"completed"``, ``"failed"`` or ``"cancelled"``."""
        return self._job.record.state

    @property
    def record(self) -> JobRecord:
        """The job's current record (small: refs stay refs)."""
        return self._job.record

    @property
    def attempts(self) -> int:
        """Attempts started so far."""
        return self._job.record.attempt

    async def wait(self) -> JobState:
        """
        Wait until the job is terminal and return its state.

        Raises:
            UnknownJobError: a handle from `JobQueue.handle` for an id the shared store does
                not hold (S8-21).

        Cancellation: a checkpoint; cancelling the wait leaves the job alone.
        """
        await self._job.done.wait()  # a checkpoint whether or not it is set already
        if self._job.unknown is not None:
            raise self._job.unknown
        return self._job.record.state

    async def result(self) -> Mapping[str, object]:
        """
        Wait for the job and return its output, refs included (small: spec S8-5).

        Returns:
            The output of a task job; ``{node id: output}`` for a graph job.

        Raises:
            JobCancelledError: the job was cancelled.
            Exception: the last attempt's error, as itself (a `TaskFailedError` naming the
                task, the cause chained), when the job failed in this process.
            RemoteJobError: the job failed in another process: its ``type_name``,
                ``remote_message`` and ``remote_traceback`` say what that process recorded
                (S8-24).
            UnknownJobError: a handle from `JobQueue.handle` for an id the shared store does
                not hold (S8-21).

        Cancellation:
            A checkpoint; cancelling the wait leaves the job running.
        """
        await self.wait()
        return self._outcome()

    def _outcome(self) -> Mapping[str, object]:
        job = self._job
        if job.unknown is not None:
            raise job.unknown
        record = job.record
        if record.state is JobState.COMPLETED:
            assert record.output is not None
            return record.output
        if record.state is JobState.CANCELLED:
            raise JobCancelledError(f"job {record.id} was cancelled")
        if job.exception is not None:
            raise job.exception
        # A job another process ran (S8-24): what that process recorded of its error.
        raise _remote_error(record)

    def cancel(self) -> None:
        """
        Cancel the job: a pending job becomes ``cancelled`` at once; a running one is cancelled
        through its cancel scope and becomes ``cancelled`` when its runner has cleaned up
        (temp blobs deleted). A finished job is left alone. Synchronous, never blocks.
        """
        self._queue._cancel(self._job)

    def on_stream(
        self,
        callback: StreamCallback,
        *,
        high_water_bytes: int = DEFAULT_HIGH_WATER_BYTES,
        lossy: bool = False,
    ) -> None:
        """
        Subscribe ``callback`` to the job's stream events (text, object, binary chunks,
        snapshots, phases, finish, error), delivered in order, from the next event on.

        ``callback(event)`` may be a plain function or an ``async`` one. Each subscriber is
        isolated: one that raises is logged and dropped, the others go on (S8-9). Each has a
        byte-budget channel of ``high_water_bytes`` (spec S8-7). By default a subscriber that
        falls that far behind applies backpressure: the job's task waits after its next event
        until the subscriber has caught up (S8-8). With ``lossy=True`` it is dropped instead,
        and its last event is ``StreamError(SubscriberOverflowError)``. A failed attempt ends
        with a `StreamError` before any retry's events. On a finished job, nothing is
        delivered.

        Raises:
            TypeError: ``callback`` is not callable, or ``high_water_bytes`` is not an int.
            ValueError: ``high_water_bytes`` is not positive.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        _check_positive_int("high_water_bytes", high_water_bytes)
        job = self._job
        if job.record.terminal:
            return
        subscriber = _Subscriber(
            callback=callback, high_water_bytes=high_water_bytes, lossy=bool(lossy)
        )
        job.subscribers.append(subscriber)
        if job.accepting and job.nursery is not None:
            _start_delivery(job, subscriber, job.nursery)

    @asynccontextmanager
    async def open_output_stream(
        self, port: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """
        Wait for the job, then stream one binary output port without materialising it.

        A `CacheRef` is streamed from the run's cache in the repository's chunks; an inline
        `Blob` or bytes value is streamed in 64 KiB chunks. Without ``port``, the job's task
        must declare exactly one binary output port (the seed's M-1: never a ref found just
        anywhere in the output). For a graph job, ``port`` is ``"<node id>.<port>"``.

        Raises:
            JobCancelledError: the job was cancelled.
            Exception: the job's error, when it failed.
            JobOutputError: no port given and not exactly one binary port; ``port`` is not a
                declared binary port; the value there is missing or not a ref or bytes; a
                ref but the run had no cache.
            RefError: the cache no longer has the blob (`DanglingRefError`).

        Cancellation:
            Waiting and reading are checkpoints; cancelling closes the blob reader.
        """
        await self.result()
        value = self._select(port)
        if isinstance(value, CacheRef):
            assert self._job.work is not None
            cache = self._job.work.config.cache
            if cache is None:
                raise JobOutputError(
                    f"job {self.id}: the output holds a ref but the run had no cache"
                )
            opener = getattr(cache, "open_output_stream_by_ref", None)
            if opener is None:
                raise JobOutputError(f"job {self.id}: the run's cache cannot stream refs")
            async with opener(value) as chunks:
                yield chunks
            return
        data = value.data if isinstance(value, Blob) else value
        yield _iterate_inline(memoryview(data).cast("B"))

    def _select(self, port: str | None) -> Blob | bytes | bytearray | memoryview | CacheRef:
        job = self._job
        output = job.record.output
        assert output is not None
        if job.work is None:
            raise JobOutputError(
                f"job {self.id}: its task type {job.record.task_type!r} is not registered here"
            )
        target = job.work.target
        if isinstance(target, Task):
            where: Mapping[str, object] = output
            declared = [p for p, spec in type(target).output_ports.items() if spec.is_binary]
            node_label = ""
        else:
            if port is None:
                raise JobOutputError(
                    f"job {self.id} runs a graph: name the port as '<node id>.<port>'"
                )
            node, _, port = port.partition(".")
            if node not in output or not port:
                raise JobOutputError(f"job {self.id}: no node {node!r} in the graph's output")
            node_out = output[node]
            assert isinstance(node_out, Mapping)
            where = node_out
            task = target.task(node)
            declared = [p for p, spec in type(task).output_ports.items() if spec.is_binary]
            node_label = f"{node}."
        if port is None:
            # Invariant (S8-12): portless only with exactly one declared binary port (M-1).
            if len(declared) != 1:
                raise JobOutputError(
                    f"job {self.id}: open_output_stream() without a port needs exactly one "
                    f"binary output port; the task declares {sorted(declared)}"
                )
            port = declared[0]
        if port not in declared:
            raise JobOutputError(
                f"job {self.id}: {node_label}{port!r} is not a declared binary output port "
                f"(binary ports: {sorted(declared)})"
            )
        if port not in where:
            raise JobOutputError(f"job {self.id}: the output has no value at {node_label}{port!r}")
        value = where[port]
        if isinstance(value, CacheRef | Blob | bytes | bytearray | memoryview):
            return value
        raise JobOutputError(
            f"job {self.id}: the value at {node_label}{port!r} is a {type(value).__name__}, "
            "not a ref or bytes"
        )


async def _iterate_inline(view: memoryview) -> AsyncIterator[bytes]:
    # Inline values are streamed too, in bounded chunks, a checkpoint per chunk.
    offset = 0
    while True:
        await trio.lowlevel.checkpoint()
        if offset >= len(view):
            return
        piece = bytes(view[offset : offset + _INLINE_CHUNK])
        offset += len(piece)
        yield piece


def _start_delivery(job: _Job, subscriber: _Subscriber, nursery: trio.Nursery) -> None:
    if subscriber.dropped:
        return
    send, receive = open_byte_channel(subscriber.high_water_bytes, size_of=_event_size)
    subscriber.send = send
    nursery.start_soon(_deliver, job, subscriber, receive)


def _event_size(event: StreamEvent) -> int:
    return event_budget_size(event)


async def _call(callback: StreamCallback, event: StreamEvent) -> None:
    result = callback(event)
    if inspect.isawaitable(result):
        await result


async def _deliver(
    job: _Job, subscriber: _Subscriber, receive: ByteReceiveChannel[StreamEvent]
) -> None:
    async with receive:
        async for event in receive:
            try:
                await _call(subscriber.callback, event)
            except Exception:
                # Invariant (S8-9): a raising subscriber is logged and dropped, alone.
                logger.exception(
                    "on_stream subscriber %r of job %s raised; it is dropped",
                    subscriber.callback,
                    job.record.id,
                )
                subscriber.dropped = True
                return
    if subscriber.overflowed:
        error = SubscriberOverflowError(
            f"job {job.record.id}: on_stream subscriber fell more than "
            f"{subscriber.high_water_bytes} bytes behind and was dropped"
        )
        try:
            await _call(subscriber.callback, StreamError(error))
        except Exception:
            logger.exception(
                "on_stream subscriber %r raised on its overflow error", subscriber.callback
            )


def _overflow(job: _Job, subscriber: _Subscriber) -> None:
    # Invariant (S8-8): a subscriber never holds more than its budget (plus its backlog,
    # itself bounded by the budget): past that it is dropped with a clear error.
    send = subscriber.send
    subscriber.dropped = True
    subscriber.overflowed = True
    subscriber.backlog.clear()
    subscriber.backlog_bytes = 0
    logger.warning(
        "on_stream subscriber %r of job %s overflowed its %d-byte budget; dropped",
        subscriber.callback,
        job.record.id,
        subscriber.high_water_bytes,
    )
    if send is not None:
        send.close()


def _publish(job: _Job, event: StreamEvent) -> None:
    # The runner's listener: synchronous, never blocks (S8-8).
    if isinstance(event, Finish | StreamError):
        job.finished_stream = True
    for subscriber in job.subscribers:
        send = subscriber.send
        if send is None or subscriber.dropped:
            continue
        if subscriber.backlog:
            # Keep the order: nothing overtakes the backlog.
            subscriber.backlog.append(event)
            subscriber.backlog_bytes += event_budget_size(event)
            if subscriber.backlog_bytes > subscriber.high_water_bytes:
                _overflow(job, subscriber)
            continue
        try:
            send.send_nowait(event)
        except trio.WouldBlock:
            if subscriber.lossy:
                _overflow(job, subscriber)
            else:
                subscriber.backlog.append(event)
                subscriber.backlog_bytes = event_budget_size(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            subscriber.dropped = True


async def _pace(job: _Job) -> None:
    # Called by a paced task after each event it yields (the runner has published it by then).
    if not job.subscribers:
        return
    # Invariant (S8-8): a checkpoint per event lets the delivery tasks run, so a subscriber
    # that keeps up is never behind by more than what one scheduling round produced.
    await trio.lowlevel.checkpoint()
    if any(subscriber.backlog for subscriber in job.subscribers):
        # Another paced task may be flushing: then this one waits on the subscriber's lock.
        await _flush(job)


async def _flush(job: _Job) -> None:
    # Backpressure: send each backlog through its byte-budget channel, parking until room.
    for subscriber in list(job.subscribers):
        if not subscriber.backlog:
            continue
        async with subscriber.flushing:
            while subscriber.backlog and not subscriber.dropped:
                send = subscriber.send
                if send is None:
                    break
                event = subscriber.backlog.popleft()
                subscriber.backlog_bytes -= event_budget_size(event)
                try:
                    await send.send(event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    subscriber.dropped = True
                    subscriber.backlog.clear()
                    subscriber.backlog_bytes = 0


def _paced_task(task: Task, job: _Job) -> Task:
    # A copy of a streaming task whose event stream pauses at `_pace` after each event: the
    # only place a job can wait for its subscribers, since the runner's listener is sync.
    # Non-streaming tasks yield one event and need nothing.
    if not type(task).is_streaming():
        return task
    original = task.execute_stream

    async def execute_stream(
        inputs: Mapping[str, object], ctx: TaskContext
    ) -> AsyncIterator[StreamEvent]:
        async with aclosing(original(inputs, ctx)) as stream:  # type: ignore[type-var]
            async for event in stream:
                yield event
                await _pace(job)

    try:
        clone = copy.copy(task)
        # object.__setattr__: a frozen (attrs) task class refuses plain assignment.
        object.__setattr__(clone, "execute_stream", execute_stream)
    except Exception:  # an uncopyable task runs unpaced: lossy delivery only (S8-8)
        logger.debug("task %r cannot be copied; its job runs without pacing", task)
        return task
    return clone


def _paced_target(target: Task | TaskGraph, job: _Job) -> Task | TaskGraph:
    if isinstance(target, Task):
        return _paced_task(target, job)
    if not any(type(target.task(node)).is_streaming() for node in target.nodes):
        return target
    # The same graph (same node ids, fixed inputs and edges) over paced copies of its tasks.
    graph = TaskGraph()
    for node in target.nodes:
        new_id = graph.add(_paced_task(target.task(node), job), inputs=target.fixed_inputs(node))
        assert new_id == node
    for edge in target.edges:
        graph.connect(edge.src, edge.src_port, edge.dst, edge.dst_port)
    return graph


@final
class JobQueue:
    """
    Runs jobs on a fixed number of workers; made by `open_job_queue`.
    """

    def __init__(
        self,
        config: RunConfig,
        workers: int,
        store: JobStore,
        runner: JobRunner,
    ) -> None:
        self._config = config
        self._workers = workers
        self._store = store
        self._runner = runner
        self._jobs: dict[str, _Job] = {}
        self._schedule = JobSchedule()
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._running = 0
        self._peak_running = 0
        self._counts = dict.fromkeys(JobState, 0)
        self._dropped = 0
        self._observers: list[Callable[[JobRecord], object]] = []
        # A shared store (S8-14): jobs are claimed from it, not from `_schedule`.
        self._claiming: ClaimingJobStore | None = (
            store if isinstance(store, ClaimingJobStore) else None
        )
        self._claim_scopes: set[trio.CancelScope] = set()

    @property
    def config(self) -> RunConfig:
        """The run configuration every job runs under."""
        return self._config

    @property
    def store(self) -> JobStore:
        """The job store."""
        return self._store

    def statistics(self) -> JobQueueStatistics:
        """A frozen snapshot: jobs per state, the peak of running jobs."""
        c = self._counts
        return JobQueueStatistics(
            workers=self._workers,
            pending=c[JobState.PENDING],
            running=c[JobState.RUNNING],
            completed=c[JobState.COMPLETED],
            failed=c[JobState.FAILED],
            cancelled=c[JobState.CANCELLED],
            peak_running=self._peak_running,
            subscribers_dropped=self._dropped,
        )

    def submit(
        self,
        task_or_graph: Task | TaskGraph,
        inputs: Mapping[str, object] | None = None,
        *,
        run_after: float | None = None,
        max_retries: int = 0,
        retry_delay: float = 0.0,
        retry_backoff: float = 2.0,
    ) -> JobHandle:
        """
        Submit a job; it is ``pending`` until a worker runs it. Synchronous, never blocks.

        Args:
            task_or_graph: a `Task` instance (run with ``inputs``) or a `TaskGraph`.
            inputs: the task's inputs (``None``: none); must be ``None`` for a graph.
            run_after: a `trio.current_time` deadline; the job does not start before it.
            max_retries: how many times a retryable failure runs the job again (S8-2).
            retry_delay: seconds before the first retry; later ones multiply it by
                ``retry_backoff``.
            retry_backoff: the delay factor between retries (>= 1).

        Returns:
            The job's `JobHandle`.

        Raises:
            TypeError: ``task_or_graph`` is neither; ``inputs`` is not a mapping (or is given
                for a graph); ``run_after`` is not a number.
            ValueError: ``max_retries`` is negative; ``run_after`` is NaN.
            trio.ClosedResourceError: the queue is closing or closed.
        """
        if self._closing:
            raise trio.ClosedResourceError("the job queue is closed")
        policy = RetryPolicy(max_retries=max_retries, delay=retry_delay, backoff=retry_backoff)
        if isinstance(task_or_graph, TaskGraph):
            if inputs is not None:
                raise TypeError("a graph job takes no inputs (give nodes fixed inputs instead)")
            kind, task_type = "graph", "graph"
            work_inputs: dict[str, object] = {}
        elif isinstance(task_or_graph, Task):
            if inputs is None:
                work_inputs = {}
            elif isinstance(inputs, Mapping):
                work_inputs = dict(inputs)
            else:
                raise TypeError(f"inputs must be a mapping or None, not {type(inputs).__name__}")
            kind, task_type = "task", type(task_or_graph).type
        else:
            raise TypeError(
                f"submit needs a Task instance or a TaskGraph, not {type(task_or_graph).__name__}"
            )
        if self._claiming is not None:
            # Invariant (S8-14): other processes find the task by its registered type.
            if kind == "graph":
                raise TypeError("a shared job store runs tasks (by registered type), not graphs")
            try:
                registered = get_task_class(task_type)
            except KeyError:
                registered = None
            if registered is not type(task_or_graph):
                raise TypeError(f"task type {task_type!r} is not registered by this class")
        now = trio.current_time()
        if run_after is not None:
            _check_deadline(run_after)
        job_id = self._store.new_id()
        record = JobRecord(
            id=job_id,
            kind=kind,
            task_type=task_type,
            max_retries=max_retries,
            run_after=None if run_after is None else float(run_after),
        )
        work = JobWork(target=task_or_graph, inputs=work_inputs, config=self._config)
        job = _Job(record=record, work=work, policy=policy)
        handle = JobHandle(self, job)
        job.handle = handle
        self._jobs[job_id] = job
        self._counts[JobState.PENDING] += 1
        if self._claiming is not None:
            self._claiming.submit(record, work_inputs, policy)
            self._notify(record)
            return handle
        self._store.save(record)
        self._notify(record)
        # Invariant (S8-3): due at run_after, or at submission time.
        self._schedule.push(job_id, now if run_after is None else float(run_after))
        self._lot.unpark()
        return handle

    def on_transition(self, callback: Callable[[JobRecord], object]) -> None:
        """
        Call ``callback(record)`` synchronously after every job transition, with the job's new
        record (a submitted job's first record included). It must not block; one that raises
        is logged and dropped.

        Raises:
            TypeError: ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        self._observers.append(callback)

    def forget(self, job_id: str) -> None:
        """
        Drop a finished job from the queue and its store, so a long-lived queue does not keep
        every job; handles already held keep working.

        Raises:
            KeyError: no such job in this queue.
            ValueError: the job is not finished.
        """
        job = self._jobs[job_id]
        if not job.record.terminal:
            raise ValueError(f"job {job_id} is {job.record.state.value}, not finished")
        del self._jobs[job_id]
        self._store.forget(job_id)

    def _notify(self, record: JobRecord) -> None:
        for observer in list(self._observers):
            try:
                observer(record)
            except Exception:
                logger.exception("on_transition observer %r raised; it is dropped", observer)
                self._observers.remove(observer)

    def handle(self, job_id: str) -> JobHandle:
        """
        Return the handle of job ``job_id``.

        With a shared store (`PostgresJobStore`), ``job_id`` may name a job submitted in
        another process: the handle follows it through the store (its state, `result`,
        `cancel`, `open_output_stream` through the run's cache). The store looks the id up at
        once: if the table does not hold it, the handle's `JobHandle.result` and
        `JobHandle.wait` raise `UnknownJobError` (a `KeyError`) instead of waiting (S8-21);
        a later ``handle(job_id)`` looks again. A process that submits jobs writes them
        when its store flushes (at once in the background, and when its queue closes).

        Raises:
            KeyError: no such job in this queue (in-memory store only).
        """
        job = self._jobs.get(job_id)
        if job is None:
            if self._claiming is None:
                raise KeyError(job_id)
            record = JobRecord(id=job_id, kind="task", task_type="")
            job = _Job(record=record, work=None, policy=RetryPolicy())
            job.handle = JobHandle(self, job)
            self._jobs[job_id] = job
            self._counts[JobState.PENDING] += 1
            self._claiming.watch(job_id)
        job.claimed_only = False
        assert job.handle is not None
        return job.handle

    # --- a shared store's reports -----------------------------------------------------------

    def _work_for(self, task_type: str, inputs: Mapping[str, object]) -> JobWork | None:
        try:
            task = get_task_class(task_type)()
        except Exception:
            return None
        return JobWork(target=task, inputs=dict(inputs), config=self._config)

    def _on_remote_record(self, record: JobRecord, inputs: Mapping[str, object]) -> None:
        # A watched job's record, as another process wrote it (S8-21).
        job = self._jobs.get(record.id)
        if job is None or job.scope is not None or job.record.terminal:
            return
        if job.work is None:
            job.work = self._work_for(record.task_type, inputs)
        before = job.record.state
        job.record = record
        self._counts[before] -= 1
        self._counts[record.state] += 1
        if record.terminal:
            job.done.set()
        self._notify(record)

    def _on_remote_missing(self, job_id: str) -> None:
        # Invariant (S8-21): the store does not hold the id `handle` asked for: its handle
        # fails at once (a later `handle(job_id)` looks again).
        job = self._jobs.get(job_id)
        if job is None or job.work is not None or job.scope is not None or job.record.attempt:
            return
        job.unknown = UnknownJobError(job_id)
        del self._jobs[job_id]
        self._counts[job.record.state] -= 1
        job.done.set()

    def _on_remote_cancel(self, job_id: str) -> None:
        # Cancel requested elsewhere, or the lease lost, for a job running here (S8-20).
        job = self._jobs.get(job_id)
        if job is not None and job.record.state is JobState.RUNNING:
            job.cancel_requested = True
            if job.scope is not None:
                job.scope.cancel()

    # --- transitions ------------------------------------------------------------------------

    def _apply(
        self,
        job: _Job,
        event: JobEvent,
        *,
        output: Mapping[str, object] | None = None,
        error: str | None = None,
        run_after: float | None = None,
        error_traceback: str | None = None,
    ) -> None:
        before = job.record.state
        job.record = job.record.apply(
            event, output=output, error=error, run_after=run_after, error_traceback=error_traceback
        )
        after = job.record.state
        self._counts[before] -= 1
        self._counts[after] += 1
        self._store.save(job.record)
        if job.record.terminal:
            job.done.set()
        self._notify(job.record)

    def _cancel(self, job: _Job) -> None:
        state = job.record.state
        if self._claiming is not None and job.scope is None:
            # Invariant (S8-20): the store decides: pending there, or running elsewhere.
            if not job.record.terminal:
                self._claiming.request_cancel(job.record.id)
            return
        if state is JobState.PENDING:
            self._schedule.discard(job.record.id)
            self._apply(job, JobEvent.CANCEL)
        elif state is JobState.RUNNING:
            job.cancel_requested = True
            if job.scope is not None:
                job.scope.cancel()

    # --- workers ----------------------------------------------------------------------------

    async def _claim_shared(self, claiming: ClaimingJobStore) -> _Job | None:
        while True:
            if self._closing:
                return None
            claimed: ClaimedJob | None = None
            with trio.CancelScope() as scope:
                self._claim_scopes.add(scope)
                try:
                    claimed = await claiming.claim()
                finally:
                    self._claim_scopes.discard(scope)
            if claimed is None:
                return None
            record = claimed.record
            work = self._work_for(record.task_type, claimed.inputs)
            if work is None:  # pragma: no cover - the claim asks for registered types only
                claiming.release(record.id)
                continue
            job = self._jobs.get(record.id)
            if job is None:
                job = _Job(record=record, work=work, policy=claimed.policy, claimed_only=True)
                job.handle = JobHandle(self, job)
                self._jobs[record.id] = job
                self._counts[JobState.RUNNING] += 1
            else:
                self._counts[job.record.state] -= 1
                self._counts[JobState.RUNNING] += 1
                job.record, job.work, job.policy = record, work, claimed.policy
                job.cancel_requested = False
            self._notify(record)
            return job

    async def _claim(self) -> _Job | None:
        if self._claiming is not None:
            return await self._claim_shared(self._claiming)
        while True:
            if self._closing:
                return None
            job_id = self._schedule.pop_due(trio.current_time())
            if job_id is not None:
                job = self._jobs[job_id]
                # Invariant (S8-6): popped and started with no checkpoint in between.
                self._apply(job, JobEvent.START)
                return job
            deadline = self._schedule.next_due()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._lot.park()

    async def _worker(self) -> None:
        while True:
            job = await self._claim()
            if job is None:
                return
            self._running += 1
            self._peak_running = max(self._peak_running, self._running)
            try:
                await self._run(job)
            finally:
                self._running -= 1
            if job.claimed_only and job.record.state is not JobState.RUNNING:
                # A worker process keeps no record of the jobs it ran for others.
                self._jobs.pop(job.record.id, None)
                self._store.forget(job.record.id)

    async def _run(self, job: _Job) -> None:
        record = job.record
        assert job.work is not None
        config = job.work.config
        # Each attempt runs as "<job id>-<attempt>".
        work = JobWork(
            target=_paced_target(job.work.target, job),
            inputs=job.work.inputs,
            config=attrs.evolve(config, run_id=f"{record.id}-{record.attempt}"),
        )
        output: Mapping[str, object] | None = None
        error: Exception | None = None
        job.finished_stream = False
        job.scope = scope = trio.CancelScope()
        if job.cancel_requested:
            scope.cancel()
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    job.nursery = nursery
                    job.accepting = True
                    for subscriber in job.subscribers:
                        _start_delivery(job, subscriber, nursery)
                    try:
                        try:
                            output = await self._runner(work, lambda e: _publish(job, e))
                            if not job.finished_stream and isinstance(work.target, Task):
                                _publish(job, Finish(output))
                        except Exception as exc:
                            error = exc
                            if not job.finished_stream:
                                _publish(job, StreamError(exc))
                        # What the subscribers could not take yet (S8-8), before the end.
                        await _flush(job)
                    finally:
                        # Invariant (S8-9): subscribers drain before the job is terminal.
                        job.accepting = False
                        for subscriber in job.subscribers:
                            subscriber.backlog.clear()
                            subscriber.backlog_bytes = 0
                            if subscriber.send is not None:
                                subscriber.send.close()
                                subscriber.send = None
        except BaseException:
            # The queue itself is being cancelled: the job ends cancelled.
            self._finish_cancelled(job)
            raise
        finally:
            job.nursery = None
            job.scope = None
            self._dropped += sum(1 for s in job.subscribers if s.dropped)
            job.subscribers = [s for s in job.subscribers if not s.dropped]
        if scope.cancelled_caught or job.cancel_requested:
            self._finish_cancelled(job)
        elif error is not None:
            self._failed(job, error)
        else:
            assert output is not None
            self._apply(job, JobEvent.SUCCEED, output=output)

    def _finish_cancelled(self, job: _Job) -> None:
        if job.record.state is JobState.RUNNING:
            if self._claiming is not None and not job.cancel_requested:
                # Invariant (S8-18): a worker shutting down gives its job back, not cancels it.
                self._claiming.release(job.record.id)
            self._apply(job, JobEvent.CANCEL)

    def _failed(self, job: _Job, error: Exception) -> None:
        job.exception = error
        text = f"{type(error).__name__}: {error}"
        # Invariant (S8-24): a shared store keeps the traceback for other processes.
        trace = _format_traceback(error) if self._claiming is not None else None
        decision = job.policy.decide(job.record.attempt, error)
        if decision.retry and (not self._closing or self._claiming is not None):
            due = trio.current_time() + decision.delay
            self._apply(job, JobEvent.RETRY, error=text, run_after=due, error_traceback=trace)
            if self._claiming is None:
                self._schedule.push(job.record.id, due)
                self._lot.unpark()
        elif decision.retry:
            self._apply(job, JobEvent.CANCEL)
        else:
            self._apply(job, JobEvent.FAIL, error=text, error_traceback=trace)

    def _close(self) -> None:
        # Pending jobs are cancelled; running ones finish; idle workers return.
        self._closing = True
        if self._claiming is not None:
            # Invariant (S8-23): prefetched jobs no worker took go back to the store now.
            self._claiming.stop_claiming()
        for scope in list(self._claim_scopes):
            scope.cancel()
        for job in list(self._jobs.values()):
            # A shared store's pending jobs are the store's: other workers run them.
            if job.record.state is JobState.PENDING and self._claiming is None:
                self._schedule.discard(job.record.id)
                self._apply(job, JobEvent.CANCEL)
        self._lot.unpark_all()


#: The longest traceback text a failed job's record keeps (S8-24): its head and its tail.
_MAX_TRACEBACK_CHARS = 16 * 1024


def _format_traceback(error: BaseException) -> str:
    text = "".join(traceback.format_exception(error))
    if len(text) <= _MAX_TRACEBACK_CHARS:
        return text
    half = _MAX_TRACEBACK_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def _remote_error(record: JobRecord) -> RemoteJobError:
    # Invariant (S8-24): "TypeName: message" as the failing process wrote it.
    type_name, _, message = (record.error or "").partition(": ")
    return RemoteJobError(record.id, type_name or "Exception", message, record.error_traceback)


def _check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_deadline(value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"run_after must be a number, not {type(value).__name__}")
    if math.isnan(value):
        raise ValueError("run_after must not be NaN")


@asynccontextmanager
async def open_job_queue(
    config: RunConfig = RunConfig(),  # noqa: B008 - a frozen value, safe as a default
    *,
    workers: int = 4,
    store: JobStore | None = None,
    _runner: JobRunner | None = None,
) -> AsyncIterator[JobQueue]:
    """
    Open a job queue whose ``workers`` worker tasks live in a nursery of this block.

    Args:
        config: the run configuration of every job (its cache keeps the jobs' blobs).
        workers: the concurrency limit: at most this many jobs run at once (>= 1).
        store: where job records live; ``None``: a fresh `MemoryJobStore`.

    Yields:
        The `JobQueue`.

    Raises:
        TypeError: ``config`` is not a `RunConfig`, ``workers`` not an int, ``store`` not a
            `JobStore`.
        ValueError: ``workers`` < 1.
        JobStoreUnavailableError: a shared store could not write what it buffered within
            its ``close_timeout`` (its database unreachable): raised when the block ends
            (S8-25); if the block itself raised, its error wins and this one is logged.

    Cancellation:
        When the block ends normally, pending jobs are cancelled and running jobs are waited
        for. When it raises or is cancelled, every job is cancelled (each cleans up what it
        streamed) and nothing is left running.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, not {type(config).__name__}")
    count = _check_positive_int("workers", workers)
    if store is None:
        store = MemoryJobStore()
    elif not isinstance(store, JobStore):
        raise TypeError(f"store must be a JobStore, not {type(store).__name__}")
    queue = JobQueue(config, count, store, _runner if _runner is not None else _default_runner())
    claiming = queue._claiming
    body_error: BaseException | None = None
    close_error: TaskGraphError | None = None
    # The service nursery holds a shared store's flusher, renewer and listener (S8-15..18);
    # it outlives the workers so their outcomes are written before it stops.
    async with trio.open_nursery() as service:
        if claiming is not None:
            await claiming.attach(
                service,
                on_record=queue._on_remote_record,
                on_cancel=queue._on_remote_cancel,
                on_missing=queue._on_remote_missing,
            )
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(queue._worker)
                try:
                    yield queue
                except BaseException as exc:
                    # Re-raised as itself below, not wrapped in the nursery's exception group.
                    body_error = exc
                    queue._close()
                    nursery.cancel_scope.cancel()
                else:
                    queue._close()
        finally:
            queue._closing = True
            if claiming is not None:
                claiming.stop_claiming()
            for job in list(queue._jobs.values()):
                # A shared store's unfinished jobs are the store's (S8-14): left alone.
                if not job.record.terminal and claiming is None:
                    queue._schedule.discard(job.record.id)
                    queue._apply(job, JobEvent.CANCEL)
            try:
                with trio.CancelScope(shield=True):
                    await store.flush()
            except TaskGraphError as exc:
                # Invariant (S8-25): a store that gave up (its database unreachable past its
                # close_timeout) ends the block with its error, after the service stops.
                close_error = exc
            finally:
                service.cancel_scope.cancel()
    if body_error is not None:
        if close_error is not None:
            logger.error("the job store's final flush failed", exc_info=close_error)
        raise body_error
    if close_error is not None:
        raise close_error
