"""
Crash-point suite (S4-9, checking S4-3, S4-4, S4-5): SIGKILL at every durable moment.

A child process (``crash_child.py``, a fork server) runs small workloads (streamed saves, row
saves, deletes, prunes; at most three operations after a setup) against an
`FsOutputRepository`. The repository's private `_crash_hook` names each durable moment it
reaches (temp file created, each write, fsync, rename, directory fsync, each commit, each
unlink); the child counts them and SIGKILLs itself at moment ``k``. A run without a kill
enumerates the moments of the workload, then every ``k`` (or an evenly spread sample of them)
gets its own crash, in a fresh folder.

After each crash the folder is reopened (the open-time sweep runs) and judged against a model
of the workload: the rows and blobs must be the state before the interrupted operation or the
state after it (rows, and the blob records a prune removes with them, change in one commit),
and never

- a torn blob: every blob file (recorded or not) holds exactly the bytes of one whole save;
- a row without its blob, or a blob record without its file;
- a blob whose bytes differ from what its ref promised (size and SHA-256);
- a temp file after the sweep, or a dead writer's lock file;
- an effect of a completed operation lost, or an effect of an operation not yet begun.

A blob file with no record is allowed only where the interrupted operation makes one (a crash
between the rename and the commit of a save, or between the commit and the unlink of a delete
or prune); it is whole, no ref reads it as anything else, and `gc` collects it once it is old
enough (checked by ageing it). Finally the reopened repository must still work: a save, a row
and a read back.

Sizes: ``make test`` runs `DEFAULT_POINTS` points of one workload per family;
``make crash`` (``CRASH_MAX_POINTS=0``) runs every moment of every workload.
This suite subsumes the random-moment ``test_crash.py`` (which killed the child at moments
chosen by reading its output); that test stays as an independent, hook-free check.

Limits: the kill simulates a process crash, not a power loss: what the kernel accepted
survives, so the fsync ordering itself is not exercised (that needs a fault-injecting file
system); moments inside SQLite's own commit are not enumerated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import attrs
import pytest
import trio

import trio_taskgraph as tg
from trio_taskgraph._repository._common import decode_row
from trio_taskgraph.testing import spread_points

from .crash_child import SETUP_TIME, WORK_TIME, content, digest, stream_size

CHILD = Path(__file__).with_name("crash_child.py")
CRASH_MAX_POINTS_ENV = "CRASH_MAX_POINTS"
#: Crash points per workload in ``make test`` (spread evenly, first and last moment included).
DEFAULT_POINTS = 3
_NAME = re.compile(r"/([0-9a-f]{32})#")

Op = Mapping[str, object]


def crash_max_points(default: int | None) -> int | None:
    """``default`` unless ``CRASH_MAX_POINTS`` is set (``0``/``all``: every moment)."""
    raw = os.environ.get(CRASH_MAX_POINTS_ENV, "").strip().lower()
    if not raw:
        return default
    if raw == "all" or int(raw) == 0:
        return None
    return int(raw)


# --- workloads --------------------------------------------------------------------------------

#: Chunk layouts of a streamed save: more chunks (with one write each when the batch is one
#: byte) multiply the moments.
SIZES: tuple[list[int], ...] = ([], [1], [7, 5], [3] * 5, [64] * 10, [1] * 24, [2] * 40, [1] * 64)
BATCHES = (1, 1 << 20)


def _stream(blob_id: str, sizes: list[int], **extra: object) -> dict[str, object]:
    return {"op": "stream", "id": blob_id, "sizes": sizes, **extra}


def _row(key: str, ids: list[str], **extra: object) -> dict[str, object]:
    return {"op": "row", "key": key, "ids": ids, **extra}


def _family(name: str) -> list[dict[str, object]]:
    """The workloads of one family: one per chunk layout and write batch where that applies."""
    out: list[dict[str, object]] = []
    for sizes in SIZES:
        for batch in BATCHES:
            if batch == 1 and len(sizes) <= 1:
                continue  # one chunk: the batch size changes nothing
            base: dict[str, object] = {"write_batch": batch, "label": f"{len(sizes)}x/b{batch}"}
            if name == "stream":
                out.append({**base, "ops": [_stream("a", sizes)]})
            elif name == "stream-row":
                out.append({**base, "ops": [_stream("a", sizes), _row("r1", ["a"])]})
            elif name == "two-streams-row":
                ops = [_stream("a", sizes), _stream("b", sizes[::-1]), _row("r1", ["a", "b"])]
                out.append({**base, "ops": ops})
            elif name == "replace":
                setup = [_stream("old", [5, 6]), _row("r1", ["old"])]
                ops = [_stream("new", sizes), _row("r1", ["new"]), {"op": "delete", "id": "old"}]
                out.append({**base, "setup": setup, "ops": ops})
    if name == "delete":
        setup = [_stream("a", [4, 4]), _stream("b", [9]), _row("r1", ["a"])]
        variants: list[list[dict[str, object]]] = [
            [{"op": "delete", "id": "b"}, _stream("c", [2, 3]), {"op": "delete", "id": "c"}],
            [{"op": "delete", "id": "b"}, {"op": "delete", "id": "b"}],  # idempotent
            [_row("r1", []), {"op": "delete", "id": "a"}, {"op": "delete", "id": "b"}],
        ]
        out.extend(
            {"label": f"delete/{i}", "setup": setup, "ops": v} for i, v in enumerate(variants)
        )
    if name == "prune":
        # The seed's M-5: blob b is shared by an old row and a newer one; pruning the old row
        # must keep b, and the second prune (reaching the newer row) takes it.
        setup = [
            _stream("a", [3, 3]),
            _stream("b", [8]),
            _stream("c", [1, 2, 3]),  # never referenced
            _row("old", ["a", "b"]),
            _row("new", ["b"], at=SETUP_TIME + 900),
            _stream("d", [4], at=SETUP_TIME + 900),  # unreferenced but young
        ]
        variants = [
            [{"op": "prune", "seconds": 500.0}],
            [{"op": "prune", "seconds": 500.0}, {"op": "prune", "seconds": 50.0}],
            [{"op": "prune", "seconds": 500.0}, _stream("e", [2, 2]), _row("e", ["e", "b"])],
        ]
        out.extend({"label": f"prune/{len(v)}", "setup": setup, "ops": v} for v in variants)
    if name == "prefix":
        setup = [
            _stream("a", [3, 4], task="old.x"),
            _row("k1", ["a"], task="old.x"),
            _stream("b", [5], task="keep"),
            _row("k2", ["b"], task="keep"),
            _stream("c", [6], task="old.y"),  # unreferenced
            _row("k3", ["b"], task="old.z"),  # b is kept: "keep" still points to it
        ]
        variants = [
            [{"op": "prefix", "prefix": "old."}],
            [{"op": "prefix", "prefix": "old."}, {"op": "prefix", "prefix": "keep"}],
        ]
        out.extend({"label": f"prefix/{len(v)}", "setup": setup, "ops": v} for v in variants)
    return out


FAMILIES = ("stream", "stream-row", "two-streams-row", "replace", "delete", "prune", "prefix")


# --- the model ----------------------------------------------------------------------------------


@attrs.define
class _State:
    """What the workload has done after some operations: blobs (id -> created, task type) and
    rows (key -> ids, created, task type)."""

    blobs: dict[str, tuple[float, str]] = attrs.Factory(dict)
    rows: dict[str, tuple[tuple[str, ...], float, str]] = attrs.Factory(dict)

    def copy(self) -> _State:
        return _State(dict(self.blobs), dict(self.rows))

    def apply(self, op: Op, now: float) -> None:
        kind, task = op["op"], str(op.get("task", "crash"))
        if kind == "stream":
            self.blobs[str(op["id"])] = (now, task)
        elif kind == "row":
            ids = op["ids"]
            assert isinstance(ids, list)
            self.rows[str(op["key"])] = (tuple(str(i) for i in ids), now, task)
        elif kind == "delete":
            self.blobs.pop(str(op["id"]), None)
        elif kind == "prune":
            cutoff = now - float(str(op["seconds"]))
            self._drop([k for k, (_, at, _) in self.rows.items() if at <= cutoff])
            self._collect(lambda at, _task: at <= cutoff)
        elif kind == "prefix":
            prefix = str(op["prefix"])
            self._drop([k for k, (_, _, t) in self.rows.items() if t.startswith(prefix)])
            self._collect(lambda _at, t: t.startswith(prefix))
        else:  # pragma: no cover - a workload typo
            raise ValueError(kind)

    def _drop(self, keys: list[str]) -> None:
        for key in keys:
            del self.rows[key]

    def _collect(self, matches: object) -> None:
        assert callable(matches)
        kept = {i for ids, _, _ in self.rows.values() for i in ids}
        for blob_id, (at, task) in list(self.blobs.items()):
            if blob_id not in kept and matches(at, task):
                del self.blobs[blob_id]

    def row_view(self) -> dict[str, tuple[str, ...]]:
        return {key: ids for key, (ids, _, _) in self.rows.items()}


def _states(workload: Mapping[str, object]) -> list[_State]:
    """The model after the setup and after each operation (``len(ops) + 1`` states)."""
    state = _State()
    now = SETUP_TIME
    for op in _ops(workload, "setup"):
        now = float(str(op.get("at", now)))
        state.apply(op, now)
    states = [state.copy()]
    now = WORK_TIME
    for op in _ops(workload, "ops"):
        now = float(str(op.get("at", now)))
        state.apply(op, now)
        states.append(state.copy())
    return states


def _ops(workload: Mapping[str, object], part: str) -> list[Op]:
    ops = workload.get(part, [])
    assert isinstance(ops, list)
    return ops


def _stream_ops(workload: Mapping[str, object]) -> dict[str, Op]:
    return {
        str(op["id"]): op
        for part in ("setup", "ops")
        for op in _ops(workload, part)
        if op["op"] == "stream"
    }


# --- running the child ----------------------------------------------------------------------------


class _ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, request: Mapping[str, object]) -> dict[str, object]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the crash-point fork server died"
        answer: dict[str, object] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def fork_server() -> Iterator[_ForkServer]:
    server = _ForkServer()
    try:
        yield server
    finally:
        server.close()


def _journal(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- judging a folder ----------------------------------------------------------------------------


@attrs.frozen
class _Seen:
    records: dict[str, int]  # name -> size
    files: dict[str, bytes]  # name -> bytes
    temps: list[str]
    locks: list[str]
    rows: dict[str, dict[str, object]]  # key -> row


def _look(folder: Path) -> _Seen:
    conn = sqlite3.connect(folder / "rows.sqlite")
    try:
        records = dict(conn.execute("SELECT name, size FROM blobs WHERE ns = 'default'"))
        rows = [decode_row(bytes(d)) for (d,) in conn.execute("SELECT data FROM rows")]
    finally:
        conn.close()
    blobs = folder / "blobs"
    files = {p.name.removesuffix(".blob"): p.read_bytes() for p in blobs.glob("*.blob")}
    return _Seen(
        records=records,
        files=files,
        temps=sorted(p.name for p in blobs.glob("*.tmp")),
        locks=sorted(p.name for p in (folder / "locks").iterdir()),
        rows={str(row["key"]): row for row in rows},
    )


async def _reopen_and_look(
    folder: Path, refs: dict[str, tg.CacheRef]
) -> tuple[_Seen, dict[str, bytes | None]]:
    """Open the folder (the sweep runs), read every known ref, look at what is there."""
    repo = tg.FsOutputRepository(folder, clock=lambda: WORK_TIME + 10)
    try:
        await repo.stats()
        seen = await trio.to_thread.run_sync(_look, folder)
        reads: dict[str, bytes | None] = {}
        for blob_id, ref in refs.items():
            try:
                reads[blob_id] = await repo.get_output_by_ref(ref)
            except tg.DanglingRefError:
                reads[blob_id] = None
    finally:
        await repo.aclose()
    # The dead writer's lock went with the sweep, ours with the close.
    locks = sorted(p.name for p in (folder / "locks").iterdir())
    return attrs.evolve(seen, locks=locks), reads


async def _recover_and_use(folder: Path, strays: list[str]) -> None:
    """S4-4, S4-5: aged strays are collected, records kept, and the repository still works."""
    for name in strays:
        os.utime(folder / "blobs" / f"{name}.blob", (0, 0))
    repo = tg.FsOutputRepository(folder, clock=lambda: WORK_TIME + 10)
    try:
        before = await repo.stats()
        report = await repo.gc(min_age=1e9)  # no recorded blob is that old: only strays go
        assert report.blobs == len(strays)
        assert report.temp_files == 0
        assert await repo.stats() == before

        async def one() -> AsyncIterator[bytes]:
            yield b"still usable"

        ref = await repo.save_output_stream("after", {}, "out", one())
        await repo.save_output("after", {}, {"ref": ref})
        row = await repo.get_output("after", {})
        assert row == {"ref": ref}
        assert await repo.get_output_by_ref(ref) == b"still usable"
    finally:
        await repo.aclose()
    assert list((folder / "locks").iterdir()) == []
    assert [p.stem for p in (folder / "blobs").glob("*.blob") if p.stem in strays] == []


def _ids(row: Mapping[str, object], field: str = "ids") -> list[object]:
    value = row[field]
    assert isinstance(value, list)
    return value


def _judge(workload: Mapping[str, object], journal: list[dict[str, object]], folder: Path) -> int:
    """Check the folder after a crash (or a full run); return how many stray files it had."""
    states = _states(workload)
    streams = _stream_ops(workload)
    setup = next(e["setup"] for e in journal if "setup" in e)
    assert isinstance(setup, dict)
    promised: dict[str, dict[str, object]] = {str(k): v for k, v in setup.items()}
    begun = [int(str(e["begin"])) for e in journal if "begin" in e]
    done = {int(str(e["done"])): e for e in journal if "done" in e}
    ended = any("end" in e for e in journal)
    ops = _ops(workload, "ops")
    for index, entry in done.items():
        if ops[index]["op"] == "stream":
            promised[str(entry["id"])] = entry
    refs = {
        blob_id: tg.CacheRef(str(p["ref"]), int(str(p["size"]))) for blob_id, p in promised.items()
    }
    names = {blob_id: _name(ref) for blob_id, ref in refs.items()}

    if ended:
        assert sorted(done) == list(range(len(ops)))
        candidates = [states[-1]]
        flight: Op | None = None
    else:
        assert begun, "killed before any operation began: the moment count is wrong"
        j = begun[-1]
        assert sorted(done) == list(range(j)), (begun, sorted(done))
        candidates = [states[j], states[j + 1]]
        flight = ops[j]

    seen, reads = trio.run(_reopen_and_look, folder, refs)

    # S4-5: no temp file survives the open-time sweep; the dead writer's lock is gone.
    assert seen.temps == [], seen.temps
    assert seen.locks == [], seen.locks

    # S4-3: every file (recorded or stray) holds the whole bytes of exactly one save.
    by_name = {name: blob_id for blob_id, name in names.items()}
    unknown = sorted((set(seen.files) | set(seen.records)) - set(by_name))
    for name, data in seen.files.items():
        blob_id = by_name.get(name)
        if blob_id is None:
            assert flight is not None, f"stray blob {name}"
            assert flight["op"] == "stream", f"stray blob {name}"
            blob_id = str(flight["id"])
        assert data == content(blob_id, stream_size(streams[blob_id])), f"torn blob {blob_id}"
    # S4-3: a record never outlives its file, and records the size of the bytes on disk.
    for name, size in seen.records.items():
        assert name in seen.files, f"blob record {name} without its file"
        assert len(seen.files[name]) == size
    # The interrupted save made at most one name nobody was told about.
    assert len(unknown) <= (1 if flight is not None and flight["op"] == "stream" else 0), unknown

    # S4-3: every promised ref reads back exactly what it promised, or is gone entirely.
    for blob_id, read in reads.items():
        if read is not None:
            assert len(read) == refs[blob_id].size
            assert digest(read) == promised[blob_id]["sha"]

    # Old or new: rows change in one commit, together with the records a prune removes.
    rows_seen = {key: tuple(str(i) for i in _ids(row)) for key, row in seen.rows.items()}
    matching = [s for s in candidates if s.row_view() == rows_seen]
    assert matching, f"rows {rows_seen} are neither {[s.row_view() for s in candidates]}"
    atomic_prune = flight is not None and flight["op"] in ("prune", "prefix")
    before = candidates[0]
    for blob_id, name in names.items():
        if atomic_prune and len(matching) == 1:
            # The prune's rows and blob records go in one commit: both old or both new.
            allowed = {blob_id in matching[0].blobs}
        else:
            allowed = {blob_id in s.blobs for s in candidates}
        recorded = name in seen.records
        assert recorded in allowed, f"blob {blob_id}: recorded={recorded}, allowed {allowed}"
        if blob_id not in before.blobs:
            # Removed by an operation that completed: its file went before it returned.
            assert name not in seen.files, f"blob {blob_id}'s file outlived a finished delete"
    # S4-4: a row's blobs are there, with the bytes the row recorded.
    for key, row in seen.rows.items():
        for ref, sha in zip(_ids(row, "refs"), _ids(row, "shas"), strict=True):
            name = _name(ref)
            assert name in seen.records, f"row {key} points to a blob without a record"
            assert digest(seen.files[name]) == sha, f"row {key}: blob bytes differ"

    strays = sorted(set(seen.files) - set(seen.records))
    trio.run(_recover_and_use, folder, strays)
    return len(strays)


def _name(ref: object) -> str:
    assert isinstance(ref, tg.CacheRef)
    match = _NAME.search(ref.ref)
    assert match is not None, ref
    return match.group(1)


# --- the suite ----------------------------------------------------------------------------------


def _run_workload(
    server: _ForkServer, workload: Mapping[str, object], base: Path, points: int | None
) -> tuple[int, int, list[str]]:
    """Enumerate the workload's moments, crash at each chosen one; return (moments, crashes,
    moment names)."""
    base.mkdir(parents=True)
    folder, journal = base / "baseline", base / "baseline.jsonl"
    answer = server.run({"folder": str(folder), "journal": str(journal), "workload": workload})
    assert answer == {"signal": 0, "code": 0}, answer
    entries = _journal(journal)
    moments = int(str(next(e["moments"] for e in entries if "end" in e)))
    names = [str(e["name"]) for e in entries if "moment" in e]
    assert len(names) == moments > 0
    _judge(workload, entries, folder)
    chosen = [k + 1 for k in spread_points(moments, points)]
    for k in chosen:
        folder, journal = base / f"k{k}", base / f"k{k}.jsonl"
        request = {"folder": str(folder), "journal": str(journal), "workload": workload}
        answer = server.run({**request, "kill_at": k})
        assert answer == {"signal": signal.SIGKILL, "code": None}, (k, answer)
        entries = _journal(journal)
        last = [e for e in entries if "moment" in e][-1]
        # The kill landed exactly at moment k, the same moment as in the enumeration.
        assert (last["moment"], last["name"]) == (k, names[k - 1])
        try:
            _judge(workload, entries, folder)
        except AssertionError as exc:
            raise AssertionError(
                f"workload {workload['label']} killed at moment {k} ({names[k - 1]}): {exc}"
            ) from exc
    return moments, len(chosen), names


@pytest.mark.parametrize("family", FAMILIES)
def test_crash_points(family: str, fork_server: _ForkServer, tmp_path: Path) -> None:
    """S4-9 (S4-3, S4-4, S4-5): a SIGKILL at any durable moment leaves the old or new state.

    Also the seed's M-5 (prune keeps a blob a newer row shares) and its late CRITICAL race
    (each save its own name) under crashes; ``make crash`` runs every moment.
    """
    workloads = _family(family)
    limit = crash_max_points(DEFAULT_POINTS)
    if limit is not None:  # a sample: the family's last workload (most chunks or operations)
        workloads = workloads[-1:]
    total_moments = crashes = 0
    kinds: set[str] = set()
    for index, workload in enumerate(workloads):
        moments, run, names = _run_workload(fork_server, workload, tmp_path / f"w{index}", limit)
        total_moments += moments
        crashes += run
        kinds.update(names)
    print(
        f"\ncrash points [{family}]: {len(workloads)} workloads, {total_moments} moments, "
        f"{crashes} crashes, 0 torn states; moments seen: {sorted(kinds)}"
    )
    assert crashes >= len(workloads)
