"""
S9-7: every public name has a docstring (`python -m pydoc trio_taskgraph` reads well), and every
public async function or method says what cancellation leaves behind (STYLE.md, 8).
"""

from __future__ import annotations

import inspect
import types

import pytest

import trio_taskgraph as tg

#: Values that cannot carry a docstring of their own (ints, type aliases); the module
#: docstrings and the README describe them.
NOT_DOCUMENTABLE = (int, str, float, types.GenericAlias, types.UnionType)


def _public_objects() -> list[tuple[str, object]]:
    found = []
    for name in tg.__all__:
        obj = getattr(tg, name)
        if isinstance(obj, NOT_DOCUMENTABLE) or type(obj).__module__ == "typing":
            continue
        found.append((name, obj))
    return found


def _own_members(cls: type) -> list[tuple[str, object]]:
    members: list[tuple[str, object]] = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            members.append((f"{cls.__name__}.{name}", value))
    return members


def _documented(obj: object) -> bool:
    doc = inspect.getdoc(obj)
    return bool(doc and doc.strip())


def _is_async(fn: object) -> bool:
    # Async methods, async generators and async context managers (asynccontextmanager wraps
    # an async generator: __wrapped__).
    inner = getattr(fn, "__wrapped__", fn)
    return inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)


PUBLIC = _public_objects()


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[n for n, _ in PUBLIC])
def test_every_public_name_has_a_docstring(name: str, obj: object) -> None:
    assert _documented(obj), f"trio_taskgraph.{name} has no docstring"
    if isinstance(obj, type):
        undocumented = [m for m, fn in _own_members(obj) if not inspect.getdoc(fn)]
        assert not undocumented, f"public methods without a docstring: {undocumented}"


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_async_callables_say_what_cancellation_leaves(name: str, obj: object) -> None:
    callables = _own_members(obj) if isinstance(obj, type) else [(name, obj)]
    missing = [
        member
        for member, fn in callables
        if _is_async(fn) and "Cancellation" not in (inspect.getdoc(fn) or "")
    ]
    assert not missing, f"async without a 'Cancellation:' section: {missing}"


def test_pydoc_renders_the_package() -> None:
    import pydoc

    plaintext = vars(pydoc)["plaintext"]  # missing from typeshed's pydoc stub
    assert isinstance(plaintext, pydoc.TextDoc)
    text = pydoc.render_doc(tg, renderer=plaintext)
    assert "structured-concurrency task graphs on Trio" in text
    for name in ("run_graph", "open_byte_channel", "CacheRef", "open_cache_server"):
        assert name in text
