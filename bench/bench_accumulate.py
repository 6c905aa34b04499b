"""
Cost of the output accumulator against the bare minimum, measured in the same run.

Two scenarios, each as alternating pairs (ours, baseline), medians reported:

- accumulate: N MiB of 64 KiB `BinaryDelta` events fed to `OutputAccumulator` and
  materialised, versus appending the same chunks to a list and ``b"".join``-ing them;
- hop: the events pass through a trio memory channel (buffer 16, what every streaming hop
  costs the runner at least) and the consumer feeds each to an accumulator whose port is
  routed to a sink (per-event bookkeeping only), versus the same channel hop summing
  ``len(chunk)``.

Targets: accumulate >= 0.8x of the baseline's throughput (materialisation dominates);
hop >= 0.9x (the accumulator adds at most ~10% to a channel hop per event).

Run: ``python bench/bench_accumulate.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING

import trio

import trio_taskgraph as tg
from trio_taskgraph._core._accumulate import OutputAccumulator

if TYPE_CHECKING:
    from collections.abc import Callable

CHUNK = 64 * 1024
PORTS = tg.parse_ports({"properties": {"out": {"x-stream": "binary", "format": "binary"}}})


def _events(total: int) -> list[tg.BinaryDelta]:
    chunk = bytes(CHUNK)
    return [tg.BinaryDelta("out", chunk) for _ in range(total // CHUNK)]


def ours_accumulate(events: list[tg.BinaryDelta]) -> int:
    acc = OutputAccumulator(PORTS)
    for event in events:
        acc.feed(event)
    value = acc.result().output["out"]
    assert isinstance(value, bytes)
    return len(value)


def base_accumulate(events: list[tg.BinaryDelta]) -> int:
    chunks = [event.chunk for event in events]
    return len(b"".join(chunks))


def _hop(events: list[tg.BinaryDelta], accumulate: bool) -> int:
    total = 0
    acc = OutputAccumulator.with_sinks(PORTS, {"out"})

    async def main() -> None:
        nonlocal total
        send, receive = trio.open_memory_channel[tg.BinaryDelta](16)

        async def produce() -> None:
            async with send:
                for event in events:
                    await send.send(event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async with receive:
                async for event in receive:
                    if accumulate:
                        acc.feed(event)
                    total += len(event.chunk)

    trio.run(main)
    if accumulate:
        assert acc.result().binary_sizes["out"] == total
    return total


def ours_hop(events: list[tg.BinaryDelta]) -> int:
    return _hop(events, True)


def base_hop(events: list[tg.BinaryDelta]) -> int:
    return _hop(events, False)


def _time(fn: Callable[[list[tg.BinaryDelta]], int], events: list[tg.BinaryDelta]) -> float:
    start = time.perf_counter()
    size = fn(events)
    elapsed = time.perf_counter() - start
    assert size == len(events) * CHUNK
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds in total")
    args = parser.parse_args()
    mib = 32 if args.quick else 256
    pairs = 3 if args.quick else 7
    events = _events(mib * 1024 * 1024)
    rows = []
    for name, ours, base, target in (
        ("accumulate", ours_accumulate, base_accumulate, 0.8),
        ("hop", ours_hop, base_hop, 0.9),
    ):
        ours_t: list[float] = []
        base_t: list[float] = []
        for _ in range(pairs):
            ours_t.append(_time(ours, events))
            base_t.append(_time(base, events))
        o, b = statistics.median(ours_t), statistics.median(base_t)
        rows.append((name, mib / o / 1024, mib / b / 1024, b / o, target))
    print(f"{mib} MiB in {CHUNK // 1024} KiB chunks, {pairs} alternating pairs, medians")
    print(f"{'scenario':<12}{'ours GiB/s':>12}{'base GiB/s':>12}{'ratio':>8}{'target':>8}  ok")
    for name, ours_gbs, base_gbs, ratio, target in rows:
        ok = "yes" if ratio >= target else "NO"
        print(f"{name:<12}{ours_gbs:>12.2f}{base_gbs:>12.2f}{ratio:>8.2f}{target:>8.2f}  {ok}")
    for name, _ours_gbs, _base_gbs, ratio, target in rows:
        peer = "list + b''.join" if name == "accumulate" else "memory channel hop summing len()"
        print(f'RESULT name=accumulate/{name} ratio={ratio:.3f} target=>={target} peer="{peer}"')


if __name__ == "__main__":
    main()
