"""Factories for every repository implementation, shared by the repository tests."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from trio_taskgraph import (
    FsOutputRepository,
    MemoryOutputRepository,
    NamespacedRepository,
    OutputRepository,
    RunPrivateRepository,
)

Factory = Callable[[], OutputRepository]


def _fs_factory(tmp_path: Path) -> Callable[[], FsOutputRepository]:
    counter = itertools.count()

    def make() -> FsOutputRepository:
        # A fresh folder per repository: another folder is another repository.
        return FsOutputRepository(tmp_path / f"repo{next(counter)}")

    return make


def _run_private_factory(make_backing: Callable[[], NamespacedRepository]) -> Factory:
    counter = itertools.count()

    def make() -> OutputRepository:
        return RunPrivateRepository(make_backing(), f"run-{next(counter)}")

    return make


@pytest.fixture(params=["memory", "filesystem", "run_private_memory", "run_private_filesystem"])
def repository_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """A factory of fresh, empty repositories of every kind."""
    kind: str = request.param
    if kind == "memory":
        return MemoryOutputRepository
    if kind == "filesystem":
        return _fs_factory(tmp_path)
    if kind == "run_private_memory":
        return _run_private_factory(MemoryOutputRepository)
    return _run_private_factory(_fs_factory(tmp_path))
