"""
Independent oracles for the ref walker's tests (and nothing else): a naive recursive
substitution for acyclic values, and a parallel walk that checks a rebuilt graph (cycles and
sharing included) against its original, rule by rule (S3-3 .. S3-6).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from trio_taskgraph import CacheRef

_WALKED = (
    dict,
    collections.OrderedDict,
    collections.defaultdict,
    list,
    tuple,
    set,
    frozenset,
)


def _walked(value: object) -> bool:
    tp = type(value)
    return tp in _WALKED or (issubclass(tp, tuple) and hasattr(tp, "_fields"))


def naive_refs(value: object) -> set[CacheRef]:
    """Every ref in an acyclic ``value``, recursively (the oracle for collect)."""
    if type(value) is CacheRef:
        return {value}
    if not _walked(value):
        return set()
    items = value.values() if isinstance(value, dict) else value  # type: ignore[attr-defined]
    found: set[CacheRef] = set()
    for item in items:
        found |= naive_refs(item)
    return found


def naive_substitute(value: object, table: Mapping[CacheRef, object]) -> object:
    """Recursively substitute refs in an acyclic ``value`` (the oracle for rebuild)."""
    if type(value) is CacheRef:
        return table.get(value, value)
    tp = type(value)
    if not _walked(value):
        return value
    if isinstance(value, dict):
        out = (
            collections.defaultdict(value.default_factory)
            if tp is collections.defaultdict
            else tp()
        )
        for k, v in value.items():
            out[k] = naive_substitute(v, table)
        return out
    items = [naive_substitute(v, table) for v in value]  # type: ignore[attr-defined]
    if tp is not tuple and issubclass(tp, tuple):
        return tp._make(items)  # type: ignore[attr-defined]
    return tp(items)


def _reachable_refs(value: object) -> set[CacheRef]:
    found: set[CacheRef] = set()
    seen: set[int] = set()
    stack = [value]
    while stack:
        x = stack.pop()
        if type(x) is CacheRef:
            found.add(x)
        elif _walked(x) and id(x) not in seen:
            seen.add(id(x))
            stack.extend(x.values() if isinstance(x, dict) else x)  # type: ignore[attr-defined]
    return found


def check_rebuilt(original: object, result: object, table: Mapping[CacheRef, object]) -> None:
    """
    Assert that ``result`` is ``original`` with the refs of ``table`` substituted:

    - a ref becomes ``table[ref]`` (the very object), other refs and leaves are kept (S3-3);
    - a container with no substituted ref below it is the same object (S3-4);
    - otherwise a container of the same type, children in the same order (S3-3);
    - two paths to one original container lead to one result container: shared sub-trees
      stay shared and cycles keep their topology (S3-5).
    """
    pairs: dict[int, object] = {}
    stack = [(original, result)]
    while stack:
        o, r = stack.pop()
        if type(o) is CacheRef:
            expected = table.get(o, o)
            assert r is expected, (o, r)
            continue
        if not _walked(o):
            assert r is o, (o, r)
            continue
        if id(o) in pairs:
            assert pairs[id(o)] is r, "a shared container was copied twice"
            continue
        pairs[id(o)] = r
        if not (_reachable_refs(o) & table.keys()):
            assert r is o, f"a container with nothing to resolve was copied: {o!r}"
            continue
        assert r is not o
        assert type(r) is type(o)
        if isinstance(o, dict):
            assert isinstance(r, dict)
            assert list(r.keys()) == list(o.keys())
            if type(o) is collections.defaultdict:
                assert r.default_factory is o.default_factory  # type: ignore[attr-defined]
            stack.extend((o[k], r[k]) for k in o)
        elif isinstance(o, set | frozenset):
            assert isinstance(r, set | frozenset)
            # Members are hashable, hence acyclic: the naive substitution is the oracle.
            assert r == {naive_substitute(x, table) for x in o}
        else:
            assert isinstance(o, list | tuple)
            assert isinstance(r, list | tuple)
            assert len(r) == len(o)
            stack.extend(zip(o, r, strict=True))
