"""
The command line: `python -m trio_taskgraph demo` runs a real self-check.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from trio_taskgraph._cli import main


def test_demo_self_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--self-check"]) == 0
    out = capsys.readouterr().out
    assert "self-check: ok" in out
    assert "typo 'Blob' refused" in out


def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trio_taskgraph", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert proc.stdout.strip()


def test_cache_server_command_serves_until_sigterm(tmp_path: Path) -> None:
    """S5-12, S5-13: ``python -m trio_taskgraph cache-server`` prints READY, stops on SIGTERM."""
    folder = tempfile.mkdtemp(prefix="tg-", dir="/tmp")
    sock = os.path.join(folder, "s")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_taskgraph",
                "cache-server",
                "--root",
                str(tmp_path / "r"),
                "--socket",
                sock,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == f"READY {sock}"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
        assert not os.path.exists(sock)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_cache_server_command_reports_a_bad_socket_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S5-13: a socket folder others can enter is refused with a clear message."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    assert main(["cache-server", "--root", str(tmp_path / "r"), "--socket", str(shared / "s")]) == 2
    assert "0700" in capsys.readouterr().err
