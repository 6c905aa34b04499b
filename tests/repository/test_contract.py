"""
The output-repository contract (spec/S4) against every implementation: memory, filesystem,
and run-private over both. One test per contract check, so a failure names the check.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import trio

from trio_taskgraph.testing import CONTRACT_CHECKS, check_output_repository

from .conftest import Factory


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
async def test_contract(repository_factory: Factory, check: str) -> None:
    """S4-1..S4-8: each check of the contract, on each implementation."""
    await check_output_repository(repository_factory, only=[check])


async def test_whole_suite_accepts_async_context_manager_factories(tmp_path: object) -> None:
    """S4-8: the suite takes a factory of async context managers (how the server client runs)."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from trio_taskgraph import MemoryOutputRepository

    opened: list[MemoryOutputRepository] = []

    @asynccontextmanager
    async def factory() -> AsyncIterator[MemoryOutputRepository]:
        repo = MemoryOutputRepository()
        opened.append(repo)
        try:
            yield repo
        finally:
            await repo.aclose()

    await check_output_repository(factory)
    assert len(opened) == len(CONTRACT_CHECKS) + 1  # the foreign-ref check opens two


async def test_suite_catches_a_wrapper_that_drops_deletes() -> None:
    """S4-7 (seed late HIGH 1): the contract fails a wrapper whose delete is a silent no-op."""
    from trio_taskgraph import CacheRef, MemoryOutputRepository

    class DropsDeletes:
        def __init__(self) -> None:
            self._inner = MemoryOutputRepository()

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

        async def delete_output_by_ref(self, ref: CacheRef) -> None:
            await trio.lowlevel.checkpoint()  # forgets to forward, like the seed's wrapper

    with pytest.raises(AssertionError, match="expected DanglingRefError"):
        await check_output_repository(DropsDeletes, only=["delete_output_by_ref"])  # type: ignore[arg-type]


async def test_suite_catches_top_level_only_keys() -> None:
    """S4-1: the contract fails a repository that keys rows by str(inputs)."""
    from trio_taskgraph import MemoryOutputRepository

    class StrKeys:
        def __init__(self) -> None:
            self._inner = MemoryOutputRepository()

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

        async def save_output(
            self, task_type: str, inputs: object, output: Mapping[str, object]
        ) -> None:
            await self._inner.save_output(task_type, str(inputs), output)

        async def get_output(self, task_type: str, inputs: object) -> object:
            return await self._inner.get_output(task_type, str(inputs))

    with pytest.raises(AssertionError):
        await check_output_repository(StrKeys, only=["row_keys_are_canonical"])  # type: ignore[arg-type]
