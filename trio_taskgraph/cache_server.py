"""
The cache server's entry point: ``python -m trio_taskgraph.cache_server --root DIR --socket
PATH`` (also ``python -m trio_taskgraph cache-server ...``).

It serves the folder ``DIR`` (an `FsOutputRepository`) on the Unix socket ``PATH`` and
prints one readiness line, ``READY <PATH>``, once it listens. SIGTERM or SIGINT stops it:
no new connections or requests, open requests finish (up to ``--grace`` seconds), then it
exits with status 0 and removes its socket. See spec/S5-wire-and-server.md (S5-6 on).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import trio

from ._cache_server import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_KEEP_FREED_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_ROW_CACHE_BYTES,
    DEFAULT_WINDOW,
    CacheServer,
    serve_cache_server,
    tune_allocator,
)
from ._errors import CacheServerError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["PROFILE_ENV", "add_arguments", "main", "run"]

#: Environment variable naming a file: the server runs under `cProfile` and writes its
#: statistics there on exit (for benchmarks; the event loop's thread only).
PROFILE_ENV = "TRIO_TASKGRAPH_SERVER_PROFILE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` (shared with the ``cache-server`` command)."""
    parser.add_argument("--root", required=True, help="the repository folder")
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="credit per stream")
    parser.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="largest chunk per frame"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, help="requests per connection"
    )
    parser.add_argument(
        "--row-cache-bytes",
        type=int,
        default=DEFAULT_ROW_CACHE_BYTES,
        help="rows kept in memory; 0 if other processes write the folder's rows",
    )
    parser.add_argument(
        "--keep-freed-bytes",
        type=int,
        default=DEFAULT_KEEP_FREED_BYTES,
        help="freed memory the allocator keeps for reuse (glibc; 0: leave it as it is)",
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds open requests get on SIGTERM"
    )


async def _serve(args: argparse.Namespace) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server: CacheServer = await nursery.start(
                lambda task_status: serve_cache_server(
                    args.root,
                    args.socket,
                    window=args.window,
                    chunk_bytes=args.chunk_bytes,
                    max_in_flight=args.max_in_flight,
                    row_cache_bytes=args.row_cache_bytes,
                    task_status=task_status,
                )
            )
            print(f"READY {args.socket}", flush=True)
            async for _ in signals:
                await server.shutdown(args.grace)
                break
            nursery.cancel_scope.cancel()


def run(args: argparse.Namespace) -> int:
    """Run the server with parsed ``args``; returns the exit status."""
    status = 0
    tune_allocator(getattr(args, "keep_freed_bytes", DEFAULT_KEEP_FREED_BYTES))
    try:
        profile_path = os.environ.get(PROFILE_ENV)
        if profile_path:
            # A measuring hook for benchmarks (bench/bench_cache_server.py): the event
            # loop's thread only (worker threads' file I/O shows as waits).
            import cProfile  # only when asked for

            profiler = cProfile.Profile(time.thread_time)  # CPU time: load-proof
            try:
                profiler.runcall(trio.run, _serve, args)
            finally:
                profiler.dump_stats(profile_path)
        else:
            trio.run(_serve, args)
    except* CacheServerError as refused:
        for problem in refused.exceptions:
            print(f"cache server: {problem}", file=sys.stderr)
        status = 2
    except* OSError as failed:
        for error in failed.exceptions:
            print(f"cache server: {error}", file=sys.stderr)
        status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the server; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_taskgraph.cache_server", description=__doc__.splitlines()[1]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
