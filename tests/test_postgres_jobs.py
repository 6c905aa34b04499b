"""
`PostgresJobStore` across processes (issue 11; spec S8-14 .. S8-22).

Worker processes are real ``python -m trio_taskgraph worker`` children; the test process
submits (with ``claim=False``, so it never runs a job itself) and watches. The tasks
(``tests/pgjobs_tasks.py``) log ``start``/``end`` lines to a file with ``O_APPEND``; the
log is the start/end record per job that the exactly-once and no-overlap checks read.

Waiting on a child process's log line polls the file (another process cannot wake a trio
task); waiting on jobs uses the handles (LISTEN/NOTIFY), never a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_taskgraph as tg
from tests import pgjobs_tasks as tasks
from tests.polling import wait_until
from trio_taskgraph._core._jobs import JobEvent, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Set as AbstractSet

ROOT = Path(__file__).resolve().parent.parent
LEASE = 1.0
POLL = 0.5


@asynccontextmanager
async def _worker(
    dsn: str, *, workers: int = 4, lease: float = LEASE
) -> AsyncIterator[trio.Process]:
    """A worker process, READY when yielded; SIGTERM (clean stop checked) on exit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [
        sys.executable, "-m", "trio_taskgraph", "worker", "--dsn", dsn,
        "--import", "tests.pgjobs_tasks", "--workers", str(workers),
        "--lease", str(lease), "--poll", str(POLL), "--grace", "5", "--close-timeout", "10",
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "the worker exited before READY"
                line += chunk
        assert line.startswith(b"READY "), line
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(20):
                    await proc.wait()
                if proc.returncode is None:  # pragma: no cover - a hung worker
                    proc.kill()
                    await proc.wait()
                    pytest.fail("the worker did not stop on SIGTERM")
            if proc.stdout is not None:
                await proc.stdout.aclose()


def _submitter(dsn: str) -> tg.PostgresJobStore:
    return tg.PostgresJobStore(dsn, lease_seconds=LEASE, poll_interval=POLL, claim=False)


def _find_line(path: Path, prefix: str) -> str | None:
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
    return None


async def _wait_for_line(path: Path, prefix: str, *, timeout: float = 20) -> str:
    # Another process writes the log: the file is all there is to watch.
    found: list[str] = []

    def seen() -> bool:
        line = _find_line(path, prefix)
        if line is not None:
            found.append(line)
        return line is not None

    await wait_until(seen, f"a {prefix!r} line in {path.name}", timeout=timeout, interval=0.02)
    return found[0]


def _check_runs(path: Path, killed: AbstractSet[str] = frozenset()) -> dict[str, list[str]]:
    """
    Read a start/end log: per job, the pids that ran it to the end. Fails if two runs of a
    job ever overlapped (a second ``start`` before the first run's ``end`` or kill).
    """
    open_runs: dict[str, str] = {}
    finished: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        word, *rest = line.split()
        if word == "killed":
            (pid,) = rest
            for n in [n for n, p in open_runs.items() if p == pid]:
                del open_runs[n]
            continue
        n, pid = rest[0], rest[1]
        if word == "start":
            assert n not in open_runs, f"job {n} started by {pid} while {open_runs[n]} ran it"
            open_runs[n] = pid
        elif word == "end":
            assert open_runs.pop(n) == pid
            finished.setdefault(n, []).append(pid)
    assert not open_runs or set(open_runs.values()) <= killed, open_runs
    return finished


def _rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql.encode()).fetchall())


async def test_many_jobs_two_workers_exactly_once(postgres_dsn: str, tmp_path: Path) -> None:
    """
    S8-16, S8-17: two worker processes and one submitter: 1,000 jobs all complete exactly
    once (one run each, attempt 1 in the table), both workers take part, and no job is ever
    run by two workers at the same time (the start/end log).
    """
    log = tmp_path / "log"
    count = 1000
    store = _submitter(postgres_dsn)
    async with _worker(postgres_dsn) as a, _worker(postgres_dsn) as b:
        async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as queue:
            handles = [
                queue.submit(tasks.Record(), {"n": i, "log": str(log), "sleep": 0})
                for i in range(count)
            ]
            with trio.fail_after(60):
                outputs = [await h.result() for h in handles]
    await store.aclose()
    assert [o["n"] for o in outputs] == list(range(count))
    assert {o["pid"] for o in outputs} == {a.pid, b.pid}
    finished = _check_runs(log)
    assert sorted(finished, key=int) == [str(i) for i in range(count)]
    assert all(len(pids) == 1 for pids in finished.values())
    rows = _rows(
        postgres_dsn, "SELECT state, attempt, count(*) FROM trio_taskgraph_jobs GROUP BY 1, 2"
    )
    assert rows == [("completed", 1, count)]


async def test_killed_worker_job_completes_on_the_other(postgres_dsn: str, tmp_path: Path) -> None:
    """
    S8-17 (at-least-once): SIGKILL the worker running a job: after its lease expires the
    other worker claims it and completes it; the two runs never overlap.
    """
    log = tmp_path / "log"
    store = _submitter(postgres_dsn)
    async with _worker(postgres_dsn, workers=1) as a, _worker(postgres_dsn, workers=1) as b:
        async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as queue:
            handle = queue.submit(tasks.Record(), {"n": 7, "log": str(log), "sleep": 2.0})
            first = await _wait_for_line(log, "start 7 ")
            victim = a if first.split()[2] == str(a.pid) else b
            survivor = b if victim is a else a
            victim.kill()
            await victim.wait()
            with log.open("a") as f:
                f.write(f"killed {victim.pid}\n")
            killed_at = time.monotonic()
            with trio.fail_after(30):
                output = await handle.result()
            assert time.monotonic() - killed_at < 15
    await store.aclose()
    assert output["pid"] == survivor.pid
    finished = _check_runs(log, killed={str(victim.pid)})
    assert finished == {"7": [str(survivor.pid)]}
    assert _rows(postgres_dsn, "SELECT state, attempt FROM trio_taskgraph_jobs") == [
        ("completed", 2)
    ]


async def test_submitted_here_awaited_and_streamed_there(postgres_dsn: str, tmp_path: Path) -> None:
    """
    S8-21: a job submitted in one process (a child that exits at once) is awaited in
    another through ``queue.handle(job_id)``, and its binary output is streamed from the
    shared `PostgresOutputRepository`, in chunks, never materialised by the handle.
    """
    script = (
        "import sys, trio, trio_taskgraph as tg\n"
        "from tests import pgjobs_tasks as t\n"
        "async def main():\n"
        "    store = tg.PostgresJobStore(sys.argv[1], claim=False)\n"
        "    async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as q:\n"
        "        h = q.submit(t.Blocks(), {'blocks': 40})\n"
        "    await store.aclose()\n"
        "    print(h.id)\n"
        "trio.run(main)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    async with _worker(postgres_dsn) as worker:
        done = await trio.run_process(
            [sys.executable, "-c", script, postgres_dsn], cwd=ROOT, env=env, capture_stdout=True
        )
        job_id = done.stdout.decode().strip()
        assert job_id.startswith("job-")
        cache = tg.PostgresOutputRepository(postgres_dsn)
        store = _submitter(postgres_dsn)
        async with tg.open_job_queue(tg.RunConfig(cache=cache), workers=1, store=store) as queue:
            handle = queue.handle(job_id)
            with trio.fail_after(30):
                output = await handle.result()
            assert output["pid"] == worker.pid
            assert isinstance(output["data"], tg.CacheRef)
            assert handle.state == "completed"
            received = 0
            async with handle.open_output_stream() as chunks:
                async for chunk in chunks:
                    for at in range(0, len(chunk), 65536):
                        block = (received + at) // 65536
                        assert chunk[at : at + 65536] == bytes([block % 251]) * 65536
                    received += len(chunk)
            assert received == 40 * 65536
        await store.aclose()
        await cache.aclose()


async def test_cancel_across_processes(postgres_dsn: str, tmp_path: Path) -> None:
    """
    S8-20: ``cancel()`` in the submitting process cancels a job running in a worker
    process (its task sees the cancellation) and a pending job at once; both end
    ``cancelled`` in the table and ``result()`` raises `JobCancelledError`.
    """
    log = tmp_path / "log"
    store = _submitter(postgres_dsn)
    async with _worker(postgres_dsn) as worker:
        async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as queue:
            running = queue.submit(tasks.Forever(), {"log": str(log)})
            later = queue.submit(
                tasks.Forever(), {"log": str(log)}, run_after=trio.current_time() + 3600
            )
            await _wait_for_line(log, "start ")
            running.cancel()
            later.cancel()
            with trio.fail_after(20):
                with pytest.raises(tg.JobCancelledError):
                    await running.result()
                with pytest.raises(tg.JobCancelledError):
                    await later.result()
            await _wait_for_line(log, f"cancelled {worker.pid}")
    await store.aclose()
    assert _rows(postgres_dsn, "SELECT state, count(*) FROM trio_taskgraph_jobs GROUP BY 1") == [
        ("cancelled", 2)
    ]
    assert log.read_text().count("start ") == 1


async def test_run_after_and_retries_across_processes(postgres_dsn: str, tmp_path: Path) -> None:
    """
    S8-19: a job submitted with ``run_after`` (this process's trio clock) does not start in
    the worker process before that moment; S8-2 across processes: a retryable failure is
    retried (by any worker) and the job completes on its second attempt.
    """
    log = tmp_path / "log"
    flaky = tmp_path / "flaky"
    store = _submitter(postgres_dsn)
    async with _worker(postgres_dsn), _worker(postgres_dsn):
        async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as queue:
            submitted = time.time()
            delayed = queue.submit(
                tasks.Record(),
                {"n": 1, "log": str(log), "sleep": 0},
                run_after=trio.current_time() + 1.5,
            )
            retried = queue.submit(tasks.Flaky(), {"log": str(flaky)}, max_retries=2)
            with trio.fail_after(30):
                await delayed.result()
                await retried.result()
            assert retried.state == "completed"
    await store.aclose()
    started = float((await _wait_for_line(log, "start 1 ")).split()[3])
    assert started >= submitted + 1.5
    assert flaky.read_text().count("attempt") == 2
    rows = _rows(postgres_dsn, "SELECT task_type, attempt FROM trio_taskgraph_jobs ORDER BY 1")
    assert rows == [("pgjobs.Flaky", 2), ("pgjobs.Record", 1)]


# --- in one process: the store's seams, park points and fences ------------------------------


def test_store_arguments_are_checked() -> None:
    """The constructor does no I/O and refuses bad arguments at once."""
    with pytest.raises(TypeError):
        tg.PostgresJobStore(b"dbname=x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue"):
        tg.PostgresJobStore("dbname=x", queue="")
    with pytest.raises(ValueError, match="positive"):
        tg.PostgresJobStore("dbname=x", lease_seconds=0)
    store = tg.PostgresJobStore("password=secret dbname=x", queue="q")
    assert "secret" not in repr(store)
    assert store.queue == "q"
    assert store.new_id() != store.new_id()


async def test_graphs_and_unregistered_tasks_are_refused(postgres_dsn: str) -> None:
    """S8-14: a shared store runs tasks by registered type: a graph is refused at submit."""
    store = _submitter(postgres_dsn)
    async with tg.open_job_queue(tg.RunConfig(), workers=1, store=store) as queue:
        with pytest.raises(TypeError, match="graphs"):
            queue.submit(tg.TaskGraph())
    await store.aclose()


async def test_closing_leaves_jobs_to_the_store(postgres_dsn: str, tmp_path: Path) -> None:
    """
    S8-14, S8-15, S8-21: a submit-only queue that closes leaves its jobs pending in the
    table (written by the shielded flush); another queue in this process, whose workers
    claim, runs them and awaits them through `queue.handle`.
    """
    log = tmp_path / "log"
    submitter = _submitter(postgres_dsn)
    async with tg.open_job_queue(tg.RunConfig(), workers=1, store=submitter) as queue:
        ids = [queue.submit(tasks.Record(), {"n": i, "log": str(log)}).id for i in range(3)]
    await submitter.aclose()
    assert _rows(postgres_dsn, "SELECT state, count(*) FROM trio_taskgraph_jobs GROUP BY 1") == [
        ("pending", 3)
    ]
    runner = tg.PostgresJobStore(postgres_dsn, lease_seconds=LEASE, poll_interval=POLL)
    async with tg.open_job_queue(tg.RunConfig(), workers=2, store=runner) as queue:
        with trio.fail_after(20):
            outputs = [await queue.handle(job_id).result() for job_id in ids]
    await runner.aclose()
    assert [o["n"] for o in outputs] == [0, 1, 2]
    assert {o["pid"] for o in outputs} == {os.getpid()}


async def test_cancelled_claim_claims_nothing(postgres_dsn: str, tmp_path: Path) -> None:
    """
    S8-16 park point: a claim parked waiting for work, cancelled, claims nothing: a job
    submitted afterwards is still pending (attempt 0) and the next claim takes it.
    """
    store = tg.PostgresJobStore(postgres_dsn, lease_seconds=LEASE, poll_interval=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.claim)
        while store._lot.statistics().tasks_waiting != 1:
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    record = tg.JobRecord(id=store.new_id(), kind="task", task_type=tasks.Tiny.type)
    store.submit(record, {"n": 1}, RetryPolicy())
    await store.flush()
    assert _rows(postgres_dsn, "SELECT state, attempt FROM trio_taskgraph_jobs") == [("pending", 0)]
    with trio.fail_after(10):
        claimed = await store.claim()
    assert claimed.record.id == record.id
    assert claimed.record.attempt == 1
    assert claimed.inputs == {"n": 1}
    await store.aclose()


async def test_lost_lease_outcome_is_fenced(postgres_dsn: str) -> None:
    """
    S8-17: a worker whose lease expired and whose job another worker claimed cannot write
    its outcome over the new run: the row stays the second claimer's.
    """
    first = tg.PostgresJobStore(postgres_dsn, lease_seconds=0.3, poll_interval=0.1)
    second = tg.PostgresJobStore(postgres_dsn, lease_seconds=30, poll_interval=0.1)
    record = tg.JobRecord(id=first.new_id(), kind="task", task_type=tasks.Tiny.type)
    first.submit(record, {"n": 1}, RetryPolicy())
    await first.flush()
    with trio.fail_after(10):
        mine = await first.claim()
        theirs = await second.claim()  # waits for the first lease to expire (not renewed)
    assert theirs.record.attempt == 2
    first.save(mine.record.apply(JobEvent.SUCCEED, output={"n": "stale"}))
    await first.flush()
    rows = _rows(postgres_dsn, "SELECT state, attempt, lease_owner FROM trio_taskgraph_jobs")
    assert rows == [("running", 2, second.owner)]
    await first.aclose()
    await second.aclose()
