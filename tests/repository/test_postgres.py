"""
`PostgresOutputRepository` (issue 11; spec S4-10..S4-13): the contract, plus what only a
shared database has to get right: a save and its record in one transaction (cancelled,
failed or killed: no large object, no record), refs checked before the database, the
secret in the database, pruning that takes the large objects along, snapshot reads,
cancellable waits for a connection, and several repositories (processes) at once.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings, strategies as st

import trio_taskgraph as tg
from tests.polling import wait_until
from tests.typed_hypothesis import given
from trio_taskgraph._repository import _postgres
from trio_taskgraph.testing import (
    CONTRACT_CHECKS,
    cancel_at_each_checkpoint,
    check_output_repository,
    torture_max_points,
)
from trio_taskgraph.testing._repository_contract import _forgeries

from . import test_sources

Databases = Callable[[], str]


async def _stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


def _query_sync(dsn: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql.encode(), params)
        return cur.fetchall() if cur.description is not None else []


async def _query(dsn: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    return await trio.to_thread.run_sync(_query_sync, dsn, sql, params)


async def _large_objects(dsn: str) -> int:
    """Large objects in the database, as the server sees them (committed ones only)."""
    ((count,),) = await _query(dsn, "SELECT count(*) FROM pg_largeobject_metadata")
    assert isinstance(count, int)
    return count


async def _open_transactions(dsn: str) -> int:
    """Other sessions on this database inside a transaction (a save in flight), whether
    running a statement (a ``lowrite`` in a worker thread) or idle between two."""
    ((count,),) = await _query(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
    )
    assert isinstance(count, int)
    return count


async def _sessions(dsn: str) -> int:
    ((count,),) = await _query(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()",
    )
    assert isinstance(count, int)
    return count


async def _poll_server(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for the server, another process, to reach a state no trio event can announce:
    a dropped session, a lock wait."""
    await wait_until(condition, what, timeout=30, interval=0.05)


# --- the contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
async def test_contract(postgres_databases: Databases, check: str) -> None:
    """S4-1..S4-8, S4-10: each check of the contract; a fresh database is a fresh repository."""

    def factory() -> tg.OutputRepository:
        return tg.PostgresOutputRepository(postgres_databases())

    await check_output_repository(factory, only=[check])


#: The checks where a run-private view over Postgres could differ from one over memory or the
#: filesystem (namespaced refs, deletes, pruning, cancellation); the wrapper's own forwarding
#: is checked against every check in test_contract.py and test_run_private.py.
RUN_PRIVATE_CHECKS = [
    "stream_round_trip",
    "delete_output_by_ref",
    "foreign_refs_are_refused",
    "cancelled_stream_leaves_nothing",
    "prefix_delete_cascades",
    "stats_and_gc",
]


@pytest.mark.parametrize("check", RUN_PRIVATE_CHECKS)
async def test_contract_run_private(postgres_databases: Databases, check: str) -> None:
    """S4-7 (seed late HIGH 1: the wrapper forwards deletes): a run's private area of a
    Postgres repository passes the contract checks that touch namespaces and blobs."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[tg.OutputRepository]:
        backing = tg.PostgresOutputRepository(postgres_databases())
        repo = tg.RunPrivateRepository(backing, "run")
        try:
            yield repo
        finally:
            await repo.aclose()
            await backing.aclose()  # closing the wrapper never closes the backing

    await check_output_repository(factory, only=[check])


@pytest.mark.parametrize(
    "name",
    [
        "test_failed_save_closes_a_channel_source",
        "test_sink_failing_before_reading_releases_the_producer",
        "test_streamed_reads_hand_out_bounded_bytes_chunks",
    ],
)
async def test_sources_and_bounded_reads(postgres_dsn: str, name: str) -> None:
    """S4-3 (seed late HIGH 2: a failed save releases its producer), S4-12 (seed M-6:
    streamed reads hand out bounded chunks): the shared source tests, on Postgres."""
    await getattr(test_sources, name)(lambda: tg.PostgresOutputRepository(postgres_dsn))


# --- S4-11: one transaction; nothing left behind ---------------------------------------------


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=10),
    cancel_at=st.integers(min_value=0, max_value=10),
    how=st.sampled_from(["cancel", "raise"]),
)
async def test_cancellation_at_random_chunks(
    postgres_dsn: str, sizes: list[int], cancel_at: int, how: str
) -> None:
    """S4-11: a streamed save cancelled (or failed) at any chunk, or after the last one,
    leaves no large object (``pg_largeobject_metadata``), no record and no open
    transaction; the repository works afterwards."""
    # A tiny batch makes every chunk boundary a write (a lowrite hop) too.
    repo = tg.PostgresOutputRepository(postgres_dsn, write_batch_bytes=3000)
    cancel_at %= len(sizes) + 1
    try:
        before = await repo.stats()
        objects = await _large_objects(postgres_dsn)
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
                    scope.cancel()  # after the last chunk, before the commit
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
        assert await _large_objects(postgres_dsn) == objects
        assert await _open_transactions(postgres_dsn) == 0
        assert await repo.stats() == before
        ref = await repo.save_output_stream("t", {"x": 1}, "out", _stream(b"ok" * 3000))
        assert await repo.get_output_by_ref(ref) == b"ok" * 3000
        assert await _large_objects(postgres_dsn) == objects + 1
        await repo.delete_output_by_ref(ref)
    finally:
        await repo.aclose()


async def test_cancel_while_parked_waiting_for_the_producer(postgres_dsn: str) -> None:
    """S4-11: while a save waits for its producer, its transaction is open and its large
    object invisible to everyone else; cancelled from outside, it rolls back: nothing."""
    repo = tg.PostgresOutputRepository(postgres_dsn, write_batch_bytes=10)
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
        assert await _open_transactions(postgres_dsn) == 1
        assert await _large_objects(postgres_dsn) == 0, "uncommitted, so invisible"
        nursery.cancel_scope.cancel()
    assert await _open_transactions(postgres_dsn) == 0
    assert await _large_objects(postgres_dsn) == 0
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


async def test_cancel_while_a_batch_is_being_written(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S4-11: cancelled while a worker thread runs a ``lowrite`` (the producer waiting for
    the writer): the thread finishes, then the transaction rolls back; nothing is kept."""
    repo = tg.PostgresOutputRepository(postgres_dsn, write_batch_bytes=4)
    await repo.stats()
    entered = threading.Event()
    release = threading.Event()
    real = _postgres._lo_write

    def slow_write(conn: object, fd: int, batch: list[bytes]) -> None:
        entered.set()
        release.wait(10)
        real(conn, fd, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(_postgres, "_lo_write", slow_write)

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
    assert await _large_objects(postgres_dsn) == 0
    assert await _open_transactions(postgres_dsn) == 0
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


async def test_failed_commit_leaves_nothing(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S4-11: the record insert failing after every byte was written rolls the large object
    back with it; the error is a RepositoryError and the repository keeps working."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    await repo.stats()
    # A record whose name collides with the next save's fails its INSERT at commit time.
    # The very module `_postgres` draws its names from (it calls ``secrets.token_hex``).
    monkeypatch.setattr(secrets, "token_hex", lambda n: "a" * (2 * n))
    first = await repo.save_output_stream("t", {}, "out", _stream(b"first"))
    with pytest.raises(tg.RepositoryError, match="database error"):
        await repo.save_output_stream("t", {}, "out", _stream(b"x" * 100_000))
    monkeypatch.undo()
    assert await _large_objects(postgres_dsn) == 1
    assert await _open_transactions(postgres_dsn) == 0
    assert await repo.get_output_by_ref(first) == b"first"
    await repo.aclose()


CHILD = r"""
import sys, trio
import trio_taskgraph as tg

async def main():
    repo = tg.PostgresOutputRepository(sys.argv[1], write_batch_bytes=1000)
    async def chunks():
        while True:
            yield b"z" * 1000
            print("c", flush=True)  # a batch went to the server
            await trio.sleep(0.001)
    await repo.save_output_stream("t", {}, "out", chunks())

trio.run(main)
"""


async def test_killed_process_leaves_nothing(postgres_dsn: str) -> None:
    """S4-11: a process SIGKILLed mid-save (batches already written into its large object)
    leaves no large object and no record: the server rolls its transaction back."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    await repo.stats()  # create the tables
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, postgres_dsn], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    seen = b""
    try:
        with trio.fail_after(60):
            while seen.count(b"c") < 20:
                data = await proc.stdout.receive_some()
                assert data, "the child died on its own"
                seen += data
            assert await _open_transactions(postgres_dsn) == 1
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            await proc.stdout.aclose()

    # The server notices the dropped connection on its own; wait for it (our pooled
    # connection stays).
    async def child_gone() -> bool:
        return await _sessions(postgres_dsn) == 1

    await _poll_server(child_gone, "the server to drop the killed child's session")
    assert await _large_objects(postgres_dsn) == 0
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


# --- S4-6, S4-10: refs and the secret ---------------------------------------------------------


async def test_forged_refs_touch_no_database(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S4-6: traversal shapes, other ids, flipped tags, 10 KiB texts, NUL: refused with
    ForeignRefError before any connection is taken."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    real = await repo.save_output_stream("t", {}, "out", _stream(b"secret bytes"))

    def no_db(self: object) -> object:
        raise AssertionError("a forged ref reached the database")

    monkeypatch.setattr(_postgres._Shared, "connection", no_db)
    huge = object.__new__(tg.CacheRef)
    object.__setattr__(huge, "ref", real.ref + "/" + "a" * 10240)
    nul = object.__new__(tg.CacheRef)
    object.__setattr__(nul, "ref", real.ref[:-1] + "\x00")
    for bad in [*_forgeries(real), huge, nul, tg.CacheRef("pg_largeobject")]:
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


async def test_other_namespace_refs_are_refused(postgres_dsn: str) -> None:
    """S4-6, S4-7: views in other namespaces share the database, nothing else: another
    namespace's ref is foreign, its rows, prunes and stats are its own."""
    root = tg.PostgresOutputRepository(postgres_dsn)
    other = root.with_namespace("tenant-b")
    assert other.namespace == "tenant-b"
    ref = await root.save_output_stream("t", {}, "out", _stream(b"root"))
    await root.save_output("t", {}, {"out": ref})
    assert await other.get_output("t", {}) is None
    with pytest.raises(tg.ForeignRefError, match="namespace"):
        await other.get_output_by_ref(ref)
    with pytest.raises(tg.ForeignRefError, match="namespace"):
        await other.delete_output_by_ref(ref)
    with pytest.raises(tg.ForeignRefError, match="namespace"):
        async with other.open_output_stream_by_ref(ref):
            pass
    # The same ref text in another process's repository with the other namespace: refused.
    elsewhere = tg.PostgresOutputRepository(postgres_dsn, namespace="tenant-b")
    with pytest.raises(tg.ForeignRefError, match="namespace"):
        await elsewhere.get_output_by_ref(ref)
    assert await other.delete_by_task_type_prefix("") == 0
    assert await other.clear_older_than(0) == 0
    assert (await other.gc(min_age=0)).blobs == 0
    assert (await other.stats()).rows == 0
    assert await root.get_output_by_ref(ref) == b"root"
    await other.aclose()
    assert await root.get_output("t", {}) == {"out": ref}, "closing a view closes only it"
    await elsewhere.aclose()
    await root.aclose()
    with pytest.raises(ValueError, match="namespace"):
        root.with_namespace("../up")


async def test_the_secret_lives_in_the_database(postgres_databases: Databases) -> None:
    """S4-10: every repository on one database (another process, another machine) issues and
    accepts the same refs; another database's refs are foreign; the secret is in a table.
    S4-3 (seed late CRITICAL race): identical inputs from two writers give two blobs, and
    deleting one never touches the other."""
    dsn = postgres_databases()
    a = tg.PostgresOutputRepository(dsn)
    b = tg.PostgresOutputRepository(dsn)
    ref_a = await a.save_output_stream("t", {"same": 1}, "out", _stream(b"from a"))
    ref_b = await b.save_output_stream("t", {"same": 1}, "out", _stream(b"from b"))
    assert ref_a.ref != ref_b.ref
    assert ref_a.ref.split("/")[2] == ref_b.ref.split("/")[2], "one repository id"
    assert await b.get_output_by_ref(ref_a) == b"from a"
    await b.delete_output_by_ref(ref_a)
    with pytest.raises(tg.DanglingRefError):
        await a.get_output_by_ref(ref_a)
    assert await a.get_output_by_ref(ref_b) == b"from b"
    ((secret,),) = await _query(dsn, "SELECT secret FROM trio_taskgraph_meta")
    assert isinstance(secret, bytes)
    assert len(secret) == 32
    other = tg.PostgresOutputRepository(postgres_databases())
    with pytest.raises(tg.ForeignRefError, match="another repository"):
        await other.get_output_by_ref(ref_b)
    for repo in (a, b, other):
        await repo.aclose()


# --- S4-12: reads ---------------------------------------------------------------------------


async def test_a_streamed_read_sees_one_snapshot(postgres_dsn: str) -> None:
    """S4-12: a delete committed while a streamed read is half-way does not tear it: the
    reader finishes with every byte; new readers then see the blob gone."""
    repo = tg.PostgresOutputRepository(postgres_dsn, read_chunk_bytes=1000)
    data = bytes(range(256)) * 40
    ref = await repo.save_output_stream("t", {}, "out", _stream(data))
    got = bytearray()
    async with repo.open_output_stream_by_ref(ref) as chunks:
        got += await chunks.__anext__()
        await repo.delete_output_by_ref(ref)
        assert await _large_objects(postgres_dsn) == 0
        async for chunk in chunks:
            assert len(chunk) <= 1000
            got += chunk
    assert bytes(got) == data
    with pytest.raises(tg.DanglingRefError):
        await repo.get_output_by_ref(ref)
    with pytest.raises(tg.RepositoryError, match="after its"):
        await chunks.__anext__()
    await repo.aclose()


async def test_whole_reads_cross_the_read_chunk(postgres_dsn: str) -> None:
    """S4-12: get_output_by_ref reads a blob larger than one loread exactly."""
    repo = tg.PostgresOutputRepository(postgres_dsn, read_chunk_bytes=7, write_batch_bytes=5)
    data = b"0123456789" * 13 + b"!"
    ref = await repo.save_output_stream(
        "t", {}, "out", _stream(*(data[i : i + 3] for i in range(0, len(data), 3)))
    )
    assert ref.size == len(data)
    assert await repo.get_output_by_ref(ref) == data
    await repo.aclose()


# --- S4-13: pruning takes the large objects --------------------------------------------------


async def test_pruning_removes_large_objects(postgres_dsn: str) -> None:
    """S4-13 (seed M-5): prefix deletes, age pruning and gc unlink the large objects of the
    blobs they remove, in the same transaction (no vacuumlo); a blob a surviving row points
    to keeps its large object."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    shared = await repo.save_output_stream("a.x", {}, "out", _stream(b"shared"))
    only_a = await repo.save_output_stream("a.x", {}, "out", _stream(b"a only"))
    loose = await repo.save_output_stream("z", {}, "out", _stream(b"loose"))
    await repo.save_output("a.x", {}, {"s": shared, "a": only_a})
    await repo.save_output("b", {}, {"s": shared})
    assert await _large_objects(postgres_dsn) == 3
    assert await repo.delete_by_task_type_prefix("a.") == 1
    assert await _large_objects(postgres_dsn) == 2
    assert await repo.get_output_by_ref(shared) == b"shared"
    # Age, by the server's clock: make row "b" old and the loose blob young.
    await _query(
        postgres_dsn, "UPDATE trio_taskgraph_rows SET created = created - interval '1 hour'"
    )
    assert await repo.clear_older_than(600) == 1
    assert await _large_objects(postgres_dsn) == 1, "b's blob went with it, the young one stayed"
    assert await repo.get_output_by_ref(loose) == b"loose"
    assert (await repo.gc()).blobs == 0, "gc spares young unreferenced blobs"
    report = await repo.gc(min_age=0)
    assert (report.blobs, report.bytes, report.temp_files) == (1, 5, 0)
    assert await _large_objects(postgres_dsn) == 0
    assert await repo.stats() == tg.RepositoryStats(rows=0, blobs=0, bytes=0)
    await repo.aclose()


async def test_a_large_object_removed_by_hand(postgres_dsn: str) -> None:
    """S4-12, S4-13: a record whose large object someone unlinked by hand reads as dangling
    (a cache miss, not a failed run), and pruning still removes the record."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    ref = await repo.save_output_stream("t", {}, "out", _stream(b"soon gone"))
    await _query(postgres_dsn, "SELECT lo_unlink(lo) FROM trio_taskgraph_blobs")
    with pytest.raises(tg.DanglingRefError):
        await repo.get_output_by_ref(ref)
    with pytest.raises(tg.DanglingRefError):
        async with repo.open_output_stream_by_ref(ref):
            pass
    report = await repo.gc(min_age=0)
    assert (report.blobs, report.bytes) == (1, 9)
    assert (await repo.stats()).blobs == 0
    await repo.aclose()


async def test_prune_waits_for_a_row_being_saved(postgres_dsn: str) -> None:
    """S4-13: while a row save holds its namespace's shared lock, a prune of that namespace
    waits for it (so it sees the row's refs); a prune of another namespace does not."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    ref = await repo.save_output_stream("t", {}, "out", _stream(b"kept"))
    import psycopg

    saver = await trio.to_thread.run_sync(lambda: psycopg.connect(postgres_dsn))
    try:
        # Stand in for a save_output of another process, paused just before its commit.
        await trio.to_thread.run_sync(
            lambda: _postgres._lock_namespace(saver, "default", exclusive=False)
        )
        await trio.to_thread.run_sync(
            lambda: saver.execute(
                "INSERT INTO trio_taskgraph_rows (ns, task_type, digest, data)"
                " VALUES ('default', 't', 'd', '\\x80')"
            )
        )
        await trio.to_thread.run_sync(
            lambda: saver.execute(
                "INSERT INTO trio_taskgraph_row_blobs VALUES ('default', 't', 'd', %s)",
                (ref.ref.split("/")[4].split("#")[0],),
            )
        )
        assert (await repo.with_namespace("other").gc(min_age=0)).blobs == 0
        done: list[int] = []

        async def prune() -> None:
            done.append((await repo.gc(min_age=0)).blobs)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(prune)

            async def prune_waits() -> bool:
                return bool(
                    await _query(
                        postgres_dsn,
                        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    )
                )

            await _poll_server(prune_waits, "the prune to wait on the namespace lock")
            assert done == []
            await trio.to_thread.run_sync(saver.commit)
        assert done == [0], "the prune saw the committed row and kept its blob"
        assert await repo.get_output_by_ref(ref) == b"kept"
    finally:
        await trio.to_thread.run_sync(saver.close)
    await repo.aclose()


# --- the pool, closing, errors ---------------------------------------------------------------


async def test_cancel_while_waiting_for_a_connection(postgres_dsn: str) -> None:
    """S4-8: calls parked waiting for a free connection (all held by a streamed read) are
    cancelled cleanly: nothing parked, nothing changed, the pool still works."""
    repo = tg.PostgresOutputRepository(postgres_dsn, max_connections=1)
    ref = await repo.save_output_stream("t", {}, "out", _stream(b"held"))
    await repo.save_output("t", {}, {"v": 1})
    slots = repo._shared.slots
    async with repo.open_output_stream_by_ref(ref):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repo.save_output, "t", {}, {"v": 2})
            nursery.start_soon(repo.get_output, "t", {})
            nursery.start_soon(repo.save_output_stream, "t", {}, "out", _stream(b"no"))
            await trio.testing.wait_all_tasks_blocked()
            assert slots.statistics().tasks_waiting == 3
            nursery.cancel_scope.cancel()
        assert slots.statistics().tasks_waiting == 0
    assert slots.value == 1
    assert await repo.get_output("t", {}) == {"v": 1}
    assert (await repo.stats()).blobs == 1
    await repo.aclose()


async def test_concurrent_repositories_share_one_database(postgres_dsn: str) -> None:
    """S4-3, S4-10: two repositories (two processes' worth of pools) stream, save rows and
    read each other's blobs concurrently; every ref is distinct and reads back exactly."""
    a = tg.PostgresOutputRepository(postgres_dsn, max_connections=3, write_batch_bytes=4096)
    b = tg.PostgresOutputRepository(postgres_dsn, max_connections=3, write_batch_bytes=4096)
    written: dict[str, bytes] = {}

    async def writer(repo: tg.PostgresOutputRepository, i: int) -> None:
        data = (b"%d-" % i) * (1000 + 997 * i)
        ref = await repo.save_output_stream(
            "t",
            {"same": 1},
            "out",
            _stream(*(data[j : j + 5000] for j in range(0, len(data), 5000))),
        )
        await repo.save_output("t", {"i": i}, {"out": ref})
        written[ref.ref] = data

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(writer, a if i % 2 else b, i)
    assert len(written) == 12
    for i in range(12):
        row = await (b if i % 2 else a).get_output("t", {"i": i})
        assert row is not None
        ref = row["out"]
        assert isinstance(ref, tg.CacheRef)
        assert await (b if i % 2 else a).get_output_by_ref(ref) == written[ref.ref]
    assert await _large_objects(postgres_dsn) == 12
    assert await a.delete_by_task_type_prefix("t") == 12
    assert await _large_objects(postgres_dsn) == 0
    await a.aclose()
    await b.aclose()


async def test_aclose_closes_pooled_connections(postgres_dsn: str) -> None:
    """S4-8, S4-14: aclose closes every pooled connection (closing a view closes none);
    a connection in use when closing is closed when its call ends."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    view = repo.with_namespace("v")
    ref = await repo.save_output_stream("t", {}, "out", _stream(b"x"))
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(repo.save_output, "t", {"i": i}, {"v": i})
    assert await _sessions(postgres_dsn) >= 2
    await view.aclose()
    assert await _sessions(postgres_dsn) >= 2, "closing a view closes only the view"

    def sessions_become(n: int) -> Callable[[], Awaitable[bool]]:
        # A backend leaves pg_stat_activity a moment after its client closed the socket.
        async def condition() -> bool:
            return await _sessions(postgres_dsn) == n

        return condition

    async with repo.open_output_stream_by_ref(ref) as chunks:
        await repo.aclose()
        await _poll_server(sessions_become(1), "the idle connections to close")
        assert [c async for c in chunks] == [b"x"]
    await _poll_server(sessions_become(0), "the streaming connection to close")
    with pytest.raises(tg.RepositoryError, match="closed"):
        await repo.get_output("t", {})
    with pytest.raises(tg.RepositoryError, match="closed"):
        await view.stats()


async def test_unreachable_database_is_a_repository_error(tmp_path: object) -> None:
    """S4-8: a server that is not there is a RepositoryError on first use, not a hang."""
    repo = tg.PostgresOutputRepository(f"host={tmp_path} port=1 dbname=x connect_timeout=5")
    with pytest.raises(tg.RepositoryError, match="database error"):
        await repo.get_output("t", {})
    await repo.aclose()


async def test_corrupt_row_is_a_repository_error(postgres_dsn: str) -> None:
    """S4-2: a row that does not decode is reported, not returned half-read."""
    repo = tg.PostgresOutputRepository(postgres_dsn)
    await repo.save_output("t", {}, {"v": 1})
    await _query(postgres_dsn, "UPDATE trio_taskgraph_rows SET data = '\\xc1'")
    with pytest.raises(tg.RepositoryError, match="corrupt"):
        await repo.get_output("t", {})
    await repo.aclose()


def test_repr_never_shows_the_dsn() -> None:
    """S4-10: the DSN may hold a password; the repr never shows it."""
    repo = tg.PostgresOutputRepository("host=h password=hunter2 dbname=d", namespace="ns")
    assert "hunter2" not in repr(repo)
    assert "ns" in repr(repo)
    with pytest.raises(ValueError, match="max_connections"):
        tg.PostgresOutputRepository("", max_connections=0)
    with pytest.raises(ValueError, match="namespace"):
        tg.PostgresOutputRepository("", namespace="../x")


BLOCK_PSYCOPG = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError("psycopg is blocked in this test")

sys.meta_path.insert(0, Block())
import trio
import trio_taskgraph as tg

assert "psycopg" not in sys.modules
repo = tg.PostgresOutputRepository("dbname=x")

async def main():
    try:
        await repo.get_output("t", {})
    except tg.RepositoryError as exc:
        print("RepositoryError:", exc)

trio.run(main)
"""


def test_without_psycopg_the_name_imports_and_first_use_explains() -> None:
    """S4-10: without the extra, ``import trio_taskgraph`` works, the name exists, and the
    first call raises RepositoryError saying how to install the extra."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_PSYCOPG],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "RepositoryError:" in done.stdout, done.stdout + done.stderr
    assert "trio-taskgraph[postgres]" in done.stdout


async def test_cancel_at_each_checkpoint_of_a_save(postgres_dsn: str) -> None:
    """S4-11, S4-14 (S7 toolkit): a streamed save, its row and a streamed read, cancelled
    after each scheduler step in turn: never a large object without its record or a record
    without its large object, never a transaction or a pooled connection left open."""
    repo = tg.PostgresOutputRepository(postgres_dsn, write_batch_bytes=2500, max_connections=2)
    await repo.stats()
    counter = iter(range(10**6))

    async def scenario() -> None:
        i = next(counter)
        ref = await repo.save_output_stream(
            "t", {"i": i}, "out", _stream(b"a" * 1000, b"b" * 2000, b"c" * 3000)
        )
        await repo.save_output("t", {"i": i}, {"out": ref})
        async with repo.open_output_stream_by_ref(ref) as chunks:
            assert b"".join([c async for c in chunks]) == b"a" * 1000 + b"b" * 2000 + b"c" * 3000

    async def check() -> None:
        (pairs,) = await _query(
            postgres_dsn,
            "SELECT (SELECT count(*) FROM pg_largeobject_metadata),"
            " (SELECT count(*) FROM trio_taskgraph_blobs b"
            "  JOIN pg_largeobject_metadata m ON m.oid = b.lo),"
            " (SELECT count(*) FROM trio_taskgraph_blobs)",
        )
        assert pairs[0] == pairs[1] == pairs[2], f"objects, matched, records: {pairs}"
        assert await _open_transactions(postgres_dsn) == 0
        assert repo._shared.slots.value == 2, "a pooled connection was not given back"

    report = await cancel_at_each_checkpoint(
        scenario, check=check, max_points=torture_max_points(12), cancel_timeout=30.0
    )
    assert report.steps >= 10
    assert report.unreached == ()
    await repo.aclose()
