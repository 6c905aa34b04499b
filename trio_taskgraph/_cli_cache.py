"""
``python -m trio_taskgraph cache stats|ls|gc|rm DIR``: look after a cache folder made by
`FsOutputRepository` (the folder a cache server serves, too).

Every command opens the folder as one more `FsOutputRepository` (several processes may share
a folder: a running cache server keeps working), refuses a folder that holds no repository
rather than creating one, and prints plain aligned text. Rules: spec/S9-cli-demo-docs.md,
S9-1 ... S9-3.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, final

import attrs
import trio

from ._core._refs import CacheRef
from ._errors import TaskGraphError
from ._repository import DEFAULT_GC_MIN_AGE, FsOutputRepository
from ._units import format_bytes

if TYPE_CHECKING:
    from ._repository import RowInfo

__all__ = ["CacheCommand", "run_cache_command"]


@final
@attrs.frozen(kw_only=True)
class CacheCommand:
    """
    One parsed ``cache`` command.

    Attributes:
        action: ``"stats"``, ``"ls"``, ``"gc"`` or ``"rm"``.
        path: the cache folder.
        namespace: the namespace to look at (default ``"default"``).
        min_age: ``gc`` keeps unreferenced blobs younger than this (seconds).
        prefix, older_than, ref, remove_all: what ``rm`` removes (exactly one is set).
    """

    action: str
    path: Path = attrs.field(converter=Path)
    namespace: str = "default"
    min_age: float = DEFAULT_GC_MIN_AGE
    prefix: str | None = None
    older_than: float | None = None
    ref: str | None = None
    remove_all: bool = False


def run_cache_command(command: CacheCommand, *, out: TextIO | None = None) -> int:
    """
    Run one ``cache`` command; return the exit code (0 done, 1 failed, 2 bad usage).

    Errors the library raises on purpose (`TaskGraphError`) are printed to stderr, not
    raised.
    """
    stream = sys.stdout if out is None else out
    # Invariant (S9-1): a cache command never makes a cache.
    if not (command.path / "rows.sqlite").is_file():
        print(f"error: {command.path} is not a cache folder (no rows.sqlite)", file=sys.stderr)
        return 2
    try:
        return trio.run(_run, command, stream)
    except (TaskGraphError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _run(command: CacheCommand, out: TextIO) -> int:
    repo = FsOutputRepository(command.path, namespace=command.namespace)
    try:
        if command.action == "stats":
            await _stats(repo, out)
        elif command.action == "ls":
            await _ls(repo, out)
        elif command.action == "gc":
            report = await repo.gc(min_age=command.min_age)
            print(
                f"removed {report.blobs} unreferenced blobs ({format_bytes(report.bytes)}) "
                f"and {report.temp_files} stale temp files",
                file=out,
            )
        elif command.action == "rm":
            return await _rm(repo, command, out)
        else:  # pragma: no cover - the parser only offers the four actions
            raise AssertionError(command.action)
    finally:
        await repo.aclose()
    return 0


async def _stats(repo: FsOutputRepository, out: TextIO) -> None:
    stats = await repo.stats()
    print(f"folder:    {repo.path}", file=out)
    print(f"namespace: {repo.namespace}", file=out)
    print(f"rows:      {stats.rows}", file=out)
    print(f"blobs:     {stats.blobs} ({format_bytes(stats.bytes)}, {stats.bytes} bytes)", file=out)


def _age(created: float, now: float) -> str:
    seconds = max(0.0, now - created)
    for unit, span in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_rows(rows: list[RowInfo], *, now: float) -> list[str]:
    """The lines of ``cache ls``: one per row, then one indented line per ref it holds."""
    lines = [f"{'task type':<24} {'inputs':<12} {'age':>5} {'row':>10} {'blobs':>10}  refs"]
    for row in rows:
        lines.append(
            f"{row.task_type:<24} {row.digest[:12]:<12} {_age(row.created, now):>5} "
            f"{format_bytes(row.row_bytes):>10} {format_bytes(row.blob_bytes):>10}  {len(row.refs)}"
        )
        for ref in row.refs:
            size = "?" if ref.size is None else f"{format_bytes(ref.size)} ({ref.size} bytes)"
            mime = f" {ref.mime}" if ref.mime else ""
            lines.append(f"    {ref.ref}  {size}{mime}")
    return lines


async def _ls(repo: FsOutputRepository, out: TextIO) -> None:
    rows = await repo.list_rows()
    for line in format_rows(rows, now=time.time()):
        print(line, file=out)
    stats = await repo.stats()
    print(
        f"{stats.rows} rows; {stats.blobs} blobs, {format_bytes(stats.bytes)}",
        file=out,
    )


async def _rm(repo: FsOutputRepository, command: CacheCommand, out: TextIO) -> int:
    chosen = [
        name
        for name, value in (
            ("--prefix", command.prefix),
            ("--older-than", command.older_than),
            ("--ref", command.ref),
            ("--all", command.remove_all or None),
        )
        if value is not None
    ]
    # Invariant (S9-3): exactly one selector, or nothing is removed.
    if len(chosen) != 1:
        print(
            "error: cache rm needs exactly one of --prefix, --older-than, --ref, --all",
            file=sys.stderr,
        )
        return 2
    if command.ref is not None:
        # Checked against this folder's key and namespace before any file is touched (S4-6).
        await repo.delete_output_by_ref(CacheRef(command.ref))
        print(f"removed blob {command.ref}", file=out)
        return 0
    if command.older_than is not None:
        if math.isnan(command.older_than) or command.older_than < 0:
            print("error: --older-than takes seconds >= 0", file=sys.stderr)
            return 2
        removed = await repo.clear_older_than(command.older_than)
    else:
        removed = await repo.delete_by_task_type_prefix(command.prefix or "")
    print(f"removed {removed} rows (and the blobs only they pointed to)", file=out)
    return 0
