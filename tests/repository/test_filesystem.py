"""
`FsOutputRepository` beyond the contract: cancellation at every chunk, injected I/O faults,
live versus dead writers sharing a folder, namespaces, forged refs that touch no file.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings, strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph import BytesLike
from trio_taskgraph._repository import _filesystem
from trio_taskgraph.testing._repository_contract import _forgeries

_folders = itertools.count()


def _temps(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "blobs").glob("*.tmp"))


def _published(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "blobs").glob("*.blob"))


async def _stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def test_constructor_does_no_io(tmp_path: Path) -> None:
    """S4-8: the sync constructor never blocks: the folder appears on the first call."""
    repo = tg.FsOutputRepository(tmp_path / "lazy")
    assert not (tmp_path / "lazy").exists()
    await repo.save_output("t", {}, {"v": 1})
    assert (tmp_path / "lazy" / "rows.sqlite").exists()
    secret = tmp_path / "lazy" / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    await repo.aclose()
    assert list((tmp_path / "lazy" / "locks").iterdir()) == []


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=12),
    cancel_at=st.integers(min_value=0, max_value=12),
    how=st.sampled_from(["cancel", "raise"]),
)
async def test_cancellation_at_every_chunk(
    tmp_path: Path, sizes: list[int], cancel_at: int, how: str
) -> None:
    """S4-3: cancelled or failed at any chunk: no .tmp, no row, no blob; still works after."""
    folder = tmp_path / f"f{next(_folders)}"
    # A tiny batch makes every chunk boundary a write hop too.
    repo = tg.FsOutputRepository(folder, write_batch_bytes=3000)
    cancel_at %= len(sizes) + 1
    try:
        before = await repo.stats()
        with trio.CancelScope() as scope:

            async def chunks() -> AsyncIterator[bytes]:
                for i, size in enumerate(sizes):
                    if i == cancel_at:
                        if how == "cancel":
                            scope.cancel()
                            await trio.lowlevel.checkpoint()
                        raise RuntimeError("producer failed")
                    yield bytes([i % 256]) * size
                if cancel_at == len(sizes):
                    scope.cancel()  # cancelled after the last chunk, before publication
                    await trio.lowlevel.checkpoint()

            raised: list[str] = []
            try:
                await repo.save_output_stream("t", {"x": 1}, "out", chunks())
            except RuntimeError as exc:
                raised.append(str(exc))
            else:
                raise AssertionError("the save should not have completed")
        cancelled = how == "cancel" or cancel_at == len(sizes)
        assert scope.cancelled_caught == cancelled
        assert raised == ([] if cancelled else ["producer failed"])
        assert _temps(folder) == []
        assert _published(folder) == []
        assert await repo.stats() == before
        ref = await repo.save_output_stream("t", {"x": 1}, "out", _stream(b"ok" * 3000))
        assert await repo.get_output_by_ref(ref) == b"ok" * 3000
    finally:
        await repo.aclose()


async def test_cancel_while_parked_in_a_save(tmp_path: Path) -> None:
    """S4-3: a save parked waiting for its producer, cancelled from outside, leaves nothing."""
    repo = tg.FsOutputRepository(tmp_path / "r", write_batch_bytes=10)
    gate = trio.Event()
    parked = trio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"0123456789abc"  # one full batch goes to the writer
        parked.set()
        await gate.wait()
        yield b"never"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(repo.save_output_stream, "t", {}, "out", slow())
        await parked.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(_temps(tmp_path / "r")) == 1
        nursery.cancel_scope.cancel()
    assert _temps(tmp_path / "r") == []
    assert _published(tmp_path / "r") == []
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


def _fail_when(predicate_name: str, real: object) -> object:
    def fake(*args: object) -> object:
        raise OSError(errno.EIO, f"injected {predicate_name} failure")

    return fake


@pytest.mark.parametrize("fault", ["writev", "fsync_file", "rename", "fsync_dir"])
async def test_injected_faults_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """S4-3: a failing write, fsync, rename or folder fsync: a clean RepositoryError, no
    temp file, no published partial blob, no record; the repository works afterwards."""
    folder = tmp_path / "r"
    repo = tg.FsOutputRepository(folder, write_batch_bytes=1000)
    await repo.save_output("t", {}, {"warm": True})  # open the folder before patching
    real_fsync = os.fsync

    def is_dir(fd: int) -> bool:
        return stat.S_ISDIR(os.fstat(fd).st_mode)

    def fsync(fd: int) -> None:
        if (fault == "fsync_dir") == is_dir(fd):
            raise OSError(errno.EIO, f"injected {fault}")
        real_fsync(fd)

    def boom(*args: object) -> None:
        raise OSError(errno.ENOSPC, f"injected {fault}")

    with monkeypatch.context() as patch:
        if fault in ("fsync_file", "fsync_dir"):
            patch.setattr(os, "fsync", fsync)
        else:
            patch.setattr(os, fault, boom)
        with pytest.raises(tg.RepositoryError, match="injected"):
            await repo.save_output_stream("t", {}, "out", _stream(b"a" * 1500, b"b" * 1500))
    assert _temps(folder) == []
    assert _published(folder) == []
    stats = await repo.stats()
    assert (stats.blobs, stats.bytes) == (0, 0)
    ref = await repo.save_output_stream("t", {}, "out", _stream(b"fine"))
    assert await repo.get_output_by_ref(ref) == b"fine"
    await repo.aclose()


async def test_forged_refs_touch_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S4-6: traversal shapes, other ids, flipped tags, 10 KiB texts, NUL: refused before
    any thread hop (so before any file or database access)."""
    repo = tg.FsOutputRepository(tmp_path / "r")
    real = await repo.save_output_stream("t", {}, "out", _stream(b"secret bytes"))

    async def no_io(*args: object) -> object:
        raise AssertionError("a forged ref reached the file system")

    monkeypatch.setattr(_filesystem.FsOutputRepository, "_run_io", no_io)
    monkeypatch.setattr(_filesystem.FsOutputRepository, "_db", no_io)
    huge = object.__new__(tg.CacheRef)
    object.__setattr__(huge, "ref", real.ref + "/" + "a" * 10240)
    nul = object.__new__(tg.CacheRef)
    object.__setattr__(nul, "ref", real.ref[:-1] + "\x00")
    absolute = tg.CacheRef(str(tmp_path / "r" / "secret"))
    for bad in [*_forgeries(real), huge, nul, absolute]:
        with pytest.raises(tg.ForeignRefError):
            await repo.get_output_by_ref(bad)  # type: ignore[arg-type]
        with pytest.raises(tg.ForeignRefError):
            await repo.delete_output_by_ref(bad)  # type: ignore[arg-type]
        with pytest.raises(tg.ForeignRefError):
            async with repo.open_output_stream_by_ref(bad):  # type: ignore[arg-type]
                pass
    monkeypatch.undo()
    assert await repo.get_output_by_ref(real) == b"secret bytes"
    await repo.aclose()


async def test_two_repositories_share_a_folder(tmp_path: Path) -> None:
    """S4-3, S4-5: concurrent writers in one folder get distinct refs; deleting one leaves
    the other; a live writer's temp file survives another repository's open-time sweep."""
    a = tg.FsOutputRepository(tmp_path / "shared")
    b = tg.FsOutputRepository(tmp_path / "shared")
    ref_a = await a.save_output_stream("t", {"same": 1}, "out", _stream(b"from a"))
    ref_b = await b.save_output_stream("t", {"same": 1}, "out", _stream(b"from b"))
    assert ref_a.ref != ref_b.ref
    assert await b.get_output_by_ref(ref_a) == b"from a"  # same folder, same repository id
    await b.delete_output_by_ref(ref_a)
    assert await a.get_output_by_ref(ref_b) == b"from b"
    with pytest.raises(tg.DanglingRefError):
        await a.get_output_by_ref(ref_a)

    gate = trio.Event()
    is_parked = trio.Event()

    async def parked() -> AsyncIterator[bytes]:
        yield b"x" * 10
        is_parked.set()
        await gate.wait()
        yield b"y" * 10

    async with trio.open_nursery() as nursery:
        results: list[tg.CacheRef] = []

        async def save() -> None:
            results.append(await a.save_output_stream("t", {}, "out", parked()))

        nursery.start_soon(save)
        await is_parked.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(_temps(tmp_path / "shared")) == 1
        c = tg.FsOutputRepository(tmp_path / "shared")
        report = await c.gc(min_age=0.0)  # sweeps like an open, and more
        assert report.temp_files == 0
        assert len(_temps(tmp_path / "shared")) == 1, "a live writer's temp file was swept"
        gate.set()
    assert await c.get_output_by_ref(results[0]) == b"x" * 10 + b"y" * 10
    for repo in (a, b, c):
        await repo.aclose()


async def test_dead_writers_temp_files_are_swept(tmp_path: Path) -> None:
    """S4-5: temp files whose owner's lock is free (owner dead) are removed at open."""
    folder = tmp_path / "r"
    repo = tg.FsOutputRepository(folder)
    await repo.stats()
    dead_token = "d" * 32
    (folder / "locks" / f"{dead_token}.lock").write_bytes(b"")
    (folder / "blobs" / f"{dead_token}.{'1' * 32}.tmp").write_bytes(b"torn")
    (folder / "blobs" / f"{'e' * 32}.{'2' * 32}.tmp").write_bytes(b"no lock file at all")
    await repo.aclose()
    again = tg.FsOutputRepository(folder)
    await again.stats()
    assert _temps(folder) == []
    assert sorted(p.name for p in (folder / "locks").iterdir()) != [f"{dead_token}.lock"]
    await again.aclose()


async def test_namespaces_share_a_folder_but_nothing_else(tmp_path: Path) -> None:
    """S4-6, S4-7: views in other namespaces have their own rows, blobs, refs and stats."""
    root = tg.FsOutputRepository(tmp_path / "r")
    other = root.with_namespace("tenant-b")
    ref = await root.save_output_stream("t", {}, "out", _stream(b"root"))
    await root.save_output("t", {}, {"out": ref})
    assert await other.get_output("t", {}) is None
    with pytest.raises(tg.ForeignRefError, match="namespace"):
        await other.get_output_by_ref(ref)
    with pytest.raises(tg.ForeignRefError):
        await other.delete_output_by_ref(ref)
    assert await other.delete_by_task_type_prefix("") == 0
    assert await other.clear_older_than(0) == 0
    assert (await other.stats()).rows == 0
    assert await root.get_output_by_ref(ref) == b"root"
    await other.aclose()
    assert await root.get_output("t", {}) == {"out": ref}, "closing a view closes only it"
    await root.aclose()
    with pytest.raises(ValueError, match="namespace"):
        root.with_namespace("../up")


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
async def test_clear_older_than_keeps_blobs_newer_rows_use(tmp_path: Path, kind: str) -> None:
    """S4-4 (seed M-5): pruning an old row never deletes a blob a newer row points to;
    pruning by age removes old unreferenced blobs but not young ones."""
    now = [1000.0]

    def clock() -> float:
        return now[0]

    repo: tg.OutputRepository = (
        tg.MemoryOutputRepository(clock=clock)
        if kind == "memory"
        else tg.FsOutputRepository(tmp_path / "r", clock=clock)
    )
    shared = await repo.save_output_stream("t", {}, "out", _stream(b"shared"))
    only_old = await repo.save_output_stream("t", {}, "out", _stream(b"old only"))
    await repo.save_output("old", {}, {"a": shared, "b": only_old})
    now[0] += 100
    await repo.save_output("new", {}, {"a": shared})
    young_orphan = await repo.save_output_stream("t", {}, "out", _stream(b"in flight"))
    now[0] += 10
    assert await repo.clear_older_than(50) == 1
    assert await repo.get_output("old", {}) is None
    assert await repo.get_output_by_ref(shared) == b"shared"
    assert await repo.get_output_by_ref(young_orphan) == b"in flight"
    with pytest.raises(tg.DanglingRefError):
        await repo.get_output_by_ref(only_old)
    await repo.aclose()


async def test_failed_row_save_leaves_blob_deletable(tmp_path: Path) -> None:
    """S4-4: when save_output fails after a streamed save, the caller deletes the blob."""
    repo = tg.FsOutputRepository(tmp_path / "r")
    ref = await repo.save_output_stream("t", {}, "out", _stream(b"orphan"))
    with pytest.raises(TypeError):
        await repo.save_output("t", {}, {"out": ref, "bad": object()})
    await repo.delete_output_by_ref(ref)
    assert _published(tmp_path / "r") == []
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


async def test_gc_removes_record_less_files(tmp_path: Path) -> None:
    """S4-4, S4-5: a blob file without a record (crash between rename and record) is
    collected once it is old enough that no live writer can still be recording it."""
    repo = tg.FsOutputRepository(tmp_path / "r")
    await repo.stats()
    stray = tmp_path / "r" / "blobs" / f"{'3' * 32}.blob"
    stray.write_bytes(b"stray")
    assert (await repo.gc()).blobs == 0  # too young by default
    assert (await repo.gc(min_age=0.0)).blobs == 0  # a live writer may be about to record it
    old = stray.stat().st_mtime - 120
    os.utime(stray, (old, old))
    report = await repo.gc(min_age=0.0)
    assert report.blobs == 1
    assert not stray.exists()
    await repo.aclose()


async def test_corrupt_row_is_a_repository_error(tmp_path: Path) -> None:
    """S4-2: a row that does not decode is reported, not returned half-read."""
    import sqlite3

    repo = tg.FsOutputRepository(tmp_path / "r")
    await repo.save_output("t", {}, {"v": 1})

    def corrupt() -> None:
        with sqlite3.connect(tmp_path / "r" / "rows.sqlite") as conn:
            conn.execute("UPDATE rows SET data = ?", (b"\xc1",))
        conn.close()

    await trio.to_thread.run_sync(corrupt)
    with pytest.raises(tg.RepositoryError, match="corrupt"):
        await repo.get_output("t", {})
    await repo.aclose()


async def test_stream_iterator_is_dead_after_its_block(tmp_path: Path) -> None:
    """S4-8: an iterator kept past its `async with` never reads a recycled descriptor."""
    repo = tg.FsOutputRepository(tmp_path / "r", read_chunk_bytes=4)
    ref = await repo.save_output_stream("t", {}, "out", _stream(b"0123456789"))
    async with repo.open_output_stream_by_ref(ref) as chunks:
        assert await chunks.__anext__() == b"0123"
    with pytest.raises(tg.RepositoryError, match="after its"):
        await chunks.__anext__()
    await repo.aclose()


async def test_cancel_while_parked_on_the_database_lock(tmp_path: Path) -> None:
    """S4-8: a call parked behind another's database work, cancelled, leaves nothing parked
    and changes nothing."""
    repo = tg.FsOutputRepository(tmp_path / "r")
    await repo.save_output("t", {}, {"v": 1})
    lock = repo._root.db_lock
    async with lock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repo.save_output, "t", {}, {"v": 2})
            nursery.start_soon(repo.get_output, "t", {})
            await trio.testing.wait_all_tasks_blocked()
            assert lock.statistics().tasks_waiting == 2
            nursery.cancel_scope.cancel()
        assert lock.statistics().tasks_waiting == 0
    assert await repo.get_output("t", {}) == {"v": 1}
    await repo.aclose()


async def test_cancel_while_a_batch_is_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S4-3: cancelled while a worker thread writes a batch (and the producer waits for the
    writer): the thread finishes, then the temp file goes; nothing is published."""
    import threading

    folder = tmp_path / "r"
    repo = tg.FsOutputRepository(folder, write_batch_bytes=4)
    await repo.stats()
    entered = threading.Event()
    release = threading.Event()
    real = _filesystem._writev_all

    def slow_writev(fd: int, batch: list[BytesLike]) -> None:
        entered.set()
        release.wait(10)
        real(fd, batch)

    monkeypatch.setattr(_filesystem, "_writev_all", slow_writev)

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            yield b"abcd"
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(repo.save_output_stream, "t", {}, "out", chunks())
        await trio.to_thread.run_sync(entered.wait, 10)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
        release.set()
    assert _temps(folder) == []
    assert _published(folder) == []
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
async def test_rows_beyond_wire_defaults_read_back(tmp_path: Path, kind: str) -> None:
    """S4-2: a row the repository accepted always reads back, even past the wire codec's
    default peer limits (64 MiB frames, 2**20-item containers): rows are our own writing."""
    from trio_taskgraph._core._codec import DEFAULT_MAX_CONTAINER_LEN, DEFAULT_MAX_FRAME_BYTES

    repo: tg.MemoryOutputRepository | tg.FsOutputRepository = (
        tg.MemoryOutputRepository() if kind == "memory" else tg.FsOutputRepository(tmp_path / "r")
    )
    output = {
        "blob": tg.Blob(b"x" * (DEFAULT_MAX_FRAME_BYTES + 1)),
        "items": [0] * (DEFAULT_MAX_CONTAINER_LEN + 1),
    }
    await repo.save_output("t", {"k": 1}, output)
    assert await repo.get_output("t", {"k": 1}) == output
    await repo.aclose()


async def test_unstorable_output_is_a_type_error(tmp_path: Path) -> None:
    """S4-2: a value no row can hold is refused before anything is written."""
    repo = tg.FsOutputRepository(tmp_path / "r")
    with pytest.raises(TypeError, match="cannot be stored"):
        await repo.save_output("t", {}, {"bad": object()})
    assert await repo.get_output("t", {}) is None
    await repo.aclose()
