"""
Tasks for the PostgresJobStore tests and benchmark (issue 11), importable by worker processes
(``python -m trio_taskgraph worker --import tests.pgjobs_tasks``).

Each writes what it does to an append-only log file named in its inputs, one line per event
(``start <n> <pid> <attempt-key>`` / ``end <n> <pid>``), so a test can check which process ran
which job and that no two runs of a job overlapped.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, ClassVar

import trio

import trio_taskgraph as tg

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping


def _log(path: object, line: str) -> None:
    assert isinstance(path, str)
    # O_APPEND: each short line lands whole, whatever the other processes write.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _absent(path: str) -> bool:
    return not os.path.exists(path)


class Record(tg.Task):
    """Logs its start and end, sleeps ``sleep`` seconds (its work) in between."""

    type = "pgjobs.Record"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"n": {"type": "integer"}, "log": {"type": "string"}, "sleep": {}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {}, "pid": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        n, sleep = inputs["n"], inputs.get("sleep", 0)
        assert isinstance(sleep, int | float)
        _log(inputs["log"], f"start {n} {os.getpid()} {time.time():.3f}")
        await trio.sleep(sleep)
        _log(inputs["log"], f"end {n} {os.getpid()}")
        return {"n": n, "pid": os.getpid()}


class Tiny(tg.Task):
    """Does nothing: the benchmark's job."""

    type = "pgjobs.Tiny"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"n": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        await trio.lowlevel.checkpoint()
        return {"n": inputs["n"]}


class Flaky(tg.Task):
    """Fails on its first attempt (OSError, retryable), succeeds on the next."""

    type = "pgjobs.Flaky"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"log": {"type": "string"}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"pid": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        path = inputs["log"]
        assert isinstance(path, str)
        first = _absent(path)
        _log(path, f"attempt {os.getpid()}")
        await trio.lowlevel.checkpoint()
        if first:
            raise OSError("first attempt fails")
        return {"pid": os.getpid()}


class Blocks(tg.Task):
    """
    Streams ``blocks`` blocks of 64 KiB, block ``i`` filled with byte ``i % 251``; cacheable,
    so its output is stored in the run's cache and returned as a `CacheRef`.
    """

    type = "pgjobs.Blocks"
    cacheable = True
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"blocks": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}, "pid": {}}
    }

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        blocks = inputs["blocks"]
        assert isinstance(blocks, int)
        for i in range(blocks):
            yield tg.BinaryDelta("data", bytes([i % 251]) * 65536)
        yield tg.Finish({"pid": os.getpid()})


class Forever(tg.Task):
    """Logs its start, then waits until cancelled (logs that too)."""

    type = "pgjobs.Forever"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"log": {"type": "string"}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        _log(inputs["log"], f"start {os.getpid()}")
        try:
            await trio.sleep_forever()
        finally:
            _log(inputs["log"], f"cancelled {os.getpid()}")
        raise AssertionError("unreachable")  # pragma: no cover


class Planted(tg.Task):
    """
    Returns its one declared binary port inline, and a branded `CacheRef` planted in a plain
    field (the seed's M-1: a handle must never stream that one).
    """

    type = "pgjobs.Planted"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}, "meta": {}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        await trio.lowlevel.checkpoint()
        return {"data": b"the real output", "meta": tg.make_cache_ref("planted-elsewhere")}
