"""
``python -m trio_taskgraph``: argument parsing only. Each command family lives in its own
module behind this one (``_demo``, ``_cli_cache``, ``_cli_bench``), imported when the command
runs, and calls the public API.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio_taskgraph as tg
from trio_taskgraph import _worker_cli, cache_server

from ._units import parse_size

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1:
        raise argparse.ArgumentTypeError("the size must be at least 1 byte")
    return size


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import DemoOptions, run_demo, self_check

    if args.self_check:
        return self_check()
    if args.input is not None and not args.input.is_file():
        print(f"error: --input {args.input}: no such file", file=sys.stderr)
        return 2
    options = DemoOptions(
        size=args.size,
        budget=args.budget,
        input=args.input,
        keep=args.keep,
        in_process=args.in_process,
    )
    return run_demo(options)


def _run_cache(args: argparse.Namespace) -> int:
    from ._cli_cache import CacheCommand, run_cache_command

    command = CacheCommand(
        action=args.action,
        path=args.dir,
        namespace=args.namespace,
        min_age=getattr(args, "min_age", 300.0),
        prefix=getattr(args, "prefix", None),
        older_than=getattr(args, "older_than", None),
        ref=getattr(args, "ref", None),
        remove_all=getattr(args, "all", False),
    )
    return run_cache_command(command)


def _run_bench(args: argparse.Namespace) -> int:
    from ._cli_bench import run_bench_command

    return run_bench_command(
        quick=args.quick, only=args.only, bench_dir=args.dir, markdown=args.markdown
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: one ``add_parser`` block per command."""
    parser = argparse.ArgumentParser(prog="python -m trio_taskgraph", description=tg.__doc__)
    parser.add_argument("--version", action="version", version=tg.__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # demo: what `make demo` runs.
    demo = sub.add_parser(
        "demo",
        help="stream a large input through a graph, a cache server and back; cancel one run",
        description="Stream bytes through a two-task graph and a cache server (a child "
        "process), replay them from the cache, then cancel a run halfway and check that "
        "nothing is left.",
    )
    demo.add_argument(
        "--size", type=_size, default=parse_size("512MiB"), help="bytes to generate (512MiB)"
    )
    demo.add_argument(
        "--budget",
        type=_size,
        default=tg.DEFAULT_HIGH_WATER_BYTES,
        help="byte budget of every streaming edge (8MiB)",
    )
    demo.add_argument("--input", type=Path, metavar="FILE", help="stream FILE instead")
    demo.add_argument("--keep", action="store_true", help="keep the cache folder afterwards")
    demo.add_argument(
        "--in-process",
        action="store_true",
        help="use an in-process FsOutputRepository instead of a cache server",
    )
    demo.add_argument(
        "--self-check",
        action="store_true",
        help="only show how ports and binary chunks work (instant, no I/O)",
    )
    demo.set_defaults(handler=_run_demo)

    # cache stats|ls|gc|rm DIR: a cache folder made by FsOutputRepository.
    cache = sub.add_parser("cache", help="look after a cache folder (stats, ls, gc, rm)")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("stats", "count rows, blobs and bytes"),
        ("ls", "list rows with their refs and sizes"),
        ("gc", "remove unreferenced blobs and stale temp files"),
        ("rm", "remove rows (and the blobs only they use) or one blob"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("dir", metavar="DIR", help="the cache folder")
        action.add_argument("--namespace", default="default", help="namespace (default)")
        if name == "gc":
            action.add_argument(
                "--min-age",
                type=float,
                default=300.0,
                metavar="SECONDS",
                help="keep unreferenced blobs younger than this (300)",
            )
        if name == "rm":
            action.add_argument("--prefix", help="rows whose task type starts with PREFIX")
            action.add_argument(
                "--older-than", type=float, metavar="SECONDS", help="rows at least this old"
            )
            action.add_argument("--ref", help="one blob, by its ref (cache://...)")
            action.add_argument("--all", action="store_true", help="every row")
    cache.set_defaults(handler=_run_cache)

    # bench: run bench/bench_*.py and print one table of ratios.
    bench = sub.add_parser("bench", help="run the benchmarks and print one table of ratios")
    bench.add_argument("--quick", action="store_true", help="a few seconds per benchmark")
    bench.add_argument("--dir", help="the bench folder (./bench)")
    bench.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    bench.add_argument(
        "only", nargs="*", metavar="NAME", help="only these (e.g. byte_channel wire)"
    )
    bench.set_defaults(handler=_run_bench)

    # cache-server: run one (issue 6).
    serve = sub.add_parser("cache-server", help="serve a repository folder on a Unix socket")
    cache_server.add_arguments(serve)
    serve.set_defaults(handler=cache_server.run)

    # worker: run PostgresJobStore jobs for the tasks a module registers (issue 11).
    worker = sub.add_parser("worker", help="run PostgresJobStore jobs")
    _worker_cli.add_arguments(worker)
    worker.set_defaults(handler=_worker_cli.run)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
