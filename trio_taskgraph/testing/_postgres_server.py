"""
A throwaway PostgreSQL server for tests and benchmarks (issue 11).

`throwaway_postgres()` runs ``initdb`` and ``pg_ctl`` in a fresh temp folder and yields a
`PostgresServer` whose `dsn` reaches it. The server:

- listens on a Unix socket in that folder only (``listen_addresses = ''``), so it never
  touches the network and never clashes with another server's port;
- trusts local connections as the superuser ``postgres`` (nobody else can reach the socket
  folder's server unless they can reach the folder);
- runs as the current user, or, when that is root (``initdb`` refuses to run as root, as CI
  does), as an unprivileged user (``nobody`` by default): the folder is handed to that user
  and the server binaries run with its uid and gid and no supplementary groups;
- is stopped with ``pg_ctl stop -m fast`` when the block exits (killed through the pid in
  its ``postmaster.pid`` if that fails), and the folder is removed.

The binaries are looked up on ``PATH`` and then in ``/usr/lib/postgresql/<version>/bin``
(where Debian's ``postgresql`` package puts them). Where they are missing, `RepositoryError`
says how to install them: never a silent skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import attrs

from .._errors import RepositoryError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "POSTGRES_INSTALL_ADVICE",
    "TEST_SETTINGS",
    "PostgresServer",
    "find_postgres_bin",
    "throwaway_postgres",
]

#: What to tell someone whose machine has no PostgreSQL server binaries.
POSTGRES_INSTALL_ADVICE: Final = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH or in "
    "/usr/lib/postgresql/*/bin. Install them with `apt-get install postgresql` (Debian and "
    "Ubuntu; `make test` does this itself when run as root), or put a PostgreSQL bin folder "
    "on PATH. The PostgreSQL tests need them; they are never skipped."
)

#: Settings that make a throwaway server fast and lose nothing a test cares about: a crash
#: of the machine loses the server's data, which a throwaway server does not keep anyway.
TEST_SETTINGS: Final[Mapping[str, str]] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}

_UNPRIVILEGED_USER: Final = "nobody"
_PORT: Final = 5432  # the socket lives in a private folder: no port can clash


@final
@attrs.frozen(kw_only=True)
class PostgresServer:
    """
    A running throwaway server.

    Attributes:
        socket_dir: the folder holding its Unix socket.
        port: the port number in the socket's name (``.s.PGSQL.<port>``).
        data_dir: its data folder.
        user: the superuser to connect as.
    """

    socket_dir: Path
    port: int
    data_dir: Path
    user: str = "postgres"

    def dsn_for(self, dbname: str) -> str:
        """A libpq connection string for database ``dbname`` as the superuser."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", dbname):
            raise ValueError(f"use a plain database name, not {dbname!r}")
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname={dbname}"

    @property
    def dsn(self) -> str:
        """A libpq connection string for the ``postgres`` database as the superuser."""
        return self.dsn_for("postgres")


def _has_server(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def find_postgres_bin() -> Path | None:
    """
    The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    ``PATH`` wins (symlinks are followed to the real folder); then the newest
    ``/usr/lib/postgresql/<version>/bin``.
    """
    found = shutil.which("pg_ctl")
    if found is not None:
        folder = Path(found).resolve().parent
        if _has_server(folder):
            return folder
    versions = [
        (int(folder.parent.name), folder)
        for folder in Path("/usr/lib/postgresql").glob("*/bin")
        if folder.parent.name.isdigit() and _has_server(folder)
    ]
    return max(versions)[1] if versions else None


@attrs.define(eq=False)
class _Runner:
    """Runs the server binaries as the right user."""

    bindir: Path
    home: Path
    uid: int | None = None
    gid: int | None = None

    def run(self, *args: str, timeout: float = 120.0) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        env = {**os.environ, "HOME": str(self.home), "LC_ALL": "C"}
        done = subprocess.run(
            command,
            cwd=self.home,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            user=self.uid,
            group=self.gid,
            extra_groups=None if self.uid is None else [],
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RepositoryError(f"{args[0]} failed ({done.returncode}): {output}")


def _kill_postmaster(data_dir: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def throwaway_postgres(
    *,
    settings: Mapping[str, str] = TEST_SETTINGS,
    run_as: str = _UNPRIVILEGED_USER,
    base_dir: str | os.PathLike[str] | None = None,
) -> Iterator[PostgresServer]:
    """
    Run a throwaway PostgreSQL server for the duration of the block.

    Args:
        settings: extra ``postgresql.conf`` settings (default: `TEST_SETTINGS`, no fsync).
        run_as: the user to run the server as when this process is root.
        base_dir: where to make the temp folder (default: the system temp folder).

    Yields:
        The running server.

    Raises:
        RepositoryError: the binaries are missing (the message says how to install them),
            or ``initdb``/``pg_ctl`` failed (the message holds their output).
    """
    bindir = find_postgres_bin()
    if bindir is None:
        raise RepositoryError(POSTGRES_INSTALL_ADVICE)
    root = Path(tempfile.mkdtemp(prefix="trio-taskgraph-pg-", dir=base_dir))
    data_dir = root / "data"
    socket_dir = root / "sock"
    runner = _Runner(bindir=bindir, home=root)
    started = False
    try:
        socket_dir.mkdir()
        if os.geteuid() == 0:
            account = pwd.getpwnam(run_as)
            runner.uid, runner.gid = account.pw_uid, account.pw_gid
            for path in (root, socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
            # The user must reach the folder: walk up and check every parent is searchable.
            if not all(os.stat(p).st_mode & 0o001 for p in root.parents):
                raise RepositoryError(
                    f"{root.parent} is not searchable by {run_as!r}: pass base_dir"
                )
        runner.run(
            "initdb",
            "--pgdata",
            str(data_dir),
            "--username",
            "postgres",
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        lines = [
            "listen_addresses = ''",
            f"unix_socket_directories = '{socket_dir}'",
            f"port = {_PORT}",
            *(f"{name} = '{value}'" for name, value in settings.items()),
        ]
        with open(data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# throwaway_postgres\n" + "\n".join(lines) + "\n")
        started = True
        runner.run(
            "pg_ctl", "start", "--pgdata", str(data_dir), "--log", str(root / "log"), "-w",
            "-t", "60",
        )  # fmt: skip
        yield PostgresServer(socket_dir=socket_dir, port=_PORT, data_dir=data_dir)
    finally:
        try:
            if started:
                try:
                    runner.run("pg_ctl", "stop", "--pgdata", str(data_dir), "-m", "fast", "-w")
                except (RepositoryError, subprocess.TimeoutExpired):
                    _kill_postmaster(data_dir)
        finally:
            shutil.rmtree(root, ignore_errors=True)
