"""
``python -m trio_taskgraph cache stats|ls|gc|rm DIR`` against a folder made here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import trio_taskgraph as tg
from trio_taskgraph._cli import main


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 4096):
        await trio.lowlevel.checkpoint()
        yield data[i : i + 4096]


async def _fill(folder: Path) -> dict[str, tg.CacheRef]:
    repo = tg.FsOutputRepository(folder)
    try:
        big = await repo.save_output_stream("demo.render", {"w": 1}, "png", _chunks(b"p" * 70_000))
        await repo.save_output("demo.render", {"w": 1}, {"png": big, "n": 1})
        small = await repo.save_output_stream("demo.thumb", {"w": 1}, "png", _chunks(b"t" * 5000))
        await repo.save_output("demo.thumb", {"w": 1}, {"png": small})
        await repo.save_output("text.upper", "abc", {"text": "ABC"})
        orphan = await repo.save_output_stream("demo.lost", 0, "png", _chunks(b"o" * 3000))
        # A crashed writer's temp file (its lock file is gone: the owner is dead).
        (folder / "blobs" / f"{'ab' * 16}.{'cd' * 16}.tmp").write_bytes(b"half")
    finally:
        await repo.aclose()
    return {"big": big, "small": small, "orphan": orphan}


def _blob_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "blobs").iterdir())


def _published(folder: Path) -> list[str]:
    return [n for n in _blob_files(folder) if n.endswith(".blob")]


@pytest.fixture
def cache_dir(tmp_path: Path) -> tuple[Path, dict[str, tg.CacheRef]]:
    folder = tmp_path / "cache"
    refs = trio.run(_fill, folder)
    return folder, refs


def test_ls_shows_rows_with_their_refs_and_sizes(
    cache_dir: tuple[Path, dict[str, tg.CacheRef]], capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-2, S4-4; seed L-1: every ref shows the size its repository recorded."""
    folder, refs = cache_dir
    assert main(["cache", "ls", str(folder)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["task", "type"]
    render = next(line for line in lines if line.startswith("demo.render"))
    assert "68.4 KiB" in render  # blob bytes of the row
    assert f"    {refs['big'].ref}  68.4 KiB (70000 bytes)" in lines
    assert f"    {refs['small'].ref}  4.88 KiB (5000 bytes)" in lines
    assert any(line.startswith("text.upper") for line in lines)
    assert refs["orphan"].ref not in out  # no row holds it
    assert lines[-1] == "3 rows; 3 blobs, 76.2 KiB"


def test_stats_counts_rows_blobs_and_bytes(
    cache_dir: tuple[Path, dict[str, tg.CacheRef]], capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-1: stats opens the folder as one more repository."""
    folder, _ = cache_dir
    assert main(["cache", "stats", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "rows:      3" in out
    assert "blobs:     3 (76.2 KiB, 78000 bytes)" in out


def test_gc_removes_the_orphan_and_the_dead_writers_temp_file(
    cache_dir: tuple[Path, dict[str, tg.CacheRef]], capsys: pytest.CaptureFixture[str]
) -> None:
    """
    S9-3, S4-4, S4-5: gc keeps the blobs rows point to and removes the orphan; a dead writer's temp
    file is gone too (opening the folder already sweeps it).
    """
    folder, _ = cache_dir
    assert main(["cache", "gc", str(folder)]) == 0  # default min age: the orphan is too young
    assert "removed 0 unreferenced blobs (0 B)" in capsys.readouterr().out
    assert not [n for n in _blob_files(folder) if n.endswith(".tmp")]
    assert main(["cache", "gc", str(folder), "--min-age", "0"]) == 0
    assert "removed 1 unreferenced blobs (2.93 KiB)" in capsys.readouterr().out
    assert len(_published(folder)) == 2
    assert main(["cache", "stats", str(folder)]) == 0
    assert "blobs:     2 (73.2 KiB, 75000 bytes)" in capsys.readouterr().out


def test_rm_by_prefix_removes_rows_and_the_blobs_only_they_used(
    cache_dir: tuple[Path, dict[str, tg.CacheRef]], capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-3, S4-4: the prefix's rows go with the blobs only they pointed to."""
    folder, refs = cache_dir
    assert main(["cache", "rm", str(folder), "--prefix", "demo.r"]) == 0
    assert "removed 1 rows" in capsys.readouterr().out
    assert main(["cache", "ls", str(folder)]) == 0
    out = capsys.readouterr().out
    assert refs["big"].ref not in out
    assert "demo.thumb" in out
    assert out.splitlines()[-1] == "2 rows; 2 blobs, 7.81 KiB"


def test_rm_by_ref_and_all(
    cache_dir: tuple[Path, dict[str, tg.CacheRef]], capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-3: one blob by its ref, then every row."""
    folder, refs = cache_dir
    assert main(["cache", "rm", str(folder), "--ref", refs["orphan"].ref]) == 0
    assert f"removed blob {refs['orphan'].ref}" in capsys.readouterr().out
    assert main(["cache", "rm", str(folder), "--all"]) == 0
    assert "removed 3 rows" in capsys.readouterr().out
    assert _published(folder) == []
    assert main(["cache", "rm", str(folder), "--older-than", "0"]) == 0
    assert "removed 0 rows" in capsys.readouterr().out


def test_rm_refuses_a_forged_ref_without_touching_a_file(
    cache_dir: tuple[Path, dict[str, tg.CacheRef]], capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-3, S4-6: a ref this folder did not issue is refused before any file is touched."""
    folder, refs = cache_dir
    before = _published(folder)
    forged = refs["big"].ref[:-4] + "0000"
    assert main(["cache", "rm", str(folder), "--ref", forged]) == 1
    assert "error:" in capsys.readouterr().err
    assert _published(folder) == before


@pytest.mark.parametrize(
    "extra",
    [[], ["--prefix", "a", "--all"], ["--older-than", "-1"]],
)
def test_rm_needs_exactly_one_valid_selector(
    cache_dir: tuple[Path, dict[str, tg.CacheRef]],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
) -> None:
    """S9-3: none or several selectors (or a negative age) remove nothing."""
    folder, _ = cache_dir
    assert main(["cache", "rm", str(folder), *extra]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["cache", "stats", str(folder)]) == 0
    assert "rows:      3" in capsys.readouterr().out


def test_a_folder_without_a_repository_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-1: a cache command never makes a cache."""
    missing = tmp_path / "nothing"
    assert main(["cache", "ls", str(missing)]) == 2
    assert "not a cache folder" in capsys.readouterr().err
    assert not missing.exists()


def test_other_namespaces_are_listed_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S9-2, S4-7: other namespaces are not listed unless asked for."""

    async def fill() -> None:
        repo = tg.FsOutputRepository(tmp_path / "c", namespace="tenant-a")
        await repo.save_output("only.here", 1, {"v": 1})
        await repo.aclose()

    trio.run(fill)
    assert main(["cache", "ls", str(tmp_path / "c")]) == 0
    assert "only.here" not in capsys.readouterr().out
    assert main(["cache", "ls", str(tmp_path / "c"), "--namespace", "tenant-a"]) == 0
    assert "only.here" in capsys.readouterr().out


def test_rm_older_than_keeps_a_blob_a_newer_row_points_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    S9-3, S4-4; seed M-5: ``cache rm --older-than`` removes old rows, but a blob a newer row still
    points to stays (the seed pruned blobs by age alone).
    """
    folder = tmp_path / "c"

    async def fill() -> tg.CacheRef:
        old = tg.FsOutputRepository(folder, clock=lambda: 1000.0)  # long ago
        try:
            ref = await old.save_output_stream("t.old", 1, "p", _chunks(b"s" * 5000))
            await old.save_output("t.old", 1, {"p": ref})
            await old.save_output("t.gone", 1, {"v": 1})
        finally:
            await old.aclose()
        new = tg.FsOutputRepository(folder)  # now
        try:
            await new.save_output("t.new", 1, {"p": ref})  # shares the old blob
        finally:
            await new.aclose()
        return ref

    ref = trio.run(fill)
    assert main(["cache", "rm", str(folder), "--older-than", "3600"]) == 0
    assert "removed 2 rows" in capsys.readouterr().out
    assert main(["cache", "ls", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "t.old" not in out
    assert f"    {ref.ref}  4.88 KiB (5000 bytes)" in out  # kept: t.new points to it
    assert out.splitlines()[-1] == "1 rows; 1 blobs, 4.88 KiB"
