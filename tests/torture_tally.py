"""
Opt-in pytest plugin (``-p tests.torture_tally``, used by ``make torture``): prints how many
cancel points the session exercised, for spec/VERIFICATION.md.
"""

from __future__ import annotations

import pytest

from trio_taskgraph.testing import torture_statistics


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = torture_statistics()
    terminalreporter.write_sep("-", "cancellation torture")
    terminalreporter.write_line(
        f"campaigns: {stats.campaigns}  baseline steps: {stats.baseline_steps}  "
        f"cancel points exercised: {stats.points}  CancellationLeak raised: {stats.findings} "
        "(the toolkit's self-tests raise some on purpose)"
    )
