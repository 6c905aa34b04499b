"""
`PostgresOutputRepository` (issue 11; spec S4-9..S4-12): the contract, plus what only a
shared database has to get right.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import trio_taskgraph as tg
from trio_taskgraph.testing import CONTRACT_CHECKS, check_output_repository


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
async def test_contract(postgres_databases: Callable[[], str], check: str) -> None:
    """S4-1..S4-8: each check of the contract; a fresh database is a fresh repository."""

    def factory() -> tg.OutputRepository:
        return tg.PostgresOutputRepository(postgres_databases())

    await check_output_repository(factory, only=[check])
