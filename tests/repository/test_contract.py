"""
The output-repository contract (spec/S4) against every implementation: memory, filesystem,
and run-private over both. One test per contract check, so a failure names the check.
"""

from __future__ import annotations

import pytest

from trio_taskgraph.testing import CONTRACT_CHECKS, check_output_repository

from .conftest import Factory


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
async def test_contract(repository_factory: Factory, check: str) -> None:
    """S4-1..S4-8: each check of the contract, on each implementation."""
    await check_output_repository(repository_factory, only=[check])


async def test_whole_suite_accepts_async_context_manager_factories(tmp_path: object) -> None:
    """S4-8: the suite takes a factory of async context managers (how the server client runs)."""
    from contextlib import asynccontextmanager

    from trio_taskgraph import MemoryOutputRepository

    opened = []

    @asynccontextmanager
    async def factory():  # type: ignore[no-untyped-def]
        repo = MemoryOutputRepository()
        opened.append(repo)
        try:
            yield repo
        finally:
            await repo.aclose()

    await check_output_repository(factory)
    assert len(opened) == len(CONTRACT_CHECKS) + 1  # the foreign-ref check opens two
