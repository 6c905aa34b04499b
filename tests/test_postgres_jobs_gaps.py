"""
`PostgresJobStore` gaps closed by issue 11's last part (spec S8-17, S8-21, S8-23 .. S8-25):
unknown ids, remote failures, prefetched jobs at close, a re-claim racing a write, and a
database that is unreachable or hung when a queue closes.

An unreachable or hung database is made with a Unix-socket proxy in front of the throwaway
server (`_Proxy`): ``freeze()`` swallows every byte from then on (a hung server: nothing
answers, nothing fails), ``cut()`` closes every connection and the listening socket (a
stopped server: connections are refused). Everything runs in this process; the proxy is
closed at the end of each test, which lets abandoned threads finish.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing

import trio_taskgraph as tg
from tests import pgjobs_tasks as tasks
from trio_taskgraph._core._jobs import JobEvent, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

LEASE = 2.0
POLL = 0.5


def _rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql.encode()).fetchall())


@attrs.define(eq=False)
class _Proxy:
    """Forwards a Unix socket to the server's; can freeze (hang) or cut (refuse)."""

    target: str
    path: str
    frozen: bool = False
    scope: trio.CancelScope | None = None

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        with trio.CancelScope() as self.scope:
            try:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener])
            finally:
                await listener.aclose()
                os.unlink(self.path)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_unix_socket(self.target) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server)
                nursery.start_soon(self._pump, server, client)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while data := await src.receive_some(65536):
            if self.frozen:
                await trio.sleep_forever()  # the bytes are swallowed: nothing answers
            await dst.send_all(data)

    def freeze(self) -> None:
        self.frozen = True

    def cut(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


@asynccontextmanager
async def _proxied(dsn: str) -> AsyncIterator[tuple[_Proxy, str]]:
    """A proxy in front of ``dsn``'s server, and the DSN that goes through it."""
    host = re.search(r"host=(\S+)", dsn)
    port = re.search(r"port=(\d+)", dsn)
    assert host is not None
    assert port is not None
    # A short folder: a Unix socket path has at most 107 bytes.
    folder = tempfile.mkdtemp(prefix="pgproxy")
    try:
        name = f".s.PGSQL.{port.group(1)}"
        proxy = _Proxy(target=f"{host.group(1)}/{name}", path=f"{folder}/{name}")
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            yield proxy, dsn.replace(host.group(0), f"host={folder}")
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(folder)


def _submitter(dsn: str, **kwargs: float) -> tg.PostgresJobStore:
    return tg.PostgresJobStore(dsn, lease_seconds=LEASE, poll_interval=POLL, claim=False, **kwargs)  # type: ignore[arg-type]


# --- S8-21: a handle for an id the store does not hold --------------------------------------


async def test_handle_of_an_unknown_id_fails_at_once(postgres_dsn: str) -> None:
    """
    S8-21: ``queue.handle(id)`` for an id the table does not hold raises `UnknownJobError`
    (a `KeyError` and a `JobError`, naming the id) from ``result()`` and ``wait()`` as soon
    as the store has looked, instead of waiting forever; a real id still works.
    """
    store = _submitter(postgres_dsn)
    async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as queue:
        real = queue.submit(tasks.Tiny(), {"n": 1})
        await store.flush()
        handle = queue.handle("job-does-not-exist")
        with trio.fail_after(10):
            with pytest.raises(tg.UnknownJobError, match="job-does-not-exist") as info:
                await handle.result()
        assert isinstance(info.value, KeyError)
        assert isinstance(info.value, tg.JobError)
        assert info.value.job_id == "job-does-not-exist"
        with pytest.raises(tg.UnknownJobError):
            await handle.wait()
        # A new handle looks again; the real job's handle is not affected.
        assert queue.handle("job-does-not-exist") is not handle
        assert queue.handle(real.id) is real
        assert real.state == "pending"
    await store.aclose()


# --- S8-24: a failure in another process keeps its type, message and traceback -------------


async def test_remote_failure_keeps_type_message_and_traceback(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """
    S8-24: a job that fails in another queue (another process, as far as the submitter can
    tell: the outcome comes through the table) raises `RemoteJobError` from ``result()``,
    with the remote exception's type name, message and traceback text (cause chain
    included) as attributes.
    """
    submitter = _submitter(postgres_dsn)
    runner = tg.PostgresJobStore(postgres_dsn, lease_seconds=LEASE, poll_interval=POLL)
    async with (
        tg.open_job_queue(tg.RunConfig(), workers=1, store=runner),
        tg.open_job_queue(tg.RunConfig(), workers=1, store=submitter) as queue,
    ):
        handle = queue.submit(tasks.Flaky(), {"log": str(tmp_path / "flaky")})
        with trio.fail_after(20):
            with pytest.raises(tg.RemoteJobError) as info:
                await handle.result()
    await submitter.aclose()
    await runner.aclose()
    error = info.value
    assert isinstance(error, tg.JobError)
    assert error.job_id == handle.id
    assert error.type_name == "TaskFailedError"
    assert "pgjobs.Flaky" in error.remote_message
    assert str(error) == f"job {handle.id} failed: TaskFailedError: {error.remote_message}"
    assert error.remote_traceback is not None
    assert "OSError: first attempt fails" in error.remote_traceback
    assert 'raise OSError("first attempt fails")' in error.remote_traceback
    assert handle.record.error_traceback == error.remote_traceback


async def test_remote_handle_streams_only_a_declared_binary_port(postgres_dsn: str) -> None:
    """
    S8-21 with the seed's M-1: a handle for a job another queue ran (found by id through the
    table) streams the task's one declared binary port without a port name, and refuses a
    branded ref planted in a plain field, even when asked for it by name.
    """
    submitter = _submitter(postgres_dsn)
    watcher = _submitter(postgres_dsn)
    runner = tg.PostgresJobStore(postgres_dsn, lease_seconds=LEASE, poll_interval=POLL)
    async with (
        tg.open_job_queue(tg.RunConfig(), workers=1, store=runner),
        tg.open_job_queue(tg.RunConfig(), workers=1, store=submitter) as queue,
        tg.open_job_queue(tg.RunConfig(), workers=1, store=watcher) as elsewhere,
    ):
        job_id = queue.submit(tasks.Planted()).id
        await submitter.flush()
        handle = elsewhere.handle(job_id)
        with trio.fail_after(20):
            output = await handle.result()
        assert tg.is_cache_ref(output["meta"])
        async with handle.open_output_stream() as chunks:
            assert b"".join([chunk async for chunk in chunks]) == b"the real output"
        with pytest.raises(tg.JobOutputError, match="meta"):
            async with handle.open_output_stream("meta"):
                pass  # pragma: no cover - refused before
    for store in (submitter, watcher, runner):
        await store.aclose()


def test_array_literals_round_trip(postgres_dsn: str) -> None:
    """
    S8-15: the batch's outcome statement sends its columns as array literals; any text
    (quotes, backslashes, braces, commas, the word NULL, unicode, empty) and any bytes come
    back as they went, None as NULL.
    """
    import psycopg

    from trio_taskgraph._jobs_postgres import _array_literal

    texts: list[str | None] = ['a"b', "c\\d", "{x,y}", "NULL", "", " sp ", "é€", None, "\\x00"]
    blobs = [b"", b"\x00\xff\\", bytes(range(256)), None]
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute(
            "SELECT %s::text[], %s::bytea[]",
            (
                _array_literal(texts),
                _array_literal([None if b is None else "\\x" + b.hex() for b in blobs]),
            ),
        ).fetchone()
    assert row is not None
    assert row[0] == texts
    assert row[1] == blobs


def test_done_notes_keep_only_watched_ids() -> None:
    """
    S8-21: ``done`` notifications name every job any process finished; a store keeps only
    the ids it watches (a worker, watching nothing, keeps none: its memory stays bounded).
    """
    store = _submitter("dbname=unused")
    assert store._heard("done:job-a,job-b") is False
    assert store._done_ids == set()
    store.watch("job-b")
    store._heard("done:job-a,job-b")
    store._heard("cancel:job-c")
    assert store._done_ids == {"job-b"}
    assert store._heard("new:") is True


# --- S8-17 and S8-23: holds and prefetched jobs ---------------------------------------------


async def test_reclaim_during_the_release_write_keeps_the_new_hold(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    S8-17: a job released (a retry) and claimed again by the same store while the release
    is being written keeps its new claim: the finished write drops the old hold only, so
    the second attempt's outcome is written (it used to be dropped, and the job ran a third
    time after its lease expired).
    """
    store = tg.PostgresJobStore(postgres_dsn, lease_seconds=30, poll_interval=POLL)
    record = tg.JobRecord(id=store.new_id(), kind="task", task_type=tasks.Tiny.type)
    store.submit(record, {"n": 1}, RetryPolicy(max_retries=1))
    await store.flush()
    with trio.fail_after(10):
        first = await store.claim()
    retry = first.record.apply(JobEvent.RETRY, error="OSError: once", run_after=None)
    store.save(retry)
    write = tg.PostgresJobStore._write
    reclaimed: list[tg.JobRecord] = []

    async def write_then_claim(self: tg.PostgresJobStore, batch: list[object]) -> None:
        await write(self, batch)  # type: ignore[arg-type]
        # The release is committed; the flush has not done its bookkeeping yet.
        reclaimed.append((await self.claim()).record)

    with monkeypatch.context() as patch:
        patch.setattr(tg.PostgresJobStore, "_write", write_then_claim)
        with trio.fail_after(10):
            await store.flush()
    assert [r.attempt for r in reclaimed] == [2]
    store.save(reclaimed[0].apply(JobEvent.SUCCEED, output={"n": 1}))
    await store.flush()
    rows = _rows(postgres_dsn, "SELECT state, attempt, error FROM trio_taskgraph_jobs")
    assert rows == [("completed", 2, "OSError: once")]
    await store.aclose()


async def test_prefetched_jobs_go_back_when_the_queue_closes(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """
    S8-23: jobs a worker process prefetched but never started go back to the store (pending,
    attempt not counted) when its queue closes, at once, not when their lease expires.
    """
    log = tmp_path / "log"
    submitter = _submitter(postgres_dsn)
    async with tg.open_job_queue(tg.RunConfig(), workers=1, store=submitter) as queue:
        for n in range(4):
            queue.submit(tasks.Record(), {"n": n, "log": str(log), "sleep": 0.2})
    await submitter.aclose()
    runner = tg.PostgresJobStore(postgres_dsn, lease_seconds=30, poll_interval=POLL, prefetch=3)
    started = trio.Event()
    async with tg.open_job_queue(tg.RunConfig(), workers=1, store=runner) as queue:
        queue.on_transition(lambda r: started.set() if r.state == "running" else None)
        with trio.fail_after(10):
            await started.wait()
        assert len(runner._claimed_jobs) == 3
    await runner.aclose()
    rows = _rows(
        postgres_dsn,
        "SELECT state, attempt, lease_owner IS NULL, count(*) FROM trio_taskgraph_jobs"
        " GROUP BY 1, 2, 3 ORDER BY 1",
    )
    assert rows == [("completed", 1, True, 1), ("pending", 0, True, 3)]


async def test_a_row_that_does_not_decode_does_not_stop_claiming(postgres_dsn: str) -> None:
    """
    S8-16: a claimed row whose inputs are not a msgpack map is logged and skipped (it stays
    leased, so it comes back only when its lease expires); the claimer goes on and claims
    the next job instead of ending the queue.
    """
    import psycopg

    store = tg.PostgresJobStore(postgres_dsn, lease_seconds=30, poll_interval=POLL)
    good = tg.JobRecord(id=store.new_id(), kind="task", task_type=tasks.Tiny.type)
    store.submit(good, {"n": 1}, RetryPolicy())
    await store.flush()
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            "INSERT INTO trio_taskgraph_jobs (id, queue, kind, task_type, inputs, state,"
            " run_after) VALUES ('job-bad', 'default', 'task', %s, %b, 'pending',"
            " clock_timestamp() - interval '1 hour')",
            (tasks.Tiny.type, b"\xc1"),
        )
    with trio.fail_after(10):
        claimed = await store.claim()
    assert claimed.record.id == good.id
    rows = _rows(postgres_dsn, "SELECT id, state FROM trio_taskgraph_jobs ORDER BY id")
    assert ("job-bad", "running") in rows
    await store.aclose()


# --- S8-25: an unreachable or hung database when the queue closes ---------------------------


@pytest.mark.parametrize("failure", ["hung", "stopped"])
async def test_closing_with_the_database_gone_gives_up(postgres_dsn: str, failure: str) -> None:
    """
    S8-25: a queue whose database hangs (nothing answers) or is stopped (connections
    refused) when it closes gives up after the store's ``close_timeout`` with
    `JobStoreUnavailableError`, raised as itself from the block, counting what was not
    written; it never hangs. The LISTEN connection's loss does not crash the queue.
    """
    async with _proxied(postgres_dsn) as (proxy, dsn):
        store = _submitter(dsn, close_timeout=1.0)

        async def close_with_the_database_gone() -> None:
            async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as queue:
                proxy.freeze() if failure == "hung" else proxy.cut()
                queue.submit(tasks.Tiny(), {"n": 1})

        with trio.fail_after(30):
            with pytest.raises(tg.JobStoreUnavailableError, match="1 buffered") as info:
                await close_with_the_database_gone()
        await store.aclose()
        assert isinstance(info.value, tg.RepositoryError)
        if failure == "stopped":
            assert isinstance(info.value.__cause__, tg.RepositoryError)
    assert _rows(postgres_dsn, "SELECT count(*) FROM trio_taskgraph_jobs") == [(0,)]


@pytest.mark.parametrize("failure", ["hung", "stopped"])
async def test_cancelled_flush_keeps_what_it_did_not_write(postgres_dsn: str, failure: str) -> None:
    """
    S8-25 park points: a flush parked on a hung database (an abandoned thread hop) or
    between retries against a stopped one, cancelled, returns at once and keeps the
    operation buffered.
    """
    async with _proxied(postgres_dsn) as (proxy, dsn):
        store = _submitter(dsn, close_timeout=60)
        first = tg.JobRecord(id=store.new_id(), kind="task", task_type=tasks.Tiny.type)
        store.submit(first, {"n": 1}, RetryPolicy())
        await store.flush()  # healthy: written
        proxy.freeze() if failure == "hung" else proxy.cut()
        second = tg.JobRecord(id=store.new_id(), kind="task", task_type=tasks.Tiny.type)
        store.submit(second, {"n": 2}, RetryPolicy())
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.flush)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert len(store._ops) == 1
        await store.aclose()
    assert _rows(postgres_dsn, "SELECT count(*) FROM trio_taskgraph_jobs") == [(1,)]
