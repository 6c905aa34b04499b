"""
Row keys and ref signing (`_core/_keys.py`): S4-1 and S4-6.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph._core._keys import (
    RefSigner,
    canonical_encode,
    check_namespace,
    child_namespace,
    input_digest,
    is_blob_name,
)

# JSON-ish values plus bytes: what task inputs hold.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=4),
    ),
    max_leaves=20,
)


def _reordered(value: object) -> object:
    if isinstance(value, dict):
        return {k: _reordered(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


@given(values)
def test_key_ignores_dict_order_at_every_depth(value: object) -> None:
    """S4-1: insertion order of nested mappings never changes the key."""
    assert canonical_encode(_reordered(value)) == canonical_encode(value)


@given(values, values)
def test_encoding_is_injective(a: object, b: object) -> None:
    """S4-1: different values (types included) give different encodings."""

    def normal(v: object) -> object:
        # Compare with types: True == 1 and 1 == 1.0 in Python, but are distinct inputs.
        if isinstance(v, dict):
            return ("d", sorted((repr(normal(k)), normal(x)) for k, x in v.items()))
        if isinstance(v, list):
            return ("l", [normal(x) for x in v])
        return (type(v).__name__, repr(v))

    if normal(a) != normal(b):
        assert canonical_encode(a) != canonical_encode(b)
    else:
        assert canonical_encode(a) == canonical_encode(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, "1"),
        (b"x", "x"),
        (True, 1),
        (1, 1.0),
        (0.0, -0.0),
        (None, b""),
        ({"a": {"b": 1}}, {"a": {"b": "1"}}),
        ({"a": 1, "b": 2}, {"a": 1}),
        ([1, 2], [2, 1]),
        (["ab"], ["a", "b"]),
        ({1: "x"}, {"1": "x"}),
        (tg.Blob(b"x"), b"x"),
        (tg.Blob(b"x", "a/b"), tg.Blob(b"x")),
    ],
)
def test_distinct_inputs_have_distinct_keys(a: object, b: object) -> None:
    """S4-1: types are preserved; top-level-only sorting would merge some of these."""
    assert input_digest(a) != input_digest(b)


def test_equivalent_shapes_share_a_key() -> None:
    """S4-1: tuples key as lists (rows are msgpack); sets ignore order; NaN is one key."""
    assert input_digest((1, 2)) == input_digest([1, 2])
    assert input_digest({3, 1, 2}) == input_digest({2, 3, 1})
    assert input_digest(float("nan")) == input_digest(float("nan"))
    assert input_digest(bytearray(b"x")) == input_digest(b"x")


def test_unkeyable_inputs_are_refused() -> None:
    """S4-1: anything the encoding cannot represent is a TypeError, never a silent key."""
    with pytest.raises(TypeError, match="object"):
        canonical_encode({"x": object()})
    deep: list[object] = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match="deeper"):
        canonical_encode(deep)


SIGNER = RefSigner(repository_id="a" * 32, secret=b"s" * 32)


def test_issued_refs_parse_back() -> None:
    """S4-6: parse(issue(ns, name)) == name, in that namespace only."""
    text = SIGNER.issue("default", "0" * 32)
    assert SIGNER.parse(tg.CacheRef(text), namespace="default") == "0" * 32
    with pytest.raises(tg.ForeignRefError, match="namespace"):
        SIGNER.parse(tg.CacheRef(text), namespace="other")
    other = RefSigner(repository_id="b" * 32, secret=b"s" * 32)
    with pytest.raises(tg.ForeignRefError, match="another repository"):
        other.parse(tg.CacheRef(text), namespace="default")
    same_id = RefSigner(repository_id="a" * 32, secret=b"t" * 32)
    with pytest.raises(tg.ForeignRefError, match="tag"):
        same_id.parse(tg.CacheRef(text), namespace="default")


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_refused(position: int, byte: int) -> None:
    """S4-6: flipping any character of a ref (tag bits included) makes it foreign."""
    text = SIGNER.issue("ns", "f" * 32)
    position %= len(text)
    if text[position] == chr(byte) or byte == 0:
        return
    forged = text[:position] + chr(byte) + text[position + 1 :]
    with pytest.raises(tg.ForeignRefError):
        SIGNER.parse(tg.CacheRef(forged), namespace="ns")


def test_forged_instances_and_shapes_are_refused() -> None:
    """S4-6: non-CacheRefs, 10 KiB texts planted past the validator, traversal shapes."""
    for bad in ({"$ref": "x"}, "cache://x", None, 3):
        with pytest.raises(tg.ForeignRefError, match="not a CacheRef"):
            SIGNER.parse(bad, namespace="ns")
    forged = object.__new__(tg.CacheRef)
    object.__setattr__(forged, "ref", "cache://" + "a" * 10240)
    with pytest.raises(tg.ForeignRefError):
        SIGNER.parse(forged, namespace="ns")
    object.__setattr__(forged, "ref", b"bytes")
    with pytest.raises(tg.ForeignRefError):
        SIGNER.parse(forged, namespace="ns")
    good = SIGNER.issue("ns", "1" * 32)
    for text in (
        good.replace("/ns/", "/../"),
        good.replace("1" * 32, "../" + "1" * 29),
        "/" + good,
        good + "\n",
    ):
        with pytest.raises(tg.ForeignRefError):
            SIGNER.parse(tg.CacheRef(text), namespace="ns")


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "a/b", "a..b", ".hidden", "-x", "a\x00", "é", "x" * 256]
)
def test_namespaces_cannot_be_paths(bad: str) -> None:
    """S4-6: a namespace never holds a separator, '..', NUL or a leading dot."""
    with pytest.raises(ValueError, match="namespace"):
        check_namespace(bad)


@given(st.text(min_size=1, max_size=50))
def test_child_namespaces_are_valid_and_distinct(label: str) -> None:
    """S4-7: any run id yields a valid namespace of its own."""
    child = child_namespace("default", label)
    assert check_namespace(child) == child
    assert child != child_namespace("default", label + "x")


def test_blob_names_and_signer_validation() -> None:
    """S4-6: names are exactly 32 hex digits; signers need an id and a real secret."""
    assert is_blob_name("0123456789abcdef" * 2)
    assert not is_blob_name("0123456789ABCDEF" * 2)
    assert not is_blob_name("../" + "0" * 29)
    with pytest.raises(ValueError, match="blob name"):
        SIGNER.issue("ns", "../etc")
    with pytest.raises(ValueError, match="repository id"):
        RefSigner(repository_id="nothex", secret=b"s" * 32)
    with pytest.raises(ValueError, match="secret"):
        RefSigner(repository_id="a" * 32, secret=b"short")
    assert "s" * 32 not in repr(SIGNER)


def test_refs_in_inputs_key_by_all_fields() -> None:
    """S4-1: a CacheRef input keys by its text, size and MIME type; never equal to its str."""
    ref = tg.CacheRef("cache://x", 3, "a/b")
    assert input_digest(ref) == input_digest(tg.CacheRef("cache://x", 3, "a/b"))
    assert input_digest(ref) != input_digest(tg.CacheRef("cache://x", 4, "a/b"))
    assert input_digest(ref) != input_digest("cache://x")
    with pytest.raises(TypeError, match="namespace"):
        check_namespace(7)
