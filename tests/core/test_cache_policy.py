"""
The cache policy (S6-18 ... S6-26): sinks and tees, inline vs ref, hit rows, dangling refs,
replay chunking, input refs, orphan cleanup.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph import wire
from trio_taskgraph._core._accumulate import BinaryRoute, OutputAccumulator
from trio_taskgraph._core._cache_policy import (
    MAX_REPLAY_CHUNK_BYTES,
    binary_routes,
    check_cached_row,
    decide_hit,
    hydrate_value,
    inline_ports_to_ref,
    input_format,
    input_ref_error,
    input_refs,
    keep_as_ref,
    plan_hydration,
    refs_to_delete,
    replay_chunk_size,
    replay_plan,
    sink_ports,
    split_chunk,
)
from trio_taskgraph._core._graph import EdgeMode

SCHEMA: dict[str, object] = {
    "properties": {
        "image": {"x-stream": "binary", "contentMediaType": "image/png"},
        "raw": {"x-stream": "binary", "format": "binary"},
        "meta": {"type": "object"},
        "log": {"x-stream": "append"},
    }
}
PORTS = tg.parse_ports(SCHEMA)
KIB = 1024


def _ref(name: str, size: int | None, mime: str | None = None) -> tg.CacheRef:
    return tg.make_cache_ref(name, size=size, mime=mime)


def test_sinks_need_a_cacheable_task_and_a_streaming_cache() -> None:
    """S6-18: every binary port gets its own sink (better than the seed's single-port rule)."""
    assert sink_ports(PORTS, cacheable=True, cache_streams=True) == {"image", "raw"}
    assert sink_ports(PORTS, cacheable=False, cache_streams=True) == frozenset()
    assert sink_ports(PORTS, cacheable=True, cache_streams=False) == frozenset()


def test_routes_tee_only_for_materialising_consumers() -> None:
    """S6-18 (seed: tee for the graph + materialising consumer)."""
    routes = binary_routes(
        PORTS,
        cacheable=True,
        cache_streams=True,
        consumer_modes={"image": {"materialize", "stream"}, "raw": {"stream"}},
    )
    assert routes == {
        "image": BinaryRoute(sink=True, accumulate=True),
        "raw": BinaryRoute(sink=True, accumulate=False),
    }
    no_cache = binary_routes(PORTS, cacheable=True, cache_streams=False, consumer_modes={})
    assert no_cache == {
        "image": BinaryRoute(sink=False, accumulate=True),
        "raw": BinaryRoute(sink=False, accumulate=True),
    }
    # the routes plug straight into the accumulator
    OutputAccumulator(PORTS, routes)


@pytest.mark.parametrize(
    ("size", "threshold", "keep"),
    [
        (0, 0, True),  # force-ref: threshold 0 keeps every ref
        (10 * 1024 * 1024, 0, True),
        (None, 64 * KIB, True),  # seed L-1: unknown size is never hydrated blindly
        (64 * KIB - 1, 64 * KIB, False),
        (64 * KIB, 64 * KIB, True),
        (0, 1, False),
    ],
)
def test_keep_as_ref(size: int | None, threshold: int, keep: bool) -> None:
    """S6-19 (seed: force-ref with threshold 0; L-1)."""
    assert keep_as_ref(_ref("r", size), threshold) is keep


def test_negative_threshold_is_refused() -> None:
    """S6-19"""
    with pytest.raises(ValueError, match=">= 0"):
        keep_as_ref(_ref("r", 1), -1)


def test_hydration_only_at_declared_binary_ports() -> None:
    """S6-20 (seed: threshold hydration is schema-restricted; a `$ref`-looking dict is data)."""
    small = _ref("small", 10)
    output: dict[str, object] = {
        "image": small,
        "raw": _ref("big", 100 * KIB),
        "meta": {"$ref": "cache://other-run/secret", "kind": "task-graph/CacheRef"},
        "log": _ref("not-binary", 1),
        "undeclared": _ref("ghost", 1),
    }
    assert plan_hydration(output, PORTS, 64 * KIB) == {"image": small}
    assert plan_hydration(output, PORTS, 0) == {}


@pytest.mark.parametrize(
    ("port", "ref", "expected"),
    [
        ("image", _ref("a", 3, "image/webp"), tg.Blob(b"abc", "image/webp")),
        ("image", _ref("a", 3), tg.Blob(b"abc", "image/png")),
        ("raw", _ref("a", 3, "x/y"), b"abc"),
    ],
)
def test_hydrate_value_per_format(port: str, ref: tg.CacheRef, expected: object) -> None:
    """S6-19 (seed: threshold hydration, blob and binary formats)."""
    value = hydrate_value(PORTS[port], ref, b"abc")
    assert value == expected
    assert type(value) is type(expected)


def test_fresh_run_and_hit_agree() -> None:
    """S6-21 (seed 337b688): the row holds refs; the same hydration applies on both paths."""
    acc = OutputAccumulator(PORTS, {"image": BinaryRoute(sink=True, accumulate=False)})
    acc.feed(tg.BinaryDelta("image", b"x" * 100))
    acc.feed(tg.Finish({"meta": {"a": 1}}))
    result = acc.result()
    ref = _ref("blob-1", result.binary_sizes["image"], "image/png")
    row = result.with_refs({"image": ref})
    blobs = {ref: b"x" * 100}

    def returned(stored: dict[str, object]) -> dict[str, object]:
        out = dict(stored)
        for port, r in plan_hydration(stored, PORTS, 64 * KIB).items():
            out[port] = hydrate_value(PORTS[port], r, blobs[r])
        return out

    fresh = returned(row)
    cached = check_cached_row(wire.unpackb(wire.packb(row)), PORTS)
    assert cached is not None
    assert decide_hit(cached) == "hit"
    assert (
        returned(cached.output)
        == fresh
        == {"image": tg.Blob(b"x" * 100, "image/png"), "meta": {"a": 1}}
    )


def test_saved_row_stays_small_and_round_trips() -> None:
    """S6-21 (seed: a 10 MiB output leaves a row under 1 KiB; the row survives the codec)."""
    acc = OutputAccumulator(PORTS, {"raw": BinaryRoute(sink=True, accumulate=False)})
    chunk = bytes(64 * KIB)
    for _ in range(160):  # 10 MiB
        acc.feed(tg.BinaryDelta("raw", chunk))
    result = acc.result()
    assert result.binary_sizes["raw"] == 10 * 1024 * 1024
    row = result.with_refs({"raw": _ref("task_abc_0001.bin", result.binary_sizes["raw"])})
    packed = wire.packb(row)
    assert len(packed) < 1024
    again = wire.unpackb(packed)
    assert again == row
    assert tg.is_cache_ref(again["raw"])


@pytest.mark.parametrize(
    "row",
    [
        None,
        ["image"],
        {"ghost": 1},
        {1: b"x"},
        {"image": "not bytes"},
        {"image": {"$ref": "r", "kind": "task-graph/CacheRef"}},
        {"raw": 12},
    ],
)
def test_unusable_rows_are_misses(row: object) -> None:
    """S6-22"""
    assert check_cached_row(row, PORTS) is None
    assert decide_hit(check_cached_row(row, PORTS)) == "miss"


def test_usable_row_normalises_and_lists_refs() -> None:
    """S6-22"""
    ref = _ref("r", 5)
    cached = check_cached_row(
        {"image": b"inline", "raw": ref, "meta": {"$ref": "data"}, "log": "t"}, PORTS
    )
    assert cached is not None
    assert cached.output == {
        "image": tg.Blob(b"inline", "image/png"),
        "raw": ref,
        "meta": {"$ref": "data"},
        "log": "t",
    }
    assert cached.refs == {"raw": ref}


def test_dangling_ref_turns_hit_into_miss() -> None:
    """S6-23 (seed: dangling-ref best-effort becomes a miss here)."""
    good, gone = _ref("good", 1), _ref("gone", 1)
    cached = check_cached_row({"image": good, "raw": gone}, PORTS)
    assert decide_hit(cached) == "hit"
    assert decide_hit(cached, [gone]) == "miss"
    assert decide_hit(cached, [_ref("unrelated", 1)]) == "hit"


def test_replay_chunks_fit_the_consumer_budget() -> None:
    """S6-24 (seed M-6): replay never sends a chunk larger than the consumer's budget."""
    assert replay_chunk_size(8 * 1024 * 1024) == MAX_REPLAY_CHUNK_BYTES
    assert replay_chunk_size(1000) == 1000
    assert replay_chunk_size(1) == 1
    with pytest.raises(ValueError, match=">= 1"):
        replay_chunk_size(0)


@given(data=st.binary(max_size=300), size=st.integers(1, 70))
def test_property_split_chunk(data: bytes, size: int) -> None:
    """S6-24 (property): pieces are at most `size`, none empty, and concatenate to the input."""
    pieces = list(split_chunk(data, size))
    assert all(0 < p.nbytes <= size for p in pieces)
    assert b"".join(pieces) == data
    assert list(split_chunk(bytearray(data), size)) == pieces


def test_split_chunk_refuses_zero() -> None:
    """S6-24"""
    with pytest.raises(ValueError, match=">= 1"):
        list(split_chunk(b"x", 0))


def test_split_chunk_of_a_wide_memoryview_counts_bytes() -> None:
    """S6-24, S1-2: a memoryview's size is its bytes, not its items."""
    import array

    view = memoryview(array.array("I", [1, 2, 3]))
    pieces = list(split_chunk(view, 5))
    assert [p.nbytes for p in pieces] == [5, 5, 2]
    assert b"".join(pieces) == view.tobytes()


def test_inline_values_over_threshold_become_refs() -> None:
    """S6-19: execute() results store like streamed ones."""
    output = {"image": tg.Blob(b"x" * 10), "raw": b"y" * 100, "meta": b"z" * 1000}
    assert inline_ports_to_ref(output, PORTS, 50, cacheable=True, cache_streams=True) == ["raw"]
    assert inline_ports_to_ref(output, PORTS, 0, cacheable=True, cache_streams=True) == [
        "image",
        "raw",
    ]
    assert inline_ports_to_ref(output, PORTS, 0, cacheable=False, cache_streams=True) == []
    refs_only = {"image": _ref("r", 99), "raw": memoryview(b"12")}
    assert inline_ports_to_ref(refs_only, PORTS, 1, cacheable=True, cache_streams=True) == ["raw"]


def test_input_refs_and_formats() -> None:
    """S6-25"""
    schema = {"properties": {"a": {"format": "binary"}, "b": {"format": "blob"}, "c": {}}}
    assert input_format(schema, "a") == "binary"
    assert input_format(schema, "b") == "blob"
    assert input_format(schema, "c") == "blob"
    assert input_format({}, "c") == "blob"
    ref = _ref("r", 1)
    assert input_refs({"a": ref, "b": {"$ref": "r"}, "c": 1}) == {"a": ref}
    err = input_ref_error("Resize", "n3", "a", ref)
    assert isinstance(err, tg.DanglingRefError)
    for part in ("'Resize'", "'n3'", "'a'", "'r'"):
        assert part in str(err)


def test_orphans_to_delete() -> None:
    """S6-26: every streamed blob once, in a stable order."""
    a, b = _ref("a", 1), _ref("b", 2)
    assert refs_to_delete([b, a, b]) == [a, b]
    assert refs_to_delete([]) == []


def test_inline_binary_row_round_trips_for_non_streaming_caches() -> None:
    """S6-22 (seed H-1): with a cache that cannot stream, the row holds the inline Blob/bytes;
    it survives the wire codec as itself (never a silent `{}`) and reads back as a usable hit
    with the port's format and MIME."""
    result = OutputAccumulator(PORTS)
    result.feed(tg.BinaryDelta("image", b"\x01\x02\x03\x04"))
    result.feed(tg.BinaryDelta("raw", b"\x05"))
    row = result.result().output
    assert sink_ports(PORTS, cacheable=True, cache_streams=False) == frozenset()
    again = wire.unpackb(wire.packb(row))
    cached = check_cached_row(again, PORTS)
    assert cached is not None
    assert decide_hit(cached) == "hit"
    assert cached.output == {"image": tg.Blob(b"\x01\x02\x03\x04", "image/png"), "raw": b"\x05"}
    assert cached.refs == {}


def test_replay_plan() -> None:
    """S6-24: refs stream to streaming consumers and hydrate for materialising ones; inline
    values only need streaming; ports without consumers need nothing."""
    ref = _ref("r", 10**9)
    cached = check_cached_row(
        {"image": ref, "raw": b"inline", "meta": _ref("not-binary", 1), "log": "t"}, PORTS
    )
    assert cached is not None
    both: set[EdgeMode] = {"stream", "materialize"}
    plan = replay_plan(cached, PORTS, {"image": both, "raw": both, "meta": both, "log": both})
    assert plan == {"image": {"stream", "hydrate"}, "raw": {"stream"}}
    assert replay_plan(cached, PORTS, {"image": {"materialize"}}) == {"image": {"hydrate"}}
    assert replay_plan(cached, PORTS, {"raw": {"materialize"}}) == {}
    assert replay_plan(cached, PORTS, {}) == {}
