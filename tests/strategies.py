"""
Hypothesis strategies shared by the test suites (and the fuzz harnesses' fallbacks).
"""

from __future__ import annotations

from typing import Literal

from hypothesis import strategies as st

__all__ = ["binary_chunks", "port_names"]

#: Port names: any non-empty text.
port_names = st.text(min_size=1, max_size=20)

#: A list of binary chunks of mixed bytes-like types, empty chunks included.
binary_chunks = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64).map(bytearray),
        st.binary(max_size=64).map(lambda data: memoryview(data)),
    ),
    max_size=20,
)


# --- refs and the ref walker (issue 4) -------------------------------------------------------

import collections as _collections  # noqa: E402
from typing import NamedTuple as _NamedTuple  # noqa: E402

from trio_taskgraph import Blob as _Blob, CacheRef as _CacheRef  # noqa: E402


class Pair(_NamedTuple):
    """A namedtuple for the walker's strategies (rebuilt with the same type)."""

    left: object
    right: object


_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)

#: Valid `CacheRef`s: short ref names (so that equal refs occur), optional size and mime.
cache_refs = st.builds(
    _CacheRef,
    # No NUL (S3-2) and no lone surrogates (not UTF-8: the wire refuses them, S5-1).
    st.text(
        st.characters(exclude_characters="\x00", exclude_categories=_SURROGATES),
        min_size=1,
        max_size=3,
    ),
    st.none() | st.integers(min_value=0, max_value=2**40),
    st.none() | st.sampled_from(["image/png", "text/plain"]),
)

#: Hashable leaves, refs included (what may go into a set or a frozenset).
hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=8),
    st.binary(max_size=8),
    cache_refs,
    st.builds(_Blob, st.binary(max_size=8), st.none() | st.just("a/b")),
)

#: Dicts that only look like refs: JSON-Schema pointers and forged envelopes (S3-1).
_FAKE_REFS: list[dict[str, object]] = [
    {"$ref": "#/$defs/Foo"},
    {"$ref": "cache://OTHER_RUN/secret"},
    {"kind": "task-graph/CacheRef", "$ref": "cache://OTHER_RUN/secret", "size": 3},
]
fake_refs = st.sampled_from(_FAKE_REFS).map(dict)


def _ref_containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    keys = st.text(max_size=4)
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(_collections.OrderedDict),
        st.dictionaries(keys, children, max_size=4).map(
            lambda d: _collections.defaultdict(list, d)
        ),
        st.builds(Pair, children, children),
        st.frozensets(hashable_leaves, max_size=4),
        st.sets(hashable_leaves, max_size=4),
    )


#: Acyclic trees of every shape the walker walks, with refs and fake refs among the leaves.
ref_trees = st.recursive(st.one_of(hashable_leaves, fake_refs), _ref_containers, max_leaves=25)


def _mutable_containers(value: object) -> list[object]:
    seen: dict[int, object] = {}
    stack = [value]
    while stack:
        x = stack.pop()
        if type(x) in (list, dict, _collections.OrderedDict, _collections.defaultdict):
            if id(x) in seen:
                continue
            seen[id(x)] = x
            if isinstance(x, dict):
                stack.extend(x.values())
            else:
                assert isinstance(x, list)
                stack.extend(x)
        elif type(x) in (tuple, Pair):
            assert isinstance(x, tuple)
            stack.extend(x)
    return list(seen.values())


@st.composite
def ref_graphs(draw: st.DrawFn, *, cycles: bool = True) -> object:
    """
    A tree from `ref_trees`, wrapped in a list, then rewired: some mutable containers get
    extra edges to other containers (shared sub-trees) and, with ``cycles``, to themselves
    or their ancestors (cycles).
    """
    root: list[object] = [draw(ref_trees), draw(ref_trees)]
    targets = _mutable_containers(root)
    for _ in range(draw(st.integers(0, 4))):
        holder = draw(st.sampled_from(targets))
        if cycles:
            target = draw(st.sampled_from(targets))
        else:
            # Only edges to containers that are not ancestors of the holder: to a container
            # of the first tree from a holder in the second (never an ancestor), or leaves.
            first = _mutable_containers(root[0])
            second = _mutable_containers(root[1])
            if not first or not second:
                continue
            holder = draw(st.sampled_from(second))
            target = draw(st.sampled_from(first))
        if isinstance(holder, dict):
            holder[f"link{len(holder)}"] = target
        else:
            assert isinstance(holder, list)
            holder.append(target)
    return root


__all__ += ["Pair", "cache_refs", "fake_refs", "hashable_leaves", "ref_graphs", "ref_trees"]


#: Values the wire carries (S5-1): scalars, refs, blobs, lists, tuples, dicts with scalar keys.
wire_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=12),
    cache_refs,
    st.builds(_Blob, st.binary(max_size=12), st.none() | st.just("image/png")),
)
wire_values = st.recursive(
    wire_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=5),
        st.dictionaries(st.integers(-5, 5) | st.binary(max_size=3), children, max_size=3),
    ),
    max_leaves=30,
)

__all__ += ["wire_scalars", "wire_values"]
