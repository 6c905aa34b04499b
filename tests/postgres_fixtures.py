"""
Fixtures for a throwaway PostgreSQL server (issue 11), loaded by ``tests/conftest.py``.

- ``postgres_server`` (session): one server, started the first time a test asks for it
  (``initdb`` + ``pg_ctl`` in a temp folder, Unix socket only, as ``nobody`` when the tests
  run as root) and stopped with ``pg_ctl stop -m fast`` at the end of the session, its
  folder removed. Where the server binaries or psycopg are missing, every test that needs
  it fails with the install advice: never a skip.
- ``postgres_databases`` (function): makes fresh, empty databases on that server
  (``make()`` returns a DSN) and drops them, with any connection left, after the test.
- ``postgres_dsn`` (function): one fresh database.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from trio_taskgraph import RepositoryError
from trio_taskgraph.testing._postgres_server import PostgresServer, throwaway_postgres

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the whole session."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail(
            "psycopg is not installed: `pip install -e '.[postgres]'` (make test does it)",
            pytrace=False,
        )
    server_cm = throwaway_postgres()
    try:
        server = server_cm.__enter__()
    except RepositoryError as exc:
        pytest.fail(f"cannot start a throwaway PostgreSQL server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server_cm.__exit__(None, None, None)


def _admin(server: PostgresServer, sql: str) -> None:
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(sql.encode())


@pytest.fixture
def postgres_databases(postgres_server: PostgresServer) -> Iterator[Callable[[], str]]:
    """``make()`` creates a fresh database and returns its DSN; all are dropped after."""
    made: list[str] = []

    def make() -> str:
        name = f"t{next(_names)}"
        _admin(postgres_server, f"CREATE DATABASE {name}")
        made.append(name)
        return postgres_server.dsn_for(name)

    yield make
    for name in made:
        _admin(postgres_server, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def postgres_dsn(postgres_databases: Callable[[], str]) -> str:
    """The DSN of one fresh, empty database."""
    return postgres_databases()
