"""
Benchmark: the ref walker (`resolve_output`) against a bare iterative visit of the same tree.

A 100,000-node nested output (dicts and lists, fan-out 8, scalar leaves) is timed:

- ``bare visit``: an iterative visit touching every node (same container types as the
  walker: dict, list, tuple, set, frozenset), building nothing: the floor;
- ``resolve_output, no refs``: the scan only; the same object comes back (target <= 1.2x);
- ``resolve_output, 1,000 refs``: a trivial resolver, distinct refs spread over the tree
  (target <= 3x);
- ``copy.deepcopy``: for context.

Each round runs every variant once, in alternating order; the table shows medians. Run:
``python bench/bench_walker.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections import deque
from typing import TYPE_CHECKING

import trio

import trio_taskgraph as tg

if TYPE_CHECKING:
    from collections.abc import Callable

NODES = 100_000
FANOUT = 8
REFS = 1_000


def build_tree(nodes: int = NODES, refs: int = 0) -> object:
    """
    A tree of exactly ``nodes`` nodes, breadth first: about one node in ``FANOUT`` is a
    container (dicts and lists alternating), the rest are scalar leaves. ``refs`` leaves,
    evenly spread, are replaced by distinct CacheRefs.
    """
    leaves_cycle: list[object] = ["name", 42, 3.5, None, True, "a longer text value", -7]
    root: dict[str, object] = {}
    queue: deque[object] = deque([root])
    count = 1
    containers = 1
    while count < nodes:
        parent = queue.popleft()
        for i in range(FANOUT):
            if count >= nodes:
                break
            count += 1
            child: object
            if containers < nodes // FANOUT:
                containers += 1
                child = [] if containers % 2 else {}
                queue.append(child)
            else:
                child = leaves_cycle[count % len(leaves_cycle)]
            if isinstance(parent, dict):
                parent[f"k{i}"] = child
            else:
                assert isinstance(parent, list)
                parent.append(child)
    if refs:
        _plant_refs(root, refs)
    return root


def _plant_refs(root: object, refs: int) -> None:
    slots: list[tuple[object, object]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)  # type: ignore[arg-type]
        for key, child in items:
            if isinstance(child, dict | list):
                stack.append(child)
            else:
                slots.append((node, key))
    step = len(slots) // refs
    for n in range(refs):
        node, key = slots[n * step]
        node[key] = tg.CacheRef(f"blobs/{n}.bin", n)  # type: ignore[index]


def count_nodes(root: object) -> int:
    return bare_visit(root)


def bare_visit(root: object) -> int:
    """
    Touch every node once, build nothing: the floor. Tuned as hard as the walker (locals
    for the types, one set lookup for the sequence kinds) so the ratio is honest.
    """
    stack = [root]
    pop = stack.pop
    push_all = stack.extend
    dict_ = dict
    sequences = frozenset({list, tuple, set, frozenset})
    n = 0
    while stack:
        x = pop()
        n += 1
        tp = type(x)
        if tp is dict_:
            push_all(x.values())  # type: ignore[attr-defined]
        elif tp in sequences:
            push_all(x)  # type: ignore[arg-type]
    return n


async def trivial_resolver(ref: tg.CacheRef) -> object:
    return ref.ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="a few rounds only")
    args = parser.parse_args()
    rounds = 5 if args.quick else 21

    plain = build_tree()
    with_refs = build_tree(refs=REFS)
    print(
        f"tree: {count_nodes(plain):,} nodes; with refs: {len(tg.collect_cache_refs(with_refs)):,} refs"
    )

    timings: dict[str, list[float]] = {}

    async def run() -> None:
        # The collector is paused while timing (collected between runs) so that one
        # variant's garbage is never paid for by the next.
        async def timed(name: str, fn: Callable[[], object]) -> None:
            gc.collect()
            gc.disable()
            t0 = time.perf_counter()
            fn()
            timings.setdefault(name, []).append(time.perf_counter() - t0)
            gc.enable()

        async def timed_async(name: str, value: object) -> object:
            gc.collect()
            gc.disable()
            t0 = time.perf_counter()
            out = await tg.resolve_output(value, trivial_resolver)
            timings.setdefault(name, []).append(time.perf_counter() - t0)
            gc.enable()
            return out

        for r in range(rounds):
            order = [0, 1, 2, 3] if r % 2 == 0 else [3, 2, 1, 0]
            for which in order:
                if which == 0:
                    await timed("bare visit", lambda: bare_visit(plain))
                elif which == 1:
                    out = await timed_async("resolve_output, no refs", plain)
                    assert out is plain
                elif which == 2:
                    out = await timed_async("resolve_output, 1,000 refs", with_refs)
                    assert out is not with_refs
                else:
                    await timed("copy.deepcopy", lambda: copy.deepcopy(plain))

    trio.run(run)
    targets = {"resolve_output, no refs": 1.2, "resolve_output, 1,000 refs": 3.0}
    print(
        f"{'variant':<28} {'median ms':>10} {'x bare':>8} {'min ms':>8} {'x bare':>7} {'target':>10}"
    )
    print("(x bare: median over rounds of time / that round's bare visit; then min / min)")
    ok = True
    results: list[str] = []
    for name, values in timings.items():
        med = statistics.median(values)
        ratio = statistics.median(v / b for v, b in zip(values, timings["bare visit"], strict=True))
        target = targets.get(name)
        low = min(values)
        low_ratio = low / min(timings["bare visit"])
        mark = ""
        if target is not None:
            mark = f"<= {target}" + (" ok" if ratio <= target else " MISSED")
            ok = ok and ratio <= target
        print(
            f"{name:<28} {med * 1000:>10.2f} {ratio:>8.2f} {low * 1000:>8.2f} {low_ratio:>7.2f} {mark:>10}"
        )
        if target is not None:
            scenario = "no_refs" if "no refs" in name else "1000_refs"
            results.append(
                f"RESULT name=walker/{scenario} ratio={ratio:.3f} target=<={target} "
                'peer="bare iterative visit (time: lower is better)"'
            )
    for line in results:
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
