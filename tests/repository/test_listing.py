"""
`FsOutputRepository.list_rows`: what ``python -m trio_taskgraph cache ls`` shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_taskgraph as tg


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def test_rows_list_their_refs_and_sizes_oldest_first(tmp_path: Path) -> None:
    """S9-2, S4-4: each row lists its refs and the recorded size of the blobs they name."""
    now = [1000.0]
    repo = tg.FsOutputRepository(tmp_path / "c", clock=lambda: now[0])
    try:
        ref = await repo.save_output_stream("img.render", {"w": 1}, "png", _chunks(b"x" * 70_000))
        other = await repo.save_output_stream("img.render", {"w": 1}, "thumb", _chunks(b"y" * 10))
        await repo.save_output("img.render", {"w": 1}, {"png": ref, "meta": {"t": other}, "n": 3})
        now[0] = 2000.0
        await repo.save_output("text.upper", "abc", {"text": "ABC"})
        rows = await repo.list_rows()
    finally:
        await repo.aclose()
    assert [r.task_type for r in rows] == ["img.render", "text.upper"]
    first, second = rows
    assert set(first.refs) == {ref, other}
    assert first.blob_bytes == 70_010
    assert first.created == 1000.0
    assert len(first.digest) == 64
    assert 0 < first.row_bytes < 1024  # a 70 KB result, a row under 1 KiB: it holds refs
    assert second.refs == ()
    assert second.blob_bytes == 0
    assert second.created == 2000.0


async def test_prefix_filter_is_literal_and_namespaces_are_separate(tmp_path: Path) -> None:
    """S9-2, S4-7: a view sees only its namespace; the prefix is literal (no LIKE wildcards)."""
    repo = tg.FsOutputRepository(tmp_path / "c")
    other = repo.with_namespace("tenant-b")
    try:
        await repo.save_output("a_b.x", 1, {"v": 1})
        await repo.save_output("axb.x", 1, {"v": 2})
        await other.save_output("a_b.y", 1, {"v": 3})
        assert [r.task_type for r in await repo.list_rows(task_type_prefix="a_")] == ["a_b.x"]
        assert [r.task_type for r in await other.list_rows()] == ["a_b.y"]
        with pytest.raises(TypeError):
            await repo.list_rows(task_type_prefix=3)  # type: ignore[arg-type]
    finally:
        await other.aclose()
        await repo.aclose()


async def test_a_closed_repository_refuses_to_list(tmp_path: Path) -> None:
    """S4-8: a closed repository raises `RepositoryError`."""
    repo = tg.FsOutputRepository(tmp_path / "c")
    await repo.aclose()
    with pytest.raises(tg.RepositoryError, match="closed"):
        await repo.list_rows()


async def test_list_rows_is_a_checkpoint(tmp_path: Path) -> None:
    """S9-2 (STYLE 8): a public async method is a checkpoint on every call."""
    repo = tg.FsOutputRepository(tmp_path / "c")
    try:
        await repo.save_output("t", 1, {"v": 1})
        with trio.testing.assert_checkpoints():
            await repo.list_rows()
    finally:
        await repo.aclose()


async def test_cancelled_list_leaves_the_repository_usable(tmp_path: Path) -> None:
    """S9-2: a read-only query, cancelled while parked on the database lock, leaves nothing."""
    repo = tg.FsOutputRepository(tmp_path / "c")
    try:
        await repo.save_output("t", 1, {"v": 1})
        root = repo._root
        async with root.db_lock:  # hold the lock so list_rows parks on it
            scope = trio.CancelScope()
            cancelled: list[bool] = []

            async def lister() -> None:
                with scope:
                    await repo.list_rows()
                cancelled.append(scope.cancelled_caught)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lister)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert cancelled == [True]
        assert [r.task_type for r in await repo.list_rows()] == ["t"]
    finally:
        await repo.aclose()
