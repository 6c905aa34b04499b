"""
The throwaway PostgreSQL server (`trio_taskgraph.testing.throwaway_postgres`, issue 11):
Unix socket only, never as root, stopped and removed at the end, and a clear failure (never a
skip) where PostgreSQL is not installed.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

import pytest

from trio_taskgraph import RepositoryError
from trio_taskgraph.testing import PostgresServer, _postgres_server, throwaway_postgres


def _query(dsn: str, sql: str) -> object:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql.encode()).fetchone()
        assert row is not None
        return row[0]


def test_socket_only_unprivileged_and_removed(postgres_server: PostgresServer) -> None:
    """S4-14 (the throwaway server): no TCP listener, a socket in its own folder, not run
    as root; a second server stops and leaves no folder and no process behind."""
    assert _query(postgres_server.dsn, "SHOW listen_addresses") == ""
    assert _query(postgres_server.dsn, "SHOW unix_socket_directories") == str(
        postgres_server.socket_dir
    )
    owner = postgres_server.data_dir.stat().st_uid
    if os.geteuid() == 0:
        assert owner == pwd.getpwnam("nobody").pw_uid
    else:
        assert owner == os.geteuid()
    with throwaway_postgres(settings={}) as other:
        pid = int((other.data_dir / "postmaster.pid").read_text().split()[0])
        assert _query(other.dsn, "SELECT 1") == 1
        assert _query(other.dsn, "SHOW fsync") == "on"
        root = other.socket_dir.parent
    assert not root.exists()
    # pg_ctl returns once the pid file is gone, which the postmaster removes just before it
    # exits: allow it that last moment (another process, so a bounded poll).
    for _ in range(100):
        if not _running(pid):
            break
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie waiting for its reaper is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_missing_binaries_fail_with_install_advice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """S4-14 (the throwaway server): without PostgreSQL, a RepositoryError that says how to
    install it (the fixture turns it into a failure), and no temp folder is made."""
    monkeypatch.setattr(_postgres_server, "find_postgres_bin", lambda: None)
    with pytest.raises(RepositoryError, match=r"apt-get install postgresql"):
        with throwaway_postgres(base_dir=tmp_path):
            raise AssertionError("started without binaries")
    assert list(tmp_path.iterdir()) == []


def test_finds_debian_binaries_off_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """S4-14 (the throwaway server): Debian keeps the binaries off PATH; they are found."""
    found = _postgres_server.find_postgres_bin()
    assert found is not None
    monkeypatch.setenv("PATH", "/nonexistent")
    again = _postgres_server.find_postgres_bin()
    if Path("/usr/lib/postgresql").is_dir():
        assert again is not None
        assert (again / "initdb").is_file()
