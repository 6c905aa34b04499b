"""
`PostgresJobStore`: a job queue many processes on many machines work from (issue 11).

Every process that opens ``open_job_queue(config, store=PostgresJobStore(dsn))`` against the
same database and queue name shares one set of jobs: a job submitted in one process runs on a
worker in any process whose task registry knows its type. Nothing here imports psycopg at
``import trio_taskgraph``; it is imported on first use.

Table (created on first use under a transaction-level advisory lock of class ``0x746A``)::

    trio_taskgraph_jobs   id, queue, seq, task type, msgpack inputs, state, attempt, retry
                          policy, run_after (database time), lease owner / until,
                          cancel_requested, msgpack output, error

Theory of operation (spec/S8-jobs.md, S8-14 .. S8-21):

- Write-behind (S8-15): `JobStore` methods are synchronous (``submit`` and ``cancel`` are),
  so submissions, outcomes, releases and cancel requests are appended to a buffer and written
  by a flusher task, in order, in one transaction per batch that ends with a ``NOTIFY``.
  `flush` writes the buffer at once; the queue awaits it (shielded) when it closes.
- Claiming (S8-16): a worker claims with one ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE
  SKIP LOCKED LIMIT 1)``: the first job by ``(run_after, seq)`` that is due and pending, or
  running under an expired lease, among the task types this process has registered. The
  claim sets ``running``, counts the attempt and takes a lease (owner token, expiry).
- Leases (S8-17): a renewer task extends the leases this process holds every third of the
  lease; every outcome is written only ``WHERE lease_owner = me AND attempt = n`` (a fence),
  so a worker that lost its lease cannot overwrite the run that replaced it. A killed
  worker's job is claimed again once its lease expires: at-least-once.
- Waking (S8-18): idle claimers park until the next due time, a ``NOTIFY`` that jobs were
  added (read from a dedicated ``LISTEN`` connection with `trio.lowlevel.wait_readable`, no
  thread parked), or the fallback ``poll_interval``, whichever comes first.
- Time (S8-19): ``run_after`` is stored as database time: the flusher writes
  ``clock_timestamp() + (deadline - trio.current_time())``, so clocks of different machines
  never meet and a job never starts before its deadline.
- Cancel (S8-20): a pending job is cancelled in the database; a running one gets
  ``cancel_requested`` and a ``NOTIFY``: the owner's listener (or its next renewal) cancels
  the job's scope, and the outcome ``cancelled`` is written as any other.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, TypeVar, final

import attrs
import trio

from ._core._codec import packb, unpackb
from ._core._jobs import JobRecord, JobState, RetryPolicy
from ._errors import RepositoryError
from ._repository._postgres import (
    _import_psycopg,
    _run,
    _Shared,
    _transaction,
)

if TYPE_CHECKING:
    from ._repository._postgres import Conn

__all__ = ["ClaimedJob", "PostgresJobStore"]

T = TypeVar("T")

#: Advisory-lock class of the job store (the repository uses 0x7467).
_LOCK_CLASS: Final = 0x746A  # "tj"
#: Seconds a claimed job's lease lasts without renewal (renewed every third of it).
DEFAULT_LEASE_SECONDS: Final = 30.0
#: Seconds an idle claimer waits at most without a NOTIFY before looking again.
DEFAULT_POLL_INTERVAL: Final = 5.0
_MAX_BATCH: Final = 500
_RETRY_SECONDS: Final = 0.5
_MAX_CLAIM: Final = 64

logger = logging.getLogger("trio_taskgraph.jobs")
_MAX_INPUT_BYTES: Final = 64 * 1024 * 1024

_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS trio_taskgraph_jobs (
        id text PRIMARY KEY,
        queue text NOT NULL,
        seq bigserial NOT NULL,
        kind text NOT NULL,
        task_type text NOT NULL,
        inputs bytea NOT NULL,
        state text NOT NULL,
        attempt integer NOT NULL DEFAULT 0,
        max_retries integer NOT NULL DEFAULT 0,
        retry_delay double precision NOT NULL DEFAULT 0,
        retry_backoff double precision NOT NULL DEFAULT 2,
        run_after timestamptz NOT NULL,
        lease_owner text,
        lease_until timestamptz,
        cancel_requested boolean NOT NULL DEFAULT false,
        output bytea,
        error text,
        created timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished timestamptz
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS trio_taskgraph_jobs_due ON trio_taskgraph_jobs
        (queue, run_after, seq) WHERE state IN ('pending', 'running')
    """,
)

_CLAIM: Final = """
    UPDATE trio_taskgraph_jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_owner = %(me)s,
        lease_until = clock_timestamp() + %(lease)s * interval '1 second'
    WHERE j.id IN (
        SELECT id FROM trio_taskgraph_jobs
        WHERE queue = %(queue)s AND state IN ('pending', 'running')
          AND task_type = ANY(%(types)s)
          AND ((state = 'pending' AND run_after <= clock_timestamp())
               OR (state = 'running' AND lease_until < clock_timestamp()
                   AND NOT cancel_requested))
        ORDER BY run_after, seq
        FOR UPDATE SKIP LOCKED
        LIMIT %(limit)s
    )
    RETURNING j.id, j.kind, j.task_type, j.inputs, j.attempt, j.max_retries, j.retry_delay,
              j.retry_backoff, j.error, j.run_after, j.seq
"""

# A job whose owner died after a cancel request ends cancelled, not run again.
_EXPIRED_CANCELS: Final = """
    UPDATE trio_taskgraph_jobs SET state = 'cancelled', lease_owner = NULL, lease_until = NULL,
        finished = clock_timestamp()
    WHERE queue = %(queue)s AND state = 'running' AND cancel_requested
      AND lease_until < clock_timestamp()
    RETURNING id
"""

_NEXT_DUE: Final = """
    SELECT extract(epoch FROM min(t) - clock_timestamp()) FROM (
        SELECT min(run_after) AS t FROM trio_taskgraph_jobs
        WHERE queue = %(queue)s AND state = 'pending' AND task_type = ANY(%(types)s)
        UNION ALL
        SELECT min(lease_until) FROM trio_taskgraph_jobs
        WHERE queue = %(queue)s AND state = 'running' AND task_type = ANY(%(types)s)
    ) s
"""

_SELECT_RECORDS: Final = """
    SELECT id, kind, task_type, inputs, state, attempt, max_retries, output, error,
           extract(epoch FROM run_after - clock_timestamp())
    FROM trio_taskgraph_jobs WHERE queue = %s AND id = ANY(%s)
"""


@final
@attrs.frozen(kw_only=True)
class ClaimedJob:
    """
    A job a worker of this process claimed from a shared store.

    Attributes:
        record: its record, ``running``, the attempt counted.
        inputs: the task's inputs as submitted.
        policy: its retry policy as submitted.
    """

    record: JobRecord
    inputs: Mapping[str, object]
    policy: RetryPolicy


# --- buffered operations ---------------------------------------------------------------------


@attrs.frozen
class _Insert:
    record: JobRecord
    inputs: bytes
    policy: RetryPolicy
    deadline: float | None  # trio clock


@attrs.frozen
class _Outcome:
    record: JobRecord
    output: bytes | None


@attrs.frozen
class _Release:
    job_id: str
    attempt: int
    record: JobRecord | None  # a retry (pending, error, run_after), or None: a release as is


@attrs.frozen
class _CancelRequest:
    job_id: str


_Op = _Insert | _Outcome | _Release | _CancelRequest


def _delay(deadline: float | None, now: float) -> float:
    if deadline is None:
        return 0.0
    return max(0.0, deadline - now)


def _setup(conn: Conn) -> None:
    row = conn.execute("SELECT to_regclass('trio_taskgraph_jobs') IS NOT NULL").fetchone()
    if row is not None and row[0]:
        return
    conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_CLASS,))
    for statement in _SCHEMA:
        conn.execute(statement)


def _decode_mapping(data: bytes | None) -> Mapping[str, object] | None:
    if data is None:
        return None
    value = unpackb(data, max_bytes=_MAX_INPUT_BYTES)
    if not isinstance(value, Mapping):
        raise RepositoryError("a job row holds something other than a map")
    return {str(k): v for k, v in value.items()}


@final
@attrs.define(eq=False, init=False, repr=False)
class PostgresJobStore:
    """
    A `JobStore` in a PostgreSQL database, shared by every process that uses the same DSN and
    queue name: pass it as ``open_job_queue(config, workers=N, store=PostgresJobStore(dsn))``.

    Jobs must be tasks whose type is registered (``Task`` subclasses with a ``type``) in the
    worker processes; a worker claims only the types its process knows. Use a shared
    `PostgresOutputRepository` as ``RunConfig.cache`` so that handles in other processes can
    stream the jobs' binary outputs.

    Args:
        dsn: a libpq connection string or URI.
        queue: the queue name; stores with other names in the same database are independent.
        lease_seconds: how long a claimed job's lease lasts without renewal (renewed every
            third of it); a killed worker's job is claimed again this long after its last
            renewal.
        poll_interval: the longest an idle worker waits without a ``NOTIFY`` before it looks
            for due jobs again.
        max_connections: connections this store holds at most (besides its ``LISTEN`` one).
        claim: ``False`` for a process that only submits and watches jobs: its queue's
            workers never claim any (S8-16).
        prefetch: jobs claimed beyond the idle workers' needs, per claim statement (default
            0). More throughput for tiny jobs; but a prefetched job waits for a worker of
            this process while another process may be idle, so keep 0 for long jobs.

    Raises:
        TypeError: ``dsn`` or ``queue`` is not a str.
        ValueError: ``queue`` is empty, or a number is not positive.
    """

    _shared: _Shared
    _queue: str
    _lease: float
    _poll: float
    _owner: str
    _channel: str
    _ops: list[_Op]
    _records: dict[str, JobRecord]
    _held: dict[str, int]
    _released: set[str]
    _watched: set[str]
    _done_ids: set[str]
    _full_refresh: bool
    _lot: trio.lowlevel.ParkingLot
    _flush_lock: trio.Lock
    _dirty: trio.Event
    _ready: bool
    _on_record: Callable[[JobRecord, Mapping[str, object]], None] | None
    _on_cancel: Callable[[str], None] | None
    _claims: bool
    _prefetch: int
    _waiting: int
    _claiming_now: bool
    _claimed_jobs: deque[ClaimedJob]
    _claim_conn: Conn | None

    def __init__(
        self,
        dsn: str,
        *,
        queue: str = "default",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_connections: int = 8,
        claim: bool = True,
        prefetch: int = 0,
    ) -> None:
        dsn_value: object = dsn
        queue_value: object = queue
        if not isinstance(dsn_value, str):
            raise TypeError(f"dsn must be a str, not {type(dsn_value).__name__}")
        if not isinstance(queue_value, str):
            raise TypeError(f"queue must be a str, not {type(queue_value).__name__}")
        if not queue:
            raise ValueError("queue must not be empty")
        if not (lease_seconds > 0 and poll_interval > 0 and max_connections >= 1):
            raise ValueError("lease_seconds, poll_interval and max_connections must be positive")
        self._shared = _Shared(
            dsn=dsn, max_connections=max_connections, slots=trio.Semaphore(max_connections)
        )
        self._queue = queue
        self._lease = float(lease_seconds)
        self._poll = float(poll_interval)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._channel = "trio_taskgraph_jobs_" + hashlib.sha256(queue.encode()).hexdigest()[:24]
        self._ops = []
        self._records = {}
        self._held = {}
        self._released = set()
        self._watched = set()
        self._done_ids = set()
        self._full_refresh = False
        self._lot = trio.lowlevel.ParkingLot()
        self._flush_lock = trio.Lock()
        self._dirty = trio.Event()
        self._ready = False
        self._on_record = None
        self._on_cancel = None
        self._claims = bool(claim)
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self._prefetch = prefetch
        self._waiting = 0
        self._claiming_now = False
        self._claimed_jobs = deque()
        self._claim_conn = None

    def __repr__(self) -> str:
        # Never the DSN: it may hold a password.
        return f"<PostgresJobStore queue={self._queue!r}>"

    @property
    def queue(self) -> str:
        """The queue name."""
        return self._queue

    @property
    def owner(self) -> str:
        """The lease owner token of this store (host, pid, random part)."""
        return self._owner

    # --- the JobStore seam (synchronous, never blocks) ---------------------------------------

    def new_id(self) -> str:
        """Return a fresh job id, unique across processes (``job-<uuid4 hex>``)."""
        return f"job-{uuid.uuid4().hex}"

    def save(self, record: JobRecord) -> None:
        """
        Record a transition of a job this process runs; buffered, written by `flush` (S8-15).

        Only the outcome of a job this process claimed is written (fenced by its lease:
        S8-17); a record of a job it does not hold is kept locally only.
        """
        self._records[record.id] = record
        attempt = self._held.get(record.id)
        if attempt is None or record.id in self._released:
            return
        if record.state is JobState.RUNNING:
            return  # the claim wrote it
        if record.state is JobState.PENDING:
            self._push(_Release(job_id=record.id, attempt=attempt, record=record))
        else:
            output = None if record.output is None else packb(dict(record.output))
            self._push(_Outcome(record=record, output=output))

    def load(self, job_id: str) -> JobRecord | None:
        """The latest record of ``job_id`` this process has seen, or None."""
        return self._records.get(job_id)

    def forget(self, job_id: str) -> None:
        """Drop this process's copy of a finished job's record (the row stays)."""
        record = self._records.get(job_id)
        if record is not None and record.terminal:
            del self._records[job_id]
            self._watched.discard(job_id)

    async def flush(self) -> None:
        """
        Write every buffered operation, in order, one transaction per batch.

        Cancellation: a batch is written whole or not at all; what is not written stays
        buffered.
        """
        await trio.lowlevel.checkpoint()
        async with self._flush_lock:
            while self._ops:
                batch = self._ops[:_MAX_BATCH]
                await self._write(batch)
                del self._ops[: len(batch)]
                for op in batch:
                    if isinstance(op, _Outcome | _Release):
                        job_id = op.record.id if isinstance(op, _Outcome) else op.job_id
                        self._held.pop(job_id, None)

    # --- what the queue calls in shared mode -------------------------------------------------

    def submit(self, record: JobRecord, inputs: Mapping[str, object], policy: RetryPolicy) -> None:
        """Buffer a new job row (S8-15); its ``run_after`` is a trio-clock deadline."""
        self._records[record.id] = record
        self._watched.add(record.id)
        self._push(
            _Insert(
                record=record,
                inputs=packb(dict(inputs)),
                policy=policy,
                deadline=record.run_after,
            )
        )

    def watch(self, job_id: str) -> None:
        """Follow a job another process runs: its records reach the queue's callback."""
        self._watched.add(job_id)
        self._full_refresh = True
        self._dirty.set()

    def request_cancel(self, job_id: str) -> None:
        """Cancel a job wherever it is (S8-20): pending, at once; running, by its owner."""
        self._watched.add(job_id)
        self._push(_CancelRequest(job_id=job_id))

    def release(self, job_id: str) -> None:
        """Give back a claimed job unfinished (a worker shutting down): pending again."""
        attempt = self._held.get(job_id)
        if attempt is None or job_id in self._released:
            return
        self._released.add(job_id)
        self._push(_Release(job_id=job_id, attempt=attempt, record=None))

    async def claim(self) -> ClaimedJob:
        """
        Wait for a due job of a registered type and claim it (S8-16).

        Claims coalesce: one claimer at a time runs the claim statement, for as many jobs as
        there are claimers waiting in this process (never more: a process claims only what
        its idle workers can start), and hands them out.

        Cancellation: a claim statement runs in one thread hop and its jobs are kept even
        when a cancel arrives meanwhile (another claimer takes them; the last claimer to be
        cancelled releases them to the store); a cancel while waiting claims nothing.
        """
        await self._start()
        if not self._claims:
            await trio.sleep_forever()
        self._waiting += 1
        try:
            while True:
                if self._claimed_jobs:
                    return self._claimed_jobs.popleft()
                if self._claiming_now:
                    with trio.move_on_after(self._poll):
                        await self._lot.park()
                    continue
                self._claiming_now = True
                try:
                    found = await self._claim_batch(min(self._waiting + self._prefetch, _MAX_CLAIM))
                finally:
                    self._claiming_now = False
                if isinstance(found, list):
                    for job in found:
                        self._released.discard(job.record.id)
                        self._held[job.record.id] = job.record.attempt
                        self._records[job.record.id] = job.record
                    self._claimed_jobs.extend(found)
                    self._lot.unpark_all()
                    continue
                wait = self._poll if found is None else min(self._poll, max(found, 0.0) + 0.01)
                with trio.move_on_after(wait):
                    await self._lot.park()
        except BaseException:
            if self._waiting == 1:
                # The last claimer leaves (cancelled): what it claimed goes back to the store.
                while self._claimed_jobs:
                    self.release(self._claimed_jobs.popleft().record.id)
            raise
        finally:
            self._waiting -= 1

    async def _claim_batch(self, limit: int) -> list[ClaimedJob] | float | None:
        from ._repository._postgres import _close, _connect
        from ._task import registered_task_types

        params: dict[str, object] = {
            "me": self._owner,
            "lease": self._lease,
            "queue": self._queue,
            "types": registered_task_types(),
            "limit": limit,
        }
        try:
            if self._claim_conn is None:
                self._claim_conn = await _run(_connect, self._shared.dsn)
            conn = self._claim_conn
            try:
                return await _transaction(conn, functools.partial(self._claim_rows, params=params))
            except RepositoryError:
                self._claim_conn = None
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_close, conn)
                raise
        except RepositoryError:
            logger.warning("claiming jobs failed; retrying", exc_info=True)
            return _RETRY_SECONDS

    def _claim_rows(
        self, conn: Conn, *, params: Mapping[str, object]
    ) -> list[ClaimedJob] | float | None:
        rows = conn.execute(_CLAIM, params).fetchall()
        if rows:
            # Invariant (S8-16): handed out in (run_after, seq) order.
            rows.sort(key=lambda r: (r[9], r[10]))
            return [self._claimed(row) for row in rows]
        conn.execute(_EXPIRED_CANCELS, params)
        due = conn.execute(_NEXT_DUE, params).fetchone()
        if due is None or due[0] is None:
            return None
        return float(due[0])

    @staticmethod
    def _claimed(row: tuple[object, ...]) -> ClaimedJob:
        job_id, kind, task_type, inputs, attempt, max_retries, delay, backoff, error = row[:9]
        assert isinstance(attempt, int)
        assert isinstance(max_retries, int)
        assert isinstance(delay, float)
        assert isinstance(backoff, float)
        assert isinstance(inputs, bytes | memoryview)
        record = JobRecord(
            id=str(job_id),
            kind=str(kind),
            task_type=str(task_type),
            state=JobState.RUNNING,
            attempt=attempt,
            max_retries=max_retries,
            error=None if error is None else str(error),
        )
        decoded = _decode_mapping(bytes(inputs))
        assert decoded is not None
        policy = RetryPolicy(max_retries=max_retries, delay=delay, backoff=backoff)
        return ClaimedJob(record=record, inputs=decoded, policy=policy)

    # --- background tasks --------------------------------------------------------------------

    async def attach(
        self,
        nursery: trio.Nursery,
        *,
        on_record: Callable[[JobRecord, Mapping[str, object]], None],
        on_cancel: Callable[[str], None],
    ) -> None:
        """
        Start the flusher, lease renewer and listener in ``nursery`` (the queue's service
        nursery); ``on_record`` receives records of watched jobs, ``on_cancel`` the ids of
        held jobs whose cancel was requested elsewhere.

        Cancellation: the tables are created (if needed) and the listener connected before
        this returns; a cancel leaves nothing started.
        """
        self._on_record = on_record
        self._on_cancel = on_cancel
        await self._start()
        await nursery.start(self._listener)
        nursery.start_soon(self._flusher)
        nursery.start_soon(self._renewer)

    async def _start(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._shared.closed:
            raise RepositoryError("the job store is closed")
        if not self._ready:
            async with self._shared.open_lock:
                if not self._ready:
                    await trio.to_thread.run_sync(_import_psycopg)
                    await self._do(_setup)
                    self._ready = True

    async def _do(self, fn: Callable[[Conn], T]) -> T:
        async with self._shared.connection() as conn:
            return await _transaction(conn, fn)

    def _push(self, op: _Op) -> None:
        self._ops.append(op)
        self._dirty.set()

    async def _flusher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            try:
                await self.flush()
                if self._watched:
                    await self._refresh()
            except RepositoryError:
                # Nothing is lost: unwritten operations stay buffered; try again soon.
                logger.warning("job store flush failed; retrying", exc_info=True)
                self._dirty.set()
                await trio.sleep(_RETRY_SECONDS)

    def _write_batch(self, conn: Conn, batch: list[_Op], now: float) -> bool:
        added = False
        notes: list[str] = []
        done: list[str] = []
        touched = sorted(
            {
                op.record.id if isinstance(op, _Outcome) else op.job_id
                for op in batch
                if not isinstance(op, _Insert)
            }
        )
        if touched:
            conn.execute(
                "SELECT 1 FROM trio_taskgraph_jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                (touched,),
            )
        for op in batch:
            if isinstance(op, _Insert):
                record, policy = op.record, op.policy
                conn.execute(
                    "INSERT INTO trio_taskgraph_jobs (id, queue, kind, task_type, inputs, state,"
                    " max_retries, retry_delay, retry_backoff, run_after) VALUES"
                    " (%s, %s, %s, %s, %b, 'pending', %s, %s, %s,"
                    " clock_timestamp() + %s * interval '1 second')",
                    (
                        record.id,
                        self._queue,
                        record.kind,
                        record.task_type,
                        op.inputs,
                        policy.max_retries,
                        policy.delay,
                        policy.backoff,
                        _delay(op.deadline, now),
                    ),
                )
                added = True
            elif isinstance(op, _Outcome):
                record = op.record
                # Invariant (S8-17): only the lease holder of this attempt writes its outcome.
                conn.execute(
                    "UPDATE trio_taskgraph_jobs SET state = %s, output = %b, error = %s,"
                    " lease_owner = NULL, lease_until = NULL, finished = clock_timestamp()"
                    " WHERE id = %s AND lease_owner = %s AND attempt = %s AND state = 'running'",
                    (
                        record.state.value,
                        op.output,
                        record.error,
                        record.id,
                        self._owner,
                        record.attempt,
                    ),
                )
                done.append(record.id)
            elif isinstance(op, _Release):
                retry = op.record
                if retry is None:
                    conn.execute(
                        "UPDATE trio_taskgraph_jobs SET state = 'pending', attempt = attempt - 1,"
                        " lease_owner = NULL, lease_until = NULL"
                        " WHERE id = %s AND lease_owner = %s AND attempt = %s"
                        " AND state = 'running'",
                        (op.job_id, self._owner, op.attempt),
                    )
                else:
                    conn.execute(
                        "UPDATE trio_taskgraph_jobs SET state = 'pending', error = %s,"
                        " lease_owner = NULL, lease_until = NULL,"
                        " run_after = clock_timestamp() + %s * interval '1 second'"
                        " WHERE id = %s AND lease_owner = %s AND attempt = %s"
                        " AND state = 'running'",
                        (
                            retry.error,
                            _delay(retry.run_after, now),
                            op.job_id,
                            self._owner,
                            op.attempt,
                        ),
                    )
                added = True
            else:
                conn.execute(
                    "UPDATE trio_taskgraph_jobs SET state = 'cancelled', finished ="
                    " clock_timestamp() WHERE id = %s AND queue = %s AND state = 'pending'",
                    (op.job_id, self._queue),
                )
                conn.execute(
                    "UPDATE trio_taskgraph_jobs SET cancel_requested = true"
                    " WHERE id = %s AND queue = %s AND state = 'running'",
                    (op.job_id, self._queue),
                )
                notes.append(f"cancel:{op.job_id}")
        # One NOTIFY per ~200 finished jobs, not one each.
        notes.extend("done:" + ",".join(done[at : at + 200]) for at in range(0, len(done), 200))
        if added:
            notes.append("new:")
        for note in notes:
            conn.execute("SELECT pg_notify(%s, %s)", (self._channel, note))
        return added

    async def _write(self, batch: list[_Op]) -> None:
        await self._start()
        now = trio.current_time()
        added = await self._do(lambda conn: self._write_batch(conn, batch, now))
        if added:
            self._lot.unpark_all()

    def _renew(self, conn: Conn, *, held: list[str]) -> list[tuple[str, bool]]:
        # Invariant (S8-17): rows are locked in id order, as the flusher locks them, so a
        # renewal and a batch of outcomes never deadlock.
        rows = conn.execute(
            "UPDATE trio_taskgraph_jobs SET lease_until = clock_timestamp() + %s * interval"
            " '1 second' WHERE id IN (SELECT id FROM trio_taskgraph_jobs WHERE id = ANY(%s)"
            " AND lease_owner = %s AND state = 'running' ORDER BY id FOR UPDATE)"
            " RETURNING id, cancel_requested",
            (self._lease, held, self._owner),
        ).fetchall()
        return [(str(r[0]), bool(r[1])) for r in rows]

    async def _renewer(self) -> None:
        while True:
            await trio.sleep(self._lease / 3)
            held = list(self._held)
            if not held:
                continue
            try:
                rows = await self._do(functools.partial(self._renew, held=held))
            except RepositoryError:
                logger.warning("job lease renewal failed; retrying", exc_info=True)
                continue
            kept = {job_id for job_id, _ in rows}
            for job_id, cancel in rows:
                if cancel:
                    self._cancel_held(job_id)
            for job_id in held:
                if job_id not in kept and job_id in self._held:
                    # The lease is gone (another worker owns the job): stop running it.
                    self._cancel_held(job_id)

    def _cancel_held(self, job_id: str) -> None:
        if job_id in self._held and self._on_cancel is not None:
            self._on_cancel(job_id)

    def _load(self, conn: Conn, ids: list[str]) -> list[tuple[JobRecord, Mapping[str, object]]]:
        rows = conn.execute(_SELECT_RECORDS, (self._queue, ids)).fetchall()
        out = []
        for job_id, kind, task_type, inputs, state, attempt, retries, output, error, wait in rows:
            record = JobRecord(
                id=str(job_id),
                kind=str(kind),
                task_type=str(task_type),
                state=JobState(state),
                attempt=int(attempt),
                max_retries=int(retries),
                run_after=None if wait is None else float(wait),  # relative: fixed below
                output=_decode_mapping(None if output is None else bytes(output)),
                error=None if error is None else str(error),
            )
            decoded = _decode_mapping(bytes(inputs))
            assert decoded is not None
            out.append((record, decoded))
        return out

    async def _refresh(self) -> None:
        # Only the jobs a NOTIFY named, unless a poll (or a new watch) asks for all of them:
        # a submitter watching many jobs reads each finished one once, not all every time.
        if self._full_refresh:
            self._full_refresh = False
            self._done_ids.clear()
            wanted: set[str] | list[str] = self._watched
        else:
            wanted, self._done_ids = self._done_ids, set()
        ids = [i for i in wanted if i in self._watched and i not in self._held]
        if not ids:
            return
        loaded = await self._do(lambda conn: self._load(conn, ids))
        now = trio.current_time()
        for record, inputs in loaded:
            if record.id in self._held:
                continue
            fixed = attrs.evolve(
                record, run_after=None if record.run_after is None else now + record.run_after
            )
            previous = self._records.get(record.id)
            self._records[record.id] = fixed
            if fixed.terminal:
                self._watched.discard(record.id)
            if previous != fixed and self._on_record is not None:
                self._on_record(fixed, inputs)

    async def _listener(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from ._repository._postgres import _close, _connect

        conn = await _run(_connect, self._shared.dsn)
        try:
            await _run(self._listen, conn)
            task_status.started()
            pgconn = conn.pgconn
            while True:
                with trio.move_on_after(self._poll):
                    await trio.lowlevel.wait_readable(pgconn.socket)
                pgconn.consume_input()
                new = heard = False
                while (note := pgconn.notifies()) is not None:
                    heard = True
                    kind, _, job_id = note.extra.decode().partition(":")
                    if kind == "new":
                        new = True
                    elif kind == "cancel":
                        self._cancel_held(job_id)
                        self._done_ids.add(job_id)
                    elif kind == "done":
                        self._done_ids.update(job_id.split(","))
                if new or not heard:
                    self._lot.unpark_all()  # new jobs, or the fallback poll
                if not heard:
                    self._full_refresh = True
                if self._watched and (self._full_refresh or self._done_ids):
                    self._dirty.set()  # the flusher refreshes the watched jobs
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close, conn)

    def _listen(self, conn: Conn) -> None:
        conn.autocommit = True
        conn.execute(f'LISTEN "{self._channel}"')

    async def aclose(self) -> None:
        """
        Close the store's pooled connections (buffered operations are dropped: `flush`
        first).

        Cancellation: shielded; the connections are closed whatever happens.
        """
        with trio.CancelScope(shield=True):
            conn, self._claim_conn = self._claim_conn, None
            if conn is not None:
                from ._repository._postgres import _close

                await trio.to_thread.run_sync(_close, conn)
            await self._shared.aclose()
