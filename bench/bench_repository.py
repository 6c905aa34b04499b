"""
Benchmark: streaming into and out of `FsOutputRepository` against plain file I/O.

Write: 1 GiB in 64 KiB chunks, sent by a producer task through a bounded trio memory channel
(128 chunks = 8 MiB, standing in for the runner's byte-budget channel) into
`save_output_stream`, versus the same chunks written with plain ``open``/``write``/``fsync``/
``rename``/folder fsync in one worker thread. Target: >= 0.8x.

RSS: a child process streams the same 1 GiB into the repository and reports how much its
peak RSS (VmHWM) grew while streaming. Target: < 32 MiB.

Read: ``open_output_stream_by_ref`` drained by a trio task versus a plain ``f.read(1 MiB)``
loop in a worker thread, both from the page cache. Target: >= 0.8x.

Runs alternate (ours, plain, ours, plain, ...) and report medians.

    python bench/bench_repository.py [--quick] [--dir DIR] [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from _repo_bench import CHUNK, chunk, ours_read, ours_write, peak_rss_kib, stream_into

from trio_taskgraph import FsOutputRepository


def _plain_write_sync(folder: Path, total: int) -> None:
    tmp = folder / "plain.tmp"
    with open(tmp, "wb") as f:
        for i in range(total // CHUNK):
            f.write(chunk(i))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, folder / "plain.bin")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def plain_write(folder: Path, total: int) -> float:
    start = time.perf_counter()
    await trio.to_thread.run_sync(_plain_write_sync, folder, total)
    return time.perf_counter() - start


def _plain_read_sync(path: Path) -> int:
    got = 0
    with open(path, "rb") as f:
        while piece := f.read(1024 * 1024):
            got += len(piece)
    return got


async def plain_read(path: Path) -> float:
    start = time.perf_counter()
    await trio.to_thread.run_sync(_plain_read_sync, path)
    return time.perf_counter() - start


def rss_child(folder: str, total: int) -> None:
    async def main() -> None:
        repo = FsOutputRepository(folder)
        await repo.stats()  # open first: the folder and SQLite are not streaming costs
        before = peak_rss_kib(reset=True)
        ref = await stream_into(repo, total)
        after = peak_rss_kib()
        await repo.delete_output_by_ref(ref)
        await repo.aclose()
        print(json.dumps({"growth_kib": after - before}))

    trio.run(main)


def measure_rss(folder: Path, total: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(folder / "rss"), str(total)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)["growth_kib"]) / 1024


async def run(total: int, pairs: int, folder: Path) -> None:
    repo = FsOutputRepository(folder / "repo")
    writes: list[tuple[float, float]] = []
    reads: list[tuple[float, float]] = []
    for _ in range(pairs):
        ours_s, ref = await ours_write(repo, total)
        plain_s = await plain_write(folder, total)
        writes.append((ours_s, plain_s))
        ours_r = await ours_read(repo, ref)
        plain_r = await plain_read(folder / "plain.bin")
        reads.append((ours_r, plain_r))
        await repo.delete_output_by_ref(ref)
        os.unlink(folder / "plain.bin")
    await repo.aclose()
    rss = measure_rss(folder, total)

    gib = total / 2**30

    def row(name: str, pairs_: list[tuple[float, float]], target: float) -> None:
        ours = statistics.median(p[0] for p in pairs_)
        plain = statistics.median(p[1] for p in pairs_)
        ratio = statistics.median(p[1] / p[0] for p in pairs_)
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(
            f"{name:<6} {gib / ours:>9.2f} {gib / plain:>9.2f} {ratio:>7.2f}x"
            f"  (target >= {target}x: {verdict})"
        )
        peer = "open/write/fsync/rename in a thread" if name == "write" else "f.read(1 MiB) loop"
        results.append(
            f'RESULT name=repository/{name} ratio={ratio:.3f} target=>={target} peer="{peer}"'
        )

    results: list[str] = []

    print(f"{total / 2**20:.0f} MiB in {CHUNK // 1024} KiB chunks, {pairs} alternating pairs")
    print(f"{'':<6} {'ours GiB/s':>9} {'plain GiB/s':>9} {'ratio':>8}")
    row("write", writes, 0.8)
    row("read", reads, 0.8)
    verdict = "ok" if rss < 32 else "ABOVE TARGET"
    print(f"peak RSS growth while streaming: {rss:.1f} MiB (target < 32 MiB: {verdict})")
    for line in results:
        print(line)
    print(
        f"RESULT name=repository/rss_growth ratio={rss:.1f} target=<=32 unit=MiB "
        f'peer="absolute: peak RSS growth streaming {gib:.3g} GiB"'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 3 pairs")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--rss-child", nargs=2, metavar=("FOLDER", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
        return
    total = (128 if args.quick else 1024) * 2**20
    pairs = args.pairs or (3 if args.quick else 5)
    folder = Path(tempfile.mkdtemp(prefix="bench_repository_", dir=args.dir))
    try:
        trio.run(run, total, pairs, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
