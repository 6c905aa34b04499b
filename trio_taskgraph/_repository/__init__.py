"""Output repositories: the protocol, in-memory, filesystem and run-private (S4)."""

from ._filesystem import FsOutputRepository as FsOutputRepository
from ._memory import MemoryOutputRepository as MemoryOutputRepository
from ._protocol import (
    DEFAULT_GC_MIN_AGE as DEFAULT_GC_MIN_AGE,
    GcReport as GcReport,
    NamespacedRepository as NamespacedRepository,
    OutputRepository as OutputRepository,
    RepositoryStats as RepositoryStats,
    RowInfo as RowInfo,
)
from ._run_private import RunPrivateRepository as RunPrivateRepository

__all__ = [
    "DEFAULT_GC_MIN_AGE",
    "FsOutputRepository",
    "GcReport",
    "MemoryOutputRepository",
    "NamespacedRepository",
    "OutputRepository",
    "RepositoryStats",
    "RowInfo",
    "RunPrivateRepository",
]
