"""
`RunPrivateRepository`: one run's private area of a backing repository (S4-7).

Over a backing that hands out namespace views (`NamespacedRepository`: the memory and
filesystem repositories), the run gets its own namespace, derived from the backing's and the
run id, so its rows, blobs and refs are structurally separate: a ref of another run is foreign
to it (the tag covers the namespace) and no call through it can read or delete another run's
data. Over any other backing, rows are kept apart by a task-type prefix and refs are wrapped
with the run's mark and checked on every use (the backing's own tags still guard forgery
across repositories; see the spec for the limit of this fallback).

Every method is forwarded, `delete_output_by_ref` included (the seed's late HIGH 1), and the
capability probes report exactly what the backing reports.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from .._core._keys import child_namespace
from .._core._refs import CacheRef
from .._errors import ForeignRefError, RepositoryError
from ._common import check_task_type
from ._protocol import DEFAULT_GC_MIN_AGE, GcReport, NamespacedRepository, OutputRepository

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Mapping

    from .._core._events import BytesLike
    from ._protocol import RepositoryStats

__all__ = ["RunPrivateRepository"]

_WRAP_PREFIX: Final = "run:"


@final
@attrs.define(eq=False, init=False)
class RunPrivateRepository:
    """
    The private area of run ``run_id`` inside ``backing``.

    Args:
        backing: any `OutputRepository`; it is not closed by `aclose`.
        run_id: a non-empty str naming the run.
    """

    backing: OutputRepository
    run_id: str
    _inner: OutputRepository
    _structural: bool
    _row_prefix: str
    _ref_mark: str
    _closed: bool

    def __init__(self, backing: OutputRepository, run_id: str) -> None:
        run_id_value: object = run_id
        if not isinstance(run_id_value, str) or not run_id_value:
            raise ValueError("run_id must be a non-empty str")
        self.backing = backing
        self.run_id = run_id
        digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        self._row_prefix = f"__run:{digest}::"
        self._ref_mark = f"{_WRAP_PREFIX}{digest}:"
        self._closed = False
        if isinstance(backing, NamespacedRepository):
            self._inner = backing.with_namespace(child_namespace(backing.namespace, run_id))
            self._structural = True
        else:
            self._inner = backing
            self._structural = False

    @property
    def is_structurally_private(self) -> bool:
        """True when the backing gave the run its own namespace (the strong isolation)."""
        return self._structural

    def _check_open(self) -> None:
        if self._closed:
            raise RepositoryError("the run-private repository is closed")

    def _task_type(self, task_type: str) -> str:
        check_task_type(task_type)
        return task_type if self._structural else self._row_prefix + task_type

    def _wrap(self, ref: CacheRef) -> CacheRef:
        if self._structural:
            return ref
        return CacheRef(self._ref_mark + ref.ref, ref.size, ref.mime)

    def _unwrap(self, ref: CacheRef) -> CacheRef:
        self._check_open()
        if self._structural:
            return ref
        if not isinstance(ref, CacheRef):
            raise ForeignRefError(f"not a CacheRef: {type(ref).__name__}")
        if not ref.ref.startswith(self._ref_mark):
            raise ForeignRefError(f"ref {ref.ref[:80]!r} does not belong to this run")
        return CacheRef(ref.ref[len(self._ref_mark) :], ref.size, ref.mime)

    async def save_output(
        self, task_type: str, inputs: object, output: Mapping[str, object]
    ) -> None:
        """
        Store a row in this run's area (see `OutputRepository.save_output`).

        Cancellation: as the backing's.
        """
        self._check_open()
        await self._inner.save_output(self._task_type(task_type), inputs, output)

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        """
        Read a row of this run's area.

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.get_output(self._task_type(task_type), inputs)

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
        Stream a blob into this run's area; the ref is valid only through this run.

        Raises:
            RepositoryError: the backing does not support streaming.

        Cancellation: as the backing's (nothing published, no temp file left).
        """
        self._check_open()
        if not self._inner.supports_streaming():
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the backing repository does not support streaming saves")
        ref = await self._inner.save_output_stream(
            self._task_type(task_type), inputs, port, chunks, mime=mime
        )
        return self._wrap(ref)

    async def get_output_by_ref(self, ref: CacheRef) -> bytes:
        """
        Read a blob of this run.

        Raises:
            ForeignRefError: ``ref`` belongs to another run or repository.
            DanglingRefError: the blob is gone.

        Cancellation: as the backing's.
        """
        inner = self._unwrap(ref)
        return await self._inner.get_output_by_ref(inner)

    def open_output_stream_by_ref(
        self, ref: CacheRef
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream a blob of this run (see `OutputRepository.open_output_stream_by_ref`)."""
        return self._open(ref)

    @asynccontextmanager
    async def _open(self, ref: CacheRef) -> AsyncIterator[AsyncIterator[bytes]]:
        inner = self._unwrap(ref)
        if not self._inner.supports_streaming_reads():
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the backing repository does not support streaming reads")
        async with self._inner.open_output_stream_by_ref(inner) as stream:
            yield stream

    async def delete_output_by_ref(self, ref: CacheRef) -> None:
        """
        Delete a blob of this run (forwarded: the seed's late HIGH 1).

        Raises:
            ForeignRefError: ``ref`` belongs to another run or repository.

        Cancellation: as the backing's.
        """
        inner = self._unwrap(ref)
        await self._inner.delete_output_by_ref(inner)

    async def clear_older_than(self, seconds: float) -> int:
        """
        Prune this run's rows (and their blobs) at least ``seconds`` old.

        Cancellation: as the backing's.
        """
        self._check_open()
        if self._structural:
            return await self._inner.clear_older_than(seconds)
        # Fallback: the backing cannot prune one run alone by age, and pruning every run's
        # rows through one run's handle would break S4-7; refuse instead.
        await trio.lowlevel.checkpoint()
        raise RepositoryError(
            "clear_older_than needs a namespaced backing (memory or filesystem repository)"
        )

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        """
        Delete this run's rows whose task type starts with ``prefix`` (and their blobs).

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.delete_by_task_type_prefix(
            prefix if self._structural else self._row_prefix + prefix
        )

    async def clear_run(self) -> int:
        """
        Delete every row and blob of this run.

        Cancellation: as the backing's.
        """
        return await self.delete_by_task_type_prefix("")

    def supports_streaming(self) -> bool:
        """Exactly what the backing reports."""
        return self._inner.supports_streaming()

    def supports_streaming_reads(self) -> bool:
        """Exactly what the backing reports."""
        return self._inner.supports_streaming_reads()

    async def stats(self) -> RepositoryStats:
        """
        Count this run's rows and blobs (the backing's, in the fallback).

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.stats()

    async def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> GcReport:
        """
        Collect this run's unreferenced blobs (the backing's, in the fallback).

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.gc(min_age=min_age)

    async def aclose(self) -> None:
        """
        Close this wrapper (and its namespace view); the backing stays open.

        Cancellation: closed even when cancelled.
        """
        self._closed = True
        if self._structural:
            await self._inner.aclose()
        else:
            await trio.lowlevel.checkpoint()
