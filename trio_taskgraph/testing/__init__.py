"""
Tools for testing code built on trio_taskgraph, and code of your own.

- Conformance suites (`check_output_repository`): run the repository contract against your
  own `OutputRepository` implementation, as trio's ``check_one_way_stream`` does for streams.
- Cancellation torture (`cancel_at_each_checkpoint`, `cancel_at_random_checkpoints`): cancel
  a scenario at each checkpoint its tasks reach and check the invariants you care about after
  each run (no task left, nothing parked, no temp file, no orphan blob). ``make torture``
  runs the suites at every point (``TORTURE_MAX_POINTS=0``; see `torture_max_points`).
- A throwaway PostgreSQL server (`throwaway_postgres`): ``initdb`` + ``pg_ctl`` in a temp
  folder, Unix socket only, never as root; for testing code on `PostgresOutputRepository`.
"""

# output repositories (issue 5)
# a throwaway PostgreSQL server for tests (issue 11)
from ._postgres_server import (
    PostgresServer as PostgresServer,
    throwaway_postgres as throwaway_postgres,
)
from ._repository_contract import (
    CONTRACT_CHECKS as CONTRACT_CHECKS,
    RepositoryFactory as RepositoryFactory,
    check_output_repository as check_output_repository,
)

# cancellation torture (issue 10)
from ._torture import (
    DEFAULT_CANCEL_TIMEOUT as DEFAULT_CANCEL_TIMEOUT,
    TORTURE_MAX_POINTS_ENV as TORTURE_MAX_POINTS_ENV,
    CancellationLeak as CancellationLeak,
    TortureReport as TortureReport,
    TortureStatistics as TortureStatistics,
    cancel_at_each_checkpoint as cancel_at_each_checkpoint,
    cancel_at_random_checkpoints as cancel_at_random_checkpoints,
    spread_points as spread_points,
    torture_max_points as torture_max_points,
    torture_statistics as torture_statistics,
)

__all__ = [
    # output repositories (issue 5)
    "CONTRACT_CHECKS",
    "RepositoryFactory",
    "check_output_repository",
    # cancellation torture (issue 10)
    "DEFAULT_CANCEL_TIMEOUT",
    "TORTURE_MAX_POINTS_ENV",
    "CancellationLeak",
    "TortureReport",
    "TortureStatistics",
    "cancel_at_each_checkpoint",
    "cancel_at_random_checkpoints",
    "spread_points",
    "torture_max_points",
    "torture_statistics",
    # a throwaway PostgreSQL server for tests (issue 11)
    "PostgresServer",
    "throwaway_postgres",
]


def _fixup_module_metadata() -> None:
    # As in the top-level package: show the public module name in reprs and tracebacks.
    for name in __all__:
        obj = globals()[name]
        module = getattr(obj, "__module__", "")
        if isinstance(module, str) and module.startswith("trio_taskgraph.testing._"):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
