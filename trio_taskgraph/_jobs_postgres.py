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
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, TypeVar, final

import attrs
import trio

from ._core._codec import packb, unpackb
from ._core._jobs import JobRecord, JobState, RetryPolicy
from ._errors import (
    JobStoreUnavailableError,
    RemoteJobError,
    RepositoryError,
    TaskGraphError,
    UnknownJobError,
)
from ._repository._postgres import (
    _import_psycopg,
    _Shared,
)

if TYPE_CHECKING:
    from ._repository._postgres import Conn

__all__ = [
    "ClaimedJob",
    "PostgresJobStore",
    # re-exported from the error module, so the package imports them in one block
    "JobStoreUnavailableError",
    "RemoteJobError",
    "UnknownJobError",
]

T = TypeVar("T")

#: Advisory-lock class of the job store (the repository uses 0x7467).
_LOCK_CLASS: Final = 0x746A  # "tj"
#: Seconds a claimed job's lease lasts without renewal (renewed every third of it).
DEFAULT_LEASE_SECONDS: Final = 30.0
#: Seconds `PostgresJobStore.flush` waits at most for an unreachable database (S8-25).
DEFAULT_CLOSE_TIMEOUT: Final = 30.0
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
        error_traceback text,
        created timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished timestamptz
    )
    """,
    # A table made before S8-24 gets the failure's traceback column.
    "ALTER TABLE trio_taskgraph_jobs ADD COLUMN IF NOT EXISTS error_traceback text",
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
           extract(epoch FROM run_after - clock_timestamp()), error_traceback
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
    hold: int  # the claim it ends (see `PostgresJobStore._holds`)


@attrs.frozen
class _Release:
    job_id: str
    attempt: int
    record: JobRecord | None  # a retry (pending, error, run_after), or None: a release as is
    hold: int


@attrs.frozen
class _CancelRequest:
    job_id: str


_Op = _Insert | _Outcome | _Release | _CancelRequest


def _delay(deadline: float | None, now: float) -> float:
    if deadline is None:
        return 0.0
    return max(0.0, deadline - now)


def _setup(conn: Conn) -> None:
    row = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('trio_taskgraph_jobs')"
        " AND attname = 'error_traceback' AND NOT attisdropped"
    ).fetchone()
    if row is not None:
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


def _array_literal(values: list[str] | list[str | None]) -> str:
    """
    A PostgreSQL array literal (``{"a","b",NULL}``): every element quoted, backslashes and
    quotes escaped, None as NULL; cast it with ``%s::text[]`` (or ``bytea[]``, ``int[]``).
    """
    quoted = (
        "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for v in values
    )
    return "{" + ",".join(quoted) + "}"


def _connect_autocommit(dsn: str) -> Conn:
    from ._repository._postgres import _connect

    conn = _connect(dsn)
    conn.autocommit = True
    return conn


@attrs.define(eq=False)
class _Hop:
    """
    One transaction in a worker thread that the trio side may abandon (S8-25).

    Whoever comes last closes an abandoned hop's connection: the thread when it ends, or
    `abandon` when the thread has ended or never started (a cancel before the hop).
    """

    conn: Conn | None
    lock: threading.Lock = attrs.Factory(threading.Lock)
    started: bool = False
    done: bool = False
    abandoned: bool = False

    def run(self, connect: Callable[[], Conn], fn: Callable[[Conn], T]) -> T:
        with self.lock:
            if self.abandoned:
                raise RepositoryError("abandoned before it started")
            self.started = True
        try:
            if self.conn is None:
                self.conn = connect()
            conn = self.conn
            try:
                result = fn(conn)
                conn.commit()
            except BaseException:
                if not (conn.closed or conn.broken):
                    conn.rollback()
                raise
            return result
        finally:
            if self._finish():
                self.close()

    def _finish(self) -> bool:
        # The thread's end: True if the trio side has abandoned the hop (then we close).
        with self.lock:
            self.done = True
            return self.abandoned

    def abandon(self) -> None:
        """Called on the trio side after a cancel."""
        with self.lock:
            self.abandoned = True
            close_now = self.done or not self.started
        if close_now:
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def close_unless_abandoned(self) -> None:
        with self.lock:
            mine = not self.abandoned
        if mine:
            self.close()


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
        close_timeout: the longest `flush` (and so the closing of a queue) waits for an
            unreachable or unresponsive database before it gives up with
            `JobStoreUnavailableError` (S8-25); also the bound of one claim statement.

    Raises:
        TypeError: ``dsn`` or ``queue`` is not a str.
        ValueError: ``queue`` is empty, or a number is not positive.
    """

    _shared: _Shared
    _close_timeout: float
    _last_error: RepositoryError | None
    _queue: str
    _lease: float
    _poll: float
    _owner: str
    _channel: str
    _ops: list[_Op]
    _records: dict[str, JobRecord]
    _held: dict[str, int]
    _holds: dict[str, int]
    _hold_serial: int
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
    _on_missing: Callable[[str], None] | None
    _looked_up: set[str]
    _unwritten: set[str]
    _claims: bool
    _prefetch: int
    _waiting: int
    _claiming_now: bool
    _claimed_jobs: deque[ClaimedJob]
    _claim_conn: Conn | None
    _stopped: bool

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
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        dsn_value: object = dsn
        queue_value: object = queue
        if not isinstance(dsn_value, str):
            raise TypeError(f"dsn must be a str, not {type(dsn_value).__name__}")
        if not isinstance(queue_value, str):
            raise TypeError(f"queue must be a str, not {type(queue_value).__name__}")
        if not queue:
            raise ValueError("queue must not be empty")
        if not (
            lease_seconds > 0 and poll_interval > 0 and max_connections >= 1 and close_timeout > 0
        ):
            raise ValueError(
                "lease_seconds, poll_interval, max_connections and close_timeout must be positive"
            )
        self._close_timeout = float(close_timeout)
        self._last_error = None  # of the last failed write, chained by `flush` (S8-25)
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
        # The claim serial of each held job: a written outcome or release drops the hold it
        # ended, never a newer claim of the same job made while the write was in flight.
        self._holds = {}
        self._hold_serial = 0
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
        self._on_missing = None
        # Ids `watch` asked for that the table has not shown yet (S8-21), and ids of jobs
        # submitted here whose row is not written yet (never reported missing).
        self._looked_up = set()
        self._unwritten = set()
        self._claims = bool(claim)
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self._prefetch = prefetch
        self._waiting = 0
        self._claiming_now = False
        self._claimed_jobs = deque()
        self._claim_conn = None
        self._stopped = False

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
            self._push(
                _Release(
                    job_id=record.id, attempt=attempt, record=record, hold=self._holds[record.id]
                )
            )
        else:
            output = None if record.output is None else packb(dict(record.output))
            self._push(_Outcome(record=record, output=output, hold=self._holds[record.id]))

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

        A database error is retried every half second; after ``close_timeout`` seconds
        without success (an unreachable or hung database) it gives up (S8-25).

        Raises:
            JobStoreUnavailableError: not everything was written within ``close_timeout``;
                the message counts what is still buffered, the last error is chained.

        Cancellation: a batch is written whole or not at all; what is not written stays
            buffered. (A batch whose statement was abandoned at the deadline may still
            commit later: every write is idempotent, so writing it again is harmless.)
        """
        await trio.lowlevel.checkpoint()
        with trio.move_on_after(self._close_timeout) as bound:
            async with self._flush_lock:
                while self._ops:
                    batch = self._ops[:_MAX_BATCH]
                    try:
                        await self._write(batch)
                    except RepositoryError as exc:
                        self._last_error = exc
                        await trio.sleep(_RETRY_SECONDS)
                    else:
                        self._last_error = None
                        self._written(batch)
        if bound.cancelled_caught and self._ops:
            raise JobStoreUnavailableError(
                f"job store {self._queue!r}: gave up after {self._close_timeout:g} s waiting for"
                f" the database: {len(self._ops)} buffered operation(s) (submits, outcomes,"
                " cancels) were not written"
            ) from self._last_error

    def _written(self, batch: list[_Op]) -> None:
        del self._ops[: len(batch)]
        for op in batch:
            if isinstance(op, _Insert):
                self._unwritten.discard(op.record.id)
            elif isinstance(op, _Outcome | _Release):
                job_id = op.record.id if isinstance(op, _Outcome) else op.job_id
                if self._holds.get(job_id) == op.hold:
                    del self._holds[job_id]
                    self._held.pop(job_id, None)

    # --- what the queue calls in shared mode -------------------------------------------------

    def submit(self, record: JobRecord, inputs: Mapping[str, object], policy: RetryPolicy) -> None:
        """Buffer a new job row (S8-15); its ``run_after`` is a trio-clock deadline."""
        self._records[record.id] = record
        self._watched.add(record.id)
        self._unwritten.add(record.id)
        self._push(
            _Insert(
                record=record,
                inputs=packb(dict(inputs)),
                policy=policy,
                deadline=record.run_after,
            )
        )

    def watch(self, job_id: str) -> None:
        """
        Follow a job another process runs: its records reach the queue's callback; if the
        table does not hold it when the store looks (at once), ``on_missing`` is called.
        """
        self._watched.add(job_id)
        self._looked_up.add(job_id)
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
        self._push(_Release(job_id=job_id, attempt=attempt, record=None, hold=self._holds[job_id]))

    async def claim(self) -> ClaimedJob:
        """
        Wait for a due job of a registered type and claim it (S8-16).

        Claims coalesce: one claim statement at a time runs (one autocommit statement, one
        thread hop), for as many jobs as there are claimers waiting in this process plus
        ``prefetch``, and hands them out.

        Cancellation: a claim statement's jobs are kept even when a cancel arrives while it
        runs (another claimer takes them; the last claimer to be cancelled releases them to
        the store); a cancel while waiting claims nothing.
        """
        await self._start()
        if not self._claims or self._stopped:
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
                    self._take(found)
                    continue
                wait = self._poll if found is None else min(self._poll, max(found, 0.0) + 0.01)
                with trio.move_on_after(wait):
                    await self._lot.park()
        except BaseException:
            if self._waiting == 1:
                # The last claimer leaves (cancelled): what it claimed goes back to the store.
                self._release_buffered()
            raise
        finally:
            self._waiting -= 1

    def stop_claiming(self) -> None:
        """
        Claim nothing more (the queue is closing): jobs claimed for no worker yet (prefetched)
        go back to the store at once, and so do those of a claim statement still running
        (S8-23).
        """
        self._stopped = True
        self._release_buffered()
        self._lot.unpark_all()

    def _release_buffered(self) -> None:
        while self._claimed_jobs:
            self.release(self._claimed_jobs.popleft().record.id)

    def _take(self, found: list[ClaimedJob]) -> None:
        for job in found:
            self._released.discard(job.record.id)
            self._held[job.record.id] = job.record.attempt
            self._hold_serial += 1
            self._holds[job.record.id] = self._hold_serial
            self._records[job.record.id] = job.record
        self._claimed_jobs.extend(found)
        if self._stopped:
            self._release_buffered()
        self._lot.unpark_all()

    async def _claim_batch(self, limit: int) -> list[ClaimedJob] | float | None:
        import psycopg

        from ._task import registered_task_types

        params: dict[str, object] = {
            "me": self._owner,
            "lease": self._lease,
            "queue": self._queue,
            "types": registered_task_types(),
            "limit": limit,
        }
        # One autocommit statement in one thread hop (no BEGIN/COMMIT round trips), on a
        # dedicated connection. Shielded, so that the jobs it claims are kept even when a
        # cancel arrives meanwhile (S8-16), but bounded: a hung database is abandoned after
        # close_timeout (S8-25), the jobs it may have claimed then coming back when their
        # lease expires.
        hop = _Hop(conn=self._claim_conn)
        self._claim_conn = None
        connect = functools.partial(_connect_autocommit, self._shared.dsn)
        try:
            found: list[ClaimedJob] | float | None = None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._close_timeout) as bound:
                    found = await trio.to_thread.run_sync(
                        functools.partial(
                            hop.run, connect, functools.partial(self._claim_rows, params=params)
                        ),
                        abandon_on_cancel=True,
                    )
        except psycopg.Error as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(hop.close)
            logger.warning("claiming jobs failed (%s); retrying", exc)
            return _RETRY_SECONDS
        except TaskGraphError:
            # A claimed row that does not decode (its jobs come back when their lease
            # expires); the connection is fine.
            self._claim_conn = hop.conn
            logger.warning("claiming jobs failed; retrying", exc_info=True)
            return _RETRY_SECONDS
        if bound.cancelled_caught:
            hop.abandon()  # the thread closes the connection when it ends
            logger.warning(
                "a claim statement took more than %g s: abandoned; retrying", self._close_timeout
            )
            return _RETRY_SECONDS
        self._claim_conn = hop.conn
        return found

    def _claim_rows(
        self, conn: Conn, *, params: Mapping[str, object]
    ) -> list[ClaimedJob] | float | None:
        rows = conn.execute(_CLAIM, params).fetchall()
        if rows:
            # Invariant (S8-16): handed out in (run_after, seq) order.
            rows.sort(key=lambda r: (r[9], r[10]))
            return [self._claimed(row) for row in rows]
        # Nothing due (autocommit: each statement is its own transaction).
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
        on_missing: Callable[[str], None],
    ) -> None:
        """
        Start the flusher, lease renewer and listener in ``nursery`` (the queue's service
        nursery); ``on_record`` receives records of watched jobs, ``on_cancel`` the ids of
        held jobs whose cancel was requested elsewhere, ``on_missing`` the ids passed to
        `watch` that the table does not hold (S8-21).

        Cancellation: the tables are created (if needed) and the listener connected before
        this returns; a cancel leaves nothing started.
        """
        self._on_record = on_record
        self._on_cancel = on_cancel
        self._on_missing = on_missing
        await self._start()
        self._stopped = False  # a store may serve one queue after another
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
        """
        Run ``fn(conn)`` and commit, in one thread hop on a pooled connection.

        Unlike the repository's pool, a cancel does not wait for the thread (S8-25): the hop
        is abandoned, and the connection, never returned to the pool, is closed by the thread
        when it ends. So a hung database cannot hold up a closing queue.
        """
        import psycopg

        from ._repository._postgres import _connect

        shared = self._shared
        async with shared.slots:
            if shared.closed:
                raise RepositoryError("the job store is closed")
            hop = _Hop(conn=shared.idle.pop() if shared.idle else None)
            try:
                result = await trio.to_thread.run_sync(
                    functools.partial(hop.run, functools.partial(_connect, shared.dsn), fn),
                    abandon_on_cancel=True,
                )
            except psycopg.Error as exc:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(hop.close)
                raise RepositoryError(f"database error: {exc}") from exc
            except BaseException:
                hop.abandon()
                raise
            conn = hop.conn
            assert conn is not None
            if not self._pool_takes(conn):
                await trio.to_thread.run_sync(hop.close)
            else:
                shared.idle.append(conn)
            return result

    def _pool_takes(self, conn: Conn) -> bool:
        return not (self._shared.closed or conn.closed or conn.broken)

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
        # Pipeline mode: the batch's statements and its COMMIT go out together and their
        # results come back together: one round trip (and one GIL hand-over) per batch.
        with conn.pipeline():
            added = self._write_ops(conn, batch, now)
            conn.commit()
        return added

    def _write_ops(self, conn: Conn, batch: list[_Op], now: float) -> bool:
        added = False
        notes: list[str] = []
        done: list[str] = []
        outcomes: list[_Outcome] = []
        touched = sorted(
            {
                op.record.id if isinstance(op, _Outcome) else op.job_id
                for op in batch
                if not isinstance(op, _Insert)
            }
        )
        if touched:
            conn.execute(
                "SELECT 1 FROM trio_taskgraph_jobs WHERE id = ANY(%s::text[]) ORDER BY id"
                " FOR UPDATE",
                (_array_literal(touched),),
            )
        for op in batch:
            if isinstance(op, _Insert):
                record, policy = op.record, op.policy
                conn.execute(
                    "INSERT INTO trio_taskgraph_jobs (id, queue, kind, task_type, inputs, state,"
                    " max_retries, retry_delay, retry_backoff, run_after) VALUES"
                    " (%s, %s, %s, %s, %b, 'pending', %s, %s, %s,"
                    " clock_timestamp() + %s * interval '1 second')"
                    # Idempotent: a batch abandoned at a deadline may have committed.
                    " ON CONFLICT (id) DO NOTHING",
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
                outcomes.append(op)
                done.append(op.record.id)
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
                        " error_traceback = %s, lease_owner = NULL, lease_until = NULL,"
                        " run_after = clock_timestamp() + %s * interval '1 second'"
                        " WHERE id = %s AND lease_owner = %s AND attempt = %s"
                        " AND state = 'running'",
                        (
                            retry.error,
                            retry.error_traceback,
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
        if outcomes:
            # One statement for every outcome of the batch (their rows are locked above, in
            # id order). Invariant (S8-17): only the lease holder of this attempt writes one.
            conn.execute(
                "UPDATE trio_taskgraph_jobs j SET state = v.state, output = v.output,"
                " error = v.error, error_traceback = v.trace, lease_owner = NULL,"
                " lease_until = NULL, finished = clock_timestamp()"
                " FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::text[], %s::text[],"
                " %s::int[]) AS v(id, state, output, error, trace, attempt)"
                " WHERE j.id = v.id AND j.lease_owner = %s AND j.attempt = v.attempt"
                " AND j.state = 'running'",
                # Array literals, one str each: psycopg adapts a Python list element by
                # element, four times the CPU of the whole statement otherwise.
                (
                    _array_literal([op.record.id for op in outcomes]),
                    _array_literal([op.record.state.value for op in outcomes]),
                    _array_literal(
                        [None if op.output is None else "\\x" + op.output.hex() for op in outcomes]
                    ),
                    _array_literal([op.record.error for op in outcomes]),
                    _array_literal([op.record.error_traceback for op in outcomes]),
                    _array_literal([str(op.record.attempt) for op in outcomes]),
                    self._owner,
                ),
            )
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
        for row in rows:
            job_id, kind, task_type, inputs, state, attempt, retries, output, error, wait = row[:10]
            trace = row[10]
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
                error_traceback=None if trace is None else str(trace),
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
        found = {record.id for record, _ in loaded}
        for job_id in ids:
            if job_id in found:
                self._looked_up.discard(job_id)
            elif job_id in self._looked_up and job_id not in self._unwritten:
                # Invariant (S8-21): an id the table does not hold fails its handle at once.
                self._looked_up.discard(job_id)
                self._watched.discard(job_id)
                if self._on_missing is not None:
                    self._on_missing(job_id)
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
        import psycopg

        from ._repository._postgres import _connect

        started = False
        while True:
            hop = _Hop(conn=None)
            try:
                try:
                    # Abandoned on cancel (S8-25): a hung database never holds up a close.
                    await trio.to_thread.run_sync(
                        functools.partial(
                            hop.run, functools.partial(_connect, self._shared.dsn), self._listen
                        ),
                        abandon_on_cancel=True,
                    )
                except BaseException:
                    hop.abandon()
                    raise
                if not started:
                    task_status.started()
                    started = True
                else:
                    # Notifications may have been missed meanwhile: look at everything.
                    self._full_refresh = True
                    self._lot.unpark_all()
                    self._dirty.set()
                assert hop.conn is not None
                await self._hear(hop.conn)
            except psycopg.Error as exc:
                if not started:
                    raise RepositoryError(f"database error: {exc}") from exc
                # Invariant (S8-25): a lost connection is not the queue's end: reconnect.
                logger.warning("the job store's LISTEN connection failed (%s); reconnecting", exc)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(hop.close_unless_abandoned)
            await trio.sleep(_RETRY_SECONDS)

    async def _hear(self, conn: Conn) -> None:
        pgconn = conn.pgconn
        while True:
            with trio.move_on_after(self._poll):
                await trio.lowlevel.wait_readable(pgconn.socket)
            pgconn.consume_input()
            new = heard = False
            while (note := pgconn.notifies()) is not None:
                heard = True
                new = self._heard(note.extra.decode()) or new
            if new or not heard:
                self._lot.unpark_all()  # new jobs, or the fallback poll
            if not heard:
                self._full_refresh = True
            if self._watched and (self._full_refresh or self._done_ids):
                self._dirty.set()  # the flusher refreshes the watched jobs

    def _heard(self, payload: str) -> bool:
        """Take one NOTIFY payload; True if it says jobs were added or released."""
        kind, _, job_id = payload.partition(":")
        if kind == "new":
            return True
        if kind == "cancel":
            self._cancel_held(job_id)
            if job_id in self._watched:
                self._done_ids.add(job_id)
        elif kind == "done":
            # Only the watched ones: a worker watches nothing and must not collect the id of
            # every job any process finishes.
            self._done_ids.update(i for i in job_id.split(",") if i in self._watched)
        return False

    def _listen(self, conn: Conn) -> None:
        conn.autocommit = True
        conn.execute(f'LISTEN "{self._channel}"')

    async def aclose(self) -> None:
        """
        Close the store's pooled connections (buffered operations are dropped: `flush`
        first).

        Cancellation: shielded; the connections are closed whatever happens.
        """
        from ._repository._postgres import _close

        with trio.CancelScope(shield=True):
            conn, self._claim_conn = self._claim_conn, None
            if conn is not None:
                await trio.to_thread.run_sync(_close, conn)
            await self._shared.aclose()
