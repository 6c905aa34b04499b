"""
The runner's streaming pipeline against a bare byte channel into a file.

ours:  producer task -> pass-through task -> FsOutputRepository (a cacheable pass-through: its
       binary output streams through the runner's sink into a blob file; the run returns a ref)
bare:  producer -> one `open_byte_channel` -> a plain ``os.write`` loop into a file, then fsync

Both move TOTAL bytes in 64 KiB chunks with the same byte budget (4 MiB), alternating pairs,
medians. Reports throughput, the ratio (target >= 0.6; the median of per-pair ratios, which a
noisy shared machine disturbs least, and the ratio of medians) and the peak RSS growth of each run
(target <= 64 MiB for ours), read from /proc/self/status (VmHWM, reset through
/proc/self/clear_refs before each run; Linux only).

    python bench/bench_pipeline.py            # 1 GiB, 3 pairs
    python bench/bench_pipeline.py --quick    # 128 MiB, 3 pairs (a few seconds)
    python bench/bench_pipeline.py --fresh    # a fresh chunk per send (allocation included)
    python bench/bench_pipeline.py --dir /dev/shm   # files in tmpfs: the CPU side only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping  # noqa: TC003  # task annotations, one flat script
from pathlib import Path
from typing import ClassVar

import trio

import trio_taskgraph as tg

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
CHUNK = 64 * KIB
BUDGET = 4 * MIB
TARGET_RATIO = 0.6
TARGET_RSS = 64 * MIB
#: Make a fresh chunk per send (both pipelines) instead of resending one object: the RSS
#: figure then shows what the buffers really hold. Set by ``--fresh``.
FRESH = False


def _chunks() -> list[bytes] | None:
    return None if FRESH else [b"\x5a" * CHUNK]


def _chunk(shared: list[bytes] | None) -> bytes:
    return shared[0] if shared is not None else b"\x5a" * CHUNK


class BenchProduce(tg.Task):
    type = "bench_pipeline.Produce"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"size": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"data": {"x-stream": "binary", "format": "binary"}}
    }

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        size = inputs["size"]
        assert isinstance(size, int)
        shared = _chunks()
        for _ in range(size // CHUNK):
            yield tg.BinaryDelta("data", _chunk(shared))


class BenchPassThrough(tg.Task):
    type = "bench_pipeline.PassThrough"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"data": {"x-stream": "binary"}}}
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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS; return the current RSS in bytes."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * KIB


def _peak_growth(before: int) -> int:
    return max(0, _status_kib("VmHWM") * KIB - before)


def run_ours(folder: Path, total: int) -> tuple[float, int]:
    async def main() -> float:
        repo = tg.FsOutputRepository(folder)
        try:
            graph = tg.TaskGraph()
            p = graph.add(BenchProduce(), inputs={"size": total})
            t = graph.add(BenchPassThrough())
            graph.connect(p, "data", t, "data")
            config = tg.RunConfig(cache=repo, binary_high_water_bytes=BUDGET)
            start = time.perf_counter()
            outs = await tg.run_graph(graph, config=config)
            elapsed = time.perf_counter() - start
            ref = outs[t]["data"]
            assert isinstance(ref, tg.CacheRef)
            assert ref.size == total, ref
            await repo.delete_by_task_type_prefix("")
            return elapsed
        finally:
            await repo.aclose()

    gc.collect()
    before = _reset_peak()
    elapsed = trio.run(main)
    return elapsed, _peak_growth(before)


def run_bare(folder: Path, total: int) -> tuple[float, int]:
    async def main() -> float:
        send, receive = tg.open_byte_channel(BUDGET)
        path = folder / "bare.bin"
        start = time.perf_counter()

        async def producer() -> None:
            shared = _chunks()
            async with send:
                for _ in range(total // CHUNK):
                    await send.send(_chunk(shared))

        async def writer() -> None:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                async with receive:
                    async for chunk in receive:
                        os.write(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(producer)
        elapsed = time.perf_counter() - start
        assert path.stat().st_size == total
        path.unlink()
        return elapsed

    gc.collect()
    before = _reset_peak()
    elapsed = trio.run(main)
    return elapsed, _peak_growth(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 3 pairs")
    parser.add_argument("--total", type=int, default=None, help="bytes per run")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs")
    parser.add_argument("--fresh", action="store_true", help="a fresh chunk per send")
    parser.add_argument(
        "--dir", default=None, help="folder for the files (e.g. /dev/shm to leave the disk out)"
    )
    args = parser.parse_args(argv)
    global FRESH  # a flat script's one switch
    FRESH = args.fresh
    total = args.total or (128 * MIB if args.quick else GIB)
    total -= total % CHUNK
    print(
        f"python {sys.version.split()[0]}, trio {trio.__version__}; {total // MIB} MiB in "
        f"{CHUNK // KIB} KiB {'fresh ' if FRESH else ''}chunks, budget {BUDGET // MIB} MiB, "
        f"median of {args.pairs} pairs"
    )
    ours_t: list[float] = []
    bare_t: list[float] = []
    ours_rss: list[int] = []
    bare_rss: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline.", dir=args.dir) as tmp:
        folder = Path(tmp)
        run_ours(folder / "warm", 16 * MIB)
        run_bare(folder, 16 * MIB)
        for i in range(args.pairs):
            order = [("ours", run_ours), ("bare", run_bare)]
            if i % 2:
                order.reverse()
            for name, run in order:
                elapsed, growth = run(folder / "cache" if name == "ours" else folder, total)
                (ours_t if name == "ours" else bare_t).append(elapsed)
                (ours_rss if name == "ours" else bare_rss).append(growth)
    ours = total / statistics.median(ours_t)
    bare = total / statistics.median(bare_t)
    # The median of the per-pair ratios: each pair ran back to back, so a slow phase of a
    # shared machine hits both runs of a pair and cancels out.
    ratio = statistics.median(b / o for o, b in zip(ours_t, bare_t, strict=True))
    print(f"{'pipeline':>10} {'MB/s':>10} {'peak RSS growth MiB':>20}")
    print(f"{'bare':>10} {bare / 1e6:>10,.0f} {max(bare_rss) / MIB:>20.1f}")
    print(f"{'ours':>10} {ours / 1e6:>10,.0f} {max(ours_rss) / MIB:>20.1f}")
    ratio_ok = ratio >= TARGET_RATIO
    rss_ok = max(ours_rss) <= TARGET_RSS
    print(
        f"ratio ours/bare (median of per-pair ratios) = {ratio:.3f}, of medians = "
        f"{ours / bare:.3f} (target >= {TARGET_RATIO}: "
        f"{'met' if ratio_ok else 'MISSED'}); peak RSS growth {max(ours_rss) / MIB:.1f} MiB "
        f"(target <= {TARGET_RSS // MIB} MiB: {'met' if rss_ok else 'MISSED'})"
    )
    print(
        f"RESULT name=pipeline/throughput ratio={ratio:.3f} target=>={TARGET_RATIO} "
        'peer="bare open_byte_channel into a plain file write"'
    )
    print(
        f"RESULT name=pipeline/rss_growth ratio={max(ours_rss) / MIB:.1f} "
        f'target=<={TARGET_RSS // MIB} unit=MiB peer="absolute: peak RSS growth of our run"'
    )
    return 0 if ratio_ok and rss_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
