"""
Benchmark: streaming into and out of `PostgresOutputRepository` against bare psycopg.

Write: 1 GiB in 64 KiB chunks, sent by a producer task through a bounded trio memory channel
(128 chunks = 8 MiB, standing in for the runner's byte-budget channel) into
`save_output_stream` (large object + record, one transaction), versus a bare psycopg
large-object write of the same bytes in one worker thread (``lo_create``, ``lo_open``,
``lowrite`` of 4 MiB pieces joined from the same chunks, ``lo_close``, commit). Target:
>= 0.8x. (Writing each 64 KiB chunk with its own ``lowrite`` is reported too, for context.)

Read: ``open_output_stream_by_ref`` drained by a trio task versus a bare ``loread`` loop of
the same chunk size in one worker thread. Reported, no target in the issue.

RSS: a child process streams the same bytes into the repository and reports how much its
peak RSS (VmHWM) grew while streaming.

Everything runs against one throwaway server (``throwaway_postgres``: a temp folder, a Unix
socket, as ``nobody`` when run as root), by default with fsync off so that both sides do the
same server work without this machine's noisy disk in the figures; ``--durable`` turns fsync
(and full-page writes) back on. Runs alternate (ours, bare, ours, bare,
...); medians; after every run the large object is unlinked and ``pg_largeobject``
vacuumed, so each run starts from the same table.

    python bench/bench_postgres.py [--quick] [--pairs N] [--durable]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import psycopg
import trio
from _repo_bench import CHUNK, chunk, ours_read, ours_write, peak_rss_kib, stream_into

from trio_taskgraph import PostgresOutputRepository
from trio_taskgraph.testing._postgres_server import TEST_SETTINGS, throwaway_postgres

PIECE = 4 * 1024 * 1024  # the bare writer's lowrite size (our default write batch)
INV_WRITE, INV_READ = 0x20000, 0x40000
#: Big WAL, so no forced checkpoint mid-run.
WAL_SETTINGS = {"max_wal_size": "8GB", "checkpoint_timeout": "30min"}
#: Default: no fsync, so the figures compare the client paths (ours vs bare) on the same
#: server work instead of this machine's noisy disk; ``--durable`` keeps fsync on.
BENCH_SETTINGS = {**TEST_SETTINGS, **WAL_SETTINGS}


def _bare_write_sync(dsn: str, total: int, piece: int) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT lo_create(0)").fetchone()
        assert row is not None
        oid = int(row[0])
        row = conn.execute("SELECT lo_open(%s, %s)", (oid, INV_WRITE)).fetchone()
        assert row is not None
        fd = int(row[0])
        per_piece = piece // CHUNK
        for first in range(0, total // CHUNK, per_piece):
            last = min(first + per_piece, total // CHUNK)
            data = chunk(first) if last == first + 1 else b"".join(map(chunk, range(first, last)))
            conn.execute("SELECT lowrite(%s, %b)", (fd, data))
        conn.execute("SELECT lo_close(%s)", (fd,))
        conn.commit()
    return oid


async def bare_write(dsn: str, total: int, piece: int) -> tuple[float, int]:
    start = time.perf_counter()
    oid = await trio.to_thread.run_sync(_bare_write_sync, dsn, total, piece)
    return time.perf_counter() - start, oid


def _bare_read_sync(dsn: str, oid: int, piece: int) -> int:
    got = 0
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT lo_open(%s, %s)", (oid, INV_READ)).fetchone()
        assert row is not None
        fd = int(row[0])
        while True:
            row = conn.execute("SELECT loread(%s, %s)", (fd, piece), binary=True).fetchone()
            assert row is not None
            if not row[0]:
                break
            got += len(row[0])
        conn.rollback()
    return got


async def bare_read(dsn: str, oid: int, total: int) -> float:
    start = time.perf_counter()
    got = await trio.to_thread.run_sync(_bare_read_sync, dsn, oid, PIECE)
    assert got == total
    return time.perf_counter() - start


def _reset_sync(dsn: str, oid: int | None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if oid is not None:
            conn.execute("SELECT lo_unlink(%s)", (oid,))
        conn.execute("VACUUM pg_largeobject")
        conn.execute("VACUUM pg_largeobject_metadata")
        conn.execute("CHECKPOINT")


async def reset(dsn: str, oid: int | None = None) -> None:
    await trio.to_thread.run_sync(_reset_sync, dsn, oid)


def rss_child(dsn: str, total: int) -> None:
    async def main() -> None:
        repo = PostgresOutputRepository(dsn)
        await repo.stats()  # connect first: the connection is not a streaming cost
        before = peak_rss_kib(reset=True)
        ref = await stream_into(repo, total)
        after = peak_rss_kib()
        await repo.delete_output_by_ref(ref)
        await repo.aclose()
        print(json.dumps({"growth_kib": after - before}))

    trio.run(main)


def measure_rss(dsn: str, total: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", dsn, str(total)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)["growth_kib"]) / 1024


async def run(dsn: str, total: int, pairs: int) -> None:
    repo = PostgresOutputRepository(dsn, read_chunk_bytes=PIECE)
    await repo.stats()
    await reset(dsn)
    writes: list[tuple[float, float]] = []
    small_writes: list[float] = []
    reads: list[tuple[float, float]] = []
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}

    async def ours() -> tuple[float, float]:
        cpu_start = time.process_time()
        ours_s, ref = await ours_write(repo, total)
        cpu["ours"].append(time.process_time() - cpu_start)
        ours_r = await ours_read(repo, ref)
        await repo.delete_output_by_ref(ref)
        await reset(dsn)
        return ours_s, ours_r

    async def bare() -> tuple[float, float]:
        cpu_start = time.process_time()
        bare_s, oid = await bare_write(dsn, total, PIECE)
        cpu["bare"].append(time.process_time() - cpu_start)
        bare_r = await bare_read(dsn, oid, total)
        await reset(dsn, oid)
        return bare_s, bare_r

    for i in range(pairs):
        # Alternate which side goes first, so neither always follows the other.
        if i % 2 == 0:
            (ours_s, ours_r), (bare_s, bare_r) = await ours(), await bare()
        else:
            (bare_s, bare_r), (ours_s, ours_r) = await bare(), await ours()
        writes.append((ours_s, bare_s))
        reads.append((ours_r, bare_r))
        small_s, oid = await bare_write(dsn, total, CHUNK)
        await reset(dsn, oid)
        small_writes.append(small_s)
    await repo.aclose()
    rss = measure_rss(dsn, total)
    await reset(dsn)

    mib = total / 2**20

    def row(name: str, pairs_: list[tuple[float, float]], target: float | None) -> None:
        ours = statistics.median(p[0] for p in pairs_)
        bare = statistics.median(p[1] for p in pairs_)
        ratio = statistics.median(p[1] / p[0] for p in pairs_)
        if target is None:
            verdict = "(no target)"
        else:
            verdict = f"(target >= {target}x: {'ok' if ratio >= target else 'BELOW TARGET'})"
        print(f"{name:<6} {mib / ours:>10.1f} {mib / bare:>10.1f} {ratio:>7.2f}x  {verdict}")
        print(f"{'':<6} per pair: " + ", ".join(f"{p[1] / p[0]:.2f}x" for p in pairs_))
        if target is not None:
            print(
                f"RESULT name=postgres/{name} ratio={ratio:.3f} target=>={target} "
                'peer="bare psycopg large-object write"'
            )

    print(f"{mib:.0f} MiB in {CHUNK // 1024} KiB chunks, {pairs} alternating pairs, one server")
    print(f"{'':<6} {'ours MiB/s':>10} {'bare MiB/s':>10} {'ratio':>8}")
    row("write", writes, 0.8)
    row("read", reads, None)
    small = statistics.median(small_writes)
    print(f"bare write with one lowrite per 64 KiB chunk: {mib / small:.1f} MiB/s (context)")
    print(f"peak RSS growth while streaming: {rss:.1f} MiB (target < 32 MiB)")
    print(
        f"RESULT name=postgres/rss_growth ratio={rss:.1f} target=<=32 unit=MiB "
        'peer="RSS before the stream"'
    )
    gib = total / 2**30
    print(
        "client CPU per GiB written (this process, all threads): "
        f"ours {statistics.median(cpu['ours']) / gib:.2f} s, "
        f"bare {statistics.median(cpu['bare']) / gib:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 1 pair")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--durable", action="store_true", help="run the server with fsync on")
    parser.add_argument("--rss-child", nargs=2, metavar=("DSN", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
        return
    total = (32 if args.quick else 1024) * 2**20
    pairs = args.pairs or (1 if args.quick else 3)
    settings = WAL_SETTINGS if args.durable else BENCH_SETTINGS
    print("server:", ", ".join(f"{k}={v}" for k, v in settings.items()))
    with throwaway_postgres(settings=settings) as server:
        trio.run(run, server.dsn, total, pairs)


if __name__ == "__main__":
    main()
