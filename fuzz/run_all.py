"""
Run every ``fuzz/fuzz_*.py`` harness as a subprocess and summarise.

Each harness gets ``--seconds $FUZZ_SECONDS`` (default 60). Prints one row per harness
(status, inputs run, wall time) and exits non-zero if any harness found something (a
non-zero exit), or did not report ``inputs run: N``.

    FUZZ_SECONDS=10 python fuzz/run_all.py [--jobs 2] [names...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
INPUTS = re.compile(r"inputs run:\s*(\d+)")
# libFuzzer's own summary, for an atheris harness whose count was lost on its way out.
LIBFUZZER_DONE = re.compile(r"^Done (\d+) runs in", re.MULTILINE)


def _run_one(path: Path, seconds: float) -> tuple[str, str, int | None, float, str]:
    """Run one harness; return (name, status, inputs run, wall seconds, output tail)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(path), "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
        timeout=seconds * 3 + 120,
        check=False,
    )
    elapsed = time.monotonic() - start
    match = INPUTS.search(proc.stdout) or LIBFUZZER_DONE.search(proc.stderr)
    inputs = int(match.group(1)) if match else None
    if proc.returncode != 0:
        status = "FINDING"
    elif inputs is None:
        status = "NO COUNT"
    else:
        status = "ok"
    return path.stem, status, inputs, elapsed, (proc.stdout + proc.stderr)[-4000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every fuzz harness")
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "60"))
    )
    parser.add_argument("--jobs", type=int, default=1, help="harnesses run at once")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the harnesses are")
    parser.add_argument("names", nargs="*", help="harness names (default: all)")
    args = parser.parse_args(argv)
    paths = sorted(args.dir.glob("fuzz_*.py"))
    if args.names:
        wanted = {n if n.startswith("fuzz_") else f"fuzz_{n}" for n in args.names}
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        print("no fuzz harnesses found")
        return 1
    print(f"{len(paths)} harness(es), {args.seconds:g} s each, {args.jobs} at a time")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda p: _run_one(p, args.seconds), paths))
    print(f"{'harness':<24} {'status':<9} {'inputs':>12} {'seconds':>8}")
    failed = False
    for name, status, inputs, elapsed, _ in results:
        shown = "-" if inputs is None else f"{inputs:,}"
        print(f"{name:<24} {status:<9} {shown:>12} {elapsed:>8.1f}")
        failed |= status != "ok"
    for name, status, _, _, output in results:
        if status != "ok":
            print(f"\n--- {name}: {status} ---\n{output}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
