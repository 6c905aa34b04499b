"""
Child side of the crash-point suite (S4-9; ``tests/repository/test_crash_points.py``).

Run as a script, this is a small fork server: it imports trio and the library once, then reads
one JSON request per line on stdin, forks a fresh process per request, waits for it, and
answers one JSON line on stdout (``{"signal": n, "code": c}``). The forked process runs one
workload against an `FsOutputRepository`:

1. the *setup* operations, with no crash hook (the "old state" the workload starts from);
2. the workload's operations (at most three), with `_filesystem._crash_hook` counting the
   durable moments the repository reaches and SIGKILLing its own process at moment
   ``kill_at`` (1-based); ``kill_at = null`` runs to the end and reports how many moments
   there were.

Everything the parent needs to judge the folder afterwards goes to an append-only journal file
(one ``os.write`` per JSON line, so a SIGKILL never tears a line): the refs the setup made, each
operation's begin and completion (with the ref and the digest of what a streamed save
promised), and each moment's name. Moments come from the hook, never from sleeps or timers.

Forking from a server that has imported everything but never started trio (no threads) costs
a few milliseconds per crash point instead of an interpreter start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Mapping

import trio

from trio_taskgraph import CacheRef, FsOutputRepository
from trio_taskgraph._repository import _filesystem

Op = Mapping[str, object]

#: The clock of setup operations and of workload operations (rows and blobs get these ages).
SETUP_TIME = 1_000.0
WORK_TIME = 2_000.0


def content(blob_id: str, size: int) -> bytes:
    """The deterministic bytes of blob ``blob_id`` (so the parent can check any blob file)."""
    seed = hashlib.sha256(blob_id.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sizes(op: Op) -> list[int]:
    sizes = op["sizes"]
    assert isinstance(sizes, list)
    return [int(s) for s in sizes]


def stream_size(op: Op) -> int:
    return sum(_sizes(op))


class _Journal:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()

    def write(self, **entry: object) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)


async def _chunks(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    at = 0
    for size in sizes:
        yield data[at : at + size]
        at += size
        await trio.lowlevel.checkpoint()


async def _run_op(
    repo: FsOutputRepository, op: Op, refs: dict[str, CacheRef], clock: list[float]
) -> dict[str, object]:
    """Run one operation; return what the journal records when it completes."""
    kind = op["op"]
    if "at" in op:
        clock[0] = float(str(op["at"]))
    task = str(op.get("task", "crash"))
    if kind == "stream":
        blob_id = str(op["id"])
        data = content(blob_id, stream_size(op))
        ref = await repo.save_output_stream(task, {"id": blob_id}, "out", _chunks(data, _sizes(op)))
        refs[blob_id] = ref
        return {"id": blob_id, "ref": ref.ref, "size": ref.size, "sha": digest(data)}
    if kind == "row":
        raw = op["ids"]
        assert isinstance(raw, list)
        ids = [str(i) for i in raw]
        output = {
            "key": op["key"],
            "ids": ids,
            "refs": [refs[i] for i in ids],
            "shas": [digest(content(i, refs[i].size or 0)) for i in ids],
        }
        await repo.save_output(task, {"key": op["key"]}, output)
        return {"key": op["key"]}
    if kind == "delete":
        await repo.delete_output_by_ref(refs[str(op["id"])])
        return {"id": op["id"]}
    if kind == "prune":
        return {"rows": await repo.clear_older_than(float(str(op["seconds"])))}
    if kind == "prefix":
        return {"rows": await repo.delete_by_task_type_prefix(str(op["prefix"]))}
    raise ValueError(f"unknown operation {kind!r}")


def run_case(request: Mapping[str, object]) -> None:
    """Run one workload in this (forked) process; see the module docstring."""
    journal = _Journal(str(request["journal"]))
    kill_at = request.get("kill_at")
    workload = request["workload"]
    assert isinstance(workload, dict)
    moments = 0
    lock = threading.Lock()

    def hook(name: str) -> None:
        nonlocal moments
        with lock:
            moments += 1
            journal.write(moment=moments, name=name)
            if moments == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    async def main() -> None:
        clock = [SETUP_TIME]
        repo = FsOutputRepository(
            str(request["folder"]),
            clock=lambda: clock[0],
            write_batch_bytes=int(workload.get("write_batch", 1 << 20)),
        )
        refs: dict[str, CacheRef] = {}
        setup = {}
        for op in workload.get("setup", []):
            done = await _run_op(repo, op, refs, clock)
            if op["op"] == "stream":
                setup[str(op["id"])] = done
        journal.write(setup=setup)
        clock[0] = WORK_TIME
        _filesystem._crash_hook = hook
        try:
            for index, op in enumerate(workload["ops"]):
                journal.write(begin=index)
                done = await _run_op(repo, op, refs, clock)
                journal.write(done=index, **done)
        finally:
            _filesystem._crash_hook = None
        journal.write(end=True, moments=moments)
        await repo.aclose()

    trio.run(main)


def serve(lines: Callable[[], str]) -> None:
    """The fork server loop: one request per line until EOF."""
    while line := lines():
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run, never return into the server loop
            code = 0
            try:
                run_case(request)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answer = {
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        }
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin.readline)
