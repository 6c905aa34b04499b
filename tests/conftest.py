"""
Shared pytest set-up: hypothesis profiles chosen by ``HYPOTHESIS_PROFILE``.

- ``ci``: deterministic (derandomized), bounded examples, no deadline: what `make test` runs.
- ``dev``: the default for local runs; random, a few more examples.
- ``fuzz``: many examples, for long local runs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The throwaway PostgreSQL server fixtures (issue 11): started only by tests that ask.
pytest_plugins = ["tests.postgres_fixtures"]
