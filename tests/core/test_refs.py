"""
`CacheRef`: a branded, frozen, validated value (spec/S3-refs.md, S3-1 and S3-2).
"""

from __future__ import annotations

import pickle

import attrs
import pytest

import trio_taskgraph as tg
from tests.strategies import cache_refs
from tests.typed_hypothesis import given
from trio_taskgraph._core._refs import CACHE_REF_KIND, MAX_REF_LENGTH


def test_positional_construction_and_brand() -> None:
    """S3-1: ``CacheRef(ref, size=None, mime=None)``, branded by its type and ``kind``."""
    ref = tg.CacheRef("blobs/x.bin", 10, "image/png")
    assert (ref.ref, ref.size, ref.mime) == ("blobs/x.bin", 10, "image/png")
    assert ref.kind == CACHE_REF_KIND == "task-graph/CacheRef"
    assert tg.CacheRef("r") == tg.make_cache_ref("r")
    assert tg.make_cache_ref("r", size=1, mime="a/b") == tg.CacheRef("r", 1, "a/b")


def test_frozen_hashable_and_picklable() -> None:
    ref = tg.CacheRef("r", 1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ref.ref = "other"  # type: ignore[misc]
    assert {ref, tg.CacheRef("r", 1)} == {ref}
    assert pickle.loads(pickle.dumps(ref)) == ref


@pytest.mark.parametrize(
    "value",
    [
        {"$ref": "cache://OTHER_RUN/secret"},
        {"$ref": "#/$defs/Foo"},
        {"kind": "task-graph/CacheRef", "$ref": "x"},
        ("x", None, None),
        "x",
        None,
    ],
)
def test_only_instances_are_refs(value: object) -> None:
    """S3-1: shapes, even with the brand string, are data."""
    assert not tg.is_cache_ref(value)


@given(cache_refs)
def test_generated_refs_are_refs(ref: tg.CacheRef) -> None:
    assert tg.is_cache_ref(ref)


def test_ref_length_at_and_past_the_limit() -> None:
    """S3-2: at most MAX_REF_LENGTH characters."""
    assert len(tg.CacheRef("x" * MAX_REF_LENGTH).ref) == MAX_REF_LENGTH
    with pytest.raises(ValueError, match="limit"):
        tg.CacheRef("x" * (MAX_REF_LENGTH + 1))


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (("",), ValueError, "non-empty"),
        (("a\x00b",), ValueError, "NUL"),
        ((b"bytes",), TypeError, "str"),
        ((None,), TypeError, "str"),
        (("r", -1), ValueError, ">= 0"),
        (("r", True), TypeError, "int"),
        (("r", 1.0), TypeError, "int"),
        (("r", "3"), TypeError, "int"),
        (("r", None, 3), TypeError, "mime"),
    ],
)
def test_invalid_refs_cannot_be_built(
    args: tuple[object, ...], exc: type[Exception], match: str
) -> None:
    """S3-2"""
    with pytest.raises(exc, match=match):
        tg.CacheRef(*args)  # type: ignore[arg-type]


def test_size_zero_is_valid() -> None:
    assert tg.CacheRef("r", 0).size == 0
