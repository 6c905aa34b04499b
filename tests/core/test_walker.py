"""
The pure ref walker: `scan_refs`, `collect_cache_refs`, `rebuild`, `substitute_refs`
(spec/S3-refs.md, S3-1 and S3-3 .. S3-7).
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
from collections.abc import Callable
from typing import NamedTuple

import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.strategies import Pair, cache_refs, ref_graphs, ref_trees
from tests.typed_hypothesis import given
from tests.walker_oracle import check_rebuilt, naive_refs, naive_substitute
from trio_taskgraph._core._walker import is_walkable, rebuild, scan_refs, substitute_refs

A = tg.CacheRef("a", 1, "image/png")
B = tg.CacheRef("b")
TABLE = {A: "<a>", B: "<b>"}


class Point(NamedTuple):
    x: object
    y: object


@dataclasses.dataclass
class Holder:
    inner: object


class Private:
    __slots__ = ("__secret",)

    def __init__(self, secret: object) -> None:
        self.__secret = secret


class MyDict(dict[str, object]):
    pass


class MyList(list[object]):
    pass


class MyTuple(tuple[object, ...]):
    __slots__ = ()


# --- shapes (S3-3) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda r: {"k": r},
        lambda r: collections.OrderedDict(k=r),
        lambda r: collections.defaultdict(list, k=r),
        lambda r: [r],
        lambda r: (r,),
        lambda r: Point(r, 1),
        lambda r: Pair(1, r),
        lambda r: {r},
        lambda r: frozenset({r}),
    ],
    ids=[
        "dict",
        "OrderedDict",
        "defaultdict",
        "list",
        "tuple",
        "namedtuple",
        "NamedTuple",
        "set",
        "frozenset",
    ],
)
def test_walked_shapes_come_back_with_the_same_type(make: Callable[[object], object]) -> None:
    """S3-3: every walked container is rebuilt with its own type."""
    value = make(A)
    assert tg.collect_cache_refs(value) == [A]
    out = substitute_refs(value, TABLE)
    assert type(out) is type(value)
    check_rebuilt(value, out, TABLE)
    if isinstance(value, collections.defaultdict):
        assert isinstance(out, collections.defaultdict)
        assert out.default_factory is list


@pytest.mark.parametrize(
    "leaf",
    [
        Holder(A),
        Private(A),
        RuntimeError(A),
        MyDict(k=A),
        MyList([A]),
        MyTuple((A,)),
        collections.Counter({A: 1}),
        collections.deque([A]),
        b"bytes",
        tg.Blob(b"x"),
        range(3),
    ],
    ids=lambda v: type(v).__name__,
)
def test_everything_else_is_an_opaque_leaf(leaf: object) -> None:
    """
    S3-3: class instances, dataclasses, exceptions and subclasses are returned by reference,
    never walked or cloned (the seed's M-3 and its Error/URL fix: a generic clone drops data
    kept in slots or private fields).
    """
    value = {"leaf": leaf, "ref": A}
    assert not is_walkable(leaf)
    assert tg.collect_cache_refs(leaf) == []
    assert tg.collect_cache_refs(value) == [A]
    out = substitute_refs(value, TABLE)
    assert out == {"leaf": leaf, "ref": "<a>"}
    assert out["leaf"] is leaf


def test_mapping_keys_are_opaque() -> None:
    """S3-3: only values are walked; a ref used as a key is part of the shape."""
    value = {A: "value", "k": B}
    assert tg.collect_cache_refs(value) == [B]
    assert substitute_refs(value, TABLE) == {A: "value", "k": "<b>"}


# --- the brand (S3-1) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fake",
    [
        {"schema": {"$ref": "#/$defs/Foo"}},
        {"note": {"$ref": "cache://OTHER_RUN/secret"}},
        {"x": {"kind": "task-graph/CacheRef", "$ref": "cache://OTHER_RUN/secret", "size": 1}},
        [{"$ref": "cache://OTHER_RUN/secret"}],
    ],
)
def test_dicts_with_dollar_ref_are_data(fake: object) -> None:
    """S3-1: a dict carrying ``$ref`` (even with the brand string) is never a ref."""
    assert tg.collect_cache_refs(fake) == []
    assert not tg.is_cache_ref(fake)
    assert scan_refs(fake).refs == ()


# --- identity and no mutation (S3-4) ---------------------------------------------------------


def test_nothing_matched_returns_the_same_object() -> None:
    """S3-4"""
    value = {"a": [1, {"b": (2, 3)}], "c": {4, 5}}
    assert substitute_refs(value, TABLE) is value
    assert substitute_refs(value, {}) is value
    with_ref = {"r": A}
    assert substitute_refs(with_ref, {}) is with_ref
    assert substitute_refs(with_ref, {B: 1}) is with_ref


def test_clean_branches_keep_their_identity() -> None:
    """S3-4: only the path from the root to a resolved ref is copied."""
    clean = {"deep": [1, 2, (3,)]}
    value = {"clean": clean, "dirty": [clean, A], "other": [B]}
    out = substitute_refs(value, {A: "<a>"})
    assert isinstance(out, dict)
    assert out["clean"] is clean
    assert out["dirty"][0] is clean
    assert out["dirty"] == [clean, "<a>"]
    assert out["other"] is value["other"]


@given(ref_graphs())
def test_input_is_never_mutated(value: object) -> None:
    """S3-4: the input pickles to the same bytes before and after a rebuild."""
    before = pickle.dumps(value)
    refs = scan_refs(value).refs
    substitute_refs(value, {r: ("resolved", r.ref) for r in refs})
    assert pickle.dumps(value) == before


# --- cycles and sharing (S3-5) ---------------------------------------------------------------


def test_self_cycle_keeps_its_topology() -> None:
    """S3-5"""
    value: list[object] = [A]
    value.append(value)
    out = substitute_refs(value, TABLE)
    assert isinstance(out, list)
    assert out[0] == "<a>"
    assert out[1] is out
    assert value[1] is value
    assert value[0] is A


def test_cycle_through_a_tuple_and_a_dict() -> None:
    """S3-5: an immutable container on a cycle is rebuilt once, pointing at the copies."""
    inner: dict[str, object] = {"ref": A}
    outer = (inner, B)
    inner["back"] = outer
    out = substitute_refs(outer, TABLE)
    assert isinstance(out, tuple)
    assert out[1] == "<b>"
    assert out[0]["ref"] == "<a>"
    assert out[0]["back"] is out
    check_rebuilt(outer, out, TABLE)


def test_cycle_without_refs_is_returned_as_is() -> None:
    """S3-4, S3-5"""
    value: dict[str, object] = {}
    value["self"] = [value, (value,)]
    assert substitute_refs(value, TABLE) is value
    assert tg.collect_cache_refs(value) == []


def test_shared_immutable_inside_an_immutable() -> None:
    """S3-5: a tuple shared twice inside a tuple is rebuilt once."""
    inner = (A,)
    out = substitute_refs((inner, inner, frozenset({inner})), TABLE)
    assert out == (("<a>",), ("<a>",), frozenset({("<a>",)}))
    assert out[0] is out[1]


def test_shared_subtree_is_rebuilt_once_and_shared() -> None:
    """S3-5"""
    shared = [A, {"x": B}]
    value = {"one": shared, "two": shared, "three": (shared,)}
    out = substitute_refs(value, TABLE)
    assert isinstance(out, dict)
    assert out["one"] is out["two"] is out["three"][0]
    assert out["one"] == ["<a>", {"x": "<b>"}]


# --- distinct refs (S3-6) --------------------------------------------------------------------


def test_each_distinct_ref_is_reported_once_in_order() -> None:
    """S3-6: equal refs are one ref; collect lists them left to right."""
    value = [B, {"x": A, "y": [tg.CacheRef("b")]}, (A, tg.CacheRef("a", 1, "image/png"))]
    assert tg.collect_cache_refs(value) == [B, A]
    assert set(scan_refs(value).refs) == {A, B}


def test_resolved_values_are_not_walked_again() -> None:
    """S3-6: a resolved value holding a ref is inserted as-is."""
    out = substitute_refs([A], {A: [B]})
    assert out == [[B]]


def test_root_ref() -> None:
    assert substitute_refs(A, TABLE) == "<a>"
    assert substitute_refs(A, {}) is A
    assert tg.collect_cache_refs(A) == [A]


# --- depth (S3-7) ----------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [lambda x: [x], lambda x: {"k": x}, lambda x: (x, 0)])
def test_ten_thousand_levels(wrap: Callable[[object], object]) -> None:
    """S3-7: no recursion; 10,000 levels (and three times that) work."""
    for depth in (10_000, 30_000):
        value: object = A
        for _ in range(depth):
            value = wrap(value)
        assert tg.collect_cache_refs(value) == [A]
        out = substitute_refs(value, TABLE)
        for _ in range(depth):
            if isinstance(out, dict):
                out = out["k"]
            else:
                assert isinstance(out, list | tuple)
                out = out[0]
        assert out == "<a>"


# --- sets and robustness ---------------------------------------------------------------------


def test_unhashable_value_for_a_set_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="set must be hashable"):
        substitute_refs({A}, {A: []})
    with pytest.raises(TypeError, match="frozenset must be hashable"):
        substitute_refs(frozenset({A}), {A: []})


def test_mutation_between_scan_and_rebuild_never_crashes() -> None:
    """S3-4: children the scan never saw are kept by reference; the current children win."""
    value: list[object] = [[A], [B]]
    scan = scan_refs(value)
    value[0] = [A, "new"]
    value.append([A])
    out = rebuild(scan, TABLE)
    assert isinstance(out, list)
    assert out[1] == ["<b>"]
    # The new children were not scanned: they stay by reference.
    assert out[0] is value[0]
    assert out[2] is value[2]
    scan = scan_refs(value)
    value.clear()
    assert rebuild(scan, TABLE) == []


def test_scan_repr_and_counts() -> None:
    scan = scan_refs([[A], [A], {"k": (B,)}])
    assert scan.container_count == 5
    assert "2 refs" in repr(scan)


# --- properties ------------------------------------------------------------------------------


@given(ref_trees)
def test_collect_finds_exactly_the_refs_placed(value: object) -> None:
    """S3-1, S3-3, S3-6 (property): against a naive recursive oracle."""
    found = tg.collect_cache_refs(value)
    assert len(found) == len(set(found))
    assert set(found) == naive_refs(value)


@given(ref_trees, st.data())
def test_rebuild_equals_naive_substitution(value: object, data: st.DataObject) -> None:
    """S3-3, S3-4 (property): acyclic values against a naive recursive oracle."""
    refs = naive_refs(value)
    chosen = data.draw(st.sets(st.sampled_from(sorted(refs, key=repr)))) if refs else set()
    table = {r: ("resolved", r.ref, r.size) for r in chosen}
    out = substitute_refs(value, table)
    assert out == naive_substitute(value, table)
    check_rebuilt(value, out, table)
    if not table:
        assert out is value


@given(ref_graphs(), st.data())
def test_rebuild_keeps_sharing_and_cycles(value: object, data: st.DataObject) -> None:
    """S3-4, S3-5 (property): graphs with shared sub-trees and cycles."""
    refs = scan_refs(value).refs
    chosen = data.draw(st.sets(st.sampled_from(refs))) if refs else set()
    table = {r: object() for r in chosen}
    out = substitute_refs(value, table)
    check_rebuilt(value, out, table)
    assert set(tg.collect_cache_refs(out)) == set(refs) - set(chosen)


@given(ref_graphs(cycles=False))
def test_rebuild_of_shared_acyclic_graphs(value: object) -> None:
    """S3-5 (property): acyclic sharing, every ref resolved."""
    table = {r: ("resolved", r.ref) for r in scan_refs(value).refs}
    out = substitute_refs(value, table)
    check_rebuilt(value, out, table)
    assert tg.collect_cache_refs(out) == []
    assert substitute_refs(out, table) is out  # idempotent


@given(cache_refs)
def test_any_ref_alone(ref: tg.CacheRef) -> None:
    assert substitute_refs([ref, ref], {ref: 1}) == [1, 1]
