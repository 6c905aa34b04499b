"""
Cost of the cancellation torture toolkit: a scenario run under its instrument versus the same
scenario run bare, in the same process (alternating pairs, medians), and cancel points/s.

    python bench/bench_torture.py [--quick]

Target: the instrumented baseline run costs at most 1.5x the bare run (the instrument adds a
few set lookups per scheduler step), so `make torture` is bounded by the scenarios themselves.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING

import trio

from trio_taskgraph.testing import cancel_at_each_checkpoint
from trio_taskgraph.testing._torture import _run_once

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

TARGET_RATIO = 1.5


def make_scenario(items: int, workers: int) -> Callable[[], Awaitable[None]]:
    async def scenario() -> None:
        send, recv = trio.open_memory_channel[int](0)

        async def producer() -> None:
            async with send:
                for i in range(items):
                    await send.send(i)

        async def consumer(r: trio.MemoryReceiveChannel[int]) -> None:
            async with r:
                async for _ in r:
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            for _ in range(workers - 1):
                nursery.start_soon(consumer, recv.clone())
            await consumer(recv)

    return scenario


async def measure(pairs: int, items: int, workers: int, campaign_points: int) -> None:
    scenario = make_scenario(items, workers)
    bare: list[float] = []
    instrumented: list[float] = []
    steps = 0
    for _ in range(pairs):
        t0 = time.perf_counter()
        await scenario()
        t1 = time.perf_counter()
        state = await _run_once(scenario, cancel_at=None, seed=0, cancel_timeout=5.0)
        t2 = time.perf_counter()
        bare.append(t1 - t0)
        instrumented.append(t2 - t1)
        steps = state.steps
    t0 = time.perf_counter()
    report = await cancel_at_each_checkpoint(
        scenario, check=lambda: None, max_points=campaign_points
    )
    campaign = time.perf_counter() - t0
    b, i = statistics.median(bare), statistics.median(instrumented)
    ratio = i / b
    print(f"scenario: {items} items over a rendezvous channel, {workers} consumers, {steps} steps")
    print(f"{'what':<32}{'median':>12}{'per step':>12}")
    print(f"{'bare run':<32}{b * 1e3:>10.2f}ms{b / steps * 1e6:>10.2f}us")
    print(f"{'instrumented baseline run':<32}{i * 1e3:>10.2f}ms{i / steps * 1e6:>10.2f}us")
    print(
        f"ratio instrumented/bare: {ratio:.2f}x (target <= {TARGET_RATIO}x): "
        f"{'OK' if ratio <= TARGET_RATIO else 'OVER'}"
    )
    print(
        f"campaign: {report.points_exercised} cancel points in {campaign:.2f}s "
        f"= {report.points_exercised / campaign:.0f} points/s"
    )
    print(
        f"RESULT name=torture/instrumented ratio={ratio:.3f} target=<={TARGET_RATIO} "
        'peer="the same scenario run bare (cost: lower is better)"'
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        trio.run(measure, 15, 300, 4, 50)
    else:
        trio.run(measure, 41, 2000, 4, 400)


if __name__ == "__main__":
    main()
