"""
``python -m trio_taskgraph bench [--quick]`` (spec/S9-cli-demo-docs.md, S9-4): run every
``bench/bench_*.py`` script, one after the other, and print one table of the ratios they
report, each with the peer it is measured against.

Each script prints its own table, then one machine-readable line per figure it judges::

    RESULT name=byte_channel/64KiB ratio=0.97 target=>=0.95 peer="trio.open_memory_channel"

- ``name``: ``<script>/<scenario>``, no spaces;
- ``ratio``: our figure over the peer's, measured in the same run (throughput: higher is
  better; cost or time: lower is better, which the target's operator says);
- ``target``: ``>=X`` or ``<=X``;
- ``peer``: what the ratio is measured against (quoted when it has spaces);
- ``unit`` (optional): the figure is an absolute value in this unit (e.g. ``MiB`` of RSS
  growth), not a ratio; the target applies to it the same way.

The line is split with `shlex`, so quoting follows shell rules. A script that prints no
``RESULT`` line (whatever its exit code) or times out shows as a failed row, and the command
then exits 1; a script may exit 1 after its ``RESULT`` lines to flag a missed target (the
table shows it).
"""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO, final

import attrs

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "BenchResult",
    "find_bench_dir",
    "format_markdown",
    "format_table",
    "parse_result_line",
    "run_bench_command",
    "run_benches",
]

RESULT_PREFIX: Final = "RESULT "


@final
@attrs.frozen(kw_only=True)
class BenchResult:
    """
    One figure a benchmark script reported.

    Attributes:
        name: ``<script>/<scenario>``.
        ratio: ours over the peer's, in the same run; NaN when the script failed.
        target: ``">=0.95"`` style, or ``""`` when the script failed.
        peer: what the ratio is measured against (or why the script failed).
        unit: ``""`` for a ratio, else the unit of an absolute figure.
    """

    name: str
    ratio: float
    target: str
    peer: str
    unit: str = ""

    @property
    def ok(self) -> bool:
        """Whether the ratio meets the target."""
        if math.isnan(self.ratio) or len(self.target) < 3:
            return False
        op, bound = self.target[:2], float(self.target[2:])
        return self.ratio >= bound if op == ">=" else self.ratio <= bound


def parse_result_line(line: str) -> BenchResult | None:
    """
    Parse a ``RESULT ...`` line; None for any other line.

    Raises:
        ValueError: the line starts with ``RESULT`` but is malformed (says which field).
    """
    if not line.startswith(RESULT_PREFIX):
        return None
    fields: dict[str, str] = {}
    for token in shlex.split(line[len(RESULT_PREFIX) :]):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"RESULT field without '=': {token!r}")
        fields[key] = value
    missing = [k for k in ("name", "ratio", "target", "peer") if k not in fields]
    if missing:
        raise ValueError(f"RESULT line lacks {', '.join(missing)}: {line.strip()!r}")
    target = fields["target"]
    if target[:2] not in (">=", "<=") or not _is_number(target[2:]):
        raise ValueError(f"RESULT target must be '>=X' or '<=X', got {target!r}")
    if not _is_number(fields["ratio"]):
        raise ValueError(f"RESULT ratio must be a number, got {fields['ratio']!r}")
    return BenchResult(
        name=fields["name"],
        ratio=float(fields["ratio"]),
        target=target,
        peer=fields["peer"],
        unit=fields.get("unit", ""),
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def find_bench_dir(explicit: str | None = None) -> Path | None:
    """``explicit``, else ``./bench``, else the ``bench/`` beside the package's checkout."""
    if explicit is not None:
        return Path(explicit)
    for candidate in (Path("bench"), Path(__file__).resolve().parent.parent / "bench"):
        if candidate.is_dir():
            return candidate
    return None


def run_benches(
    bench_dir: Path,
    *,
    quick: bool = False,
    only: Sequence[str] = (),
    timeout: float = 1800.0,
    out: TextIO | None = None,
) -> list[BenchResult]:
    """
    Run ``bench_dir/bench_*.py`` (those named in ``only``, if given) one at a time, echoing
    their output to ``out``; return every figure they reported, in order.
    """
    stream = sys.stdout if out is None else out
    results: list[BenchResult] = []
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if only:
        wanted = set(only)
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        command = [sys.executable, str(script), *(["--quick"] if quick else [])]
        print(f"=== {shlex.join(['python', str(script), *command[2:]])}", file=stream, flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            results.append(BenchResult(name=name, ratio=math.nan, target="", peer="timed out"))
            continue
        stream.write(proc.stdout)
        if proc.stderr:
            stream.write(proc.stderr)
        print(f"({time.monotonic() - start:.1f} s)", file=stream, flush=True)
        found: list[BenchResult] = []
        problem = None
        for line in proc.stdout.splitlines():
            try:
                result = parse_result_line(line)
            except ValueError as exc:
                problem = str(exc)
                continue
            if result is not None:
                found.append(result)
        if not found and problem is None:
            # A script that reported its figures may exit 1 for a missed target: the table
            # already says so. One that reported nothing failed.
            problem = (
                f"exited with {proc.returncode}" if proc.returncode else "printed no RESULT line"
            )
        results.extend(found)
        if problem is not None:
            results.append(BenchResult(name=name, ratio=math.nan, target="", peer=problem))
    return results


def _figure(r: BenchResult) -> str:
    # Three decimals for ratios, so 0.897 against a target of 0.9 does not print as 0.90.
    if math.isnan(r.ratio):
        return "-"
    return f"{r.ratio:.1f} {r.unit}" if r.unit else f"{r.ratio:.3f}"


def format_table(results: Sequence[BenchResult]) -> list[str]:
    """One line per figure: name, ratio, target, met or not, peer."""
    width = max([len("benchmark"), *(len(r.name) for r in results)])
    lines = [f"{'benchmark':<{width}}  {'ratio':>9}  {'target':>9}  {'ok':<3} peer"]
    for r in results:
        unit = f" {r.unit}" if r.unit else ""
        ratio = _figure(r)
        ok = "yes" if r.ok else ("-" if not r.target else "NO")
        lines.append(f"{r.name:<{width}}  {ratio:>9}  {r.target + unit:>9}  {ok:<3} {r.peer}")
    return lines


def format_markdown(results: Sequence[BenchResult]) -> list[str]:
    """The same table in Markdown (what the README shows)."""
    lines = ["| benchmark | ratio | target | met | measured against |", "|---|---:|---:|:-:|---|"]
    for r in results:
        unit = f" {r.unit}" if r.unit else ""
        ratio = _figure(r)
        ok = "yes" if r.ok else ("-" if not r.target else "**no**")
        target = r.target.replace(">=", "≥ ").replace("<=", "≤ ") + unit
        lines.append(f"| `{r.name}` | {ratio} | {target} | {ok} | {r.peer} |")
    return lines


def run_bench_command(
    *,
    quick: bool,
    only: Sequence[str] = (),
    bench_dir: str | None = None,
    markdown: bool = False,
) -> int:
    """The ``bench`` command: run, print the table; exit 1 if a script failed."""
    folder = find_bench_dir(bench_dir)
    if folder is None or not folder.is_dir():
        print("error: no bench/ folder here (run from a checkout, or pass --dir)", file=sys.stderr)
        return 2
    results = run_benches(folder, quick=quick, only=only)
    print()
    print(f"ratios measured in one run against each peer{' (--quick)' if quick else ''}:")
    for line in (format_markdown if markdown else format_table)(results):
        print(line)
    failed = any(not r.target for r in results)
    return 1 if failed or not results else 0
