"""
`PostgresOutputRepository`: rows and blobs in one PostgreSQL database (issue 11).

Many processes on many machines share one database: same DSN, same repository. Nothing here
imports psycopg at ``import trio_taskgraph``; the first call imports it in a worker thread
and, where the ``postgres`` extra is missing, raises `RepositoryError` saying how to install it.

Tables (created by the first call, under a transaction-level advisory lock, so several
processes starting at once do not race)::

    trio_taskgraph_meta       one row: the secret that keys the ref tags (S4-10)
    trio_taskgraph_rows       (ns, task_type, digest) -> msgpack data, created
    trio_taskgraph_row_blobs  the blobs of its namespace each row points to (dropped with it)
    trio_taskgraph_blobs      name -> ns, large-object oid, size, mime, task_type, created

Theory of operation (spec/S4-repositories.md, S4-10..S4-13):

- A streamed save (S4-11) takes a connection for its whole life and, in ONE transaction,
  creates a large object, writes coalesced batches into it with ``lowrite`` (one statement
  per batch of up to `write_batch_bytes`, in a worker thread, the next batch gathered while
  the previous one is written), closes it, inserts the blob's record and commits; only then is
  the ref returned. A failure or cancellation at any point rolls the transaction back under
  a shielded scope; a killed process's transaction is rolled back by the server when its
  connection drops. So a large object without its record (an orphan) cannot exist, and no
  ``vacuumlo`` is needed.
- Reads (S4-12) run in a REPEATABLE READ transaction: the record and the large object are
  read from one snapshot, so a concurrent delete can neither tear a read nor turn a record
  just found into a missing object. A streamed read holds its connection and yields
  ``loread`` chunks of `read_chunk_bytes`.
- Pruning (S4-13) deletes rows, then blob records no remaining row points to, and
  ``lo_unlink``\\s their large objects, all in one transaction. Row saves take a shared
  advisory lock on their namespace and pruning an exclusive one, so a blob is never pruned
  while a concurrent ``save_output`` is committing a row that points to it.
- Refs (S4-6) are checked by `RefSigner.parse` before any database access; the secret lives
  in the database, so every process sharing it issues and accepts the same refs, and another
  database's (or namespace's) refs are foreign.
- Connections come from a small pool of our own: a `trio.Semaphore` bounds them (waiting for
  one is a cancellable park), idle ones are reused, and every blocking psycopg call runs in
  `trio.to_thread.run_sync` (psycopg's async API is asyncio-only). No thread or event loop is
  started behind the caller's back (psycopg_pool's pool runs its own worker threads).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, TypeVar, TypeVarTuple, Unpack, final

import attrs
import trio

from .._core._keys import RefSigner, check_namespace, input_digest
from .._core._refs import CacheRef
from .._errors import DanglingRefError, RepositoryError
from ._common import (
    check_mime,
    check_task_type,
    decode_row,
    encode_row,
    iterate_closing,
    row_blob_names,
    write_behind,
)
from ._protocol import DEFAULT_GC_MIN_AGE, GcReport, RepositoryStats

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping

    from psycopg import Connection
    from psycopg.rows import TupleRow

    from .._core._events import BytesLike

    Conn = Connection[TupleRow]

__all__ = ["POSTGRES_EXTRA_ADVICE", "PostgresOutputRepository"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: What to tell someone whose environment lacks psycopg.
POSTGRES_EXTRA_ADVICE: Final = (
    "PostgresOutputRepository needs psycopg 3: install the extra with "
    "`pip install 'trio-taskgraph[postgres]'` (psycopg[binary], psycopg_pool)"
)
#: Default bytes gathered per ``lowrite`` (one statement per thread hop).
DEFAULT_WRITE_BATCH_BYTES: Final = 4 * 1024 * 1024
#: Default size of the chunks `open_output_stream_by_ref` yields (one ``loread`` per hop).
DEFAULT_READ_CHUNK_BYTES: Final = 4 * 1024 * 1024
#: Default bound on open connections per repository (shared by its namespace views).
DEFAULT_MAX_CONNECTIONS: Final = 8
_MAX_BATCH_ITEMS: Final = 1024
_INV_WRITE: Final = 0x20000
_INV_READ: Final = 0x40000
#: Advisory-lock class id of this library (first key of the two-int lock functions).
_LOCK_CLASS: Final = 0x7467  # "tg"
_SCHEMA_LOCK: Final = 0

_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS trio_taskgraph_meta (
        id integer PRIMARY KEY CHECK (id = 1),
        version integer NOT NULL,
        secret bytea NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS trio_taskgraph_rows (
        ns text NOT NULL, task_type text NOT NULL, digest text NOT NULL,
        data bytea NOT NULL, created timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (ns, task_type, digest)
    )
    """,
    "CREATE INDEX IF NOT EXISTS trio_taskgraph_rows_by_age ON trio_taskgraph_rows (ns, created)",
    """
    CREATE TABLE IF NOT EXISTS trio_taskgraph_row_blobs (
        ns text NOT NULL, task_type text NOT NULL, digest text NOT NULL, name text NOT NULL,
        PRIMARY KEY (ns, task_type, digest, name),
        FOREIGN KEY (ns, task_type, digest) REFERENCES trio_taskgraph_rows ON DELETE CASCADE
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS trio_taskgraph_row_blobs_by_name
        ON trio_taskgraph_row_blobs (ns, name)
    """,
    """
    CREATE TABLE IF NOT EXISTS trio_taskgraph_blobs (
        name text PRIMARY KEY, ns text NOT NULL, lo oid NOT NULL UNIQUE,
        size bigint NOT NULL, mime text, task_type text NOT NULL,
        created timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    "CREATE INDEX IF NOT EXISTS trio_taskgraph_blobs_by_ns ON trio_taskgraph_blobs (ns, created)",
)

#: Doomed blob records -> their large objects unlinked, in the same statement. A large object
#: someone removed by hand is skipped (``lo_unlink`` is strict: NULL in, no call), so it
#: cannot make every later prune fail.
_UNLINK_DELETED: Final = """
    WITH gone AS ({delete} RETURNING lo, size)
    SELECT count(*), coalesce(sum(g.size), 0), count(lo_unlink(m.oid))
    FROM gone g LEFT JOIN pg_largeobject_metadata m ON m.oid = g.lo
"""
_NOT_REFERENCED: Final = (
    "NOT EXISTS (SELECT 1 FROM trio_taskgraph_row_blobs r WHERE r.ns = b.ns AND r.name = b.name)"
)


# --- blocking helpers (run in worker threads) ---------------------------------------------


def _import_psycopg() -> None:
    try:
        import psycopg  # noqa: F401 - lazy on purpose: the extra is optional
    except ImportError:
        raise RepositoryError(POSTGRES_EXTRA_ADVICE) from None


def _connect(dsn: str) -> Conn:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    if "connect_timeout" in conninfo_to_dict(dsn):
        return psycopg.connect(dsn, autocommit=False)
    # A connect in a worker thread cannot be cancelled: bound it.
    return psycopg.connect(dsn, autocommit=False, connect_timeout=30)


def _in_transaction(conn: Conn) -> bool:
    from psycopg.pq import TransactionStatus

    return conn.info.transaction_status != TransactionStatus.IDLE


def _finish(conn: Conn) -> None:
    """Roll back whatever is open; close the connection if it cannot be reused."""
    if conn.closed or conn.broken:
        return
    if _in_transaction(conn):
        conn.rollback()


def _close(conn: Conn) -> None:
    conn.close()


def _setup(conn: Conn) -> bytes:
    row = conn.execute("SELECT to_regclass('trio_taskgraph_meta') IS NOT NULL").fetchone()
    if row is not None and row[0]:
        found = conn.execute("SELECT secret FROM trio_taskgraph_meta WHERE id = 1").fetchone()
        if found is not None:
            # Set up already: a role that may not create tables (PostgreSQL 15 gives nobody
            # CREATE on ``public`` by default) can still use the repository.
            return bytes(found[0])
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _SCHEMA_LOCK))
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO trio_taskgraph_meta VALUES (1, 1, %b) ON CONFLICT (id) DO NOTHING",
        (secrets.token_bytes(32),),
    )
    row = conn.execute("SELECT secret FROM trio_taskgraph_meta WHERE id = 1").fetchone()
    assert row is not None
    return bytes(row[0])


def _lock_namespace(conn: Conn, ns: str, *, exclusive: bool) -> None:
    fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    conn.execute(f"SELECT {fn}(%s, hashtext(%s))", (_LOCK_CLASS, ns))


def _lo_begin(conn: Conn) -> tuple[int, int]:
    row = conn.execute("SELECT lo_create(0)").fetchone()
    assert row is not None
    oid = int(row[0])
    row = conn.execute("SELECT lo_open(%s, %s)", (oid, _INV_WRITE)).fetchone()
    assert row is not None
    return oid, int(row[0])


def _lo_write(conn: Conn, fd: int, batch: list[BytesLike]) -> None:
    data = batch[0] if len(batch) == 1 else b"".join(batch)
    row = conn.execute("SELECT lowrite(%s, %b)", (fd, data)).fetchone()
    assert row is not None
    if int(row[0]) != len(memoryview(data).cast("B")):
        raise RepositoryError(f"lowrite wrote {row[0]} bytes of {len(data)}")


def _read_range(conn: Conn, fd: int, limit: int) -> bytes:
    row = conn.execute("SELECT loread(%s, %s)", (fd, limit), binary=True).fetchone()
    assert row is not None
    return bytes(row[0])


def _open_blob(conn: Conn, ns: str, name: str) -> tuple[int, int] | None:
    """In a fresh REPEATABLE READ transaction: the blob's (size, read fd), or None."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    row = conn.execute(
        "SELECT b.lo, b.size FROM trio_taskgraph_blobs b"
        " JOIN pg_largeobject_metadata m ON m.oid = b.lo WHERE b.name = %s AND b.ns = %s",
        (name, ns),
    ).fetchone()
    if row is None:
        return None  # no record, or a large object someone removed by hand: dangling
    opened = conn.execute("SELECT lo_open(%s, %s)", (int(row[0]), _INV_READ)).fetchone()
    assert opened is not None
    return int(row[1]), int(opened[0])


def _read_blob(conn: Conn, ns: str, name: str, chunk: int) -> bytes | None:
    found = _open_blob(conn, ns, name)
    if found is None:
        return None
    size, fd = found
    out = bytearray(size)
    at = 0
    while at < size:
        piece = _read_range(conn, fd, min(chunk, size - at))
        if not piece:
            raise RepositoryError(f"blob {name} is shorter than its record says")
        out[at : at + len(piece)] = piece
        at += len(piece)
    return bytes(out)


def _unlink_where(conn: Conn, where: str, params: tuple[object, ...]) -> tuple[int, int]:
    """Delete blob records (aliased ``b``) matching ``where``; unlink their large objects."""
    delete = f"DELETE FROM trio_taskgraph_blobs b WHERE {where}"
    row = conn.execute(_UNLINK_DELETED.format(delete=delete), params).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# --- the shared state of one repository (all its namespace views) ---------------------------


@attrs.define(eq=False)
class _Shared:
    dsn: str = attrs.field(repr=False)
    max_connections: int
    slots: trio.Semaphore
    idle: list[Conn] = attrs.Factory(list)
    open_lock: trio.Lock = attrs.Factory(trio.Lock)
    signer: RefSigner | None = None
    closed: bool = False

    def connection(self) -> _Lease:
        """
        ``async with shared.connection() as conn``: a connection for the block, returned to
        the pool (rolled back) or closed after it.

        Waiting for a free slot is a cancellable park; the connect itself runs in a worker
        thread (bounded by ``connect_timeout``).
        """
        return _Lease(self)

    async def _release(self, conn: Conn) -> None:
        try:
            await trio.to_thread.run_sync(_finish, conn)
        except Exception:
            await trio.to_thread.run_sync(_close, conn)
            return
        if self.closed or conn.closed or conn.broken:
            await trio.to_thread.run_sync(_close, conn)
        else:
            self.idle.append(conn)

    async def aclose(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            await trio.to_thread.run_sync(_close, conn)


@final
class _Lease:
    """
    One use of a pooled connection: a class rather than an ``@asynccontextmanager``, whose
    decorated signature would carry psycopg's ``Any`` row type (``disallow_any_decorated``).
    """

    def __init__(self, shared: _Shared) -> None:
        self._shared = shared
        self._conn: Conn | None = None

    async def __aenter__(self) -> Conn:
        shared = self._shared
        await shared.slots.acquire()
        try:
            if shared.closed:
                raise RepositoryError("the repository is closed")
            conn = shared.idle.pop() if shared.idle else None
            if conn is None:
                conn = await _run(_connect, shared.dsn)
        except BaseException:
            shared.slots.release()
            raise
        self._conn = conn
        return conn

    async def __aexit__(self, *exc_info: object) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        try:
            with trio.CancelScope(shield=True):
                await self._shared._release(conn)
        finally:
            self._shared.slots.release()


async def _run(fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
    """Run blocking ``fn(*args)`` in a thread; psycopg errors become `RepositoryError`."""
    import psycopg

    try:
        return await trio.to_thread.run_sync(fn, *args)
    except psycopg.Error as exc:
        raise RepositoryError(f"database error: {exc}") from exc


async def _transaction(conn: Conn, fn: Callable[[Conn], T]) -> T:
    """Run ``fn(conn)`` and commit in one thread hop; roll back if anything raises."""

    def body(conn: Conn) -> T:
        try:
            result = fn(conn)
            conn.commit()
        except BaseException:
            if not (conn.closed or conn.broken):
                conn.rollback()
            raise
        return result

    return await _run(body, conn)


@final
class _BlobChunks:
    """Async iterator over an open large object: one ``loread`` per thread hop."""

    def __init__(self, conn: Conn, fd: int, size: int, chunk: int) -> None:
        self._conn = conn
        self._fd = fd
        self._left = size
        self._chunk = chunk
        self.closed = False

    def __aiter__(self) -> _BlobChunks:
        return self

    async def __anext__(self) -> bytes:
        if self.closed:
            # Its connection went back to the pool and may be serving another call.
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the blob stream was used after its `async with` block")
        if self._left <= 0:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        piece = await _run(_read_range, self._conn, self._fd, min(self._chunk, self._left))
        if not piece:
            raise RepositoryError("a blob is shorter than its record says")
        self._left -= len(piece)
        return piece


@final
@attrs.define(eq=False, init=False, repr=False)
class PostgresOutputRepository:
    """
    An `OutputRepository` in a PostgreSQL database: rows in a table, blobs as large objects.

    The constructor does no I/O; the first call connects, creates the tables if needed and
    loads the ref secret. Every process (on any machine) using the same database is the same
    repository: refs one issues, another accepts. Each namespace sees only its own rows,
    blobs and refs.

    Args:
        dsn: a libpq connection string or URI (``host=... dbname=...``,
            ``postgresql://...``).
        namespace: the namespace of this view (default ``"default"``); refs carry it.
        max_connections: connections this repository (with its views) holds at most; a
            streamed save or read holds one for its whole life.
        write_batch_bytes: bytes gathered into one ``lowrite`` per thread hop (default 4 MiB).
        read_chunk_bytes: size of the chunks streamed reads yield (default 4 MiB).

    Raises:
        RepositoryError: (on first use) psycopg is not installed (the message says how to
            install the ``postgres`` extra), or the database cannot be reached.
    """

    _shared: _Shared
    _namespace: str
    _owner: bool
    _closed: bool
    _write_batch: int
    _read_chunk: int

    def __init__(
        self,
        dsn: str,
        *,
        namespace: str = "default",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        write_batch_bytes: int = DEFAULT_WRITE_BATCH_BYTES,
        read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
    ) -> None:
        dsn_value: object = dsn
        if not isinstance(dsn_value, str):
            raise TypeError(f"dsn must be a str, not {type(dsn_value).__name__}")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if write_batch_bytes < 1 or read_chunk_bytes < 1:
            raise ValueError("write_batch_bytes and read_chunk_bytes must be >= 1")
        self._shared = _Shared(
            dsn=dsn, max_connections=max_connections, slots=trio.Semaphore(max_connections)
        )
        self._namespace = check_namespace(namespace)
        self._owner = True
        self._closed = False
        self._write_batch = write_batch_bytes
        self._read_chunk = read_chunk_bytes

    def __repr__(self) -> str:
        # Never the DSN: it may hold a password.
        return f"<PostgresOutputRepository namespace={self._namespace!r}>"

    @property
    def namespace(self) -> str:
        """This view's namespace."""
        return self._namespace

    def with_namespace(self, namespace: str) -> PostgresOutputRepository:
        """
        Return a view of the same database and connections in ``namespace``.

        The view lives as long as this repository; closing the view closes only the view.
        """
        view = PostgresOutputRepository.__new__(PostgresOutputRepository)
        view._shared = self._shared
        view._namespace = check_namespace(namespace)
        view._owner = False
        view._closed = False
        view._write_batch = self._write_batch
        view._read_chunk = self._read_chunk
        return view

    # -- plumbing --

    async def _enter(self) -> RefSigner:
        await trio.lowlevel.checkpoint()
        shared = self._shared
        if self._closed or shared.closed:
            raise RepositoryError("the repository is closed")
        if shared.signer is None:
            async with shared.open_lock:
                if shared.signer is None:
                    await trio.to_thread.run_sync(_import_psycopg)
                    async with shared.connection() as conn:
                        secret = await _transaction(conn, _setup)
                    repository_id = hashlib.sha256(
                        b"trio_taskgraph repository id\x00" + secret
                    ).hexdigest()[:32]
                    shared.signer = RefSigner(repository_id=repository_id, secret=secret)
        if shared.closed:
            raise RepositoryError("the repository is closed")
        return shared.signer

    async def _name_of(self, ref: CacheRef) -> str:
        signer = await self._enter()
        # Invariant (S4-6): a ref is checked before any database access.
        return signer.parse(ref, namespace=self._namespace)

    async def _do(self, fn: Callable[[Conn], T]) -> T:
        async with self._shared.connection() as conn:
            return await _transaction(conn, fn)

    # -- rows --

    async def save_output(
        self, task_type: str, inputs: object, output: Mapping[str, object]
    ) -> None:
        """
        Store ``output`` as the row of ``(task_type, inputs)``, replacing any older row.

        Raises:
            TypeError: ``output`` is not a str-keyed mapping of msgpack-able values.
            RepositoryError: the repository is closed or the database failed.

        Cancellation: the row is committed entirely or not at all (the thread finishes).
        """
        signer = await self._enter()
        check_task_type(task_type)
        digest = input_digest(inputs)
        data = encode_row(output)
        names = sorted(row_blob_names(output, signer, self._namespace))
        ns = self._namespace

        def save(conn: Conn) -> None:
            # Invariant (S4-13): no prune of this namespace runs while the row commits.
            _lock_namespace(conn, ns, exclusive=False)
            conn.execute(
                "INSERT INTO trio_taskgraph_rows (ns, task_type, digest, data)"
                " VALUES (%s, %s, %s, %b) ON CONFLICT (ns, task_type, digest) DO UPDATE"
                " SET data = EXCLUDED.data, created = clock_timestamp()",
                (ns, task_type, digest, data),
            )
            conn.execute(
                "DELETE FROM trio_taskgraph_row_blobs"
                " WHERE ns = %s AND task_type = %s AND digest = %s",
                (ns, task_type, digest),
            )
            if names:
                conn.execute(
                    "INSERT INTO trio_taskgraph_row_blobs"
                    " SELECT %s, %s, %s, name FROM unnest(%s::text[]) AS name",
                    (ns, task_type, digest, names),
                )

        await self._do(save)

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        """
        Return the row of ``(task_type, inputs)``, or None.

        Raises:
            RepositoryError: the repository is closed, the database failed, or the row is
                corrupt.

        Cancellation: nothing to leave behind.
        """
        await self._enter()
        check_task_type(task_type)
        key = (self._namespace, task_type, input_digest(inputs))

        def get(conn: Conn) -> bytes | None:
            row = conn.execute(
                "SELECT data FROM trio_taskgraph_rows"
                " WHERE ns = %s AND task_type = %s AND digest = %s",
                key,
                binary=True,
            ).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._do(get)
        return None if data is None else decode_row(data)

    # -- blobs --

    async def save_output_stream(
        self,
        task_type: str,
        inputs: object,
        port: str,
        chunks: AsyncIterable[BytesLike],
        *,
        mime: str | None = None,
    ) -> CacheRef:
        """
        Stream ``chunks`` into a new large object and return its ref.

        The large object and its record are written in one transaction, committed only
        after the last chunk. Chunks are gathered into batches of up to ``write_batch_bytes``,
        one ``lowrite`` per thread hop while the next batch is gathered, so at most two
        batches are held at once. Each call makes its own blob and ref, even for identical
        inputs.

        Raises:
            TypeError: a chunk is not bytes-like.
            RepositoryError: the database failed (or the repository is closed).
            Exception: whatever iterating ``chunks`` raised, unchanged.

        Cancellation: the transaction is rolled back under a shielded scope before
        `Cancelled` leaves: no large object, no record, no ref.
        """
        del inputs, port  # the name is unique per write, never derived from the inputs
        async with iterate_closing(chunks) as iterator:
            return await self._save_stream(task_type, iterator, mime)

    async def _save_stream(
        self, task_type: str, chunks: AsyncIterator[BytesLike], mime: str | None
    ) -> CacheRef:
        signer = await self._enter()
        check_task_type(task_type)
        check_mime(mime)
        name = secrets.token_hex(16)
        ns = self._namespace
        async with self._shared.connection() as conn:
            # Invariant (S4-11): one transaction; any exit before the commit rolls it back
            # (the pool's release does it, shielded), so nothing half-written survives.
            oid, fd = await _run(_lo_begin, conn)
            size = await self._pump(conn, fd, chunks)

            def finish(conn: Conn) -> None:
                conn.execute("SELECT lo_close(%s)", (fd,))
                conn.execute(
                    "INSERT INTO trio_taskgraph_blobs (name, ns, lo, size, mime, task_type)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (name, ns, oid, size, mime, task_type),
                )

            await _transaction(conn, finish)
        return CacheRef(signer.issue(ns, name), size, mime)

    async def _pump(self, conn: Conn, fd: int, chunks: AsyncIterator[BytesLike]) -> int:
        async def write_batch(batch: list[BytesLike]) -> None:
            await _run(_lo_write, conn, fd, batch)

        return await write_behind(
            chunks, write_batch, batch_bytes=self._write_batch, max_items=_MAX_BATCH_ITEMS
        )

    async def get_output_by_ref(self, ref: CacheRef) -> bytes:
        """
        Return the bytes of the blob ``ref`` names.

        Raises:
            ForeignRefError: this repository (namespace) did not issue ``ref``; the database
                is not touched.
            DanglingRefError: the blob is gone.

        Cancellation: nothing to leave behind.
        """
        name = await self._name_of(ref)
        ns = self._namespace
        chunk = self._read_chunk

        def read(conn: Conn) -> bytes | None:
            return _read_blob(conn, ns, name, chunk)

        data = await self._do(read)
        if data is None:
            raise DanglingRefError(f"the blob of ref {ref.ref[:80]!r} is gone")
        return data

    @asynccontextmanager
    async def open_output_stream_by_ref(self, ref: CacheRef) -> AsyncIterator[_BlobChunks]:
        """
        Open the blob ``ref`` names: ``async with repo.open_output_stream_by_ref(ref) as it``
        yields an async iterator of chunks of up to ``read_chunk_bytes``, all from one
        snapshot (a delete committed meanwhile does not tear the read).

        Raises (on entry):
            ForeignRefError: this repository (namespace) did not issue ``ref``; the database
                is not touched.
            DanglingRefError: the blob is gone.

        Cancellation: the transaction ends and the connection goes back to the pool when
        the block exits, however it exits.
        """
        name = await self._name_of(ref)
        async with self._shared.connection() as conn:
            found = await _run(_open_blob, conn, self._namespace, name)
            if found is None:
                raise DanglingRefError(f"the blob of ref {ref.ref[:80]!r} is gone")
            size, fd = found
            chunks = _BlobChunks(conn, fd, size, self._read_chunk)
            try:
                yield chunks
            finally:
                chunks.closed = True

    async def delete_output_by_ref(self, ref: CacheRef) -> None:
        """
        Remove the blob ``ref`` names (record and large object); a blob already gone is no
        error.

        Raises:
            ForeignRefError: this repository (namespace) did not issue ``ref``; the database
                is not touched.

        Cancellation: the record and the large object go together or not at all.
        """
        name = await self._name_of(ref)
        ns = self._namespace

        def delete(conn: Conn) -> None:
            _unlink_where(conn, "b.name = %s AND b.ns = %s", (name, ns))

        await self._do(delete)

    # -- pruning --

    async def _prune(self, where: str, params: tuple[object, ...], orphan_where: str) -> int:
        await self._enter()
        ns = self._namespace

        def prune(conn: Conn) -> int:
            # Invariant (S4-13): a blob goes with the last row that points to it, never
            # before, and never while a row pointing to it is being saved.
            _lock_namespace(conn, ns, exclusive=True)
            theirs = [
                str(name)
                for (name,) in conn.execute(
                    "SELECT DISTINCT rb.name FROM trio_taskgraph_row_blobs rb"
                    " JOIN trio_taskgraph_rows USING (ns, task_type, digest)"
                    f" WHERE ns = %s AND {where}",
                    (ns, *params),
                ).fetchall()
            ]
            removed = conn.execute(
                f"DELETE FROM trio_taskgraph_rows WHERE ns = %s AND {where}",
                (ns, *params),
            ).rowcount
            _unlink_where(
                conn,
                f"b.ns = %s AND (b.name = ANY(%s) OR ({orphan_where})) AND {_NOT_REFERENCED}",
                (ns, theirs, *params),
            )
            return removed

        return await self._do(prune)

    async def clear_older_than(self, seconds: float) -> int:
        """
        Remove rows at least ``seconds`` old (by the server's clock) with the blobs only they
        pointed to, and blobs no row points to that are at least ``seconds`` old. A blob a
        newer row still points to is kept (the seed's M-5). Returns the number of rows
        removed.

        Cancellation: committed entirely or not at all.
        """
        if math.isnan(seconds):
            raise ValueError("seconds must be a number, not NaN")
        cutoff = "created <= to_timestamp(extract(epoch FROM clock_timestamp()) - %s)"
        return await self._prune(cutoff, (float(seconds),), "b." + cutoff)

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        """
        Remove rows whose task type starts with ``prefix`` (literally: no wildcards) with the
        blobs only they pointed to, and unreferenced blobs saved under such a task type.
        Returns the rows removed.

        Cancellation: committed entirely or not at all.
        """
        if not isinstance(prefix, str):
            raise TypeError("prefix must be a str")
        return await self._prune(
            "starts_with(task_type, %s)", (prefix,), "starts_with(b.task_type, %s)"
        )

    # -- capabilities, statistics, collection, closing --

    def supports_streaming(self) -> bool:
        """True: saves stream into a large object in bounded memory."""
        return True

    def supports_streaming_reads(self) -> bool:
        """True: reads stream out of a large object in bounded memory."""
        return True

    async def stats(self) -> RepositoryStats:
        """
        Count this namespace's rows, blobs and blob bytes.

        Cancellation: nothing to leave behind.
        """
        await self._enter()
        ns = self._namespace

        def count(conn: Conn) -> RepositoryStats:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM trio_taskgraph_rows WHERE ns = %s),"
                " count(*), coalesce(sum(size), 0) FROM trio_taskgraph_blobs WHERE ns = %s",
                (ns, ns),
            ).fetchone()
            assert row is not None
            return RepositoryStats(rows=int(row[0]), blobs=int(row[1]), bytes=int(row[2]))

        return await self._do(count)

    async def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> GcReport:
        """
        Remove this namespace's blobs no row points to that are at least ``min_age`` seconds
        old (by the server's clock). There are never temp files or orphan large objects to
        sweep: a save that did not commit left nothing.

        Cancellation: committed entirely or not at all.
        """
        if math.isnan(min_age):
            raise ValueError("min_age must be a number, not NaN")
        await self._enter()
        ns = self._namespace

        def collect(conn: Conn) -> GcReport:
            _lock_namespace(conn, ns, exclusive=True)
            blobs, size = _unlink_where(
                conn,
                "b.ns = %s AND b.created <= to_timestamp(extract(epoch FROM clock_timestamp())"
                f" - %s) AND {_NOT_REFERENCED}",
                (ns, float(min_age)),
            )
            return GcReport(blobs=blobs, bytes=size)

        return await self._do(collect)

    async def aclose(self) -> None:
        """
        Close this repository: every pooled connection if this is the repository the views
        came from (connections in use close when their call ends), just this view
        otherwise. Idempotent.

        Cancellation: closed even when cancelled (the close runs shielded).
        """
        self._closed = True
        if self._owner and not self._shared.closed:
            with trio.CancelScope(shield=True):
                await self._shared.aclose()
        await trio.lowlevel.checkpoint()
