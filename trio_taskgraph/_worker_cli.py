"""
``python -m trio_taskgraph worker --dsn DSN --import MODULE [--workers N] [--queue Q]``: a
worker process of a `PostgresJobStore` queue (issue 11; spec S8-22).

It imports each ``--import`` module (which registers its `Task` classes), opens a job queue
on the store with ``--workers`` workers and runs the jobs of those task types that any process
submits, until SIGTERM or SIGINT: then it claims nothing more and lets its running jobs
finish; after ``--grace`` seconds (or a second signal) it cancels them and gives them back to
the store (pending again, for another worker). It prints ``READY <owner>`` once it listens.
With ``--cache-dsn`` (default: the same DSN) jobs run with a shared `PostgresOutputRepository`
as their cache, so other processes can stream their binary outputs.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import TYPE_CHECKING

import trio

from ._jobs import open_job_queue
from ._jobs_postgres import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_POLL_INTERVAL,
    PostgresJobStore,
)
from ._repository._postgres import PostgresOutputRepository
from ._task import RunConfig

if TYPE_CHECKING:
    import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the worker's options to ``parser``."""
    parser.add_argument("--dsn", required=True, help="the PostgreSQL DSN of the job store")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        required=True,
        metavar="MODULE",
        help="a module registering the task types to run (repeatable)",
    )
    parser.add_argument("--workers", type=int, default=4, help="jobs run at once")
    parser.add_argument("--queue", default="default", help="the queue name")
    parser.add_argument(
        "--cache-dsn", default=None, help="the output repository's DSN (default: --dsn)"
    )
    parser.add_argument("--namespace", default="default", help="the output repository namespace")
    parser.add_argument(
        "--lease", type=float, default=DEFAULT_LEASE_SECONDS, help="job lease in seconds"
    )
    parser.add_argument(
        "--poll", type=float, default=DEFAULT_POLL_INTERVAL, help="fallback poll interval"
    )
    parser.add_argument(
        "--prefetch", type=int, default=0, help="jobs claimed ahead of idle workers (tiny jobs)"
    )
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds running jobs get on SIGTERM"
    )
    parser.add_argument(
        "--close-timeout",
        type=float,
        default=DEFAULT_CLOSE_TIMEOUT,
        help="seconds the final flush waits for an unreachable database (S8-25)",
    )


async def _serve(args: argparse.Namespace) -> None:
    store = PostgresJobStore(
        args.dsn,
        queue=args.queue,
        lease_seconds=args.lease,
        poll_interval=args.poll,
        prefetch=args.prefetch,
        close_timeout=args.close_timeout,
    )
    cache = PostgresOutputRepository(args.cache_dsn or args.dsn, namespace=args.namespace)
    config = RunConfig(cache=cache)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as outer:
                async with open_job_queue(config, workers=args.workers, store=store):
                    print(f"READY {store.owner}", flush=True)
                    await signals.__anext__()
                    # Finish the running jobs; a second signal or the grace period
                    # cancels them (they go back to the store).

                    async def hard_stop() -> None:
                        with trio.move_on_after(args.grace):
                            await signals.__anext__()
                        outer.cancel_scope.cancel()

                    outer.start_soon(hard_stop)
                outer.cancel_scope.cancel()
        finally:
            await store.aclose()
            await cache.aclose()


def run(args: argparse.Namespace) -> int:
    """Run the worker until SIGTERM; returns the exit code."""
    for name in args.imports:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"worker: cannot import {name!r}: {exc}", file=sys.stderr)
            return 2
    if args.workers < 1:
        print("worker: --workers must be >= 1", file=sys.stderr)
        return 2
    trio.run(_serve, args)
    return 0
