"""
Graph tasks shared by the runner's suites (`test_runner.py`, `test_runner_cancellation.py`,
`test_torture_campaign.py`): pass-through and fan-in of streamed binary inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import trio_taskgraph as tg

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping


class Relay(tg.Task):
    type = "tests.graph_tasks.Relay"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary"}, "tag": {}},
        "required": ["data"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }
    cacheable = True

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        stream = inputs["data"]
        assert isinstance(stream, tg.BinaryInputStream)
        async for chunk in stream:
            yield tg.BinaryDelta("data", chunk)


class Join(tg.Task):
    """Streams ``a`` then ``b``: a fan-in of two streamed inputs."""

    type = "tests.graph_tasks.Join"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"a": {"x-stream": "binary"}, "b": {"x-stream": "binary"}},
        "required": ["a", "b"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }
    cacheable = True

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        for port in ("a", "b"):
            stream = inputs[port]
            assert isinstance(stream, tg.BinaryInputStream)
            async for chunk in stream:
                yield tg.BinaryDelta("data", chunk)
