"""
Benchmark: 10,000 tiny jobs through a job queue of 8 workers, against the same work started
with bare ``nursery.start_soon`` calls behind a ``trio.CapacityLimiter(8)``.

The work of one job is ``run_task(Tiny(), {"x": i})`` (a task whose ``execute`` returns its
input), so both sides pay the runner; the queue adds submit, scheduling, the worker hand-off,
the per-job cancel scope and nursery, the record transitions and ``await result()``.

- ``bare``: one nursery, ``start_soon`` per job, each holding a limiter token while it runs;
- ``queue``: ``open_job_queue(workers=8)``, ``submit`` every job, then ``await result()`` of each.

Each round runs both once, in alternating order; the table shows medians of jobs/s and the
ratio queue / bare against the target (>= 0.5). Run: ``python bench/bench_jobs.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import TYPE_CHECKING, ClassVar

import trio

import trio_taskgraph as tg

if TYPE_CHECKING:
    from collections.abc import Mapping

WORKERS = 8
TARGET = 0.5


class Tiny(tg.Task):
    type = "bench_jobs.Tiny"
    input_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {"type": "integer"}}}
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {"type": "integer"}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        return {"x": inputs["x"]}


async def run_bare(jobs: int) -> float:
    task = Tiny()
    limiter = trio.CapacityLimiter(WORKERS)
    results: list[object] = [None] * jobs

    async def one(i: int) -> None:
        async with limiter:
            results[i] = await tg.run_task(task, {"x": i})

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(jobs):
            nursery.start_soon(one, i)
    elapsed = time.perf_counter() - start
    assert all(r == {"x": i} for i, r in enumerate(results))
    return elapsed


async def run_queue(jobs: int) -> float:
    task = Tiny()
    start = time.perf_counter()
    async with tg.open_job_queue(workers=WORKERS) as queue:
        handles = [queue.submit(task, {"x": i}) for i in range(jobs)]
        results = [await h.result() for h in handles]
    elapsed = time.perf_counter() - start
    assert all(r == {"x": i} for i, r in enumerate(results))
    assert queue.statistics().peak_running <= WORKERS
    return elapsed


async def main(jobs: int, rounds: int) -> float:
    await run_bare(min(jobs, 500))  # warm up
    await run_queue(min(jobs, 500))
    bare: list[float] = []
    queue: list[float] = []
    ratios: list[float] = []
    for r in range(rounds):
        gc.collect()
        order = (run_bare, run_queue) if r % 2 == 0 else (run_queue, run_bare)
        times = {}
        for fn in order:
            times[fn] = await fn(jobs)
        bare.append(jobs / times[run_bare])
        queue.append(jobs / times[run_queue])
        ratios.append(times[run_bare] / times[run_queue])
    b, q, ratio = statistics.median(bare), statistics.median(queue), statistics.median(ratios)
    print(f"{jobs} tiny jobs, {WORKERS} workers, {rounds} rounds (medians)")
    print(f"{'variant':<44} {'jobs/s':>10}")
    print(f"{'bare start_soon + CapacityLimiter(8)':<44} {b:>10,.0f}")
    print(f"{'open_job_queue(workers=8)':<44} {q:>10,.0f}")
    verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
    print(
        f"ratio queue/bare: {ratio:.2f} (per-round min {min(ratios):.2f}, "
        f"max {max(ratios):.2f}); target >= {TARGET}: {verdict}"
    )
    print(
        f"RESULT name=jobs/throughput ratio={ratio:.3f} target=>={TARGET} "
        'peer="bare nursery.start_soon behind CapacityLimiter(8)"'
    )
    return ratio


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: 2,000 jobs, 3 rounds")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    jobs = args.jobs or (2_000 if args.quick else 10_000)
    rounds = args.rounds or (3 if args.quick else 7)
    ratio = trio.run(main, jobs, rounds)
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(cli())
