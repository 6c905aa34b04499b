"""
The 10,000-cancel-point campaign (issue 10): every public async operation under
`cancel_at_each_checkpoint` (S7), checking the S2/S4/S6/S8 invariants after every run.

Scenarios, each rebuilt afresh for every run of the toolkit:

- byte channels (S2): producers and consumers through clones, receivers or senders closing
  early, items of varying sizes against varying marks;
- cache-server repositories (S4, S5): streamed save with its row, streamed read, delete,
  prefix prune, each through ``CacheServerRepository`` against an in-process server;
- the runner (S6): ``run_graph`` on chain, fan-out, fan-in, diamond and multi-binary-port
  graphs and ``run_task``, with memory, filesystem and cache-server caches, and a cache-hit
  replay of a populated cache;
- jobs (S8): submit, cancel, ``on_stream`` and ``open_output_stream`` on a queue with a cache.

What is checked after every run: nothing parked on any channel (``statistics()``, S2-12), every
handle closed (S2-11), nothing received that was not sent (S2-7), each producer's items in
order and none twice (S2-6), the peak bound (S2-3); no temp file, no orphan blob (``stats()``
blobs equal the refs the scenario received and did not delete, or ``gc`` finds none), no row
without its blob, the repository still usable (S4-3, S4-4, S4-8); no task left (the toolkit,
S7-3); every job terminal and the queue's counts consistent (S8-1, S8-10, S8-13).

Sizing: ``make test`` runs `DEFAULT_POINTS` points of one variant per scenario; ``make
torture`` (``TORTURE_MAX_POINTS=0``) runs every point of every variant: varying chunk sizes and
counts, marks, and trio's schedule seed where tasks race. Every variant is a distinct
(scenario, k) pair: a different graph, size, chunking, cache or interleaving.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, TypeVar

import attrs
import pytest
import trio

import trio_taskgraph as tg
import trio_taskgraph._stream_processor as sp
from tests.graph_tasks import Join, Relay
from tests.polling import wait_until
from tests.server_harness import in_process_server, wait_client_settled
from trio_taskgraph import BytesLike
from trio_taskgraph._cache_server import CacheServer
from trio_taskgraph.testing import cancel_at_each_checkpoint, torture_max_points

T = TypeVar("T")

#: Cancel points per campaign in ``make test``.
DEFAULT_POINTS = 4


def _full() -> bool:
    """Whether this is the full campaign (``make torture``: every point of every variant)."""
    return torture_max_points(DEFAULT_POINTS) is None


def _pick(variants: Sequence[T], every: int = 1 << 30) -> Sequence[T]:
    """Every variant under ``make torture``; in ``make test`` every ``every``-th one (at least
    the first)."""
    return variants if _full() else variants[::every]


def _temp_files(root: Path) -> list[str]:
    blobs = root / "blobs"
    return sorted(p.name for p in blobs.glob("*.tmp")) if blobs.exists() else []


# --- byte channels (S2) ----------------------------------------------------------------------


@attrs.frozen
class ChannelCase:
    mark: int
    producers: int
    consumers: int
    items: int
    size: int  # item i is 1 + (i * size) % (2 * size) bytes
    ending: str  # "normal", "receiver-closes" (S2-9), "sender-closes" (S2-10)
    seed: int = 0


CHANNEL_CASES = [
    ChannelCase(mark=8, producers=2, consumers=2, items=6, size=3, ending="normal"),
    ChannelCase(mark=1, producers=1, consumers=1, items=8, size=4, ending="normal"),
    ChannelCase(mark=64, producers=3, consumers=1, items=5, size=16, ending="normal"),
    ChannelCase(mark=5, producers=1, consumers=3, items=9, size=2, ending="normal"),
    ChannelCase(mark=8, producers=2, consumers=2, items=6, size=3, ending="normal", seed=1),
    ChannelCase(mark=8, producers=2, consumers=2, items=6, size=3, ending="normal", seed=2),
    ChannelCase(mark=6, producers=2, consumers=2, items=8, size=5, ending="receiver-closes"),
    ChannelCase(
        mark=6, producers=2, consumers=1, items=8, size=5, ending="receiver-closes", seed=1
    ),
    ChannelCase(mark=4, producers=2, consumers=2, items=6, size=2, ending="sender-closes"),
    ChannelCase(mark=4, producers=1, consumers=2, items=6, size=2, ending="sender-closes", seed=1),
    ChannelCase(mark=32, producers=2, consumers=2, items=12, size=7, ending="normal"),
    ChannelCase(mark=32, producers=2, consumers=2, items=12, size=7, ending="normal", seed=3),
    ChannelCase(mark=3, producers=3, consumers=3, items=5, size=3, ending="normal"),
    ChannelCase(mark=3, producers=3, consumers=3, items=5, size=3, ending="receiver-closes"),
    ChannelCase(mark=3, producers=3, consumers=3, items=5, size=3, ending="sender-closes"),
    ChannelCase(mark=2, producers=2, consumers=1, items=10, size=1, ending="sender-closes"),
    ChannelCase(mark=100, producers=1, consumers=1, items=20, size=9, ending="normal"),
    ChannelCase(mark=7, producers=2, consumers=3, items=7, size=4, ending="receiver-closes"),
]


@attrs.define
class ChannelScenario:
    case: ChannelCase
    send: tg.ByteSendChannel[bytes] | None = None
    sent: list[bytes] = attrs.Factory(list)
    received: list[list[bytes]] = attrs.Factory(list)
    completed: bool = False

    def _item(self, tag: int, i: int) -> bytes:
        length = 1 + (i * self.case.size) % (2 * self.case.size)
        return bytes([tag, i]) + b"x" * max(0, length - 2)

    async def __call__(self) -> None:
        case = self.case
        self.sent, self.completed = [], False
        self.received = [[] for _ in range(case.consumers)]
        send, receive = tg.open_byte_channel(case.mark)
        self.send = send

        async def produce(handle: tg.ByteSendChannel[bytes], tag: int) -> None:
            async with handle:
                for i in range(case.items):
                    item = self._item(tag, i)
                    try:
                        await handle.send(item)
                    except trio.BrokenResourceError:  # S2-9: every receiver is gone
                        return
                    except trio.ClosedResourceError:  # S2-10: this handle was closed
                        assert case.ending == "sender-closes"
                        return
                    self.sent.append(item)  # no checkpoint between the send and this line
                    if case.ending == "sender-closes" and tag == 1 and i == case.items // 2:
                        await handle.aclose()  # a producer leaves early, mid-stream
                        return

        async def consume(handle: tg.ByteReceiveChannel[BytesLike], into: list[bytes]) -> None:
            async with handle:
                async for item in handle:
                    into.append(bytes(item))
                    if case.ending == "receiver-closes" and len(into) == 2:
                        return  # S2-9: this receiver leaves; the last one breaks the senders
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for tag in range(1, case.producers):
                nursery.start_soon(produce, send.clone(), tag + 1)
            for into in self.received[1:]:
                nursery.start_soon(consume, receive.clone(), into)
            nursery.start_soon(produce, send, 1)
            nursery.start_soon(consume, receive, self.received[0])
        self.completed = True

    def check(self) -> None:
        assert self.send is not None
        stats = self.send.statistics()
        assert (stats.parked_senders, stats.parked_receivers) == (0, 0), stats  # S2-12
        assert (stats.open_send_channels, stats.open_receive_channels) == (0, 0), stats  # S2-11
        everything = [item for mine in self.received for item in mine]
        assert len(set(everything)) == len(everything), "S2-6: an item arrived twice"
        assert set(everything) <= set(self.sent), "S2-7: a cancelled send delivered its item"
        for mine in self.received:  # S2-6: per producer, in order
            for tag in range(1, self.case.producers + 1):
                order = [self.sent.index(x) for x in mine if x[0] == tag]
                assert order == sorted(order), "S2-6: out of order"
        largest = max((len(x) for x in self.sent), default=0)
        assert stats.peak_buffered_bytes <= self.case.mark + largest, stats  # S2-3
        if self.completed and self.case.ending != "receiver-closes":
            # S2-6 conservation: a run that finished delivered everything it sent.
            assert sorted(everything) == sorted(self.sent)
            if self.case.ending == "normal":
                assert len(self.sent) == self.case.producers * self.case.items


@pytest.mark.parametrize("case", _pick(CHANNEL_CASES, every=4), ids=repr)
async def test_byte_channel_cancelled_at_each_checkpoint(case: ChannelCase) -> None:
    """S2-3, S2-6, S2-7, S2-9, S2-10, S2-11, S2-12 (and the seed's late HIGH 2: a consumer
    that leaves never strands a producer) under `cancel_at_each_checkpoint` (S7)."""
    scenario = ChannelScenario(case)
    report = await cancel_at_each_checkpoint(
        scenario,
        check=scenario.check,
        max_points=torture_max_points(DEFAULT_POINTS),
        seed=case.seed,
    )
    assert report.points_exercised >= min(DEFAULT_POINTS, report.steps)


# --- the runner (S6) -------------------------------------------------------------------------


class Source(tg.Task):
    type = "test_torture_campaign.Source"
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
        size, chunk = inputs["size"], inputs["chunk"]
        assert isinstance(size, int)
        assert isinstance(chunk, int)
        for start in range(0, size, chunk):
            yield tg.BinaryDelta("data", bytes([start % 251]) * min(chunk, size - start))


class TwoPorts(tg.Task):
    """Two binary output ports, streamed interleaved (the multi-binary-port graph)."""

    type = "test_torture_campaign.TwoPorts"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {"type": "integer"}, "chunk": {"type": "integer"}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {
            "x": {"x-stream": "binary", "format": "binary"},
            "y": {"x-stream": "binary", "format": "blob"},
        }
    }
    cacheable = True

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        size, chunk = inputs["size"], inputs["chunk"]
        assert isinstance(size, int)
        assert isinstance(chunk, int)
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            yield tg.BinaryDelta("x", b"x" * n)
            yield tg.BinaryDelta("y", b"y" * n)


class Total(tg.Task):
    """Materialises its inputs and counts their bytes (a materialising consumer)."""

    type = "test_torture_campaign.Total"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {}, "more": {}, "tag": {}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {"type": "integer"}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        n = 0
        for port in ("data", "more"):
            value = inputs.get(port)
            if isinstance(value, tg.Blob):
                value = value.data
            if value is not None:
                assert isinstance(value, bytes)
                n += len(value)
        return {"n": n}


SHAPES = ("chain", "fan-out", "fan-in", "diamond", "two-ports", "run-task")


def build(shape: str, size: int, chunk: int) -> tuple[tg.TaskGraph, dict[str, int]]:
    """The graph of ``shape``, and the byte count each counting node must report."""
    graph = tg.TaskGraph()
    if shape == "two-ports":
        two = graph.add(TwoPorts(), inputs={"size": size, "chunk": chunk})
        relay = graph.add(Relay(), inputs={"tag": "x"})
        graph.connect(two, "x", relay, "data")
        total = graph.add(Total())
        graph.connect(relay, "data", total, "data")
        graph.connect(two, "y", total, "more")
        return graph, {total: 2 * size}
    src = graph.add(Source(), inputs={"size": size, "chunk": chunk, "tag": 1})
    if shape == "chain":
        relay = graph.add(Relay())
        graph.connect(src, "data", relay, "data")
        total = graph.add(Total())
        graph.connect(relay, "data", total, "data")
        return graph, {total: size}
    if shape == "fan-out":
        for tag in range(2):  # distinct keys: two nodes with one key would share a row
            relay = graph.add(Relay(), inputs={"tag": tag})
            graph.connect(src, "data", relay, "data")
        total = graph.add(Total())
        graph.connect(src, "data", total, "data")
        return graph, {total: size}
    if shape == "fan-in":
        other = graph.add(Source(), inputs={"size": size, "chunk": chunk, "tag": 2})
        join = graph.add(Join())
        graph.connect(src, "data", join, "a")
        graph.connect(other, "data", join, "b")
        total = graph.add(Total())
        graph.connect(join, "data", total, "data")
        return graph, {total: 2 * size}
    assert shape == "diamond"
    left = graph.add(Relay(), inputs={"tag": "left"})
    right = graph.add(Relay(), inputs={"tag": "right"})
    graph.connect(src, "data", left, "data")
    graph.connect(src, "data", right, "data")
    total = graph.add(Total())
    graph.connect(left, "data", total, "data")
    graph.connect(right, "data", total, "more")
    return graph, {total: 2 * size}


@contextmanager
def _recording_channels(into: list[tg.ByteSendChannel[BytesLike]]) -> Iterator[None]:
    """Record every byte channel the stream processor opens (to read their statistics)."""
    real = tg.open_byte_channel  # the function _stream_processor imported

    def recording(
        high_water_bytes: int,
    ) -> tuple[tg.ByteSendChannel[BytesLike], tg.ByteReceiveChannel[BytesLike]]:
        send, receive = real(high_water_bytes)
        into.append(send)
        return send, receive

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sp, "open_byte_channel", recording)
        yield


@attrs.frozen
class RunCase:
    shape: str
    cache: str  # "memory", "filesystem", "cache-server"
    size: int
    chunk: int
    budget: int
    threshold: int = 0
    replay: bool = False  # run against a cache populated beforehand: hits replay refs
    seed: int = 0


def _run_cases() -> list[RunCase]:
    cases: list[RunCase] = []
    for cache in ("memory", "filesystem", "cache-server"):
        for shape in SHAPES:
            cases.append(RunCase(shape, cache, size=2048, chunk=512, budget=1024))
            cases.append(RunCase(shape, cache, size=2048, chunk=512, budget=1024, replay=True))
            # Smaller chunks under a tighter budget (more parks), and another schedule.
            cases.append(RunCase(shape, cache, size=1200, chunk=200, budget=256))
            cases.append(RunCase(shape, cache, size=2048, chunk=512, budget=1024, seed=1))
            if cache == "memory":
                # Chunk sizes and counts, budgets, thresholds (inline results) and seeds.
                cases.append(RunCase(shape, cache, size=1500, chunk=100, budget=256))
                cases.append(RunCase(shape, cache, size=3000, chunk=1024, budget=4096))
                cases.append(RunCase(shape, cache, size=2048, chunk=512, budget=1024, seed=2))
                cases.append(RunCase(shape, cache, size=2048, chunk=512, budget=1024, seed=3))
                cases.append(
                    RunCase(shape, cache, size=1024, chunk=256, budget=512, threshold=64 * 1024)
                )
                cases.append(
                    RunCase(shape, cache, size=1500, chunk=100, budget=256, replay=True, seed=1)
                )
    return cases


RUN_CASES = _run_cases()
# ``make test``: every memory case, and the base and replay cases of the slower caches.
RUN_CASES_NOW = [
    c for c in RUN_CASES if _full() or c.cache == "memory" or (c.seed == 0 and c.chunk == 512)
]


@attrs.define
class RunScenario:
    """One run of a graph (or one task) with a cache; `check` inspects what it left."""

    case: RunCase
    repo: tg.OutputRepository
    fresh: Callable[[], tg.OutputRepository] | None = None  # a new cache per run
    channels: list[tg.ByteSendChannel[BytesLike]] = attrs.Factory(list)
    result: dict[str, Mapping[str, object]] | None = None
    before: tg.RepositoryStats | None = None
    statuses: list[tuple[str, str, str]] = attrs.Factory(list)  # (node, task type, state)

    def listen(self, event: tg.RunEvent) -> None:
        if isinstance(event.event, tg.TaskStatus):
            self.statuses.append((event.node_id, event.task_type, event.event.state))

    async def populate(self) -> None:
        """Fill the cache (replay cases: the campaign then replays hits from it)."""
        if self.case.shape == "run-task":
            await tg.run_task(Source(), self._task_inputs(), config=self._config())
        else:
            graph, _ = build(self.case.shape, self.case.size, self.case.chunk)
            await tg.run_graph(graph, config=self._config())
        self.before = await self.repo.stats()
        assert self.before.blobs > 0, "a replay case needs refs in its cache"

    def _task_inputs(self) -> dict[str, object]:
        return {"size": self.case.size, "chunk": self.case.chunk, "tag": 1}

    def _config(self) -> tg.RunConfig:
        return tg.RunConfig(
            cache=self.repo,
            binary_high_water_bytes=self.case.budget,
            reference_threshold_bytes=self.case.threshold,
        )

    async def __call__(self) -> None:
        self.channels, self.result, self.statuses = [], None, []
        if self.fresh is not None:
            self.repo = self.fresh()
        case = self.case
        with _recording_channels(self.channels):
            if case.shape == "run-task":
                output = await tg.run_task(
                    Source(), self._task_inputs(), config=self._config(), on_event=self.listen
                )
                data = output["data"]
                assert isinstance(data, tg.CacheRef | bytes), output  # S6-19
                if isinstance(data, bytes):
                    assert len(data) == case.size  # S6-17
                self.result = {"task": output}
                return
            graph, expected = build(case.shape, case.size, case.chunk)
            outputs = await tg.run_graph(graph, config=self._config(), on_event=self.listen)
        for node, n in expected.items():
            assert outputs[node]["n"] == n, (node, outputs[node])  # S6-17
        self.result = dict(outputs)

    async def check(self) -> None:
        for channel in self.channels:
            stats = channel.statistics()
            assert (stats.parked_senders, stats.parked_receivers) == (0, 0), stats  # S2-12
            assert stats.peak_buffered_bytes <= self.case.budget + self.case.chunk, stats  # S2-3
        with trio.CancelScope(shield=True):
            # S6-47, S4-3: no blob without a row (an orphan): collecting finds none.
            report = await self.repo.gc(min_age=0)
            assert report.blobs == 0, report
            assert report.temp_files == 0, report
            if self.before is not None and self.result is not None:
                # S6-45: a replay run is all hits: every cacheable node was replayed, none ran.
                cacheable = {Source.type, TwoPorts.type, Relay.type, Join.type}
                ran = {(n, t) for n, t, state in self.statuses if state == "completed"}
                hit = {(n, t) for n, t, state in self.statuses if state == "cached"}
                assert {(n, t) for n, t in ran if t in cacheable} <= hit, self.statuses
                assert hit, self.statuses
            if self.before is not None:
                # A replay only reads: the cache holds what it held (S6-45).
                after = await self.repo.stats()
                assert (after.rows, after.blobs) == (self.before.rows, self.before.blobs)
            if self.case.shape == "run-task" and self.result is not None:
                ref = self.result["task"]["data"]
                if isinstance(ref, tg.CacheRef):  # S6-21: the ref the caller got reads back
                    assert len(await self.repo.get_output_by_ref(ref)) == self.case.size
            # S4-8: the cache still works.
            ref = await self.repo.save_output_stream("after", {}, "out", _one(b"after"))
            assert await self.repo.get_output_by_ref(ref) == b"after"
            await self.repo.delete_output_by_ref(ref)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    await trio.lowlevel.checkpoint()
    yield data


@pytest.mark.parametrize("case", RUN_CASES_NOW, ids=repr)
async def test_run_cancelled_at_each_checkpoint(case: RunCase, tmp_path: Path) -> None:
    """S6-49 (cancellation), S6-47 (no orphan blob), S6-45 (hit replay only reads), S2-3,
    S2-12 (nothing parked on any edge), S4-3 (no temp file): ``run_graph``/``run_task`` on
    chain, fan-out, fan-in, diamond and multi-binary-port graphs with memory, filesystem and
    cache-server caches, cancelled at each checkpoint (S7)."""
    counter = itertools.count()
    timeout = 5.0 if case.cache == "memory" else math.inf  # thread hops: real time passes
    if case.cache == "cache-server":
        async with (
            in_process_server(tmp_path / "root") as (_server, sock),
            tg.connect_cache_server(sock, namespace="campaign") as repo,
        ):
            await _run_campaign(case, RunScenario(case, repo), timeout)
        return
    if case.cache == "memory":
        scenario = RunScenario(case, tg.MemoryOutputRepository())
        if not case.replay:
            scenario.fresh = tg.MemoryOutputRepository
        await _run_campaign(case, scenario, timeout)
        return
    folders: list[tg.FsOutputRepository] = []

    def fresh() -> tg.OutputRepository:
        repo = tg.FsOutputRepository(tmp_path / f"r{next(counter)}")
        folders.append(repo)
        return repo

    scenario = RunScenario(case, fresh())
    if not case.replay:
        scenario.fresh = fresh
    try:
        await _run_campaign(case, scenario, timeout)
    finally:
        with trio.CancelScope(shield=True):
            for folder_repo in folders:
                await folder_repo.aclose()


async def _run_campaign(case: RunCase, scenario: RunScenario, timeout: float) -> None:
    if case.replay:
        await scenario.populate()
    report = await cancel_at_each_checkpoint(
        scenario,
        check=scenario.check,
        max_points=torture_max_points(DEFAULT_POINTS),
        seed=case.seed,
        cancel_timeout=timeout,
    )
    # Not a degenerate scenario. The smallest, a cache hit of run_task on a memory cache,
    # has 4 cancel points: the run's start, the row lookup, the ref check and the read (a
    # one-node run takes no task switch of its own, S6-56; a fresh run has one more).
    assert report.steps >= (4 if case.replay else 5), report


# --- cache-server repositories (S4, S5) ------------------------------------------------------


async def _chunks(n: int, size: int, fill: int) -> AsyncIterator[bytes]:
    for i in range(n):
        await trio.lowlevel.checkpoint()
        yield bytes([(fill + i) % 256]) * size


def _expected(n: int, size: int, fill: int) -> bytes:
    return b"".join(bytes([(fill + i) % 256]) * size for i in range(n))


@attrs.frozen
class ServerCase:
    op: str  # "save", "read", "delete", "prune", "rows"
    chunks: int
    size: int
    seed: int = 0


SERVER_CASES = [
    ServerCase(op, chunks, size, seed)
    for op in ("save", "read", "delete", "prune", "rows")
    for chunks, size, seed in ((4, 4096, 0), (16, 1024, 0), (2, 100_000, 0), (4, 4096, 1))
]


@attrs.define
class ServerScenario:
    """
    One operation of a `CacheServerRepository` against an in-process server. The victims of
    a delete or prune are prepared by the previous run's `check` (and once before the
    campaign), so every cancel point lands in the operation itself.
    """

    case: ServerCase
    repo: tg.OutputRepository
    server: CacheServer | None  # the in-process cache server (None: a Postgres repository)
    root: Path | None
    extra_check: Callable[[], Awaitable[None]] | None = None
    fills: itertools.count[int] = attrs.Factory(itertools.count)
    issued: dict[tg.CacheRef, bytes] = attrs.Factory(dict)  # every ref handed out, ever
    rows: dict[str, tg.CacheRef] = attrs.Factory(dict)  # row key -> its blob (saved rows)
    rows_tried: dict[str, str] = attrs.Factory(dict)  # row key -> task type
    victims: list[tg.CacheRef] = attrs.Factory(list)  # this run's
    doomed: set[tg.CacheRef] = attrs.Factory(set)  # every run's victims
    keeper: tg.CacheRef | None = None
    row_fills: dict[int, set[int]] = attrs.Factory(dict)  # "rows": values tried per row

    async def _save(self, task: str, row: str | None) -> tg.CacheRef:
        fill = next(self.fills)
        n, size = self.case.chunks, self.case.size
        ref = await self.repo.save_output_stream(task, {"f": fill}, "out", _chunks(n, size, fill))
        self.issued[ref] = _expected(n, size, fill)  # no checkpoint since the return
        if row is not None:
            self.rows_tried[row] = task
            await self.repo.save_output(task, {"row": row}, {"ref": ref})
            self.rows[row] = ref
        return ref

    async def prepare(self) -> None:
        """Set up what the next run works on (outside the scenario: never cancelled)."""
        if self.case.op in ("read", "rows") and self.keeper is None:
            self.keeper = await self._save("keep", "keep")
        elif self.case.op == "delete":
            self.victims = [await self._save("t", None), await self._save("t", None)]
            self.doomed.update(self.victims)
        elif self.case.op == "prune":
            if self.keeper is None:
                self.keeper = await self._save("keep", "keep")
            fill = next(self.fills)
            self.victims = [await self._save("p.x", f"p{fill}"), await self._save("p.y", None)]
            self.doomed.update(self.victims)

    async def __call__(self) -> None:
        repo = self.repo
        if self.case.op == "save":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._save, "t", f"a{next(self.fills)}")
                nursery.start_soon(self._save, "t", f"b{next(self.fills)}")
        elif self.case.op == "read":
            assert self.keeper is not None
            async with repo.open_output_stream_by_ref(self.keeper) as chunks:
                got = b"".join([chunk async for chunk in chunks])
            assert got == self.issued[self.keeper]
            assert await repo.get_output_by_ref(self.keeper) == got
        elif self.case.op == "delete":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(repo.delete_output_by_ref, self.victims[0])
                nursery.start_soon(repo.stats)
            await repo.delete_output_by_ref(self.victims[1])
        elif self.case.op == "rows":
            # S5-19: callers receiving for themselves, parked behind each other and behind
            # the reader (a download is open), handing over as they are cancelled.
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(self._row_round, i)
                nursery.start_soon(self._read_keeper)
        else:
            assert await repo.delete_by_task_type_prefix("p.") >= 1

    async def _row_round(self, i: int) -> None:
        fill = next(self.fills)
        self.row_fills.setdefault(i, set()).add(fill)
        await self.repo.save_output("rows", {"i": i}, {"v": fill})
        # S5-15: a caller that awaited its write reads it back.
        assert await self.repo.get_output("rows", {"i": i}) == {"v": fill}

    async def _read_keeper(self) -> None:
        assert self.keeper is not None
        async with self.repo.open_output_stream_by_ref(self.keeper) as chunks:
            got = b"".join([chunk async for chunk in chunks])
        assert got == self.issued[self.keeper]

    async def check(self) -> None:
        with trio.CancelScope(shield=True):
            if self.server is not None:
                server = self.server
                await wait_until(
                    lambda: not server.statistics().requests, "the server to finish every request"
                )
                assert server.statistics().buffered_bytes == 0
            if isinstance(self.repo, tg.CacheServerRepository):
                repo = self.repo
                stats = repo.statistics()
                assert stats.requests == 0, "S5-9: a request outlived its caller"
                # S5-8, S5-19: what the server sent for requests whose callers left is
                # taken off the socket, and their slots come back, with no other call.
                await wait_client_settled(repo)
                assert repo.statistics().buffered_bytes == 0
                conn = repo._conn
                assert conn.slots.value == conn.max_in_flight, "S5-8: a request slot leaked"
                assert not conn.waiting, "S5-19: a caller is still counted as parked"
            if self.root is not None:
                assert _temp_files(self.root) == [], "S4-3: a temp file was left behind"
            if self.extra_check is not None:
                await self.extra_check()
            readable = 0
            for ref, data in self.issued.items():
                try:
                    got = await self.repo.get_output_by_ref(ref)
                except tg.DanglingRefError:
                    assert ref in self.doomed, f"S4-3: blob {ref} vanished"
                    continue
                assert got == data, f"S4-3: {ref} reads back other bytes"
                readable += 1
            repo_stats = await self.repo.stats()
            # S4-3: every published blob is one whose ref reached the caller (no orphan).
            assert repo_stats.blobs == readable, (repo_stats, readable)
            for row, task in self.rows_tried.items():
                value = await self.repo.get_output(task, {"row": row})
                if value is None:
                    assert row not in self.rows or task.startswith("p."), f"row {row} lost"
                    continue
                row_ref = value["ref"]
                assert isinstance(row_ref, tg.CacheRef)
                await self.repo.get_output_by_ref(row_ref)  # S4-4: never a row without its blob
            for i, fills in self.row_fills.items():
                stored = await self.repo.get_output("rows", {"i": i})
                assert stored is None or stored["v"] in fills, f"row {i} reads {stored!r}"
            if self.case.op == "prune":
                # S4-4: a prefix delete takes the row and both blobs, or nothing; not others.
                assert set(self.victims) <= set(self.issued)
                gone = [not await self._readable(ref) for ref in self.victims]
                assert gone[0] == gone[1], f"S4-4: half a prune: {gone}"
                assert self.keeper is not None
                assert await self._readable(self.keeper)
            await self.prepare()

    async def _readable(self, ref: tg.CacheRef) -> bool:
        try:
            await self.repo.get_output_by_ref(ref)
        except tg.DanglingRefError:
            return False
        return True


@pytest.mark.parametrize("case", SERVER_CASES, ids=repr)
async def test_cache_server_repository_cancelled_at_each_checkpoint(
    case: ServerCase, tmp_path: Path
) -> None:
    """S4-3, S4-4, S4-8, S5-8, S5-9, S5-10, S5-19 under `cancel_at_each_checkpoint` (S7):
    streamed save with its row, streamed read, delete, prefix prune, and rows written and
    read by three callers beside a download, through ``CacheServerRepository``
    leave no temp file, no orphan blob, no row without its blob, no open request, no
    leaked request slot, and rows that read back what a caller wrote."""
    root = tmp_path / "root"
    async with (
        in_process_server(root, window=64 * 1024, chunk_bytes=16 * 1024) as (server, sock),
        tg.connect_cache_server(sock, namespace="campaign") as repo,
    ):
        scenario = ServerScenario(case, repo, server, root)
        await scenario.prepare()
        report = await cancel_at_each_checkpoint(
            scenario,
            check=scenario.check,
            max_points=torture_max_points(DEFAULT_POINTS),
            seed=case.seed,
            cancel_timeout=math.inf,
        )
        assert report.steps >= 2


async def test_upload_cancelled_after_its_end_deletes_its_blob(tmp_path: Path) -> None:
    """Regression (found by this campaign, S4-3, S5-10): an upload cancelled after its last
    chunk was sent, while it waits for the server's verdict, deletes the blob the server
    published; that cleanup ran inside the upload's own request slot and asked for a second
    one, so the client raised ``RuntimeError`` (a borrower holding a `trio.CapacityLimiter`
    token) instead of ``Cancelled`` and left an orphan blob. Every point; three seeds under
    ``make torture``."""
    root = tmp_path / "root"
    async with in_process_server(root) as (server, sock):
        for seed in (0, 1, 2) if _full() else (0,):
            async with tg.connect_cache_server(sock, namespace=f"seed{seed}") as repo:
                scenario = ServerScenario(ServerCase("save", 2, 4096, seed), repo, server, root)
                await cancel_at_each_checkpoint(
                    scenario, check=scenario.check, seed=seed, cancel_timeout=math.inf
                )


# --- jobs (S8) -------------------------------------------------------------------------------


@attrs.frozen
class JobCase:
    cache: str  # "memory", "filesystem"
    workers: int
    size: int
    chunk: int
    graph: bool = False  # a graph job (chain) instead of a task job
    seed: int = 0


JOB_CASES = [
    JobCase(cache, workers, size, chunk, graph, seed)
    for cache in ("memory", "filesystem")
    for workers, size, chunk, graph, seed in (
        (2, 2048, 512, False, 0),
        (1, 2048, 512, False, 0),
        (2, 3000, 1000, True, 0),
        (2, 2048, 512, False, 1),
        (3, 1024, 128, False, 0),
        (1, 3000, 1000, True, 1),
        (2, 1024, 128, False, 2),
    )
]


@attrs.define
class JobScenario:
    """Submit a streaming job, subscribe, cancel a second job, stream the output out."""

    case: JobCase
    tmp: Path
    counter: itertools.count[int] = attrs.Factory(itertools.count)
    repo: tg.OutputRepository | None = None
    queues: list[tg.JobQueue] = attrs.Factory(list)
    handles: list[tg.JobHandle] = attrs.Factory(list)
    streamed: list[bytes] = attrs.Factory(list)
    subscribed: list[bytes] = attrs.Factory(list)
    done: bool = False

    def _fresh(self) -> tg.OutputRepository:
        if self.case.cache == "memory":
            return tg.MemoryOutputRepository()
        return tg.FsOutputRepository(self.tmp / f"j{next(self.counter)}")

    async def __call__(self) -> None:
        case = self.case
        self.queues, self.handles, self.streamed, self.subscribed = [], [], [], []
        self.done = False
        self.repo = self._fresh()
        config = tg.RunConfig(cache=self.repo, reference_threshold_bytes=0)

        async def collect(event: tg.StreamEvent) -> None:
            if isinstance(event, tg.BinaryDelta):
                self.subscribed.append(bytes(event.chunk))
            await trio.lowlevel.checkpoint()

        async with tg.open_job_queue(config, workers=case.workers) as queue:
            self.queues.append(queue)
            inputs = {"size": case.size, "chunk": case.chunk, "tag": 1}
            port: str | None = None
            if case.graph:
                graph = tg.TaskGraph()
                src = graph.add(Source(), inputs=inputs)
                relay = graph.add(Relay())
                graph.connect(src, "data", relay, "data")
                main = queue.submit(graph)
                port = f"{relay}.data"
            else:
                main = queue.submit(Source(), inputs)
                main.on_stream(collect, high_water_bytes=case.chunk)
            doomed = queue.submit(Source(), {**inputs, "tag": 2})
            self.handles.extend((main, doomed))
            doomed.cancel()  # S8-10
            async with main.open_output_stream(port) as chunks:
                async for chunk in chunks:
                    self.streamed.append(bytes(chunk))
            await main.result()
        self.done = True

    async def check(self) -> None:
        assert all(h.record.terminal for h in self.handles), [h.state for h in self.handles]
        if self.queues:  # S8-1, S8-13: counts consistent, nothing running or pending
            stats = self.queues[0].statistics()
            assert stats.running == stats.pending == 0, stats
            assert stats.completed + stats.failed + stats.cancelled == len(self.handles)
        if self.done:  # S8-12, S8-9: the whole output, streamed and delivered in order
            expected = b"".join(
                bytes([s % 251]) * min(self.case.chunk, self.case.size - s)
                for s in range(0, self.case.size, self.case.chunk)
            )
            assert b"".join(self.streamed) == expected
            if not self.case.graph:
                assert b"".join(self.subscribed) == expected
            assert [h.state for h in self.handles] == ["completed", "cancelled"]
        if self.repo is not None:
            with trio.CancelScope(shield=True):
                try:
                    report = await self.repo.gc(min_age=0)  # S6-47: no orphan blob
                    assert report.blobs == 0, report
                    assert report.temp_files == 0, report
                finally:
                    await self.repo.aclose()


@pytest.mark.parametrize("case", JOB_CASES, ids=repr)
async def test_job_cancelled_at_each_checkpoint(case: JobCase, tmp_path: Path) -> None:
    """S8-1, S8-9, S8-10, S8-12, S8-13 under `cancel_at_each_checkpoint` (S7): submit,
    ``on_stream``, ``cancel`` and ``open_output_stream`` leave every job terminal, the queue's
    counts consistent, no task, no orphan blob in the jobs' cache."""
    scenario = JobScenario(case, tmp_path)
    report = await cancel_at_each_checkpoint(
        scenario,
        check=scenario.check,
        max_points=torture_max_points(DEFAULT_POINTS),
        seed=case.seed,
        cancel_timeout=5.0 if case.cache == "memory" else math.inf,
    )
    assert report.steps > 5


POSTGRES_CASES = [
    ServerCase(op, chunks, size)
    for op in ("save", "read", "delete", "prune")
    for chunks, size in ((3, 2000), (6, 700))
]


async def _postgres_query(dsn: str, sql: str) -> list[tuple[object, ...]]:
    def run() -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(sql.encode())
            return cur.fetchall() if cur.description is not None else []

    return await trio.to_thread.run_sync(run)


@pytest.mark.parametrize("case", POSTGRES_CASES, ids=repr)
async def test_postgres_repository_cancelled_at_each_checkpoint(
    case: ServerCase, postgres_dsn: str
) -> None:
    """S4-3, S4-4, S4-11, S4-13, S4-14 under `cancel_at_each_checkpoint` (S7): streamed save
    with its row, streamed read, delete and prefix prune of ``PostgresOutputRepository``:
    every published blob reached the caller, no row without its blob, a prune takes a row
    with its blobs or nothing, never a large object without its record (or the reverse), no
    open transaction, every pooled connection given back."""
    repo = tg.PostgresOutputRepository(postgres_dsn, write_batch_bytes=1000, max_connections=2)

    async def database() -> None:
        ((objects, matched, records),) = await _postgres_query(
            postgres_dsn,
            "SELECT (SELECT count(*) FROM pg_largeobject_metadata),"
            " (SELECT count(*) FROM trio_taskgraph_blobs b"
            "  JOIN pg_largeobject_metadata m ON m.oid = b.lo),"
            " (SELECT count(*) FROM trio_taskgraph_blobs)",
        )
        assert objects == matched == records, f"S4-11: {objects}, {matched}, {records}"
        ((open_transactions,),) = await _postgres_query(
            postgres_dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
        )
        assert open_transactions == 0, "S4-14: a transaction was left open"
        assert repo._shared.slots.value == 2, "S4-14: a pooled connection was not given back"

    try:
        await repo.stats()  # set the database up before counting steps
        scenario = ServerScenario(case, repo, None, None, extra_check=database)
        await scenario.prepare()
        report = await cancel_at_each_checkpoint(
            scenario,
            check=scenario.check,
            max_points=torture_max_points(DEFAULT_POINTS),
            seed=case.seed,
            cancel_timeout=30.0,
        )
        assert report.steps >= 2
    finally:
        with trio.CancelScope(shield=True):
            await repo.aclose()
