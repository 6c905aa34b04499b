"""
Public test helpers: conformance suites and fakes for people who extend trio_taskgraph.
"""

# output repositories (issue 5)
from ._repository_contract import (
    CONTRACT_CHECKS as CONTRACT_CHECKS,
    RepositoryFactory as RepositoryFactory,
    check_output_repository as check_output_repository,
)

__all__ = [
    # output repositories (issue 5)
    "CONTRACT_CHECKS",
    "RepositoryFactory",
    "check_output_repository",
]
