"""
Independent oracles for the ref walker's tests (and nothing else): a naive recursive
substitution for acyclic values, and a parallel walk that checks a rebuilt graph (cycles and
sharing included) against its original, rule by rule (S3-3 .. S3-6).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Protocol, cast

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


def _children(value: object) -> Iterable[object]:
    """The children of a walked container: a dict's values, or the members."""
    if isinstance(value, dict):
        return value.values()
    assert isinstance(value, list | tuple | set | frozenset)
    return value


class _NamedTupleType(Protocol):
    def _make(self, iterable: Iterable[object], /) -> object: ...


def naive_refs(value: object) -> set[CacheRef]:
    """Every ref in an acyclic ``value``, recursively (the oracle for collect)."""
    if type(value) is CacheRef:
        return {value}
    if not _walked(value):
        return set()
    found: set[CacheRef] = set()
    for item in _children(value):
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
        out: dict[object, object]
        if tp is collections.defaultdict:
            assert isinstance(value, collections.defaultdict)
            out = collections.defaultdict(value.default_factory)
        else:
            out = type(value)()
        for k, v in value.items():
            out[k] = naive_substitute(v, table)
        return out
    items = [naive_substitute(v, table) for v in _children(value)]
    if tp is not tuple and issubclass(tp, tuple):
        # `_walked` admits only namedtuples among tuple subclasses.
        return cast("_NamedTupleType", tp)._make(items)
    assert isinstance(value, list | tuple | set | frozenset)
    return type(value)(items)


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
            stack.extend(_children(x))
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
                assert isinstance(o, collections.defaultdict)
                assert isinstance(r, collections.defaultdict)
                assert r.default_factory is o.default_factory
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
