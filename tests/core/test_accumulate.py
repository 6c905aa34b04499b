"""
The per-task output accumulator (S6-1 ... S6-9), including the seed's accumulation and
explicit-finish precedence cases.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.strategies import binary_chunks
from tests.typed_hypothesis import given
from trio_taskgraph._core._accumulate import (
    AccumulatedOutput,
    BinaryRoute,
    OutputAccumulator,
    accumulate_result,
    normalize_binary_value,
    upsert_by_id,
)
from trio_taskgraph._core._events import BytesLike

SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "x-stream": "append"},
        "items": {"x-stream": "object"},
        "snap": {"x-stream": "replace"},
        "image": {"x-stream": "binary", "contentMediaType": "image/png"},
        "raw": {"x-stream": "binary", "format": "binary"},
        "count": {"type": "integer"},
    },
}
PORTS = tg.parse_ports(SCHEMA)


def _acc(routes: Mapping[str, BinaryRoute] | None = None) -> OutputAccumulator:
    return OutputAccumulator(PORTS, routes or {})


def _run(*events: object, routes: Mapping[str, BinaryRoute] | None = None) -> AccumulatedOutput:
    acc = _acc(routes)
    for event in events:
        acc.feed(event)
    return acc.result()


def test_binary_accumulation_materialises_per_format() -> None:
    """S6-5, S1-6 (seed: binary-delta accumulation): chunks join per port, per format."""
    out = _run(
        tg.BinaryDelta("image", b"\x89PN"),
        tg.BinaryDelta("raw", b"ab"),
        tg.BinaryDelta("image", bytearray(b"G")),
        tg.BinaryDelta("raw", memoryview(b"cd")),
    )
    assert out.output == {"image": tg.Blob(b"\x89PNG", "image/png"), "raw": b"abcd"}
    assert out.binary_sizes == {"image": 4, "raw": 4}
    assert out.ref_ports == frozenset()
    assert out.discarded_sink_ports == frozenset()


def test_explicit_finish_wins_over_chunks() -> None:
    """S6-6 (seed: explicit-finish-payload precedence): the chunks are dropped."""
    out = _run(
        tg.BinaryDelta("image", b"chunk-one"),
        tg.BinaryDelta("raw", b"chunk-two"),
        tg.Finish({"image": tg.Blob(b"artifact", "image/webp"), "raw": b"explicit"}),
    )
    assert out.output == {"image": tg.Blob(b"artifact", "image/webp"), "raw": b"explicit"}
    # the sizes still say what streamed
    assert out.binary_sizes == {"image": 9, "raw": 9}


@pytest.mark.parametrize(
    ("port", "value", "expected"),
    [
        ("image", b"xy", tg.Blob(b"xy", "image/png")),
        ("image", bytearray(b"xy"), tg.Blob(b"xy", "image/png")),
        ("image", tg.Blob(b"xy", None), tg.Blob(b"xy", None)),
        ("raw", tg.Blob(b"xy", "a/b"), b"xy"),
        ("raw", memoryview(b"xy"), b"xy"),
        ("raw", tg.make_cache_ref("r", size=2), tg.make_cache_ref("r", size=2)),
    ],
)
def test_explicit_binary_value_is_normalised(port: str, value: object, expected: object) -> None:
    """S6-6: an explicit value is brought to the port's format; a ref stays a ref."""
    out = _run(tg.Finish({port: value}))
    assert out.output == {port: expected}
    assert type(out.output[port]) is type(expected)


@pytest.mark.parametrize("value", ["text", 3, None, {"$ref": "x"}, [b"a"]])
def test_explicit_binary_value_of_wrong_type(value: object) -> None:
    """S6-6, S6-2: a wrong value at a binary port names the port; nothing is applied."""
    acc = _acc()
    acc.feed(tg.TextDelta("text", "kept"))
    with pytest.raises(tg.StreamProtocolError, match="'image'"):
        acc.feed(tg.Finish({"count": 1, "image": value}))
    assert acc.state == "streaming"
    assert acc.result().output == {"text": "kept"}


def test_text_deltas_concatenate_and_snapshots_replace() -> None:
    """S6-3"""
    out = _run(
        tg.TextDelta("text", "a"),
        tg.TextDelta("text", "b"),
        tg.Snapshot({"text": "RESET", "snap": {"v": 1}}),
        tg.TextDelta("text", "c"),
        tg.Snapshot({"snap": {"v": 2}}),
    )
    assert out.output == {"text": "RESETc", "snap": {"v": 2}}


def test_finish_replaces_text_and_sets_plain_ports() -> None:
    """S6-3, S6-9: Finish values replace accumulated text; plain ports are set."""
    out = _run(tg.TextDelta("text", "partial"), tg.Finish({"text": "final", "count": 3}))
    assert out.output == {"text": "final", "count": 3}


def test_object_deltas_replace_or_upsert_by_id() -> None:
    """S6-4: lists upsert by id in place; items without id are appended."""
    out = _run(
        tg.ObjectDelta("items", [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]),
        tg.ObjectDelta("items", [{"id": 2, "v": "B"}, {"v": "anon"}, {"id": 3, "v": "c"}]),
    )
    assert out.output["items"] == [
        {"id": 1, "v": "a"},
        {"id": 2, "v": "B"},
        {"v": "anon"},
        {"id": 3, "v": "c"},
    ]
    out = _run(tg.ObjectDelta("items", [1, 2]), tg.ObjectDelta("items", {"x": 1}))
    assert out.output["items"] == {"x": 1}
    out = _run(tg.ObjectDelta("items", {"x": 1}), tg.ObjectDelta("items", [1]))
    assert out.output["items"] == [1]


def test_upsert_does_not_mutate_inputs() -> None:
    """S6-4"""
    previous = [{"id": 1, "v": 0}]
    delta = [{"id": 1, "v": 1}, {"id": 2}]
    merged = upsert_by_id(previous, delta)
    assert previous == [{"id": 1, "v": 0}]
    assert delta == [{"id": 1, "v": 1}, {"id": 2}]
    assert merged == [{"id": 1, "v": 1}, {"id": 2}]


_ITEMS = st.lists(
    st.one_of(
        st.fixed_dictionaries({"id": st.integers(0, 5), "v": st.integers()}),
        st.fixed_dictionaries({"v": st.integers()}),
    ),
    max_size=8,
)


@given(previous=_ITEMS, delta=_ITEMS)
def test_property_upsert(previous: list[dict[str, int]], delta: list[dict[str, int]]) -> None:
    """S6-4 (property): upsert equals applying the delta items one by one (an item with a
    known id takes that id's place, others are appended); the last item per id wins, items
    without id all survive, and positions of old ids are kept."""
    merged = upsert_by_id(previous, delta)
    model: list[dict[str, int]] = list(previous)
    for item in delta:
        index = next(
            (i for i, old in enumerate(model) if "id" in item and old.get("id", -1) == item["id"]),
            None,
        )
        if index is None:
            model.append(item)
        else:
            model[index] = item
    assert merged == model
    for item in delta:
        if "id" not in item:
            assert item in merged
    last_by_id = {item["id"]: item for item in delta if "id" in item}
    for item in last_by_id.values():
        assert item in merged


@given(chunks=binary_chunks, fmt=st.sampled_from(["image", "raw"]))
def test_property_accumulated_binary_is_the_concatenation(
    chunks: list[BytesLike], fmt: str
) -> None:
    """S6-5, S1-6 (property): accumulated binary equals the concatenation of the chunks."""
    out = _run(*(tg.BinaryDelta(fmt, c) for c in chunks))
    expected = b"".join(bytes(c) for c in chunks)
    if not chunks:
        assert fmt not in out.output
        return
    value = out.output[fmt]
    data = value.data if isinstance(value, tg.Blob) else value
    assert data == expected
    assert out.binary_sizes[fmt] == len(expected)


@given(parts=st.lists(st.text(max_size=10), max_size=20))
def test_property_text_is_the_join(parts: list[str]) -> None:
    """S6-3 (property): an append port's value is the join of its deltas."""
    out = _run(*(tg.TextDelta("text", p) for p in parts))
    if parts:
        assert out.output["text"] == "".join(parts)
    else:
        assert "text" not in out.output


def test_sink_port_is_not_accumulated() -> None:
    """S6-5: a port routed only to a sink keeps no bytes and is left for the ref."""
    acc = _acc({"image": BinaryRoute(sink=True, accumulate=False)})
    assert acc.feed(tg.BinaryDelta("image", b"abc")) == "sink"
    assert acc.feed(tg.BinaryDelta("image", b"de")) == "sink"
    assert acc.feed(tg.BinaryDelta("raw", b"zz")) == "accumulated"
    out = acc.result()
    assert "image" not in out.output
    assert out.output == {"raw": b"zz"}
    assert out.binary_sizes == {"image": 5, "raw": 2}
    assert out.ref_ports == frozenset({"image"})
    ref = tg.make_cache_ref("blob-1", size=5)
    assert out.with_refs({"image": ref}) == {"raw": b"zz", "image": ref}


def test_with_sinks_builds_routes_from_sets() -> None:
    """S6-5: the set-based constructor the runner may prefer."""
    acc = OutputAccumulator.with_sinks(PORTS, {"image"}, tee={"raw"})
    assert acc.route_of("image") == BinaryRoute(sink=True, accumulate=False)
    assert acc.route_of("raw") == BinaryRoute(sink=True, accumulate=True)
    assert OutputAccumulator.with_sinks(PORTS).route_of("raw") == BinaryRoute()
    with pytest.raises(ValueError, match="'text'"):
        OutputAccumulator.with_sinks(PORTS, {"text"})


def test_tee_port_is_materialised_and_stored_as_ref() -> None:
    """S6-5 (seed: tee for the graph + materialising consumer): edges get the bytes, the
    stored row gets the ref."""
    acc = _acc({"image": BinaryRoute(sink=True, accumulate=True)})
    assert acc.feed(tg.BinaryDelta("image", b"ab")) == "tee"
    assert acc.feed(tg.BinaryDelta("image", b"c")) == "tee"
    out = acc.result()
    assert out.output == {"image": tg.Blob(b"abc", "image/png")}
    assert out.ref_ports == frozenset({"image"})
    ref = tg.make_cache_ref("blob-2", size=3, mime="image/png")
    assert out.with_refs({"image": ref}) == {"image": ref}
    assert out.output["image"] == tg.Blob(b"abc", "image/png")  # edge view unchanged


def test_sink_port_without_chunks_opens_no_sink() -> None:
    """S6-5: sinks open lazily; a sink port with no chunk needs no ref."""
    out = _run(tg.Finish({"count": 1}), routes={"image": BinaryRoute(sink=True, accumulate=False)})
    assert out.ref_ports == frozenset()
    assert out.output == {"count": 1}


def test_explicit_finish_over_sink_discards_the_streamed_blob() -> None:
    """S6-6: the explicit value wins over a sink too; the sink's blob must be deleted."""
    out = _run(
        tg.BinaryDelta("image", b"streamed"),
        tg.Finish({"image": b"explicit"}),
        routes={"image": BinaryRoute(sink=True, accumulate=False)},
    )
    assert out.output == {"image": tg.Blob(b"explicit", "image/png")}
    assert out.ref_ports == frozenset()
    assert out.discarded_sink_ports == frozenset({"image"})


def test_with_refs_must_cover_ref_ports_exactly() -> None:
    """S6-5"""
    out = _run(
        tg.BinaryDelta("image", b"x"), routes={"image": BinaryRoute(sink=True, accumulate=False)}
    )
    with pytest.raises(ValueError, match="missing"):
        out.with_refs({})
    with pytest.raises(ValueError, match="extra"):
        out.with_refs({"image": tg.make_cache_ref("a"), "raw": tg.make_cache_ref("b")})
    with pytest.raises(ValueError, match="CacheRef"):
        out.with_refs({"image": {"$ref": "a"}})  # type: ignore[dict-item]


def test_routes_only_for_binary_ports() -> None:
    """S6-5"""
    with pytest.raises(ValueError, match="'text'"):
        OutputAccumulator(PORTS, {"text": BinaryRoute(sink=True)})
    with pytest.raises(ValueError, match="'nope'"):
        OutputAccumulator(PORTS, {"nope": BinaryRoute(sink=True)})
    with pytest.raises(TypeError, match="BinaryRoute"):
        OutputAccumulator(PORTS, {"image": "sink"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="sink or accumulate"):
        BinaryRoute(sink=False, accumulate=False)


@pytest.mark.parametrize(
    ("event", "port"),
    [
        (tg.TextDelta("nope", "x"), "nope"),
        (tg.TextDelta("items", "x"), "items"),
        (tg.TextDelta("image", "x"), "image"),
        (tg.ObjectDelta("text", {}), "text"),
        (tg.ObjectDelta("ghost", {}), "ghost"),
        (tg.BinaryDelta("text", b"x"), "text"),
        (tg.BinaryDelta("count", b"x"), "count"),
        (tg.BinaryDelta("ghost", b"x"), "ghost"),
        (tg.Snapshot({"image": b"x"}), "image"),
        (tg.Snapshot({"ghost": 1}), "ghost"),
        (tg.Snapshot({"text": 1}), "text"),
        (tg.Finish({"ghost": 1}), "ghost"),
        (tg.Finish({"text": ["not", "str"]}), "text"),
    ],
)
def test_protocol_errors_name_the_port_and_change_nothing(event: object, port: str) -> None:
    """S6-2: strictness; the accumulator is unchanged after a refused event."""
    acc = _acc()
    acc.feed(tg.TextDelta("text", "before"))
    acc.feed(tg.BinaryDelta("raw", b"r"))
    with pytest.raises(tg.StreamProtocolError, match=repr(port)) as info:
        acc.feed(event)
    assert isinstance(info.value, tg.PortSchemaError)
    assert acc.state == "streaming"
    assert acc.result().output == {"text": "before", "raw": b"r"}


def test_snapshot_with_non_str_key_is_refused() -> None:
    """S6-2"""
    with pytest.raises(tg.StreamProtocolError, match="non-str"):
        _acc().feed(tg.Snapshot({1: "x"}))  # type: ignore[dict-item]


def test_not_an_event() -> None:
    """S6-2"""
    with pytest.raises(tg.StreamProtocolError, match="dict"):
        _acc().feed({"port": "text"})


def test_phase_is_observed_only() -> None:
    """S6-1"""
    acc = _acc()
    assert acc.feed(tg.Phase("encode")) == "observe"
    assert acc.result().output == {}


def test_stream_error_fails_the_stream() -> None:
    """S6-7, S6-8"""
    acc = _acc()
    acc.feed(tg.TextDelta("text", "x"))
    boom = RuntimeError("boom")
    assert acc.feed(tg.StreamError(boom)) == "error"
    assert acc.state == "failed"
    assert acc.error is boom
    with pytest.raises(tg.StreamProtocolError, match="failed") as info:
        acc.result()
    assert info.value.__cause__ is boom
    with pytest.raises(tg.StreamProtocolError, match="after the stream failed"):
        acc.feed(tg.TextDelta("text", "y"))


def test_nothing_after_finish() -> None:
    """S6-8"""
    acc = _acc()
    assert acc.feed(tg.Finish({"count": 1})) == "finish"
    assert acc.state == "finished"
    for event in (tg.TextDelta("text", "x"), tg.Finish({}), tg.Phase("late")):
        with pytest.raises(tg.StreamProtocolError, match="after the stream finished"):
            acc.feed(event)
    assert acc.result().output == {"count": 1}


def test_result_is_idempotent_and_ends_the_stream() -> None:
    """S6-1: a trailing Finish is optional; result() twice gives the same value."""
    acc = _acc()
    acc.feed(tg.TextDelta("text", "x"))
    first = acc.result()
    assert acc.result() is first
    assert acc.state == "finished"
    with pytest.raises(tg.StreamProtocolError):
        acc.feed(tg.TextDelta("text", "y"))


def test_plain_result_equals_a_finish_stream() -> None:
    """S6-9"""
    result = {"text": "t", "count": 2, "image": b"png", "raw": tg.Blob(b"r")}
    out = accumulate_result(PORTS, result)
    assert out == _run(tg.Finish(result))
    assert out.output == {
        "text": "t",
        "count": 2,
        "image": tg.Blob(b"png", "image/png"),
        "raw": b"r",
    }


@pytest.mark.parametrize("result", [None, [("count", 1)], "count"])
def test_plain_result_must_be_a_mapping(result: object) -> None:
    """S6-9"""
    with pytest.raises(tg.StreamProtocolError, match="mapping"):
        accumulate_result(PORTS, result)


def test_plain_result_with_undeclared_port() -> None:
    """S6-9, S6-2"""
    with pytest.raises(tg.StreamProtocolError, match="'extra'"):
        accumulate_result(PORTS, {"count": 1, "extra": 2})


def test_normalize_binary_value_direct() -> None:
    """S6-6"""
    assert normalize_binary_value(PORTS["raw"], bytearray(b"a")) == b"a"
    with pytest.raises(tg.StreamProtocolError, match="'raw'"):
        normalize_binary_value(PORTS["raw"], 1)


_EVENTS = st.one_of(
    st.builds(tg.TextDelta, st.sampled_from(["text", "items", "ghost"]), st.text(max_size=3)),
    st.builds(tg.ObjectDelta, st.sampled_from(["items", "snap"]), st.integers()),
    st.builds(tg.BinaryDelta, st.sampled_from(["image", "raw", "text"]), st.binary(max_size=4)),
    st.builds(tg.Snapshot, st.dictionaries(st.sampled_from(["snap", "text", "image"]), st.text())),
    st.builds(tg.Finish, st.dictionaries(st.sampled_from(["count", "raw"]), st.binary())),
    st.builds(tg.Phase, st.just("p")),
    st.just(tg.StreamError(ValueError("x"))),
)


@given(events=st.lists(_EVENTS, max_size=15), sink=st.booleans(), tee=st.booleans())
def test_property_any_event_sequence(events: list[object], sink: bool, tee: bool) -> None:
    """S6-1, S6-2, S6-8 (property): on any sequence, feed either applies or raises
    StreamProtocolError; binary sizes count every accepted chunk; only declared ports appear."""
    route = BinaryRoute(sink=sink, accumulate=tee or not sink)
    acc = _acc({"image": route})
    counted = {"image": 0, "raw": 0}
    for event in events:
        try:
            acc.feed(event)
        except tg.StreamProtocolError:
            continue
        if isinstance(event, tg.BinaryDelta):
            counted[event.port] += len(bytes(event.chunk))
    if acc.state == "failed":
        with pytest.raises(tg.StreamProtocolError):
            acc.result()
        return
    out = acc.result()
    assert set(out.output) <= set(PORTS)
    assert {p: n for p, n in counted.items() if p in out.binary_sizes} == dict(out.binary_sizes)
    # the strategy never sets "image" explicitly, so its fate is decided by the route alone
    assert ("image" in out.ref_ports) == (sink and "image" in out.binary_sizes)
    assert ("image" in out.output) == (route.accumulate and "image" in out.binary_sizes)
