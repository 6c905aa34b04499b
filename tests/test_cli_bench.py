"""
S9-4, ``python -m trio_taskgraph bench``: runs ``bench/bench_*.py`` and prints one table of ratios,
each with its peer. Scripts here are tiny stand-ins; the real ones are only checked to print
the machine-readable line (they take minutes, so `make test` never runs them).
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path

import pytest

from trio_taskgraph._cli import main
from trio_taskgraph._cli_bench import (
    BenchResult,
    format_markdown,
    format_table,
    parse_result_line,
    run_benches,
)

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_parse_result_line() -> None:
    line = 'RESULT name=x/64KiB ratio=0.97 target=>=0.95 peer="trio memory channel"'
    assert parse_result_line(line) == BenchResult(
        name="x/64KiB", ratio=0.97, target=">=0.95", peer="trio memory channel"
    )
    assert parse_result_line("x/64KiB 0.97") is None
    rss = parse_result_line("RESULT name=r/rss ratio=12.5 target=<=32 unit=MiB peer=absolute")
    assert rss is not None
    assert (rss.unit, rss.ok) == ("MiB", True)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("RESULT name=a ratio=1 target=>=1", "lacks peer"),
        ("RESULT name=a ratio=x target=>=1 peer=p", "ratio must be a number"),
        ("RESULT name=a ratio=1 target=1 peer=p", "target must be"),
        ("RESULT name=a ratio=1 target=>=1 peer=p junk", "without '='"),
    ],
)
def test_malformed_result_lines_say_what_is_wrong(line: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_result_line(line)


def test_ok_follows_the_target_direction() -> None:
    assert BenchResult(name="a", ratio=0.96, target=">=0.95", peer="p").ok
    assert not BenchResult(name="a", ratio=0.94, target=">=0.95", peer="p").ok
    assert BenchResult(name="a", ratio=1.1, target="<=1.2", peer="p").ok
    assert not BenchResult(name="a", ratio=1.3, target="<=1.2", peer="p").ok
    assert not BenchResult(name="a", ratio=math.nan, target="", peer="failed").ok


def _script(folder: Path, name: str, body: str) -> None:
    (folder / f"bench_{name}.py").write_text(textwrap.dedent(body))


def test_runs_every_script_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _script(
        tmp_path,
        "good",
        """
        import sys
        print("quick" if "--quick" in sys.argv else "full")
        print('RESULT name=good/a ratio=0.97 target=>=0.95 peer="the peer"')
        print('RESULT name=good/b ratio=1.5 target=<=1.2 peer=other')
        """,
    )
    _script(tmp_path, "silent", "print('a table, but no result line')\n")
    _script(tmp_path, "crash", "raise SystemExit(3)\n")
    _script(
        tmp_path,
        "missed",
        "print('RESULT name=missed ratio=0.5 target=>=0.9 peer=p')\nraise SystemExit(1)\n",
    )
    (tmp_path / "helper.py").write_text("raise SystemExit('not a benchmark')\n")
    assert main(["bench", "--quick", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "quick" in out
    table = out[out.index("ratios measured") :].splitlines()
    rows = {line.split()[0]: line for line in table[2:]}
    assert re.search(r"0\.970\s+>=0\.95\s+yes\s+the peer$", rows["good/a"])
    assert re.search(r"1\.500\s+<=1\.2\s+NO\s+other$", rows["good/b"])
    assert rows["silent"].endswith("printed no RESULT line")
    assert rows["crash"].endswith("exited with 3")
    assert re.search(r"0\.500\s+>=0\.9\s+NO\s+p$", rows["missed"])
    assert "exited" not in rows["missed"]  # a missed target is not a failed script
    assert "helper" not in out


def test_only_runs_the_named_scripts(tmp_path: Path) -> None:
    _script(tmp_path, "one", "print('RESULT name=one ratio=1 target=>=1 peer=p')\n")
    _script(tmp_path, "two", "raise SystemExit(1)\n")
    results = run_benches(tmp_path, only=["one"], out=io.StringIO())
    assert [r.name for r in results] == ["one"]


def test_table_shows_absolute_figures_with_their_unit() -> None:
    results = [
        BenchResult(name="repo/rss", ratio=12.5, target="<=32", peer="absolute", unit="MiB"),
        BenchResult(name="chan", ratio=0.5, target=">=0.95", peer="trio"),
    ]
    lines = format_table(results)
    assert re.search(r"12\.5 MiB\s+<=32 MiB\s+yes\s+absolute$", lines[1])
    assert format_markdown(results)[2:] == [
        "| `repo/rss` | 12.5 MiB | ≤ 32 MiB | yes | absolute |",
        "| `chan` | 0.500 | ≥ 0.95 | **no** | trio |",
    ]


@pytest.mark.parametrize("script", sorted(BENCH.glob("bench_*.py")), ids=lambda p: p.stem)
def test_every_bench_script_prints_a_result_line(script: Path) -> None:
    """The convention `bench` relies on: each script prints ``RESULT name=... peer=...``."""
    source = script.read_text()
    assert "RESULT name=" in source, f"{script.name} prints no RESULT line"
    assert "peer=" in source
    assert "--quick" in source
