"""
What the repository benchmarks (`bench_repository.py`, `bench_postgres.py`) share: the chunk
source, the runner-like producer feeding ``save_output_stream``, timed streamed writes and
reads of any `OutputRepository`, and the peak-RSS probe for their memory figure.
"""

from __future__ import annotations

import os
import resource
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trio_taskgraph import CacheRef, OutputRepository

CHUNK = 64 * 1024
SOURCE = os.urandom(8 * 1024 * 1024)


def chunk(i: int) -> bytes:
    """Chunk ``i`` of the stream: a fresh bytes object, as a producer makes."""
    offset = (i * CHUNK) % len(SOURCE)
    return SOURCE[offset : offset + CHUNK]


async def _produce(send: trio.MemorySendChannel[bytes], total: int) -> None:
    async with send:
        for i in range(total // CHUNK):
            await send.send(chunk(i))


async def stream_into(repo: OutputRepository, total: int) -> CacheRef:
    """What the runner does: a producer task feeds a bounded channel, the repository
    drains its receive side."""
    send, receive = trio.open_memory_channel[bytes](128)  # 128 x 64 KiB = 8 MiB
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_produce, send, total)
        ref = await repo.save_output_stream("bench", {}, "out", receive)
    assert ref.size == total
    return ref


async def ours_write(repo: OutputRepository, total: int) -> tuple[float, CacheRef]:
    """Seconds to stream ``total`` bytes into ``repo``, and the ref it returned."""
    start = time.perf_counter()
    ref = await stream_into(repo, total)
    return time.perf_counter() - start, ref


async def ours_read(repo: OutputRepository, ref: CacheRef) -> float:
    """Seconds to stream ``ref`` back out of ``repo`` (checking its size)."""
    start = time.perf_counter()
    got = 0
    async with repo.open_output_stream_by_ref(ref) as chunks:
        async for piece in chunks:
            got += len(piece)
    assert got == ref.size
    return time.perf_counter() - start


def peak_rss_kib(*, reset: bool = False) -> int:
    """The process's peak RSS (VmHWM; ``ru_maxrss`` would carry the parent's peak over
    fork+exec). ``reset`` first lowers the peak to the current RSS (``clear_refs`` 5)."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
