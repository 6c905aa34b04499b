"""
What a save does to its chunk source, and what a streamed read hands out (S4-3, S4-8),
on every implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

import trio_taskgraph as tg

from .conftest import Factory


async def test_failed_save_closes_a_channel_source(repository_factory: Factory) -> None:
    """S4-3 (seed late HIGH 2): when the sink fails, its producer fails promptly instead of
    parking forever on a full channel."""
    repo = repository_factory()
    send, receive = trio.open_memory_channel[object](0)
    outcome: list[str] = []

    async def producer() -> None:
        try:
            await send.send(b"fine")
            await send.send("not bytes")  # the sink fails on this chunk
            while True:
                await send.send(b"more")
        except trio.BrokenResourceError:
            outcome.append("producer released")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            with pytest.raises(TypeError):
                await repo.save_output_stream("t", {}, "out", receive)  # type: ignore[arg-type]
    assert outcome == ["producer released"]
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


async def test_sink_failing_before_reading_releases_the_producer(
    repository_factory: Factory,
) -> None:
    """S4-3 (seed late HIGH 2): a sink that fails before its first read (here: closed)
    still closes the source, so the producer is not left parked."""
    repo = repository_factory()
    await repo.aclose()
    send, receive = trio.open_memory_channel[bytes](0)
    released: list[bool] = []

    async def producer() -> None:
        try:
            await send.send(b"x")
        except trio.BrokenResourceError:
            released.append(True)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            with pytest.raises(tg.RepositoryError, match="closed"):
                await repo.save_output_stream("t", {}, "out", receive)
    assert released == [True]


async def test_streamed_reads_hand_out_bounded_bytes_chunks(repository_factory: Factory) -> None:
    """S4-8 (seed M-6): a reader gets bytes chunks of bounded size, never the whole blob."""
    repo = repository_factory()
    size = 20 * 1024 * 1024 + 5
    data = bytes(range(256)) * (size // 256) + b"\x01" * (size % 256)

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, size, 1 << 20):
            yield data[at : at + (1 << 20)]

    ref = await repo.save_output_stream("t", {}, "out", chunks())
    sizes = []
    async with repo.open_output_stream_by_ref(ref) as stream:
        async for chunk in stream:
            assert type(chunk) is bytes
            sizes.append(len(chunk))
    assert sum(sizes) == size
    assert max(sizes) <= 8 * 1024 * 1024
    assert len(sizes) >= 3
    await repo.aclose()
