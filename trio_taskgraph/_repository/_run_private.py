"""
`RunPrivateRepository`: one run's private area of a backing repository (S4-7).

The backing must hand out namespace views (`NamespacedRepository`: the memory and filesystem
repositories do, and so must the cache-server client). The run gets its own namespace, derived
from the backing's and the run id, so its rows, blobs and refs are structurally separate: a ref
of another run is foreign to it (the ref's tag covers the namespace) and no call through it can
read or delete another run's data. A backing without views is refused with `TypeError`: a
wrapper that merely prefixed task types and marked ref strings could not stop a run that holds
another run's ref text from rewriting the mark, and the backing's own pruning could not see
which blobs the marked refs keep alive.

Every method is forwarded, `delete_output_by_ref` included (the seed's late HIGH 1), and the
capability probes report exactly what the backing reports.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, final

import attrs
import trio

from .._core._keys import child_namespace
from .._errors import RepositoryError
from ._common import check_task_type, iterate_closing
from ._protocol import DEFAULT_GC_MIN_AGE, NamespacedRepository

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Mapping

    from .._core._events import BytesLike
    from .._core._refs import CacheRef
    from ._protocol import GcReport, RepositoryStats

__all__ = ["RunPrivateRepository"]


@final
@attrs.define(eq=False, init=False)
class RunPrivateRepository:
    """
    The private area of run ``run_id`` inside ``backing``.

    Args:
        backing: a repository with namespace views (`MemoryOutputRepository`,
            `FsOutputRepository`, or anything with ``namespace`` and ``with_namespace``);
            it is not closed by `aclose`.
        run_id: a non-empty str naming the run.

    Raises:
        TypeError: ``backing`` cannot give the run a namespace of its own.
    """

    backing: NamespacedRepository
    run_id: str
    _inner: NamespacedRepository
    _closed: bool

    def __init__(self, backing: NamespacedRepository, run_id: str) -> None:
        run_id_value: object = run_id
        if not isinstance(run_id_value, str) or not run_id_value:
            raise ValueError("run_id must be a non-empty str")
        if not isinstance(backing, NamespacedRepository):
            raise TypeError(
                f"RunPrivateRepository needs a backing with namespace views "
                f"(namespace, with_namespace), not {type(backing).__name__}"
            )
        self.backing = backing
        self.run_id = run_id
        # Invariant (S4-7): the run's own namespace; its refs are foreign everywhere else.
        self._inner = backing.with_namespace(child_namespace(backing.namespace, run_id))
        self._closed = False

    @property
    def namespace(self) -> str:
        """The run's namespace inside the backing."""
        return self._inner.namespace

    def _check_open(self) -> None:
        if self._closed:
            raise RepositoryError("the run-private repository is closed")

    async def save_output(
        self, task_type: str, inputs: object, output: Mapping[str, object]
    ) -> None:
        """
        Store a row in this run's area (see `OutputRepository.save_output`).

        Cancellation: as the backing's.
        """
        self._check_open()
        await self._inner.save_output(check_task_type(task_type), inputs, output)

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        """
        Read a row of this run's area.

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.get_output(check_task_type(task_type), inputs)

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
            RepositoryError: the backing does not support streaming saves.

        Cancellation: as the backing's (nothing published, no temp file left).
        """
        async with iterate_closing(chunks) as iterator:
            self._check_open()
            if not self._inner.supports_streaming():
                await trio.lowlevel.checkpoint()
                raise RepositoryError("the backing repository does not support streaming saves")
            return await self._inner.save_output_stream(
                check_task_type(task_type), inputs, port, iterator, mime=mime
            )

    async def get_output_by_ref(self, ref: CacheRef) -> bytes:
        """
        Read a blob of this run.

        Raises:
            ForeignRefError: ``ref`` belongs to another run or repository.
            DanglingRefError: the blob is gone.

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.get_output_by_ref(ref)

    def open_output_stream_by_ref(
        self, ref: CacheRef
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """
        Stream a blob of this run (see `OutputRepository.open_output_stream_by_ref`).

        Raises (on entry):
            RepositoryError: the backing does not support streaming reads.
            ForeignRefError: ``ref`` belongs to another run or repository.
        """
        return self._open(ref)

    @asynccontextmanager
    async def _open(self, ref: CacheRef) -> AsyncIterator[AsyncIterator[bytes]]:
        self._check_open()
        if not self._inner.supports_streaming_reads():
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the backing repository does not support streaming reads")
        async with self._inner.open_output_stream_by_ref(ref) as stream:
            yield stream

    async def delete_output_by_ref(self, ref: CacheRef) -> None:
        """
        Delete a blob of this run (forwarded: the seed's late HIGH 1).

        Raises:
            ForeignRefError: ``ref`` belongs to another run or repository.

        Cancellation: as the backing's.
        """
        self._check_open()
        await self._inner.delete_output_by_ref(ref)

    async def clear_older_than(self, seconds: float) -> int:
        """
        Prune this run's rows (and the blobs only they used) at least ``seconds`` old.

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.clear_older_than(seconds)

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        """
        Delete this run's rows whose task type starts with ``prefix`` (and their blobs).

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.delete_by_task_type_prefix(prefix)

    async def clear_run(self) -> int:
        """
        Delete every row and blob of this run.

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.delete_by_task_type_prefix("")

    def supports_streaming(self) -> bool:
        """Exactly what the backing reports."""
        return self._inner.supports_streaming()

    def supports_streaming_reads(self) -> bool:
        """Exactly what the backing reports."""
        return self._inner.supports_streaming_reads()

    async def stats(self) -> RepositoryStats:
        """
        Count this run's rows and blobs.

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.stats()

    async def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> GcReport:
        """
        Collect this run's unreferenced blobs (and dead writers' temp files).

        Cancellation: as the backing's.
        """
        self._check_open()
        return await self._inner.gc(min_age=min_age)

    async def aclose(self) -> None:
        """
        Close this wrapper (and its namespace view); the backing stays open. Idempotent.

        Cancellation: closed even when cancelled.
        """
        self._closed = True
        await self._inner.aclose()
