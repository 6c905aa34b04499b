"""
The `OutputRepository` protocol: where task results live (spec/S4-repositories.md).

A repository stores two things:

- **rows**: one output dict per ``(task_type, inputs)``, keyed by the task type and the
  SHA-256 of the canonical encoding of the whole inputs value (S4-1), stored as msgpack so
  inline `Blob` and `bytes` values round-trip exactly (S4-2);
- **blobs**: byte streams saved with `save_output_stream`, named by an opaque, tagged
  `CacheRef` that only the issuing repository (and namespace) accepts (S4-6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol, final, runtime_checkable

import attrs

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Mapping
    from contextlib import AbstractAsyncContextManager

    from .._core._events import BytesLike
    from .._core._refs import CacheRef

__all__ = [
    "DEFAULT_GC_MIN_AGE",
    "GcReport",
    "NamespacedRepository",
    "OutputRepository",
    "RepositoryStats",
    "RowInfo",
]

#: `gc` leaves unreferenced blobs younger than this many seconds alone by default: a
#: streamed save is followed by the `save_output` that points a row at it, and a janitor
#: must not win that race.
DEFAULT_GC_MIN_AGE: Final = 300.0


@final
@attrs.frozen(kw_only=True)
class RepositoryStats:
    """
    What a repository (or one namespace of it) holds.

    Attributes:
        rows: the number of rows.
        blobs: the number of published blobs.
        bytes: the total size of the published blobs.
    """

    rows: int
    blobs: int
    bytes: int


@final
@attrs.frozen(kw_only=True)
class GcReport:
    """
    What `OutputRepository.gc` removed.

    Attributes:
        blobs: unreferenced blobs removed.
        bytes: their total size.
        temp_files: stale temp files removed (left by crashed writers).
    """

    blobs: int = 0
    bytes: int = 0
    temp_files: int = 0


@final
@attrs.frozen(kw_only=True)
class RowInfo:
    """
    One stored row, as a listing (`FsOutputRepository.list_rows`) reports it.

    Attributes:
        task_type: the task type the row belongs to.
        digest: the SHA-256 (hex) of the row's canonical inputs (S4-1).
        created: when the row was saved (the repository's clock, seconds).
        row_bytes: the size of the encoded row; small when big results are refs.
        refs: every `CacheRef` the row holds, in the order found.
        blob_bytes: the recorded size of the blobs of this namespace the row points to.
    """

    task_type: str
    digest: str
    created: float
    row_bytes: int
    refs: tuple[CacheRef, ...] = ()
    blob_bytes: int = 0


@runtime_checkable
class OutputRepository(Protocol):
    """
    Where task outputs live: rows by ``(task_type, inputs)`` and streamed blobs by ref.

    Every method is safe to call concurrently from several tasks. Every ``async`` method is a
    checkpoint. `trio_taskgraph.testing.check_output_repository` is the contract.
    """

    async def save_output(
        self, task_type: str, inputs: object, output: Mapping[str, object]
    ) -> None:
        """Store ``output`` as the row of ``(task_type, inputs)``, replacing any older row."""
        ...

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        """Return the row of ``(task_type, inputs)``, or None."""
        ...

    async def save_output_stream(
        self,
        task_type: str,
        inputs: object,
        port: str,
        chunks: AsyncIterable[BytesLike],
        *,
        mime: str | None = None,
    ) -> CacheRef:
        """Store the bytes of ``chunks`` as a new blob; return its ref (with ``size``)."""
        ...

    async def get_output_by_ref(self, ref: CacheRef) -> bytes:
        """Return the bytes of the blob ``ref`` names."""
        ...

    def open_output_stream_by_ref(
        self, ref: CacheRef
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Open the blob ``ref`` names; the context yields an async iterator of chunks."""
        ...

    async def delete_output_by_ref(self, ref: CacheRef) -> None:
        """Remove the blob ``ref`` names (a blob already gone is not an error)."""
        ...

    async def clear_older_than(self, seconds: float) -> int:
        """Remove rows at least ``seconds`` old, and blobs only they pointed to."""
        ...

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        """Remove rows whose task type starts with ``prefix``, and blobs only they used."""
        ...

    def supports_streaming(self) -> bool:
        """True if `save_output_stream` stores without holding the whole payload."""
        ...

    def supports_streaming_reads(self) -> bool:
        """True if `open_output_stream_by_ref` reads without holding the whole payload."""
        ...

    async def stats(self) -> RepositoryStats:
        """Count rows, blobs and blob bytes."""
        ...

    async def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> GcReport:
        """Remove blobs no row points to (older than ``min_age``) and stale temp files."""
        ...

    async def aclose(self) -> None:
        """Release the repository's resources; later calls raise `RepositoryError`."""
        ...


@runtime_checkable
class NamespacedRepository(OutputRepository, Protocol):
    """
    A repository that can hand out views of itself restricted to another namespace.

    A view shares the storage (and its lifetime) with the repository it came from, but its
    rows, blobs and refs are its own: a ref issued in one namespace is foreign in another.
    `RunPrivateRepository` uses this to give every run a private area.
    """

    @property
    def namespace(self) -> str:
        """This view's namespace."""
        ...

    def with_namespace(self, namespace: str) -> NamespacedRepository:
        """Return a view of the same storage in ``namespace`` (sync, never blocks)."""
        ...
