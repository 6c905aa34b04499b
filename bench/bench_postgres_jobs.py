"""
Benchmark: 10,000 tiny jobs through 2 worker processes of `PostgresJobStore` versus a bare
``SKIP LOCKED`` claim loop doing the same updates (issue 11; target >= 0.7x).

Ours: two ``python -m trio_taskgraph worker --workers 4`` processes (the real CLI, the real
queue: claim under a lease, run the task through the runner, outcome written by the
write-behind flusher, NOTIFY, lease renewal). Bare: two processes with 4 threads each, every
thread a plain psycopg loop: ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT
1) RETURNING inputs``, commit, decode the inputs, ``UPDATE ... SET state = 'completed',
output = ...``, commit; it sleeps 1 ms when it finds nothing.

Each run: a fresh database, the workers started and ready, then 10,000 job rows inserted in
one transaction (the same rows and the same NOTIFY for both sides); the clock runs from that
commit until every row is ``completed`` (polled every 5 ms). Runs alternate (ours, bare, ...);
medians; jobs/s printed for both. Against one throwaway server (fsync off, as in
``bench_postgres.py``), with ``pg_stat_statements`` loaded: besides the wall clock, each side's
statements per job (every statement is one round trip for the bare loop; ours sends a claim
as one statement and a write-behind batch as one pipeline, so its round trips per job are
its claim and batch statements per job), and the CPU its two worker processes used per job
(both noise-free where the wall clock, on a shared 2-core machine, is not).

    python bench/bench_postgres_jobs.py [--quick] [--pairs N] [--jobs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

from trio_taskgraph._core._codec import packb, unpackb
from trio_taskgraph._jobs_postgres import PostgresJobStore, _setup
from trio_taskgraph.testing._postgres_server import TEST_SETTINGS, throwaway_postgres

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.7
PREFETCH = int(os.environ.get("BENCH_PREFETCH", "8"))
_names = itertools.count()

_BARE_CLAIM = """
    UPDATE trio_taskgraph_jobs j SET state = 'running', attempt = j.attempt + 1
    WHERE j.id = (
        SELECT id FROM trio_taskgraph_jobs
        WHERE queue = 'default' AND state = 'pending' AND run_after <= clock_timestamp()
        ORDER BY run_after, seq FOR UPDATE SKIP LOCKED LIMIT 1)
    RETURNING j.id, j.inputs
"""
_BARE_DONE = """
    UPDATE trio_taskgraph_jobs SET state = 'completed', output = %b,
        finished = clock_timestamp() WHERE id = %s
"""


def _bare_thread(dsn: str, stop: threading.Event) -> None:
    with psycopg.connect(dsn) as conn:
        while not stop.is_set():
            row = conn.execute(_BARE_CLAIM).fetchone()
            conn.commit()
            if row is None:
                time.sleep(0.001)
                continue
            inputs = unpackb(bytes(row[1]))
            assert isinstance(inputs, dict)
            conn.execute(_BARE_DONE, (packb({"n": inputs["n"]}), row[0]))
            conn.commit()


def _bare_worker(dsn: str, threads: int) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pool = [threading.Thread(target=_bare_thread, args=(dsn, stop)) for _ in range(threads)]
    for t in pool:
        t.start()
    print("READY", flush=True)
    for t in pool:
        t.join()


def _new_database(admin_dsn: str, server_dsn_for: object) -> str:
    name = f"bench{next(_names)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    assert callable(server_dsn_for)
    dsn = server_dsn_for(name)
    assert isinstance(dsn, str)
    with psycopg.connect(dsn) as conn:
        _setup(conn)
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.commit()
    return dsn


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"READY"), line
    return proc


def _insert_and_time(dsn: str, jobs: int) -> float:
    channel = PostgresJobStore(dsn)._channel
    rows = [(f"job-{uuid.uuid4().hex}", packb({"n": i}), "pgjobs.Tiny") for i in range(jobs)]
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO trio_taskgraph_jobs (id, queue, kind, task_type, inputs, state,"
                " run_after) VALUES (%s, 'default', 'task', %s, %b, 'pending',"
                " clock_timestamp())",
                [(job_id, task_type, inputs) for job_id, inputs, task_type in rows],
            )
        conn.execute("SELECT pg_notify(%s, 'new:')", (channel,))
        conn.commit()
        start = time.perf_counter()
        while True:
            row = conn.execute(
                "SELECT count(*) FROM trio_taskgraph_jobs WHERE state = 'completed'"
            ).fetchone()
            conn.commit()
            assert row is not None
            if row[0] == jobs:
                return time.perf_counter() - start
            time.sleep(0.005)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class _Run:
    seconds: float
    worker_cpu: float  # seconds, both processes
    statements: dict[str, int]  # calls per statement kind (the poll and the inserts excluded)


# First match wins: claims lock with SKIP LOCKED, the flusher's row lock is a plain FOR UPDATE,
# every other UPDATE is an outcome (or a release or lease renewal).
_KINDS = (("claim", "SKIP LOCKED"), ("lock", "FOR UPDATE"), ("update", "UPDATE "))


def _statements(dsn: str) -> dict[str, int]:
    counts = dict.fromkeys(["claim", "update", "lock", "BEGIN", "COMMIT", "other"], 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query, calls FROM pg_stat_statements WHERE dbid ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
    for query, calls in rows:
        text = " ".join(str(query).split())
        if "count(*)" in text or text.startswith("INSERT") or "pg_stat_statements" in text:
            continue
        kind = text if text in ("BEGIN", "COMMIT") else "other"
        for name, marker in _KINDS:
            if marker in text and kind == "other":
                kind = name
        counts[kind] += int(calls)
    return counts


def _run_once(kind: str, dsn: str, jobs: int, workers: int) -> _Run:
    if kind == "ours":
        argv = [
            sys.executable, "-m", "trio_taskgraph", "worker", "--dsn", dsn,
            "--import", "tests.pgjobs_tasks", "--workers", str(workers),
            "--prefetch", str(PREFETCH),
        ]  # fmt: skip
    else:
        argv = [sys.executable, __file__, "--bare-worker", dsn, str(workers)]
    procs = [_start(argv), _start(argv)]
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        cpu = [_cpu_seconds(proc.pid) for proc in procs]
        seconds = _insert_and_time(dsn, jobs)
        used = sum(_cpu_seconds(proc.pid) for proc in procs) - sum(cpu)
        return _Run(seconds=seconds, worker_cpu=used, statements=_statements(dsn))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
            assert proc.stdout is not None
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="1,000 jobs, 1 pair")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4, help="per process (threads for bare)")
    parser.add_argument(
        "--bare-worker", nargs=2, metavar=("DSN", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.bare_worker:
        _bare_worker(args.bare_worker[0], int(args.bare_worker[1]))
        return
    jobs, pairs = (1000, 1) if args.quick else (args.jobs, args.pairs)
    runs: dict[str, list[_Run]] = {"ours": [], "bare": []}
    settings = dict(TEST_SETTINGS, shared_preload_libraries="pg_stat_statements")
    with throwaway_postgres(settings=settings) as server:
        for _ in range(pairs):
            for kind in ("ours", "bare"):
                dsn = _new_database(server.dsn, server.dsn_for)
                runs[kind].append(_run_once(kind, dsn, jobs, args.workers))
    times = {kind: [run.seconds for run in found] for kind, found in runs.items()}
    ours, bare = statistics.median(times["ours"]), statistics.median(times["bare"])
    ratio = bare / ours
    print(
        f"{jobs} tiny jobs, 2 worker processes x {args.workers} (ours: --prefetch {PREFETCH}),"
        f" {pairs} pair(s), medians"
    )
    print(f"{'':38} {'seconds':>8} {'jobs/s':>9}")
    print(f"{'PostgresJobStore workers (CLI)':38} {ours:8.3f} {jobs / ours:9.0f}")
    print(f"{'bare SKIP LOCKED claim loop':38} {bare:8.3f} {jobs / bare:9.0f}")
    print(f"each run (seconds): ours {times['ours']}, bare {times['bare']}")
    for kind, found in runs.items():
        last = found[-1].statements
        per_job = {k: round(v / jobs, 2) for k, v in last.items() if v}
        cpu = statistics.median(run.worker_cpu for run in found) / jobs * 1e6
        print(f"{kind}: statements per job {per_job}; worker CPU {cpu:.0f} us per job")
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"ratio ours/bare throughput: {ratio:.2f}x (target >= {TARGET}x: {verdict})")
    print(
        f"RESULT name=postgres_jobs/throughput ratio={ratio:.3f} target=>={TARGET} "
        'peer="bare SKIP LOCKED claim loop, same updates"'
    )


if __name__ == "__main__":
    main()
