"""
`RunPrivateRepository` beyond the contract (S4-7): isolation between runs, forwarding of
every method (the seed's late HIGH 1), capability mirroring, and backings it must refuse.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

import trio_taskgraph as tg
from trio_taskgraph import BytesLike
from trio_taskgraph.testing import check_output_repository


async def _stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


class ThirdPartyBacking:
    """A third-party store: namespaced views over memory, capabilities chosen by the test."""

    def __init__(
        self,
        *,
        streaming: bool = True,
        streaming_reads: bool = True,
        inner: tg.MemoryOutputRepository | None = None,
    ) -> None:
        self._inner = inner or tg.MemoryOutputRepository()
        self._streaming = streaming
        self._streaming_reads = streaming_reads

    @property
    def namespace(self) -> str:
        return self._inner.namespace

    def with_namespace(self, namespace: str) -> ThirdPartyBacking:
        return ThirdPartyBacking(
            streaming=self._streaming,
            streaming_reads=self._streaming_reads,
            inner=self._inner.with_namespace(namespace),
        )

    async def save_output(
        self, task_type: str, inputs: object, output: Mapping[str, object]
    ) -> None:
        await self._inner.save_output(task_type, inputs, output)

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        return await self._inner.get_output(task_type, inputs)

    async def save_output_stream(
        self,
        task_type: str,
        inputs: object,
        port: str,
        chunks: AsyncIterable[BytesLike],
        *,
        mime: str | None = None,
    ) -> tg.CacheRef:
        return await self._inner.save_output_stream(task_type, inputs, port, chunks, mime=mime)

    async def get_output_by_ref(self, ref: tg.CacheRef) -> bytes:
        return await self._inner.get_output_by_ref(ref)

    def open_output_stream_by_ref(
        self, ref: tg.CacheRef
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._inner.open_output_stream_by_ref(ref)

    async def delete_output_by_ref(self, ref: tg.CacheRef) -> None:
        await self._inner.delete_output_by_ref(ref)

    async def clear_older_than(self, seconds: float) -> int:
        return await self._inner.clear_older_than(seconds)

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        return await self._inner.delete_by_task_type_prefix(prefix)

    def supports_streaming(self) -> bool:
        return self._streaming

    def supports_streaming_reads(self) -> bool:
        return self._streaming_reads

    async def stats(self) -> tg.RepositoryStats:
        return await self._inner.stats()

    async def gc(self, *, min_age: float = 300.0) -> tg.GcReport:
        return await self._inner.gc(min_age=min_age)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _backings(tmp_path: Path) -> dict[str, tg.NamespacedRepository]:
    return {
        "memory": tg.MemoryOutputRepository(),
        "filesystem": tg.FsOutputRepository(tmp_path / "fs"),
        "third_party": ThirdPartyBacking(),
    }


@pytest.mark.parametrize("kind", ["memory", "filesystem", "third_party"])
async def test_runs_cannot_touch_each_other(tmp_path: Path, kind: str) -> None:
    """S4-7: one run never reads, deletes or prunes another run's rows or blobs."""
    backing = _backings(tmp_path)[kind]
    run_a = tg.RunPrivateRepository(backing, "run-a")
    run_b = tg.RunPrivateRepository(backing, "run-b")
    ref_a = await run_a.save_output_stream("t", {}, "out", _stream(b"A"))
    ref_b = await run_b.save_output_stream("t", {}, "out", _stream(b"B"))
    await run_a.save_output("t", {}, {"out": ref_a})
    await run_b.save_output("t", {}, {"out": ref_b})
    assert await run_a.get_output("t", {}) == {"out": ref_a}
    assert await run_b.get_output("t", {}) == {"out": ref_b}
    assert await backing.get_output("t", {}) is None, "run rows leaked into the backing's area"
    for op in (run_a.get_output_by_ref, run_a.delete_output_by_ref):
        with pytest.raises(tg.ForeignRefError):
            await op(ref_b)
    with pytest.raises(tg.ForeignRefError):
        async with run_a.open_output_stream_by_ref(ref_b):
            pass
    assert await run_a.delete_by_task_type_prefix("") == 1
    assert await run_b.get_output("t", {}) == {"out": ref_b}
    assert await run_b.get_output_by_ref(ref_b) == b"B"
    with pytest.raises(tg.DanglingRefError):
        await run_a.get_output_by_ref(ref_a)
    await run_a.aclose()
    assert await run_b.get_output_by_ref(ref_b) == b"B", "closing a run closed the backing"
    await run_b.aclose()
    await backing.aclose()


@pytest.mark.parametrize("kind", ["memory", "filesystem", "third_party"])
async def test_delete_output_by_ref_is_forwarded(tmp_path: Path, kind: str) -> None:
    """S4-7 (seed late HIGH 1): a streamed blob whose row save failed is deleted through
    the wrapper, and is gone from the backing (and from disk)."""
    backing = _backings(tmp_path)[kind]
    run = tg.RunPrivateRepository(backing, "run-x")
    ref = await run.save_output_stream("t", {}, "out", _stream(b"orphan"))
    with pytest.raises(TypeError):
        await run.save_output("t", {}, {"out": ref, "bad": object()})
    await run.delete_output_by_ref(ref)
    with pytest.raises(tg.DanglingRefError):
        await run.get_output_by_ref(ref)
    assert (await run.stats()).blobs == 0
    if kind == "filesystem":
        assert list((tmp_path / "fs" / "blobs").glob("*.blob")) == []
    await backing.aclose()


@pytest.mark.parametrize(("streaming", "reads"), [(True, True), (True, False), (False, False)])
async def test_capabilities_mirror_the_backing(streaming: bool, reads: bool) -> None:
    """S4-7, S4-8: the probes tell the truth; a missing capability is a clear error."""
    backing = ThirdPartyBacking(streaming=streaming, streaming_reads=reads)
    run = tg.RunPrivateRepository(backing, "r")
    assert run.supports_streaming() is streaming
    assert run.supports_streaming_reads() is reads
    if not streaming:
        with pytest.raises(tg.RepositoryError, match="streaming"):
            await run.save_output_stream("t", {}, "out", _stream(b"x"))
        return
    ref = await run.save_output_stream("t", {}, "out", _stream(b"x"))
    if not reads:
        with pytest.raises(tg.RepositoryError, match="streaming reads"):
            async with run.open_output_stream_by_ref(ref):
                pass


@pytest.mark.parametrize(("streaming", "reads"), [(True, True), (True, False), (False, False)])
async def test_contract_over_third_party_backings(streaming: bool, reads: bool) -> None:
    """S4-7, S4-8: over a backing with fewer capabilities, the wrapper passes the contract
    (which skips what the probes say is unsupported)."""
    counter = iter(range(1000))

    def factory() -> tg.OutputRepository:
        backing = ThirdPartyBacking(streaming=streaming, streaming_reads=reads)
        return tg.RunPrivateRepository(backing, f"run-{next(counter)}")

    await check_output_repository(factory)


class _NoViews:
    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_refuses_backings_without_views_and_bad_run_ids() -> None:
    """S4-7: a backing that cannot give the run a namespace is refused, not half-isolated."""
    with pytest.raises(TypeError, match="namespace views"):
        tg.RunPrivateRepository(_NoViews(), "r")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="run_id"):
        tg.RunPrivateRepository(tg.MemoryOutputRepository(), "")
    run = tg.RunPrivateRepository(tg.MemoryOutputRepository(), "r")
    assert run.namespace.startswith("default.r")
    await run.aclose()
    with pytest.raises(tg.RepositoryError, match="closed"):
        await run.get_output("t", {})
