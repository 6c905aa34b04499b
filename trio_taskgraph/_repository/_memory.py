"""
`MemoryOutputRepository`: rows and blobs in process memory, for tests and small embeddings.

Rows are stored msgpack-encoded (as on disk), so a row read back is a fresh copy and an inline
`Blob` or `bytes` round-trips exactly (S4-2). Blobs are published whole at the end of a
streamed save, so a failed or cancelled save leaves nothing behind (S4-3).
"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, final

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
    size_of_chunk,
)
from ._protocol import DEFAULT_GC_MIN_AGE, GcReport, RepositoryStats

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping

    from .._core._events import BytesLike

__all__ = ["MemoryOutputRepository"]

#: Chunk size of `open_output_stream_by_ref`.
_READ_CHUNK = 1024 * 1024


@attrs.define(eq=False)
class _Row:
    data: bytes
    created: float
    blobs: frozenset[str]


@attrs.define(eq=False)
class _MemBlob:
    data: bytes
    mime: str | None
    created: float
    task_type: str


@attrs.define(eq=False)
class _Store:
    signer: RefSigner
    clock: Callable[[], float]
    # (namespace, task_type, digest) -> row; (namespace, name) -> blob
    rows: dict[tuple[str, str, str], _Row] = attrs.Factory(dict)
    blobs: dict[tuple[str, str], _MemBlob] = attrs.Factory(dict)
    closed: bool = False


def _new_store(clock: Callable[[], float]) -> _Store:
    signer = RefSigner(repository_id=secrets.token_hex(16), secret=secrets.token_bytes(32))
    return _Store(signer=signer, clock=clock)


@final
class _ChunkIterator:
    """Async iterator over a bytes value in bounded chunks; a checkpoint per chunk."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._view = memoryview(data)
        self._offset = 0
        self._chunk = chunk

    def __aiter__(self) -> _ChunkIterator:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._offset >= len(self._view):
            raise StopAsyncIteration
        piece = bytes(self._view[self._offset : self._offset + self._chunk])
        self._offset += len(piece)
        return piece


@final
@attrs.define(eq=False, init=False)
class MemoryOutputRepository:
    """
    An `OutputRepository` in process memory; streaming-capable both ways.

    Args:
        namespace: the namespace of this view (refs carry it; default ``"default"``).
        clock: wall-clock seconds, for row ages (default `time.time`).
    """

    _store: _Store
    _namespace: str
    _closed: bool
    _owner: bool

    def __init__(
        self, *, namespace: str = "default", clock: Callable[[], float] = time.time
    ) -> None:
        self._store = _new_store(clock)
        self._namespace = check_namespace(namespace)
        self._closed = False
        self._owner = True

    @property
    def namespace(self) -> str:
        """This view's namespace."""
        return self._namespace

    def with_namespace(self, namespace: str) -> MemoryOutputRepository:
        """Return a view of the same store in ``namespace`` (closing it closes only it)."""
        view = MemoryOutputRepository.__new__(MemoryOutputRepository)
        view._store = self._store
        view._namespace = check_namespace(namespace)
        view._closed = False
        view._owner = False
        return view

    async def _enter(self) -> _Store:
        await trio.lowlevel.checkpoint()
        if self._closed or self._store.closed:
            raise RepositoryError("the repository is closed")
        return self._store

    def _row_key(self, task_type: str, inputs: object) -> tuple[str, str, str]:
        return (self._namespace, check_task_type(task_type), input_digest(inputs))

    async def save_output(
        self, task_type: str, inputs: object, output: Mapping[str, object]
    ) -> None:
        """
        Store ``output`` as the row of ``(task_type, inputs)``, replacing any older row.

        Raises:
            TypeError: ``output`` is not a str-keyed mapping of msgpack-able values.
            RepositoryError: the repository is closed.

        Cancellation: the row is stored entirely or not at all.
        """
        store = await self._enter()
        key = self._row_key(task_type, inputs)
        data = encode_row(output)
        names = row_blob_names(output, store.signer, self._namespace)
        store.rows[key] = _Row(data=data, created=store.clock(), blobs=names)

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        """
        Return (a fresh copy of) the row of ``(task_type, inputs)``, or None.

        Cancellation: nothing to leave behind.
        """
        store = await self._enter()
        row = store.rows.get(self._row_key(task_type, inputs))
        return None if row is None else decode_row(row.data)

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
        Store the bytes of ``chunks`` as a new blob and return its ref.

        Each call makes a new blob with its own ref, even for identical inputs.

        Raises:
            TypeError: a chunk is not bytes-like.
            RepositoryError: the repository is closed.
            Exception: whatever iterating ``chunks`` raised, unchanged.

        Cancellation: nothing is published; the partial bytes are dropped.
        """
        del inputs, port  # refs are unique per write, not derived from the inputs
        parts: list[bytes] = []
        async with iterate_closing(chunks) as iterator:
            store = await self._enter()
            check_task_type(task_type)
            check_mime(mime)
            async for chunk in iterator:
                size_of_chunk(chunk)
                parts.append(bytes(chunk))
            if self._closed or store.closed:
                raise RepositoryError("the repository is closed")
        data = b"".join(parts)
        name = secrets.token_hex(16)
        store.blobs[(self._namespace, name)] = _MemBlob(
            data=data, mime=mime, created=store.clock(), task_type=task_type
        )
        return CacheRef(store.signer.issue(self._namespace, name), len(data), mime)

    def _blob(self, store: _Store, ref: CacheRef) -> _MemBlob:
        name = store.signer.parse(ref, namespace=self._namespace)
        blob = store.blobs.get((self._namespace, name))
        if blob is None:
            raise DanglingRefError(f"the blob of ref {ref.ref[:80]!r} is gone")
        return blob

    async def get_output_by_ref(self, ref: CacheRef) -> bytes:
        """
        Return the bytes of the blob ``ref`` names.

        Raises:
            ForeignRefError: this repository (namespace) did not issue ``ref``.
            DanglingRefError: the blob was deleted.

        Cancellation: nothing to leave behind.
        """
        store = await self._enter()
        return self._blob(store, ref).data

    @asynccontextmanager
    async def open_output_stream_by_ref(self, ref: CacheRef) -> AsyncIterator[_ChunkIterator]:
        """
        Open the blob ``ref`` names; yields an async iterator of chunks (up to 1 MiB each).

        Raises:
            ForeignRefError: this repository (namespace) did not issue ``ref``.
            DanglingRefError: the blob was deleted.

        Cancellation: nothing is held open.
        """
        store = await self._enter()
        blob = self._blob(store, ref)
        yield _ChunkIterator(blob.data, _READ_CHUNK)

    async def delete_output_by_ref(self, ref: CacheRef) -> None:
        """
        Remove the blob ``ref`` names; a blob already gone is not an error.

        Raises:
            ForeignRefError: this repository (namespace) did not issue ``ref``.

        Cancellation: the blob is removed entirely or not at all.
        """
        store = await self._enter()
        name = store.signer.parse(ref, namespace=self._namespace)
        store.blobs.pop((self._namespace, name), None)

    def _drop_rows(self, store: _Store, keys: list[tuple[str, str, str]]) -> None:
        # Invariant (S4-4): a blob goes with the last row that points to it, never before.
        candidates: set[str] = set()
        for key in keys:
            candidates |= store.rows.pop(key).blobs
        for row_key, row in store.rows.items():
            if row_key[0] == self._namespace:
                candidates -= row.blobs
        for name in candidates:
            store.blobs.pop((self._namespace, name), None)

    def _referenced(self, store: _Store) -> set[str]:
        used: set[str] = set()
        for key, row in store.rows.items():
            if key[0] == self._namespace:
                used |= row.blobs
        return used

    async def clear_older_than(self, seconds: float) -> int:
        """
        Remove rows at least ``seconds`` old, the blobs only they pointed to, and blobs no
        row points to that are at least ``seconds`` old. Returns the number of rows removed.

        Cancellation: all or nothing.
        """
        store = await self._enter()
        cutoff = store.clock() - seconds
        keys = [k for k, r in store.rows.items() if k[0] == self._namespace and r.created <= cutoff]
        self._drop_rows(store, keys)
        used = self._referenced(store)
        for key, blob in list(store.blobs.items()):
            if key[0] == self._namespace and key[1] not in used and blob.created <= cutoff:
                del store.blobs[key]
        return len(keys)

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        """
        Remove rows whose task type starts with ``prefix``, the blobs only they pointed to,
        and blobs saved under such a task type that no row points to. Returns the rows removed.

        Cancellation: all or nothing.
        """
        store = await self._enter()
        keys = [k for k in store.rows if k[0] == self._namespace and k[1].startswith(prefix)]
        self._drop_rows(store, keys)
        used = self._referenced(store)
        for key, blob in list(store.blobs.items()):
            orphan = key[0] == self._namespace and key[1] not in used
            if orphan and blob.task_type.startswith(prefix):
                del store.blobs[key]
        return len(keys)

    def supports_streaming(self) -> bool:
        """True: `save_output_stream` is supported."""
        return True

    def supports_streaming_reads(self) -> bool:
        """True: `open_output_stream_by_ref` is supported."""
        return True

    async def stats(self) -> RepositoryStats:
        """
        Count this namespace's rows, blobs and blob bytes.

        Cancellation: nothing to leave behind.
        """
        store = await self._enter()
        rows = sum(1 for k in store.rows if k[0] == self._namespace)
        blobs = [b for k, b in store.blobs.items() if k[0] == self._namespace]
        return RepositoryStats(rows=rows, blobs=len(blobs), bytes=sum(len(b.data) for b in blobs))

    async def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> GcReport:
        """
        Remove this namespace's blobs that no row points to and that are at least
        ``min_age`` seconds old.

        Cancellation: all or nothing.
        """
        store = await self._enter()
        cutoff = store.clock() - min_age
        used = self._referenced(store)
        removed = 0
        size = 0
        for key, blob in list(store.blobs.items()):
            if key[0] == self._namespace and key[1] not in used and blob.created <= cutoff:
                del store.blobs[key]
                removed += 1
                size += len(blob.data)
        return GcReport(blobs=removed, bytes=size, temp_files=0)

    async def aclose(self) -> None:
        """
        Close this repository (the whole store, if this is not a view); idempotent.

        Cancellation: closed even when cancelled.
        """
        self._closed = True
        if self._owner:
            self._store.closed = True
            self._store.rows.clear()
            self._store.blobs.clear()
        await trio.lowlevel.checkpoint()
