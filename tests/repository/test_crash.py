"""
Crash points (S4-3, S4-5): a child process streaming blobs into an `FsOutputRepository` is
killed with SIGKILL at seeded random moments. After reopening, every ref the child reported
reads back with exactly the bytes and size it promised, every row points to a readable blob,
every blob record has its file, and no temp file survives the open-time sweep.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

import trio_taskgraph as tg
from trio_taskgraph._repository._common import decode_row

CHILD = r"""
import hashlib, json, random, sys
import trio
import trio_taskgraph as tg

folder, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)

async def chunks(data, rng):
    at = 0
    while at < len(data):
        step = rng.randint(1, 200_000)
        print("c", flush=True)  # a crash point the parent can choose: mid-stream
        yield data[at : at + step]
        at += step
        await trio.lowlevel.checkpoint()

async def main():
    repo = tg.FsOutputRepository(folder, write_batch_bytes=rng.choice([4096, 65536, 1 << 20]))
    i = 0
    while True:
        size = rng.randint(0, 900_000)
        data = hashlib.sha256(b"%d-%d" % (seed, i)).digest() * (size // 32 + 1)
        data = data[:size]
        ref = await repo.save_output_stream("crash", {"i": i}, "out", chunks(data, rng))
        sha = hashlib.sha256(data).hexdigest()
        await repo.save_output("crash", {"seed": seed, "i": i}, {"ref": ref, "sha": sha})
        print(json.dumps({"ref": ref.ref, "size": ref.size, "sha": sha}), flush=True)
        i += 1

trio.run(main)
"""


async def _run_and_kill(
    folder: Path, seed: int, lines_before_kill: int
) -> tuple[list[dict[str, object]], int]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, str(folder), str(seed)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    buffer = b""
    try:
        while buffer.count(b"\n") < lines_before_kill:
            data = await proc.stdout.receive_some()
            if not data:
                break
            buffer += data
    finally:
        proc.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await proc.wait()
            await proc.stdout.aclose()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    temps = len(list((folder / "blobs").glob("*.tmp"))) if (folder / "blobs").exists() else 0
    return [json.loads(line) for line in buffer.splitlines() if line.endswith(b"}")], temps


def _rows(folder: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(folder / "rows.sqlite")
    try:
        return [decode_row(bytes(data)) for (data,) in conn.execute("SELECT data FROM rows")]
    finally:
        conn.close()


def _records(folder: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(folder / "rows.sqlite")
    try:
        return [(name, size) for name, size in conn.execute("SELECT name, size FROM blobs")]
    finally:
        conn.close()


async def test_sigkill_at_random_moments_leaves_a_consistent_store(tmp_path: Path) -> None:
    """S4-3, S4-5: after SIGKILLs mid-write, the store holds only whole, promised blobs."""
    folder = tmp_path / "store"
    rng = random.Random(561)
    reported: list[dict[str, object]] = []
    torn = 0
    for round_ in range(5):
        # A line per chunk and per committed blob: the kill lands mid-stream, mid-publish
        # or between blobs, at a point the seed chooses.
        lines, temps = await _run_and_kill(folder, round_, rng.randint(0, 40))
        reported += lines
        torn += temps
    assert torn > 0, "no kill landed mid-write; the crash points test nothing"

    repo = tg.FsOutputRepository(folder)
    await repo.stats()  # open: sweeps the dead children's temp files
    assert sorted(p.name for p in (folder / "blobs").glob("*.tmp")) == []
    for entry in reported:
        ref = tg.CacheRef(str(entry["ref"]), int(str(entry["size"])))
        data = await repo.get_output_by_ref(ref)
        assert len(data) == ref.size
        assert hashlib.sha256(data).hexdigest() == entry["sha"]
    rows = await trio.to_thread.run_sync(_rows, folder)
    assert len(rows) >= len(reported)
    for row in rows:
        row_ref = row["ref"]
        assert isinstance(row_ref, tg.CacheRef)
        data = await repo.get_output_by_ref(row_ref)
        assert len(data) == row_ref.size
        assert hashlib.sha256(data).hexdigest() == row["sha"]
    for name, size in await trio.to_thread.run_sync(_records, folder):
        assert (folder / "blobs" / f"{name}.blob").stat().st_size == size
    report = await repo.gc(min_age=0.0)  # anything left is unreferenced: record-less files
    assert report.temp_files == 0
    await repo.aclose()
    assert list((folder / "locks").iterdir()) == []
