"""
`FsOutputRepository`: rows in SQLite (WAL), blobs as sidecar files in one folder.

Layout of the folder::

    secret              32 random bytes (mode 0600), created once: keys the ref tags
    rows.sqlite         rows, the blobs each row points to, blob records (WAL mode)
    blobs/<name>.blob   published blobs; <name> is 32 random hex digits (never from a ref)
    blobs/<token>.<name>.tmp   a blob being written by the repository holding <token>
    locks/<token>.lock  held (flock) by each open repository for its whole life

Theory of operation (spec/S4-repositories.md):

- A streamed save (S4-3) writes ``<token>.<name>.tmp`` in coalesced batches (one
  ``os.writev`` of up to `write_batch_bytes` per thread hop, the next batch gathered while the
  previous one is written), fsyncs it, renames it to ``<name>.blob``, fsyncs the folder, then
  records the blob in SQLite and only then returns the ref. Any failure or cancellation before
  the ref is returned runs a shielded cleanup that unlinks the temp file (and the published
  file, if the rename had happened), so a caller never sees a torn or half-recorded blob.
- Opening sweeps temp files whose owner is dead (S4-5): a temp file's token names a lock file;
  if that lock can be taken, its owner is gone (the kernel drops a flock when a process dies,
  even by SIGKILL) and its temp files are removed; a live writer in another process, or
  another repository in this one, keeps its lock and its temp files.
- Refs (S4-6) are checked by `RefSigner.parse` before anything touches the disk, and a blob's
  path is built from the 32-hex name the check returned.
- Blocking file and SQLite work runs in `trio.to_thread.run_sync`; SQLite calls are
  serialized by a `trio.Lock` per repository (one connection, used by one thread at a time).
- Crash points (S4-9): `_crash_hook`, a private seam for the crash-point suite
  (``tests/repository/test_crash_points.py``), is called with the name of each durable moment
  (a temp file created, each write, fsync, rename, directory fsync, each commit, each unlink).
  It is None in production: one global load and a comparison per moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import secrets
import sqlite3
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar, TypeVarTuple, Unpack, final

import attrs
import trio

from .._core._keys import RefSigner, check_namespace, input_digest, is_blob_name
from .._core._refs import CacheRef
from .._errors import DanglingRefError, RepositoryError
from ._common import (
    check_mime,
    check_task_type,
    collect_refs,
    decode_row,
    encode_row,
    iterate_closing,
    row_blob_names,
    write_behind,
)
from ._protocol import DEFAULT_GC_MIN_AGE, GcReport, RepositoryStats, RowInfo

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping

    from .._core._events import BytesLike

__all__ = ["FsOutputRepository"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Default bytes gathered per write hop (one ``os.writev`` in a worker thread).
DEFAULT_WRITE_BATCH_BYTES: Final = 4 * 1024 * 1024
#: Default size of the chunks `open_output_stream_by_ref` yields, and chunks read per hop.
DEFAULT_READ_CHUNK_BYTES: Final = 8 * 1024 * 1024
_MAX_IOVECS: Final = 512
#: Temp files whose name carries no token are swept once this old (seconds).
_UNOWNED_TEMP_AGE: Final = 3600.0
#: A blob file with no record is collected only once this old (seconds), whatever
#: ``min_age`` says: a writer in another process records its blob just after the rename.
_STRAY_MIN_AGE: Final = 60.0

#: Private crash-point seam (S4-9): when set, called (in a worker thread) with the name of
#: each durable moment, so a test can SIGKILL the process exactly there. Never set it outside
#: the crash-point suite.
_crash_hook: Callable[[str], None] | None = None


def _moment(name: str) -> None:
    hook = _crash_hook
    if hook is not None:
        hook(name)


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rows (
    ns TEXT NOT NULL, task_type TEXT NOT NULL, digest TEXT NOT NULL,
    data BLOB NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (ns, task_type, digest)
);
CREATE TABLE IF NOT EXISTS row_blobs (
    ns TEXT NOT NULL, task_type TEXT NOT NULL, digest TEXT NOT NULL, name TEXT NOT NULL,
    PRIMARY KEY (ns, task_type, digest, name)
);
CREATE INDEX IF NOT EXISTS row_blobs_by_name ON row_blobs (ns, name);
CREATE TABLE IF NOT EXISTS blobs (
    name TEXT PRIMARY KEY, ns TEXT NOT NULL, size INTEGER NOT NULL, mime TEXT,
    task_type TEXT NOT NULL, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_by_ns ON blobs (ns, created);
"""


# --- blocking helpers (run in worker threads) ---------------------------------------------


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is an `input_digest` (64 lowercase hex digits), else raise."""
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError("an input digest is 64 lowercase hex digits (input_digest)")
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_secret(root: Path) -> bytes:
    path = root / "secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    tmp = root / f"secret.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and refuses to replace a secret another process made
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    _fsync_dir(root)
    return path.read_bytes()


def _take_lock(locks: Path) -> tuple[str, int]:
    """Create and flock a fresh lock file; return its token and fd."""
    while True:
        token = secrets.token_hex(16)
        path = locks / f"{token}.lock"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A sweeper may have locked and unlinked the file between our create and flock.
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return token, fd
        except OSError:
            pass
        os.close(fd)


def _owner_is_dead(locks: Path, token: str) -> tuple[bool, int | None]:
    """Return (dead, fd holding the dead owner's lock or None)."""
    try:
        fd = os.open(locks / f"{token}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    return True, fd


def _sweep_temps(blobs: Path, locks: Path, own_token: str) -> int:
    """Remove temp files (and lock files) of dead owners; return temp files removed."""
    by_token: dict[str, list[Path]] = {}
    removed = 0
    now = time.time()
    for entry in os.scandir(blobs):
        if not entry.name.endswith(".tmp"):
            continue
        token, _, rest = entry.name.partition(".")
        if is_blob_name(token) and rest:
            by_token.setdefault(token, []).append(Path(entry.path))
        else:
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= _UNOWNED_TEMP_AGE:
                    os.unlink(entry.path)
                    removed += 1
    for entry in os.scandir(locks):
        token = entry.name.removesuffix(".lock")
        if entry.name.endswith(".lock") and is_blob_name(token):
            by_token.setdefault(token, [])
    for token, paths in by_token.items():
        if token == own_token:
            continue
        dead, fd = _owner_is_dead(locks, token)
        if not dead:
            continue
        try:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(locks / f"{token}.lock")
        finally:
            if fd is not None:
                os.close(fd)
    return removed


@attrs.define(eq=False)
class _Write:
    """The state of one streamed save, shared with the worker threads that do its I/O."""

    tmp: Path
    final: Path
    fd: int | None = None
    renamed: bool = False


def _create_tmp(write: _Write) -> None:
    write.fd = os.open(write.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    _moment("create")


def _writev_all(fd: int, batch: list[BytesLike]) -> None:
    views = [memoryview(chunk).cast("B") for chunk in batch]
    start = 0
    while start < len(views):
        written = os.writev(fd, views[start : start + _MAX_IOVECS])
        _moment("write")
        while written > 0:
            head = views[start]
            if written >= len(head):
                written -= len(head)
                start += 1
            else:
                views[start] = head[written:]
                written = 0


def _publish(write: _Write, folder: Path) -> None:
    # Invariant (S4-3): data durable before the name appears, name durable before the ref.
    assert write.fd is not None
    os.fsync(write.fd)
    _moment("fsync")
    fd, write.fd = write.fd, None
    os.close(fd)
    os.rename(write.tmp, write.final)
    write.renamed = True
    _moment("rename")
    _fsync_dir(folder)
    _moment("dir-fsync")


def _discard(write: _Write) -> None:
    if write.fd is not None:
        fd, write.fd = write.fd, None
        with contextlib.suppress(OSError):
            os.close(fd)
    for path in (write.tmp, write.final) if write.renamed else (write.tmp,):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _read_file(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _open_read(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _unlink_blobs(folder: Path, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / f"{name}.blob")
        _moment("unlink")


# --- shared state of one folder -----------------------------------------------------------


@attrs.define(eq=False)
class _Root:
    path: Path
    clock: Callable[[], float]
    open_lock: trio.Lock = attrs.Factory(trio.Lock)
    db_lock: trio.Lock = attrs.Factory(trio.Lock)
    signer: RefSigner | None = None
    conn: sqlite3.Connection | None = None
    token: str = ""
    lock_fd: int | None = None
    closed: bool = False
    opened: bool = False

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    @property
    def locks(self) -> Path:
        return self.path / "locks"

    def open_sync(self) -> None:
        for folder in (self.path, self.blobs, self.locks):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = _load_secret(self.path)
        repository_id = hashlib.sha256(b"trio_taskgraph repository id\x00" + secret).hexdigest()
        self.signer = RefSigner(repository_id=repository_id[:32], secret=secret)
        self.token, self.lock_fd = _take_lock(self.locks)
        conn = sqlite3.connect(
            self.path / "rows.sqlite", timeout=30.0, check_same_thread=False, isolation_level=None
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        # Invariant (S4-5): temp files of crashed writers go; a live writer's stay.
        _sweep_temps(self.blobs, self.locks, self.token)

    def close_sync(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.locks / f"{self.token}.lock")
            os.close(self.lock_fd)
            self.lock_fd = None


class _Tx:
    """A SQLite transaction on a connection in autocommit mode: BEGIN IMMEDIATE ... COMMIT."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


#: "task_type starts with ?" without LIKE's wildcards: bind the prefix twice.
_PREFIX_CLAUSE: Final = "substr(task_type, 1, length(?)) = ?"


# --- the repository ------------------------------------------------------------------------


@final
class _FileChunks:
    """
    Async iterator over an open blob file: one ``os.read`` of a whole chunk per thread hop.

    Measured (bench/bench_repository.py): with a hop costing ~100 us, 8 MiB chunks read at
    about 0.9x of a plain sync read loop; 1 MiB chunks only ~0.5x. Reading ahead in a worker
    thread did no better on a loaded 2-vCPU machine and held more memory.
    """

    def __init__(self, repo: FsOutputRepository, fd: int, chunk: int) -> None:
        self._repo = repo
        self._fd = fd
        self._chunk = chunk
        self._eof = False
        self.closed = False

    def __aiter__(self) -> _FileChunks:
        return self

    def fileno(self) -> int:
        """
        The open blob file's descriptor, for a caller that sends the file itself (the cache
        server's ``os.sendfile``). Valid only inside the ``async with`` block; the blob is
        published, so its bytes never change. Reading it moves no iterator position here.

        Raises:
            RepositoryError: the block has exited (the descriptor is closed).
        """
        if self.closed:
            raise RepositoryError("the blob stream was used after its `async with` block")
        return self._fd

    async def __anext__(self) -> bytes:
        if self.closed:
            # The descriptor is closed and its number may already name another file.
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the blob stream was used after its `async with` block")
        if self._eof:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        piece = await self._repo._run_io(os.read, self._fd, self._chunk)
        if not piece:
            self._eof = True
            raise StopAsyncIteration
        return piece


@final
@attrs.define(eq=False, init=False)
class FsOutputRepository:
    """
    An `OutputRepository` in a folder: rows in SQLite, blobs as sidecar files.

    The constructor does no I/O; the folder is created and opened by the first call (and
    temp files of crashed writers are swept then). Several repositories, in one process or
    several, may share a folder; each namespace sees only its own rows, blobs and refs.

    Args:
        path: the folder (created if missing).
        namespace: the namespace of this view (default ``"default"``); refs carry it.
        clock: wall-clock seconds, for row and blob ages (default `time.time`).
        write_batch_bytes: bytes gathered into one write per thread hop (default 4 MiB).
        read_chunk_bytes: size of the chunks streamed reads yield (default 8 MiB).
    """

    _root: _Root
    _namespace: str
    _owner: bool
    _closed: bool
    _write_batch: int
    _read_chunk: int

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        namespace: str = "default",
        clock: Callable[[], float] = time.time,
        write_batch_bytes: int = DEFAULT_WRITE_BATCH_BYTES,
        read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
    ) -> None:
        if write_batch_bytes < 1 or read_chunk_bytes < 1:
            raise ValueError("write_batch_bytes and read_chunk_bytes must be >= 1")
        self._root = _Root(path=Path(path), clock=clock)
        self._namespace = check_namespace(namespace)
        self._owner = True
        self._closed = False
        self._write_batch = write_batch_bytes
        self._read_chunk = read_chunk_bytes

    @property
    def path(self) -> Path:
        """The folder."""
        return self._root.path

    @property
    def namespace(self) -> str:
        """This view's namespace."""
        return self._namespace

    def with_namespace(self, namespace: str) -> FsOutputRepository:
        """
        Return a view of the same folder and connection in ``namespace``.

        The view lives as long as this repository; closing the view closes only the view.
        """
        view = FsOutputRepository.__new__(FsOutputRepository)
        view._root = self._root
        view._namespace = check_namespace(namespace)
        view._owner = False
        view._closed = False
        view._write_batch = self._write_batch
        view._read_chunk = self._read_chunk
        return view

    # -- plumbing --

    async def _run_io(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """Run blocking ``fn(*args)`` in a thread; an `OSError` becomes `RepositoryError`."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            raise RepositoryError(f"I/O error in {self._root.path}: {exc}") from exc

    async def _db(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        root = self._root
        async with root.db_lock:
            if root.conn is None:
                raise RepositoryError("the repository is closed")
            try:
                return await self._run_io(fn, root.conn)
            except sqlite3.Error as exc:
                raise RepositoryError(f"database error in {root.path}: {exc}") from exc

    async def _enter(self) -> RefSigner:
        await trio.lowlevel.checkpoint()
        root = self._root
        if self._closed or root.closed:
            raise RepositoryError("the repository is closed")
        if not root.opened:
            async with root.open_lock:
                if not root.opened:
                    try:
                        await self._run_io(root.open_sync)
                    except sqlite3.Error as exc:
                        raise RepositoryError(f"cannot open {root.path}: {exc}") from exc
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(root.close_sync)
                        raise
                    root.opened = True
        if root.closed:
            raise RepositoryError("the repository is closed")
        assert root.signer is not None
        return root.signer

    def _blob_path(self, name: str) -> Path:
        # Invariant (S4-6): paths come from validated 32-hex names only.
        assert is_blob_name(name)
        return self._root.blobs / f"{name}.blob"

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
        await self.save_output_by_digest(task_type, input_digest(inputs), output)

    async def save_output_by_digest(
        self, task_type: str, digest: str, output: Mapping[str, object]
    ) -> None:
        """
        `save_output` for a caller that already holds ``input_digest(inputs)`` (the cache
        server: its clients hash the inputs, so inputs never cross the wire).

        Cancellation: the row is committed entirely or not at all (the thread finishes).
        """
        signer = await self._enter()
        check_task_type(task_type)
        check_digest(digest)
        data = encode_row(output)
        names = sorted(row_blob_names(output, signer, self._namespace))
        ns = self._namespace
        now = self._root.clock()

        def save(conn: sqlite3.Connection) -> None:
            with _Tx(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?)",
                    (ns, task_type, digest, data, now),
                )
                conn.execute(
                    "DELETE FROM row_blobs WHERE ns = ? AND task_type = ? AND digest = ?",
                    (ns, task_type, digest),
                )
                conn.executemany(
                    "INSERT INTO row_blobs VALUES (?, ?, ?, ?)",
                    [(ns, task_type, digest, name) for name in names],
                )
            _moment("row-commit")

        await self._db(save)

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        """
        Return the row of ``(task_type, inputs)``, or None.

        Raises:
            RepositoryError: the repository is closed, or the row is corrupt.

        Cancellation: nothing to leave behind.
        """
        return await self.get_output_by_digest(task_type, input_digest(inputs))

    async def get_output_by_digest(self, task_type: str, digest: str) -> dict[str, object] | None:
        """
        `get_output` for a caller that already holds ``input_digest(inputs)``.

        Cancellation: nothing to leave behind.
        """
        await self._enter()
        check_task_type(task_type)
        key = (self._namespace, task_type, check_digest(digest))

        def get(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT data FROM rows WHERE ns = ? AND task_type = ? AND digest = ?", key
            ).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._db(get)
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
        Stream ``chunks`` into a new blob file and return its ref.

        Chunks are gathered into batches of up to ``write_batch_bytes`` and written with one
        ``os.writev`` per thread hop while the next batch is gathered, so at most two batches
        are held at once. Each call makes its own file and ref, even for identical inputs.

        Raises:
            TypeError: a chunk is not bytes-like.
            RepositoryError: a write, fsync, rename or the database failed.
            Exception: whatever iterating ``chunks`` raised, unchanged.

        Cancellation: the temp file (and the published file, if the rename happened) is
        unlinked under a shielded scope before `Cancelled` leaves; no row, no blob, no ref.
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
        root = self._root
        name = secrets.token_hex(16)
        write = _Write(tmp=root.blobs / f"{root.token}.{name}.tmp", final=self._blob_path(name))
        try:
            await self._run_io(_create_tmp, write)
            size = await self._pump(write, chunks)
            await self._run_io(_publish, write, root.blobs)
            ns = self._namespace
            now = root.clock()

            def record(conn: sqlite3.Connection) -> None:
                with _Tx(conn):
                    conn.execute(
                        "INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                        (name, ns, size, mime, task_type, now),
                    )
                _moment("blob-commit")

            await self._db(record)
        except BaseException:
            # Invariant (S4-3): nothing half-written outlives a failed save.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_discard, write)
            raise
        return CacheRef(signer.issue(self._namespace, name), size, mime)

    async def _pump(self, write: _Write, chunks: AsyncIterator[BytesLike]) -> int:
        fd = write.fd
        assert fd is not None

        async def write_batch(batch: list[BytesLike]) -> None:
            await self._run_io(_writev_all, fd, batch)

        return await write_behind(
            chunks, write_batch, batch_bytes=self._write_batch, max_items=_MAX_IOVECS
        )

    async def _name_of(self, ref: CacheRef) -> str:
        signer = await self._enter()
        return signer.parse(ref, namespace=self._namespace)

    async def get_output_by_ref(self, ref: CacheRef) -> bytes:
        """
        Return the bytes of the blob ``ref`` names.

        Raises:
            ForeignRefError: this repository (namespace) did not issue ``ref``; no file is
                touched.
            DanglingRefError: the blob is gone.

        Cancellation: nothing to leave behind.
        """
        name = await self._name_of(ref)
        data = await self._run_io(_read_file, self._blob_path(name))
        if data is None:
            raise DanglingRefError(f"the blob of ref {ref.ref[:80]!r} is gone")
        return data

    @asynccontextmanager
    async def open_output_stream_by_ref(self, ref: CacheRef) -> AsyncIterator[_FileChunks]:
        """
        Open the blob ``ref`` names: ``async with repo.open_output_stream_by_ref(ref) as it``
        yields an async iterator of chunks of up to ``read_chunk_bytes``.

        Raises (on entry):
            ForeignRefError: this repository (namespace) did not issue ``ref``; no file is
                touched.
            DanglingRefError: the blob is gone.

        Cancellation: the file is closed when the block exits, however it exits.
        """
        name = await self._name_of(ref)
        fd = await self._run_io(_open_read, self._blob_path(name))
        if fd is None:
            raise DanglingRefError(f"the blob of ref {ref.ref[:80]!r} is gone")
        chunks = _FileChunks(self, fd, self._read_chunk)
        try:
            yield chunks
        finally:
            chunks.closed = True
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.close, fd)

    async def delete_output_by_ref(self, ref: CacheRef) -> None:
        """
        Remove the blob ``ref`` names (record and file); a blob already gone is no error.

        Raises:
            ForeignRefError: this repository (namespace) did not issue ``ref``; no file is
                touched.

        Cancellation: the record and the file are removed together or not at all.
        """
        name = await self._name_of(ref)
        ns = self._namespace
        folder = self._root.blobs

        def delete(conn: sqlite3.Connection) -> None:
            with _Tx(conn):
                conn.execute("DELETE FROM blobs WHERE name = ? AND ns = ?", (name, ns))
            _moment("delete-commit")
            _unlink_blobs(folder, [name])

        await self._db(delete)

    # -- pruning --

    async def _prune(self, where: str, params: tuple[object, ...], orphan_where: str) -> int:
        await self._enter()
        ns = self._namespace
        folder = self._root.blobs

        def prune(conn: sqlite3.Connection) -> int:
            # Invariant (S4-4): a blob goes with the last row that points to it, never before.
            with _Tx(conn):
                keys = conn.execute(
                    f"SELECT task_type, digest FROM rows WHERE ns = ? AND {where}",
                    (ns, *params),
                ).fetchall()
                for task_type, digest in keys:
                    conn.execute(
                        "DELETE FROM rows WHERE ns = ? AND task_type = ? AND digest = ?",
                        (ns, task_type, digest),
                    )
                    conn.execute(
                        "DELETE FROM row_blobs WHERE ns = ? AND task_type = ? AND digest = ?",
                        (ns, task_type, digest),
                    )
                doomed = [
                    name
                    for (name,) in conn.execute(
                        "SELECT name FROM blobs WHERE ns = ? AND NOT EXISTS ("
                        " SELECT 1 FROM row_blobs r WHERE r.ns = blobs.ns AND r.name = blobs.name"
                        f") AND ({orphan_where})",
                        (ns, *params),
                    ).fetchall()
                ]
                conn.executemany("DELETE FROM blobs WHERE name = ?", [(n,) for n in doomed])
            _moment("prune-commit")
            _unlink_blobs(folder, doomed)
            return len(keys)

        return await self._db(prune)

    async def clear_older_than(self, seconds: float) -> int:
        """
        Remove rows at least ``seconds`` old with the blobs only they pointed to, and blobs
        no row points to that are at least ``seconds`` old. A blob a newer row still points
        to is kept (the seed's M-5). Returns the number of rows removed.

        Cancellation: committed entirely or not at all.
        """
        if math.isnan(seconds):
            raise ValueError("seconds must be a number, not NaN")
        cutoff = self._root.clock() - seconds
        return await self._prune("created <= ?", (cutoff,), "created <= ?")

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        """
        Remove rows whose task type starts with ``prefix`` with the blobs only they pointed
        to, and unreferenced blobs saved under such a task type. Returns the rows removed.

        Cancellation: committed entirely or not at all.
        """
        if not isinstance(prefix, str):
            raise TypeError("prefix must be a str")
        return await self._prune(_PREFIX_CLAUSE, (prefix, prefix), _PREFIX_CLAUSE)

    # -- capabilities, statistics, collection, closing --

    def supports_streaming(self) -> bool:
        """True: saves stream to disk in bounded memory."""
        return True

    def supports_streaming_reads(self) -> bool:
        """True: reads stream from disk in bounded memory."""
        return True

    async def stats(self) -> RepositoryStats:
        """
        Count this namespace's rows, blobs and blob bytes.

        Cancellation: nothing to leave behind.
        """
        await self._enter()
        ns = self._namespace

        def count(conn: sqlite3.Connection) -> RepositoryStats:
            (rows,) = conn.execute("SELECT count(*) FROM rows WHERE ns = ?", (ns,)).fetchone()
            blobs, size = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM blobs WHERE ns = ?", (ns,)
            ).fetchone()
            return RepositoryStats(rows=rows, blobs=blobs, bytes=size)

        return await self._db(count)

    async def list_rows(self, *, task_type_prefix: str = "") -> list[RowInfo]:
        """
        List this namespace's rows, oldest first: task type, input digest, age, encoded
        size, the refs each row holds and the recorded size of the blobs it points to.

        Args:
            task_type_prefix: only rows whose task type starts with this (literally).

        Raises:
            TypeError: ``task_type_prefix`` is not a str.
            RepositoryError: the repository is closed, the database failed, or a row is
                corrupt.

        Cancellation: nothing to leave behind (a read-only query).
        """
        if not isinstance(task_type_prefix, str):
            raise TypeError("task_type_prefix must be a str")
        await self._enter()
        ns = self._namespace
        prefix = task_type_prefix

        def query(conn: sqlite3.Connection) -> list[tuple[str, str, float, bytes, int]]:
            return [
                (task_type, digest, created, bytes(data), blob_bytes)
                for task_type, digest, created, data, blob_bytes in conn.execute(
                    "SELECT r.task_type, r.digest, r.created, r.data, ("
                    " SELECT coalesce(sum(b.size), 0) FROM row_blobs rb JOIN blobs b"
                    " ON b.name = rb.name AND b.ns = rb.ns"
                    " WHERE rb.ns = r.ns AND rb.task_type = r.task_type AND rb.digest = r.digest"
                    ") FROM rows r WHERE r.ns = ? AND substr(r.task_type, 1, length(?)) = ?"
                    " ORDER BY r.created, r.task_type, r.digest",
                    (ns, prefix, prefix),
                ).fetchall()
            ]

        found = await self._db(query)
        return [
            RowInfo(
                task_type=task_type,
                digest=digest,
                created=created,
                row_bytes=len(data),
                refs=tuple(collect_refs(decode_row(data))),
                blob_bytes=blob_bytes,
            )
            for task_type, digest, created, data, blob_bytes in found
        ]

    async def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> GcReport:
        """
        Remove this namespace's blobs no row points to (at least ``min_age`` seconds old),
        blob files with no record (a crash between rename and record; at least
        ``max(min_age, 60)`` seconds old, so a live writer's just-renamed blob is safe), and
        temp files of dead writers (any age; a live writer's are kept).

        Cancellation: each step commits entirely or not at all.
        """
        await self._enter()
        root = self._root
        ns = self._namespace
        cutoff = root.clock() - min_age
        wall_cutoff = time.time() - max(min_age, _STRAY_MIN_AGE)

        def collect(conn: sqlite3.Connection) -> GcReport:
            temps = _sweep_temps(root.blobs, root.locks, root.token)
            with _Tx(conn):
                doomed = conn.execute(
                    "SELECT name, size FROM blobs WHERE ns = ? AND created <= ? AND NOT EXISTS ("
                    " SELECT 1 FROM row_blobs r WHERE r.ns = blobs.ns AND r.name = blobs.name)",
                    (ns, cutoff),
                ).fetchall()
                conn.executemany("DELETE FROM blobs WHERE name = ?", [(n,) for n, _ in doomed])
            _unlink_blobs(root.blobs, [n for n, _ in doomed])
            known = {n for (n,) in conn.execute("SELECT name FROM blobs").fetchall()}
            strays = 0
            for entry in os.scandir(root.blobs):
                stem = entry.name.removesuffix(".blob")
                if entry.name.endswith(".blob") and is_blob_name(stem) and stem not in known:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime <= wall_cutoff:
                            os.unlink(entry.path)
                            strays += 1
            return GcReport(
                blobs=len(doomed) + strays, bytes=sum(s for _, s in doomed), temp_files=temps
            )

        return await self._db(collect)

    async def aclose(self) -> None:
        """
        Close this repository: the connection and lock of the folder if this is the
        repository the views came from, just this view otherwise. Idempotent.

        Cancellation: closed even when cancelled (the close runs shielded).
        """
        self._closed = True
        root = self._root
        if self._owner and not root.closed:
            root.closed = True
            with trio.CancelScope(shield=True):
                async with root.db_lock:
                    await trio.to_thread.run_sync(root.close_sync)
        await trio.lowlevel.checkpoint()
