"""
The ref walker: find every `CacheRef` in a value, and rebuild the value with refs replaced.

This module is the pure half of `resolve_output` (the trio half, `_resolve.py`, only runs the
resolver calls). It never recurses, never mutates its input and never awaits.

Rules (spec/S3-refs.md):

- S3-3: the walker descends into ``dict``, ``collections.OrderedDict``,
  ``collections.defaultdict``, ``list``, ``tuple``, namedtuples, ``set`` and ``frozenset``
  (exact types; a rebuilt container has the same type as the original). Everything else is an
  opaque leaf returned by reference: other subclasses, class instances, dataclasses, attrs
  classes, exceptions, ``bytes``, `Blob`. Mapping keys are opaque too: only values are walked.
- S3-4: identity: a container with no selected ref below it is returned as the same object,
  and a value with no selected ref at all is returned as-is. The input is never mutated.
- S3-5: cycles and shared sub-trees: every container is visited once; a shared sub-tree is
  rebuilt once and the copy is shared in the result; a cycle keeps its topology.
- S3-6: each distinct ref (by value) is looked up once per call, however often it appears;
  a resolved value is inserted as-is and never walked again.
- S3-7: no recursion: depth is bounded by memory, not by Python's recursion limit.

Theory of operation
-------------------

`scan_refs` is one iterative depth-first pass with an explicit stack. It records every
walkable container by ``id()`` (the record keeps them alive, so ids stay unique), every
distinct ref, and a log of the containers and refs it popped with the stack index each was
popped from. When no ref is wanted the caller returns the input and is done: that pass is the
whole cost of the common case, so it is kept as lean as a bare visit (leaves cost one set
lookup, nothing is built).

`rebuild` runs only when some ref was resolved. Children are pushed in one block above the
index their container was popped from, so replaying the log with a monotonic stack tells
which container holds each logged node, revisits included: the holder -> child edges of the
whole graph are recovered without looking at a single leaf again. Every container from which
a resolved ref can be reached is *dirty* (a breadth-first walk up the reversed edges; cycles
need no special case). Only dirty containers are copied:

1. every dirty mutable container (``dict`` family, ``list``, ``set``) gets an empty copy of
   the same type first, so a cycle through it can point at the copy before it is filled;
2. dirty immutable containers (``tuple``, namedtuple, ``frozenset``) are built children
   first. Immutable containers cannot form a cycle on their own (a cycle always passes
   through a mutable container), so this order always exists;
3. the mutable copies are filled, in the original iteration order.

A child is mapped to its resolved value (a selected ref), to its copy (a dirty container) or
to itself (anything else). If the caller mutates the input while resolvers run, the copies
hold the current children, children the scan never saw are kept by reference and unknown
refs stay refs: never a crash.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from typing import TYPE_CHECKING, Final, final

import attrs

from ._events import Blob
from ._refs import CacheRef

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "RefScan",
    "collect_cache_refs",
    "is_walkable",
    "rebuild",
    "scan_refs",
    "substitute_refs",
]

# Container kinds.
_DICT: Final = 1  # dict, OrderedDict, defaultdict: walk values, rebuild with the same type
_LIST: Final = 2
_SET: Final = 3
_TUPLE: Final = 4
_NAMEDTUPLE: Final = 5
_FROZENSET: Final = 6

_EXACT_KINDS: Final[Mapping[type, int]] = {
    dict: _DICT,
    OrderedDict: _DICT,
    defaultdict: _DICT,
    list: _LIST,
    set: _SET,
    tuple: _TUPLE,
    frozenset: _FROZENSET,
}

# Types that are certainly leaves: checked first, because most nodes of an output are leaves.
_LEAF_TYPES: Final = frozenset(
    {str, int, float, bool, type(None), bytes, bytearray, memoryview, complex, Blob}
)

_IMMUTABLE_KINDS: Final = frozenset({_TUPLE, _NAMEDTUPLE, _FROZENSET})


def _kind_of(tp: type) -> int:
    """Return the container kind of ``tp``, 0 for an opaque leaf (S3-3)."""
    # Invariant (S3-3): exact types only; every other class is an opaque leaf.
    kind = _EXACT_KINDS.get(tp)
    if kind is not None:
        return kind
    # A namedtuple (collections.namedtuple or typing.NamedTuple) is rebuilt with `_make`.
    # Any other tuple subclass is a class instance like any other: opaque.
    if issubclass(tp, tuple) and hasattr(tp, "_fields") and hasattr(tp, "_make"):
        return _NAMEDTUPLE
    return 0


def is_walkable(value: object) -> bool:
    """True when the walker descends into ``value`` (S3-3); False for an opaque leaf."""
    return _kind_of(type(value)) != 0


def _children(container: object, kind: int) -> Iterable[object]:
    if kind == _DICT:
        return container.values()  # type: ignore[attr-defined,no-any-return]
    return container  # type: ignore[return-value]


@final
@attrs.frozen(eq=False, repr=False)
class RefScan:
    """
    What one `scan_refs` pass found.

    Attributes:
        root: the scanned value.
        refs: every distinct ref found, in depth-first order (each once, S3-6).
    """

    root: object
    refs: tuple[CacheRef, ...]
    # id -> container for every walkable container reached (keeps them alive: ids stay
    # unique while the scan exists).
    _containers: dict[int, object] = attrs.field(alias="containers")
    # The visit log, in pop order, as two parallel lists: the stack index each node was
    # popped from, and the node: a container's id (first visit or revisit) or a ref.
    _marks: list[int] = attrs.field(alias="marks")
    _items: list[object] = attrs.field(alias="items")

    def __repr__(self) -> str:
        return f"<RefScan: {len(self.refs)} refs in {len(self._containers)} containers>"

    @property
    def container_count(self) -> int:
        """How many distinct walkable containers the value holds."""
        return len(self._containers)


def scan_refs(value: object, *, ordered: bool = False) -> RefScan:
    """
    Find every distinct `CacheRef` in ``value`` and every container holding the walk.

    One iterative pass; each container is expanded once however often it is reached, so
    cycles and shared sub-trees cost nothing extra (S3-5, S3-7).

    Args:
        value: any value.
        ordered: when true, refs are listed left to right (a container's children in
            iteration order); otherwise the order is depth-first but unspecified (cheaper).

    Returns:
        The scan, to pass to `rebuild`.
    """
    containers: dict[int, object] = {}
    found: dict[CacheRef, None] = {}
    marks: list[int] = []
    items: list[object] = []
    mark = marks.append
    log = items.append
    stack: list[object] = [value]
    pop = stack.pop
    push_all = stack.extend
    leaf_types = _LEAF_TYPES
    while stack:
        x = pop()
        tp = type(x)
        if tp in leaf_types:
            continue
        # The two common containers are tested inline; everything else goes via _kind_of.
        # A container is logged with its stack index (see `_dirty_containers`), then
        # expanded once. Invariant (S3-5): a container already seen is never expanded again.
        if tp is dict:
            key = id(x)
            mark(len(stack))
            log(key)
            if key in containers:
                continue
            containers[key] = x
            values = x.values()  # type: ignore[attr-defined]
            push_all(reversed(values) if ordered else values)
        elif tp is list:
            key = id(x)
            mark(len(stack))
            log(key)
            if key in containers:
                continue
            containers[key] = x
            push_all(reversed(x) if ordered else x)  # type: ignore[call-overload,arg-type]
        elif tp is CacheRef:
            # Invariant (S3-1, S3-6): only CacheRef instances, each distinct one once.
            found[x] = None  # type: ignore[index]
            mark(len(stack))
            log(x)
        else:
            kind = _kind_of(tp)
            if kind == 0:
                continue
            key = id(x)
            mark(len(stack))
            log(key)
            if key in containers:
                continue
            containers[key] = x
            children = _children(x, kind)
            if ordered and kind != _SET and kind != _FROZENSET:
                push_all(reversed(list(children)))
            else:
                push_all(children)
    return RefScan(value, tuple(found), containers=containers, marks=marks, items=items)


def collect_cache_refs(value: object) -> list[CacheRef]:
    """
    Return every distinct `CacheRef` in ``value``, each once, left to right.

    Walks the same shapes as `resolve_output` with the same cycle safety (S3-3, S3-5). Dicts
    that merely carry a ``$ref`` key are data and are never reported (S3-1).
    """
    return list(scan_refs(value, ordered=True).refs)


def _dirty_containers(scan: RefScan, resolved: Mapping[CacheRef, object]) -> set[int]:
    """
    Return the ids of the containers from which a resolved ref can be reached.

    The scan pushes a container's children in one block above the stack index the container
    was popped from, so the container that pushed the node popped at index ``p`` is the
    most recently expanded container popped at an index ``<= p``. One pass over the log
    with a monotonic stack recovers every holder -> child edge (revisits included: shared
    sub-trees and cycles), without touching a single leaf. Dirtiness then spreads from the
    direct holders of resolved refs up the reversed edges, breadth first.
    """
    # The open containers, innermost last, with the index each was popped from; the sentinel
    # at the bottom (index -1, id -1) holds the root.
    open_marks: list[int] = [-1]
    open_ids: list[int] = [-1]
    first_holder: dict[int, int] = {}
    more_holders: dict[int, list[int]] = {}
    direct: set[int] = set()
    ref_type = CacheRef
    for mark, item in zip(scan._marks, scan._items, strict=True):
        while open_marks[-1] > mark:
            open_marks.pop()
            open_ids.pop()
        if type(item) is ref_type:
            if item in resolved:
                direct.add(open_ids[-1])
        elif item in first_holder:
            # A revisit: one more edge into a shared or cyclic container.
            more_holders.setdefault(item, []).append(open_ids[-1])
        else:
            first_holder[item] = open_ids[-1]  # type: ignore[index]
            open_marks.append(mark)
            open_ids.append(item)  # type: ignore[arg-type]
    dirty = set(direct)
    todo = deque(direct)
    while todo:
        cid = todo.popleft()
        for h in (first_holder[cid], *more_holders.get(cid, ())):
            if h != -1 and h not in dirty:
                dirty.add(h)
                todo.append(h)
    return dirty


def rebuild(scan: RefScan, resolved: Mapping[CacheRef, object]) -> object:
    """
    Return ``scan.root`` with every ref that is a key of ``resolved`` replaced by its value.

    Refs absent from ``resolved`` stay as they are. Containers with no replaced ref below
    them are returned as the same objects; the input is never mutated (S3-4, S3-5).

    Raises:
        TypeError: a resolved value destined for a ``set`` or ``frozenset`` is unhashable.
    """
    root = scan.root
    if type(root) is CacheRef:
        return resolved.get(root, root)
    if not resolved:
        return root
    dirty = _dirty_containers(scan, resolved)
    # Invariant (S3-4): only containers that reach a resolved ref are copied.
    if id(root) not in dirty:
        return root
    containers = scan._containers
    kinds = {cid: _kind_of(type(containers[cid])) for cid in dirty}
    copies: dict[int, object] = {}
    get_resolved = resolved.get
    get_copy = copies.get

    def substituted(children: Iterable[object]) -> list[object]:
        # A resolved ref, the copy of a dirty container, or the child itself.
        return [get_resolved(c, c) if type(c) is CacheRef else get_copy(id(c), c) for c in children]

    # 1. Empty copies of the dirty mutable containers, so cycles can point at them.
    for cid in dirty:
        kind = kinds[cid]
        if kind == _DICT:
            original = containers[cid]
            if type(original) is defaultdict:
                copies[cid] = defaultdict(original.default_factory)
            else:
                copies[cid] = type(original)()
        elif kind == _LIST:
            copies[cid] = []
        elif kind == _SET:
            copies[cid] = set()

    # 2. Dirty immutable containers, children first (they form a DAG: see the header).
    for start in dirty:
        if start in copies:
            continue
        stack: list[tuple[int, bool]] = [(start, False)]
        while stack:
            cid, expanded = stack.pop()
            if cid in copies:  # pragma: no cover - reached or not depending on set order
                continue
            container = containers[cid]
            kind = kinds[cid]
            if not expanded:
                stack.append((cid, True))
                for child in _children(container, kind):
                    child_id = id(child)
                    if child_id in dirty and child_id not in copies:
                        stack.append((child_id, False))
                continue
            copies[cid] = _build_immutable(container, kind, substituted(container))  # type: ignore[arg-type]

    # 3. Fill the mutable copies in the original order.
    for cid in dirty:
        kind = kinds[cid]
        if kind in _IMMUTABLE_KINDS:
            continue
        container = containers[cid]
        copy = copies[cid]
        if kind == _DICT:
            keys = list(container)  # type: ignore[call-overload]
            copy.update(zip(keys, substituted(container.values()), strict=True))  # type: ignore[attr-defined]
        elif kind == _LIST:
            copy.extend(substituted(container))  # type: ignore[attr-defined,arg-type]
        else:
            _fill_set(copy, substituted(container))  # type: ignore[arg-type]
    return copies[id(root)]


def _build_immutable(container: object, kind: int, items: list[object]) -> object:
    if kind == _TUPLE:
        return tuple(items)
    if kind == _NAMEDTUPLE:
        return type(container)._make(items)  # type: ignore[attr-defined]
    try:
        return frozenset(items)
    except TypeError as exc:
        raise TypeError(f"a value resolved inside a frozenset must be hashable: {exc}") from exc


def _fill_set(copy: set[object], items: list[object]) -> None:
    try:
        copy.update(items)
    except TypeError as exc:
        raise TypeError(f"a value resolved inside a set must be hashable: {exc}") from exc


def substitute_refs(value: object, resolved: Mapping[CacheRef, object]) -> object:
    """
    Synchronously replace every ref of ``value`` that is a key of ``resolved``.

    The pure equivalent of `resolve_output` with a lookup table (same identity, cycle and
    sharing rules). Useful for tests and for callers that already hold the data.
    """
    return rebuild(scan_refs(value), resolved)
