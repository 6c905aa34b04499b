"""
The output-repository contract (S4) against `CacheServerRepository`, directly and under
`RunPrivateRepository`, on one subprocess server per module. Each check runs in a fresh
namespace (``default.<n>``: the suite's forgeries edit ``/default``), so every repository
the suite makes starts empty and refs of the "other" repository are foreign (S5-11).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from trio_taskgraph import (
    CacheServerRepository,
    OutputRepository,
    RunPrivateRepository,
    connect_cache_server,
    open_cache_server,
)
from trio_taskgraph.testing import CONTRACT_CHECKS, check_output_repository

from ..server_harness import ServerProcess, server_process, short_tempdir

_namespaces = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with server_process() as running:
        yield running


def _direct(socket_path: str) -> object:
    @asynccontextmanager
    async def factory() -> AsyncIterator[OutputRepository]:
        async with connect_cache_server(
            socket_path, namespace=f"default.c{next(_namespaces)}"
        ) as repo:
            yield repo

    return factory


def _run_private(socket_path: str) -> object:
    @asynccontextmanager
    async def factory() -> AsyncIterator[OutputRepository]:
        async with connect_cache_server(
            socket_path, namespace=f"default.p{next(_namespaces)}"
        ) as repo:
            private = RunPrivateRepository(repo, f"run-{next(_namespaces)}")
            try:
                yield private
            finally:
                await private.aclose()

    return factory


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
async def test_contract_direct(server: ServerProcess, check: str) -> None:
    """S4-1..S4-8 through the server (S5-6): each contract check on a fresh namespace."""
    await check_output_repository(_direct(server.socket_path), only=[check])  # type: ignore[arg-type]


@pytest.mark.parametrize("check", list(CONTRACT_CHECKS))
async def test_contract_run_private(server: ServerProcess, check: str) -> None:
    """
    S4-7 over the server: a run's namespace sits below the connection's (S5-11); deletes are
    forwarded (seed late HIGH 1) and refs are unique per write (seed late CRITICAL race).
    """
    await check_output_repository(_run_private(server.socket_path), only=[check])  # type: ignore[arg-type]


async def test_contract_with_a_server_per_repository() -> None:
    """S5-12: the suite's factory may start and stop a whole server per repository."""
    folder = short_tempdir()
    counter = itertools.count()

    @asynccontextmanager
    async def factory() -> AsyncIterator[CacheServerRepository]:
        async with open_cache_server(f"{folder}/root{next(counter)}") as repo:
            yield repo

    try:
        await check_output_repository(factory, only=["foreign_refs_are_refused", "aclose"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
