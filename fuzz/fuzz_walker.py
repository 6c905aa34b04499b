# Invariant tested: S3-1, S3-3, S3-4, S3-5, S3-6, S3-7
"""
Fuzz the ref walker: the input bytes are a small program that builds a value graph (every
walked container type, opaque leaves, refs, fake ``$ref`` dicts, shared sub-trees and
cycles); the harness then checks, against its own naive oracles:

- `collect_cache_refs` returns each reachable ref exactly once, and only refs (S3-1, S3-6);
- `substitute_refs` with a random selection of refs gives a graph where each selected ref is
  its resolved object, every other leaf is itself, containers without a selected ref below
  them are the same objects, copies have the same type, keys and order, and every original
  container maps to exactly one result container (sharing and cycles kept) (S3-3..S3-5);
- the input is never mutated (it pickles identically before and after) (S3-4);
- every 16th input also goes through `resolve_output` under trio with a counting resolver:
  same result shape, one call per distinct selected ref (S3-6).

Run ``python fuzz/fuzz_walker.py [--seconds N]`` (atheris when installed, else a seeded
random-bytes loop). ``run(seconds)`` is what the test calls.
"""

from __future__ import annotations

import collections
import pickle
import random
import sys
from typing import NamedTuple

import _harness
import trio

import trio_taskgraph as tg
from trio_taskgraph._core._walker import scan_refs, substitute_refs


class Finding(AssertionError):
    """The walker broke an invariant on this input."""


class Point(NamedTuple):
    x: object
    y: object


class Opaque:
    """A class instance holding a ref: must be returned by reference, never walked."""

    def __init__(self, inner: object) -> None:
        self.inner = inner


_REFS = [tg.CacheRef(f"r{i}", i if i % 2 else None) for i in range(6)]
_LEAVES: list[object] = [None, 0, -1, "s", b"b", 2.5, True, tg.Blob(b"x")]


def _walked(x: object) -> bool:
    tp = type(x)
    return tp in (
        dict,
        collections.OrderedDict,
        collections.defaultdict,
        list,
        tuple,
        set,
        frozenset,
    ) or (issubclass(tp, tuple) and hasattr(tp, "_fields"))


def _hashable(x: object) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def build(data: bytes) -> object:
    """Interpret ``data`` as a program over a stack of values; return the final graph."""
    stack: list[object] = []
    mutables: list[object] = []
    for i in range(0, len(data) - 1, 2):
        op, arg = data[i] % 16, data[i + 1]
        take = min(len(stack), arg % 5)
        items = [stack.pop() for _ in range(take)]
        if op in (0, 1):
            stack.extend(reversed(items))
            stack.append(_LEAVES[arg % len(_LEAVES)] if op == 0 else _REFS[arg % len(_REFS)])
        elif op == 2:
            stack.append(
                {"$ref": f"cache://OTHER/{arg}"}
                if arg % 2
                else {"kind": "task-graph/CacheRef", "$ref": "x"}
            )
            stack.extend(reversed(items))
        elif op == 3:
            lst = list(items)
            mutables.append(lst)
            stack.append(lst)
        elif op == 4:
            stack.append(tuple(items))
        elif op in (5, 6, 7):
            d = {f"k{j}": v for j, v in enumerate(items)}
            made = (
                d
                if op == 5
                else collections.OrderedDict(d)
                if op == 6
                else collections.defaultdict(list, d)
            )
            mutables.append(made)
            stack.append(made)
        elif op == 8:
            stack.append(Point(items[0] if items else None, items[1] if len(items) > 1 else arg))
        elif op in (9, 10):
            members = [x for x in items if _hashable(x)]
            made_set = set(members) if op == 9 else frozenset(members)
            if op == 9:
                mutables.append(made_set)
            stack.append(made_set)
        elif op == 11 and mutables and stack:
            # Link: a mutable container gains an edge to a stack value (sharing or a cycle).
            stack.extend(reversed(items))
            holder = mutables[arg % len(mutables)]
            target = stack[-1 - (arg // 7) % len(stack)]
            if isinstance(holder, list):
                holder.append(target)
            elif isinstance(holder, dict):
                holder[f"link{len(holder)}"] = target
            elif _hashable(target):
                holder.add(target)  # type: ignore[attr-defined]
        elif op == 12:
            stack.append(Opaque(items[0] if items else _REFS[0]))
        elif op == 13:
            stack.append({_REFS[arg % len(_REFS)]: items})  # a ref as a key is opaque
        else:
            stack.extend(reversed(items))
            if stack and arg % 3 == 0:
                stack.append(stack[-1])  # duplicate: shared
    return list(stack)


def reachable_refs(value: object) -> set[tg.CacheRef]:
    found: set[tg.CacheRef] = set()
    seen: set[int] = set()
    todo = [value]
    while todo:
        x = todo.pop()
        if type(x) is tg.CacheRef:
            found.add(x)
        elif _walked(x) and id(x) not in seen:
            seen.add(id(x))
            todo.extend(x.values() if isinstance(x, dict) else x)  # type: ignore[arg-type]
    return found


def _substitute_hashable(x: object, table: dict[tg.CacheRef, object]) -> object:
    """Naive recursive substitution for set members (hashable, hence acyclic)."""
    if type(x) is tg.CacheRef:
        return table.get(x, x)
    if type(x) is frozenset:
        return frozenset(_substitute_hashable(y, table) for y in x)
    if type(x) is tuple:
        return tuple(_substitute_hashable(y, table) for y in x)
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
        return type(x)._make(_substitute_hashable(y, table) for y in x)  # type: ignore[attr-defined]
    return x


def check_rebuilt(original: object, result: object, table: dict[tg.CacheRef, object]) -> None:
    pairs: dict[int, object] = {}
    todo = [(original, result)]
    while todo:
        o, r = todo.pop()
        if type(o) is tg.CacheRef:
            if r is not table.get(o, o):
                raise Finding(f"ref {o!r} became {r!r}")
            continue
        if not _walked(o):
            if r is not o:
                raise Finding(f"opaque leaf {o!r} was replaced")
            continue
        if id(o) in pairs:
            if pairs[id(o)] is not r:
                raise Finding("a shared container was copied twice")
            continue
        pairs[id(o)] = r
        if not (reachable_refs(o) & table.keys()):
            if r is not o:
                raise Finding(f"a container with nothing to resolve was copied: {o!r}")
            continue
        if r is o or type(r) is not type(o):
            raise Finding(f"bad copy of {type(o).__name__}")
        if isinstance(o, dict):
            assert isinstance(r, dict)
            if list(o) != list(r):
                raise Finding("dict keys or order changed")
            if (
                isinstance(o, collections.defaultdict)
                and r.default_factory is not o.default_factory  # type: ignore[attr-defined]
            ):
                raise Finding("default_factory lost")
            todo.extend((o[k], r[k]) for k in o)
        elif isinstance(o, set | frozenset):
            expected = {_substitute_hashable(x, table) for x in o}
            if r != expected:
                raise Finding("set contents differ")
        else:
            assert isinstance(o, list | tuple)
            assert isinstance(r, list | tuple)
            if len(o) != len(r):
                raise Finding("sequence length changed")
            todo.extend(zip(o, r, strict=True))


def check_one(data: bytes, *, with_trio: bool = False) -> None:
    value = build(data)
    before = pickle.dumps(value)
    refs = reachable_refs(value)
    found = tg.collect_cache_refs(value)
    if len(found) != len(set(found)) or set(found) != refs:
        raise Finding(f"collect found {found!r}, expected {refs!r}")
    if set(scan_refs(value).refs) != refs:
        raise Finding("scan_refs disagrees with collect_cache_refs")
    chooser = random.Random(data)
    selected = [r for r in sorted(refs, key=repr) if chooser.random() < 0.6]
    table: dict[tg.CacheRef, object] = {r: ("resolved", r.ref) for r in selected}
    try:
        out = substitute_refs(value, table)
    except TypeError as exc:  # pragma: no cover - resolved values here are hashable
        raise Finding(f"substitute_refs raised {exc!r}") from exc
    check_rebuilt(value, out, table)
    if pickle.dumps(value) != before:
        raise Finding("the input was mutated")
    if with_trio:
        calls: list[tg.CacheRef] = []

        async def resolver(ref: tg.CacheRef) -> object:
            calls.append(ref)
            await trio.lowlevel.checkpoint()
            return table[ref]

        resolved = trio.run(
            lambda: tg.resolve_output(value, resolver, filter=table.__contains__, max_concurrency=3)
        )
        if len(calls) != len(set(calls)) or set(calls) != set(selected):
            raise Finding(f"resolver calls {calls!r} for selection {selected!r}")
        check_rebuilt(value, resolved, table)


class _EverySixteenthWithTrio:
    """``check_one``, running every 16th input through the trio shell too."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, data: bytes) -> None:
        check_one(data, with_trio=self.count % 16 == 0)
        self.count += 1


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz for about ``seconds``; return the number of inputs run."""
    return _harness.run_inputs(
        _EverySixteenthWithTrio(), name="walker", seconds=seconds, seed=seed, max_len=96
    )


if __name__ == "__main__":
    sys.exit(
        _harness.main(name="walker", description=__doc__, check=_EverySixteenthWithTrio(), run=run)
    )
