"""
``python -m trio_taskgraph demo`` end to end at a small size: a cache server child process,
a fresh run, a cache-hit replay and a run cancelled halfway that leaves nothing behind.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from trio_taskgraph._cli import main


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo's temp folder goes under ``tmp_path`` (so a leftover is seen, and removed)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_demo_at_8mib_shows_the_ref_row_the_peaks_and_a_clean_cancel(
    private_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    S9-5 (S6-42, S6-45, S6-49, S2-3; seed M-6): the row holds a ref, the edge stays within its
    budget, the hit replays the stored bytes, and the cancelled run leaves no temp file, no
    orphan blob, no parked sender or receiver and no task.
    """
    assert main(["demo", "--size", "8MiB", "--budget", "2MiB"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # rich wraps long lines at 80 columns
    assert "output row of n1, as stored" in flat
    row = re.search(r"as stored \((\d+) bytes for 8 MiB\)", flat)
    assert row is not None
    assert int(row.group(1)) < 1024  # 8 MiB of output, a row under 1 KiB: it holds a ref
    assert "CacheRef(ref='cache://" in flat
    assert "size=8388608" in flat
    peaks = re.findall(r"peak buffered bytes on the edge: \S+ \S+ \((\d+) bytes\), within", flat)
    assert len(peaks) == 2
    assert all(int(p) <= 2 * 1024 * 1024 + 1024 * 1024 for p in peaks)  # S2-1
    assert flat.count("peak RSS: this process") == 2
    assert "cache server buffered at most" in flat
    assert "cache hit: yes; demo.digest executed 0 times" in flat
    assert "sha256 matches run 1" in flat
    assert "cancelled at 4 MiB of 8 MiB" in flat
    for check in (
        "ok no temp file in the cache folder",
        "ok no orphan blob",
        "ok no new row",
        "ok no parked sender or receiver on the edge (statistics(): 0 senders, 0 receivers",
        "ok no task left",
        "clean cancel: ok",
        "demo: ok",
    ):
        assert check in flat, check
    assert "FAILED" not in flat
    assert list(private_tmp.iterdir()) == []  # the demo's folder is gone


def test_demo_streams_a_file_and_keeps_the_cache_for_cache_ls(
    private_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-5, S9-2: --input FILE, --keep, --in-process; the kept folder is one `cache ls` reads."""
    source = private_tmp / "input.bin"
    source.write_bytes(bytes(range(256)) * 12_000)  # 3 MB
    assert main(["demo", "--input", str(source), "--keep", "--in-process"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "2.93 MiB read from" in flat
    assert "clean cancel: ok" in flat
    kept = re.search(r"kept (\S+): look inside", flat)
    assert kept is not None
    folder = Path(kept.group(1))
    assert folder.is_relative_to(private_tmp)
    assert main(["cache", "ls", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert "trio_taskgraph.demo.digest" in listing
    assert "(3072000 bytes)" in listing  # the ref and its size
    assert listing.splitlines()[-1].startswith("1 rows; 1 blobs")


@pytest.mark.parametrize("argv", [["--size", "8XB"], ["--size", "0"], ["--budget", "-1"]])
def test_demo_refuses_bad_sizes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert "size" in capsys.readouterr().err


def test_demo_refuses_a_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--input", str(tmp_path / "missing.bin")]) == 2
    assert "no such file" in capsys.readouterr().err
