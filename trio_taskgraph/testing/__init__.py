"""
Tools for testing code built on trio_taskgraph, and code of your own.

- Cancellation torture (`cancel_at_each_checkpoint`, `cancel_at_random_checkpoints`): cancel
  a scenario at each checkpoint its tasks reach and check the invariants you care about after
  each run (no task left, nothing parked, no temp file, no orphan blob). ``make torture``
  runs the suites at every point (``TORTURE_MAX_POINTS=0``; see `torture_max_points`).
"""

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
]
