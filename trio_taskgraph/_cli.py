"""
``python -m trio_taskgraph``: argument parsing only; every command calls the public API.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import trio_taskgraph as tg
from trio_taskgraph import _worker_cli, cache_server

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def _demo_events_and_ports() -> int:
    """Show how ports are read and binary chunks materialise; checks what it prints."""
    schema: dict[str, object] = {
        "type": "object",
        "properties": {
            "log": {"type": "string", "x-stream": "append"},
            "image": {"x-stream": "binary", "contentMediaType": "image/png"},
            "raw": {"x-stream": "binary", "format": "binary"},
            "count": {"type": "integer"},
        },
    }
    print("trio_taskgraph", tg.__version__, "- events and ports self-check")
    print("  streaming ports:     ", tg.get_streaming_ports(schema))
    print("  first binary port:   ", tg.get_binary_port_id(schema))
    print("  task stream mode:    ", tg.get_output_stream_mode(schema))
    print("  'image' materialises:", tg.assert_binary_format(schema, "image"))
    print("  'raw' materialises:  ", tg.assert_binary_format(schema, "raw"))

    events: list[tg.StreamEvent] = [
        tg.Phase("render"),
        tg.TextDelta("log", "drawing... "),
        tg.BinaryDelta("image", b"\x89PNG"),
        tg.BinaryDelta("image", b"\r\n\x1a\n"),
        tg.TextDelta("log", "done"),
        tg.Finish({"count": 2}),
    ]
    chunks = [e.chunk for e in events if isinstance(e, tg.BinaryDelta)]
    blob = tg.materialize_binary(chunks, "blob", mime="image/png")
    raw = tg.materialize_binary(chunks, "binary")
    print("  events:              ", ", ".join(type(e).__name__ for e in events))
    print("  as a blob:           ", blob)
    print("  as bytes:            ", raw)
    ok = isinstance(blob, tg.Blob) and blob.data == raw == b"\x89PNG\r\n\x1a\n"

    bad = {"properties": {"image": {"x-stream": "binary", "format": "Blob"}}}
    try:
        tg.assert_binary_format(bad, "image")
    except tg.BinaryFormatError as exc:
        print("  typo 'Blob' refused: ", exc)
    else:
        ok = False
    print("self-check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m trio_taskgraph", description=tg.__doc__)
    parser.add_argument("--version", action="version", version=tg.__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="show what the library does")
    serve = sub.add_parser(
        "cache-server", help="serve a repository folder on a Unix socket (issue 6)"
    )
    cache_server.add_arguments(serve)
    _worker_cli.add_arguments(sub.add_parser("worker", help="run PostgresJobStore jobs"))
    args = parser.parse_args(argv)
    if args.command == "worker":
        return _worker_cli.run(args)
    if args.command == "demo":
        return _demo_events_and_ports()
    if args.command == "cache-server":
        return cache_server.run(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
