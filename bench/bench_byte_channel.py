"""
Throughput of `open_byte_channel` against raw `trio.open_memory_channel`.

Moves TOTAL bytes in chunks of 4 KiB, 64 KiB and 1 MiB through `open_byte_channel(8 MiB)` and,
in the same run, through `trio.open_memory_channel(8 MiB // chunk)` (the same bound in
items), one producer and one consumer task each. Reports chunks/s for both (median of
alternating pairs), their ratio (the median of the per-pair wall-clock ratios), the same
ratio in chunks per CPU-second of the process (steadier when other processes share the
machine), and the byte channel's peak buffered bytes against its bound (mark + one chunk).
Target: ratio >= 0.95 at 64 KiB chunks.

With one producer and one consumer doing the same work, the consumer keeps up and the
buffer holds about one chunk. The extra "64Ki sat" row makes the consumer checkpoint once
more per item, so the buffer fills to the mark and every send parks and is woken: it
measures the park/wake path (our exact wake-ups against trio's).

    python bench/bench_byte_channel.py            # 1 GiB per size, 5 pairs
    python bench/bench_byte_channel.py --quick    # 64 MiB per size, 3 pairs (a few seconds)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable  # noqa: TC003  # used at run time by annotations only; keeps the bench one flat script

import trio

from trio_taskgraph import open_byte_channel

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
MARK = 8 * MIB
TARGET = 0.95
TARGET_CHUNK = 64 * KIB


async def _pump(
    send: trio.abc.SendChannel[bytes],
    receive: trio.abc.ReceiveChannel[bytes],
    chunk: bytes,
    count: int,
    slow: bool,
) -> int:
    received = 0

    async def producer() -> None:
        async with send:
            for _ in range(count):
                await send.send(chunk)

    async def consumer() -> None:
        nonlocal received
        async with receive:
            async for item in receive:
                received += len(item)
                if slow:  # a consumer slower than the producer: the buffer fills, senders park
                    await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        nursery.start_soon(producer)
    return received


def _run_raw(chunk: bytes, count: int, slow: bool) -> tuple[float, float, int]:
    async def main() -> tuple[float, float, int]:
        send, receive = trio.open_memory_channel[bytes](max(1, MARK // len(chunk)))
        start, cpu = time.perf_counter(), time.process_time()
        moved = await _pump(send, receive, chunk, count, slow)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert moved == count * len(chunk)
        return elapsed, cpu, 0

    return trio.run(main)


def _run_byte(chunk: bytes, count: int, slow: bool) -> tuple[float, float, int]:
    async def main() -> tuple[float, float, int]:
        send, receive = open_byte_channel(MARK)
        start, cpu = time.perf_counter(), time.process_time()
        moved = await _pump(send, receive, chunk, count, slow)  # type: ignore[arg-type]
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert moved == count * len(chunk)
        return elapsed, cpu, receive.statistics().peak_buffered_bytes

    return trio.run(main)


def _measure(
    run: Callable[[bytes, int, bool], tuple[float, float, int]],
    chunk: bytes,
    count: int,
    slow: bool,
) -> tuple[float, float, int]:
    gc.collect()
    return run(chunk, count, slow)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="64 MiB per chunk size, 3 pairs")
    parser.add_argument("--total", type=int, default=None, help="bytes per chunk size")
    parser.add_argument("--pairs", type=int, default=None, help="alternating pairs per size")
    parser.add_argument(
        "--sizes", default="4096,65536,1048576", help="chunk sizes, comma-separated"
    )
    parser.add_argument(
        "--no-saturated", action="store_true", help="skip the slow-consumer 64 KiB row"
    )
    args = parser.parse_args(argv)
    total = args.total or (64 * MIB if args.quick else GIB)
    pairs = args.pairs or (3 if args.quick else 5)
    rows = [(int(s), False) for s in args.sizes.split(",")]
    if not args.no_saturated:
        rows.append((TARGET_CHUNK, True))

    print(
        f"python {sys.version.split()[0]}, trio {trio.__version__}; {total // MIB} MiB per row, "
        f"median of {pairs} alternating pairs, mark {MARK // MIB} MiB"
    )
    print(
        f"{'chunk':>10} {'raw chunks/s':>14} {'byte chunks/s':>14} {'ratio':>7} "
        f"{'cpu ratio':>9} {'peak MiB':>9} {'bound MiB':>10}"
    )
    ok = True
    results: list[str] = []
    for size, slow in rows:
        chunk = bytes(size)
        count = max(1, total // size)
        _measure(_run_raw, chunk, min(count, 1000), slow)  # warm-up
        _measure(_run_byte, chunk, min(count, 1000), slow)
        raw_rates: list[float] = []
        byte_rates: list[float] = []
        raw_cpu: list[float] = []
        byte_cpu: list[float] = []
        peak = 0
        for i in range(pairs):
            order = [(_run_raw, raw_rates, raw_cpu), (_run_byte, byte_rates, byte_cpu)]
            if i % 2:
                order.reverse()
            for run, rates, cpus in order:
                elapsed, cpu, p = _measure(run, chunk, count, slow)
                rates.append(count / elapsed)
                cpus.append(count / max(cpu, 1e-9))
                peak = max(peak, p)
        raw = statistics.median(raw_rates)
        byte = statistics.median(byte_rates)
        # The two runs of a pair are adjacent in time and share the machine's load, so the
        # median of per-pair ratios is steadier than the ratio of medians on a busy machine.
        ratio = statistics.median(b / r for b, r in zip(byte_rates, raw_rates, strict=True))
        # Chunks per CPU-second of this (single-threaded) process: what other processes on a
        # shared machine disturb least.
        cpu_ratio = statistics.median(b / r for b, r in zip(byte_cpu, raw_cpu, strict=True))
        bound = MARK + size
        if peak > bound:
            ok = False
        flag = ""
        if size == TARGET_CHUNK and not slow:
            verdict = "met" if ratio >= TARGET else "MISSED"
            flag = f"  (target >= {TARGET:.2f}: {verdict})"
        label = f"{size // KIB}Ki" + (" sat" if slow else "")
        print(
            f"{label:>10} {raw:>14,.0f} {byte:>14,.0f} {ratio:>7.3f} {cpu_ratio:>9.3f} "
            f"{peak / MIB:>9.2f} {bound / MIB:>10.2f}{flag}"
        )
        if size == TARGET_CHUNK and not slow:
            results.append(
                f"RESULT name=byte_channel/{label} ratio={ratio:.3f} target=>={TARGET} "
                'peer="trio.open_memory_channel, same bound in items"'
            )
    for line in results:
        print(line)
    if not ok:
        print("peak buffered bytes exceeded the bound!")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
