"""
Benchmark: `trio_taskgraph.wire.packb` / `unpackb` against plain msgpack with the minimal
``default`` / ``ext_hook`` for the same ext types (the ceiling: same ext payloads, no limits,
no validation beyond what constructing `CacheRef` / `Blob` does).

Two payloads: a small request envelope holding a ref, and a 1,000-node tree (dicts and
lists, scalar leaves, a few refs). Each round times a batch of calls of every variant, in
alternating order; the table shows medians and our speed as a fraction of the ceiling's
(target >= 0.9: our limits and checks cost under 10%). Run:
``python bench/bench_wire.py [--quick]``.

``--instructions`` counts CPU instructions instead of timing, under valgrind's callgrind
(one child process per variant, the same hash seed, a no-op run subtracted): the counts are
the same on every run whatever else the machine is doing, so the ratio is noise-free (it
is not a time ratio: a cache miss counts as one instruction). It takes about 6 minutes.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque

import msgpack

import trio_taskgraph as tg
from trio_taskgraph import wire


def base_default(obj: object) -> object:
    if type(obj) is tg.CacheRef:
        return msgpack.ExtType(1, msgpack.packb([obj.ref, obj.size, obj.mime], use_bin_type=True))
    if type(obj) is tg.Blob:
        return msgpack.ExtType(2, msgpack.packb([obj.mime, obj.data], use_bin_type=True))
    raise TypeError(type(obj).__name__)


def base_ext_hook(code: int, data: bytes) -> object:
    if code == 1:
        ref, size, mime = msgpack.unpackb(data)
        return tg.CacheRef(ref, size, mime)
    if code == 2:
        mime, payload = msgpack.unpackb(data)
        return tg.Blob(payload, mime)
    return msgpack.ExtType(code, data)


def envelope() -> object:
    return {
        "op": "get_output_by_ref",
        "id": 17,
        "ns": "default",
        "ref": tg.CacheRef("runs/3f2a/blobs/image_9c1e.bin", 123_456, "image/png"),
    }


def tree(nodes: int = 1_000, fanout: int = 8, refs: int = 5) -> object:
    leaves: list[object] = ["name", 42, 3.5, None, True, "a longer text value", -7, b"\x00\x01"]
    root: dict[str, object] = {}
    queue: deque[object] = deque([root])
    count = containers = 1
    while count < nodes:
        parent = queue.popleft()
        for i in range(fanout):
            if count >= nodes:
                break
            count += 1
            child: object
            if containers < nodes // fanout:
                containers += 1
                child = [] if containers % 2 else {}
                queue.append(child)
            elif refs and count % (nodes // refs) == 0:
                child = tg.CacheRef(f"blobs/{count}.bin", count, None)
            else:
                child = leaves[count % len(leaves)]
            if isinstance(parent, dict):
                parent[f"field{i}"] = child
            else:
                assert isinstance(parent, list)
                parent.append(child)
    return root


def measure(rounds: int, batch: dict[str, int]) -> dict[tuple[str, str, str], float]:
    """
    Median seconds per call of each (payload, op, variant), and the median over rounds of
    the per-round speed ratio (ceiling time / our time) under (payload, op, "ratio").

    Rounds are short and alternate which variant goes first, so that load from elsewhere
    on the machine hits both sides of a ratio alike.
    """
    payloads = {"envelope": envelope(), "1,000-node tree": tree()}
    timings: dict[tuple[str, str, str], list[float]] = {}
    for name, value in payloads.items():
        data = wire.packb(value)
        assert msgpack.packb(value, default=base_default, use_bin_type=True) == data
        assert wire.unpackb(data) == msgpack.unpackb(
            data, ext_hook=base_ext_hook, strict_map_key=False
        )
        n = batch[name]
        ours_pack = wire.packb
        ours_unpack = wire.unpackb
        mp_packb = msgpack.packb
        mp_unpackb = msgpack.unpackb
        gc.collect()
        for r in range(rounds):
            per_round: dict[tuple[str, str], float] = {}
            for who in ["ours", "ceiling"] if r % 2 == 0 else ["ceiling", "ours"]:
                if who == "ours":
                    t0 = time.perf_counter()
                    for _ in range(n):
                        ours_pack(value)
                    t1 = time.perf_counter()
                    for _ in range(n):
                        ours_unpack(data)
                    t2 = time.perf_counter()
                else:
                    t0 = time.perf_counter()
                    for _ in range(n):
                        mp_packb(value, default=base_default, use_bin_type=True)
                    t1 = time.perf_counter()
                    for _ in range(n):
                        mp_unpackb(data, ext_hook=base_ext_hook, strict_map_key=False)
                    t2 = time.perf_counter()
                per_round["pack", who] = (t1 - t0) / n
                per_round["unpack", who] = (t2 - t1) / n
            for (op, who), seconds in per_round.items():
                timings.setdefault((name, op, who), []).append(seconds)
            for op in ("pack", "unpack"):
                ratio = per_round[op, "ceiling"] / per_round[op, "ours"]
                timings.setdefault((name, op, "ratio"), []).append(ratio)
    return {k: statistics.median(v) for k, v in timings.items()}


def run_variant(payload: str, op: str, who: str, calls: int) -> None:
    """Child of ``--instructions``: ``calls`` calls of one variant (``calls`` 0: set-up only)."""
    value = envelope() if payload == "envelope" else tree()
    data = wire.packb(value)
    if who == "ours":
        if op == "pack":
            for _ in range(calls):
                wire.packb(value)
        else:
            for _ in range(calls):
                wire.unpackb(data)
    elif op == "pack":
        for _ in range(calls):
            msgpack.packb(value, default=base_default, use_bin_type=True)
    else:
        for _ in range(calls):
            msgpack.unpackb(data, ext_hook=base_ext_hook, strict_map_key=False)


def count_instructions(args: list[str]) -> int:
    """Instructions callgrind counts for this script run with ``args``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                sys.executable,
                __file__,
                "--child",
                *args,
            ],
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=True,
        )
    match = re.search(r"refs:\s+([\d,]+)", out.stderr)
    assert match, out.stderr
    return int(match.group(1).replace(",", ""))


def instructions() -> int:
    if shutil.which("valgrind") is None:
        print("--instructions needs valgrind (Debian package valgrind)")
        return 2
    calls = {"envelope": 20_000, "1,000-node tree": 400}
    print(f"{'payload':<18} {'op':<7} {'ours/call':>10} {'ceiling/call':>13} {'ratio':>6}")
    ok = True
    results: list[str] = []
    for name in ("envelope", "1,000-node tree"):
        payload = "envelope" if name == "envelope" else "tree"
        n = calls[name]
        # The set-up (imports, building the payload) is the same for every variant.
        base = count_instructions([payload, "unpack", "ours", "0"])
        for op in ("pack", "unpack"):
            per_call = {}
            for who in ("ours", "ceiling"):
                per_call[who] = (count_instructions([payload, op, who, str(n)]) - base) / n
            ratio = per_call["ceiling"] / per_call["ours"]
            ok = ok and ratio >= 0.9
            print(
                f"{name:<18} {op:<7} {per_call['ours']:>10.0f} {per_call['ceiling']:>13.0f} "
                f"{ratio:>6.3f} {'ok' if ratio >= 0.9 else 'MISSED'}"
            )
            results.append(
                f"RESULT name=wire/{payload}_{op}_instructions ratio={ratio:.3f} target=>=0.9 "
                'peer="plain msgpack with minimal ext hooks (callgrind instructions)"'
            )
    for line in results:
        print(line)
    return 0 if ok else 1


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        payload, op, who, calls = sys.argv[2:6]
        run_variant(payload, op, who, int(calls))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="a few rounds only")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under valgrind instead of timing (noise-free)",
    )
    args = parser.parse_args()
    if args.instructions:
        return instructions()
    rounds = 41 if args.quick else 301
    batch = {"envelope": 500, "1,000-node tree": 10}
    med = measure(rounds, batch)
    print(f"{'payload':<18} {'op':<7} {'ours us':>9} {'ceiling us':>11} {'speed vs ceiling':>17}")
    print("(times: medians per call; speed: median over rounds of ceiling time / our time)")
    ok = True
    results: list[str] = []
    for name in ("envelope", "1,000-node tree"):
        for op in ("pack", "unpack"):
            ours = med[(name, op, "ours")]
            ceiling = med[(name, op, "ceiling")]
            speed = med[(name, op, "ratio")]
            ok = ok and speed >= 0.9
            mark = "ok" if speed >= 0.9 else "MISSED"
            print(
                f"{name:<18} {op:<7} {ours * 1e6:>9.2f} {ceiling * 1e6:>11.2f} {speed:>12.2f} {mark}"
            )
            payload = "envelope" if name == "envelope" else "tree"
            results.append(
                f"RESULT name=wire/{payload}_{op} ratio={speed:.3f} target=>=0.9 "
                'peer="plain msgpack with minimal ext hooks"'
            )
    for line in results:
        print(line)
    print("target: speed >= 0.90 of the ceiling")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
