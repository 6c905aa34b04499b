"""
The wire codec and the frame decoder (spec/S5-wire-and-server.md, S5-1 .. S5-5).
"""

from __future__ import annotations

import contextlib
import inspect
import pickle
import struct
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.strategies import ref_trees, wire_values
from tests.typed_hypothesis import given
from trio_taskgraph import wire
from trio_taskgraph._core import _codec
from trio_taskgraph._core._codec import CLOSED, NEED_DATA, FrameDecoder, encode_frame

# --- helpers ---------------------------------------------------------------------------------


def normalized(value: object) -> object:
    """What a value decodes as (S5-1): tuples become lists, dict subclasses dicts."""
    if isinstance(value, list | tuple):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


def nested_lists(depth: int) -> bytes:
    """msgpack bytes of ``depth`` nested arrays (``[]`` is depth 1)."""
    return b"\x91" * (depth - 1) + b"\x90"


def nested_maps(depth: int) -> bytes:
    return b"\x81\xa1k" * (depth - 1) + b"\x80"


def ext(code: int, payload: bytes) -> bytes:
    """An ext32 value by hand (msgpack's ExtType refuses negative codes)."""
    return b"\xc9" + struct.pack(">Ib", len(payload), code) + payload


def assert_wire_error(data: bytes, match: str = "", **limits: int) -> None:
    with pytest.raises(tg.WireFormatError, match=match):
        wire.unpackb(data, **limits)


# --- round trips (S5-1) ----------------------------------------------------------------------


@given(wire_values)
def test_round_trip(value: object) -> None:
    """S5-1 (property): every wire value survives; refs and blobs keep their types."""
    out = wire.unpackb(wire.packb(value))
    assert out == normalized(value)
    assert wire.packb(out) == wire.packb(value)


def _holds_a_set(value: object) -> bool:
    if isinstance(value, set | frozenset):
        return True
    if isinstance(value, dict):
        return any(_holds_a_set(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_a_set(v) for v in value)
    return False


@given(ref_trees)
def test_walker_values_round_trip_or_name_the_set(value: object) -> None:
    """
    S5-1 (property): the walker's values (refs, blobs, fake refs, every container) cross the
    wire with refs and blobs intact, or, when they hold a set, are refused naming it.
    """
    if _holds_a_set(value):
        with pytest.raises(tg.WireFormatError, match="set"):
            wire.packb(value)
        return
    out = wire.unpackb(wire.packb(value))
    assert out == normalized(value)
    assert tg.collect_cache_refs(out) == tg.collect_cache_refs(value)


def test_refs_and_blobs_keep_their_types() -> None:
    """S5-1: the ext codes carry the brand across the process boundary."""
    row = {
        "image": tg.CacheRef("blobs/1.bin", 12, "image/png"),
        "thumb": tg.Blob(b"\x89PNG", "image/png"),
    }
    out = wire.unpackb(wire.packb(row))
    assert isinstance(out, dict)
    assert type(out["image"]) is tg.CacheRef
    assert out["image"] == row["image"]
    assert type(out["thumb"]) is tg.Blob
    assert out["thumb"] == row["thumb"]


def test_blob_is_never_flattened_to_an_empty_map() -> None:
    """
    The seed's H-1: a Blob written to a non-streaming row came back as ``{}``. On our wire a
    Blob (data and mime) round-trips as a Blob, inside any row.
    """
    blob = tg.Blob(bytes(range(256)) * 4, "application/octet-stream")
    row = {"bytes": blob, "nested": [{"b": blob}]}
    out = wire.unpackb(wire.packb(row))
    assert out == row
    assert out["nested"][0]["b"].mime == "application/octet-stream"
    assert wire.unpackb(wire.packb(tg.Blob(b""))) == tg.Blob(b"")


def test_dollar_ref_dicts_stay_dicts_on_the_wire() -> None:
    """S3-1 over the wire: only the ext type makes a ref."""
    fake = {"kind": "task-graph/CacheRef", "$ref": "cache://OTHER_RUN/secret"}
    out = wire.unpackb(wire.packb({"note": fake}))
    assert out == {"note": fake}
    assert tg.collect_cache_refs(out) == []


def test_tuples_and_dict_subclasses_are_documented_conversions() -> None:
    """S5-1: tuples decode as lists, any dict as dict, bytes-like as bytes."""
    value = {
        "t": (1, (2, 3)),
        "od": OrderedDict(a=1),
        "ba": bytearray(b"x"),
        "mv": memoryview(b"y"),
    }
    assert wire.unpackb(wire.packb(value)) == {
        "t": [1, [2, 3]],
        "od": {"a": 1},
        "ba": b"x",
        "mv": b"y",
    }


def test_scalar_keys_round_trip_and_container_keys_are_refused() -> None:
    """S5-2"""
    value = {1: "a", b"k": "b", None: "c", 2.5: "d", False: "e", tg.CacheRef("r"): "f"}
    assert wire.unpackb(wire.packb(value)) == value
    assert_wire_error(wire.packb({(1, 2): "x"}), "map key")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({1, 2}, "set"),
        (frozenset({1}), "frozenset"),
        (object(), "object"),
        (2**64, "range"),
        (-(2**63) - 1, "range"),
        ("\udc80", "UTF-8"),
        (tg.CacheRef("\udc80"), "UTF-8"),
        ({"k": {1}}, "set"),
        (complex(1, 2), "complex"),
    ],
)
def test_what_packb_cannot_encode_is_a_wire_format_error(value: object, match: str) -> None:
    """S5-1: never a bare TypeError."""
    with pytest.raises(tg.WireFormatError, match=match) as info:
        wire.packb(value)
    assert type(info.value) is tg.WireFormatError


def test_cycles_and_absurd_depth_are_refused_by_packb() -> None:
    """S5-1"""
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(tg.WireFormatError, match="cyclic"):
        wire.packb(cycle)
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(tg.WireFormatError, match="deep"):
        wire.packb(deep)


# --- limits, at and one past the bound (S5-3) ------------------------------------------------


def test_max_bytes() -> None:
    """S5-3"""
    data = wire.packb("x" * 100)
    assert wire.unpackb(data, max_bytes=len(data)) == "x" * 100
    assert_wire_error(data, "max_bytes", max_bytes=len(data) - 1)


@pytest.mark.parametrize("make", [nested_lists, nested_maps])
@pytest.mark.parametrize("limit", [1, 5, 40])
def test_max_depth(make: Callable[[int], bytes], limit: int) -> None:
    """S5-3: depth == limit passes, limit + 1 fails, whichever way the depth is checked."""
    at = make(limit)
    past = make(limit + 1)
    wire.unpackb(at, max_depth=limit)
    assert_wire_error(past, "max_depth", max_depth=limit)
    # Padded with a long string so the cheap length bound cannot decide.
    padded_at = b"\x92" + at + msgpack.packb("p" * 200)
    padded_past = b"\x92" + past + msgpack.packb("p" * 200)
    wire.unpackb(padded_at, max_depth=limit + 1)
    assert_wire_error(padded_past, "max_depth", max_depth=limit + 1)


def test_default_max_depth() -> None:
    """S5-3: the default bound is 512."""
    assert wire.DEFAULT_MAX_DEPTH == 512
    wire.unpackb(nested_lists(512))
    assert_wire_error(nested_lists(513), "max_depth")
    assert_wire_error(nested_lists(5000), "deep")


def test_scalars_are_depth_zero() -> None:
    assert wire.unpackb(msgpack.packb(1), max_depth=0) == 1
    assert_wire_error(msgpack.packb([]), "max_depth", max_depth=0)


def test_many_shallow_containers_pass_the_exact_depth_check() -> None:
    """S5-3: more container headers than max_depth, but shallow: accepted."""
    data = wire.packb([[[]] for _ in range(2000)])
    out = wire.unpackb(data, max_depth=3)
    assert isinstance(out, list)
    assert len(out) == 2000
    assert_wire_error(data, "max_depth", max_depth=2)


@pytest.mark.parametrize("kind", ["array", "map"])
def test_max_container_len(kind: str) -> None:
    """S5-3"""
    at = msgpack.packb(list(range(3)) if kind == "array" else {str(i): i for i in range(3)})
    past = msgpack.packb(list(range(4)) if kind == "array" else {str(i): i for i in range(4)})
    wire.unpackb(at, max_container_len=3)
    assert_wire_error(past, "max_container_len", max_container_len=3)


def test_max_str_len_and_max_bin_len() -> None:
    """S5-3"""
    assert wire.unpackb(msgpack.packb("abc"), max_str_len=3) == "abc"
    assert_wire_error(msgpack.packb("abcd"), "max_str_len", max_str_len=3)
    assert wire.unpackb(msgpack.packb(b"abc"), max_bin_len=3) == b"abc"
    assert_wire_error(msgpack.packb(b"abcd"), "max_bin_len", max_bin_len=3)


def test_blob_payload_is_bounded_by_max_bin_len() -> None:
    """S5-3: a Blob cannot smuggle more bytes than a bin may hold."""
    data = wire.packb(tg.Blob(b"x" * 1000))
    assert_wire_error(data, "max_bin_len", max_bin_len=100, max_str_len=10)


def test_header_like_bytes_inside_a_binary_are_not_depth() -> None:
    """S5-3: the cheap depth bound only ever sends data to the exact check."""
    data = msgpack.packb(b"\x90" * 100)
    assert wire.unpackb(data, max_depth=3) == b"\x90" * 100


def test_bad_limits_are_value_errors() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        wire.unpackb(b"\x90", max_depth=-1)
    with pytest.raises(ValueError, match="max_bytes"):
        wire.unpackb(b"\x90", max_bytes=0)
    with pytest.raises(ValueError, match="max_bytes must be an int"):
        wire.unpackb(b"\x90", max_bytes=True)
    with pytest.raises(ValueError, match="max_depth must be an int"):
        wire.unpackb(b"\x90", max_depth=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"2\*\*32"):
        FrameDecoder(max_frame_bytes=2**32)


# --- ext types (S5-3) ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 42, 127, -2, -128])
def test_unknown_ext_types(code: int) -> None:
    """S5-3: known ext types only."""
    assert_wire_error(ext(code, b"payload"), f"unknown ext type {code}")


@pytest.mark.parametrize("payload_len", [4, 8, 12])
def test_msgpack_timestamps_are_unknown_ext_types(payload_len: int) -> None:
    """S5-3: msgpack decodes ext -1 itself; we refuse it anyway."""
    ts = {4: msgpack.Timestamp(1), 8: msgpack.Timestamp(1, 5), 12: msgpack.Timestamp(2**40, 5)}
    data = msgpack.packb({"at": [ts[payload_len]]})
    assert len(ts[payload_len].to_bytes()) == payload_len
    assert_wire_error(data, "unknown ext type -1")


@pytest.mark.parametrize(
    "header",
    [b"\xc7\x04", b"\xc7\x08", b"\xc8\x00\x04", b"\xc9\x00\x00\x00\x08", b"\xc9\x00\x00\x00\x0c"],
)
def test_timestamps_in_every_ext_encoding_are_refused(header: bytes) -> None:
    """S5-3: found by fuzz_codec: msgpack also decodes ext8/16/32 forms of type -1."""
    length = header[-1]
    data = b"\x91" + header + b"\xff" + b"\x00" * (length - 1) + b"\x01"
    assert isinstance(msgpack.unpackb(data)[0], msgpack.Timestamp)
    assert_wire_error(data, "unknown ext type -1")


def test_malformed_timestamps_and_timestamps_in_large_values() -> None:
    """S5-3: every ext -1 is refused, whatever its length and wherever it sits."""
    assert_wire_error(b"\xc7\x03\xff\x00\x00\x00", "unknown ext type -1")
    big = msgpack.packb(["p" * 1000, msgpack.Timestamp(1)])
    assert_wire_error(big, "unknown ext type -1")
    assert_wire_error(big, "unknown ext type -1", max_str_len=2000)


def test_timestamp_shaped_bytes_inside_a_string_are_fine() -> None:
    """S5-3: the cheap timestamp check has false positives only, never false refusals."""
    value = {"bin": b"\xd6\xff\x00\x00\x00\x01", "n": -1}
    assert wire.unpackb(wire.packb(value)) == value


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (msgpack.packb(["r", 1]), "ref, size, mime"),
        (msgpack.packb(["r", 1, None, None]), "ref, size, mime"),
        (msgpack.packb({"ref": "r"}), "ref, size, mime"),
        (msgpack.packb("r"), "ref, size, mime"),
        (msgpack.packb(["", None, None]), "non-empty"),
        (msgpack.packb(["a\x00b", None, None]), "NUL"),
        (msgpack.packb(["x" * 1025, None, None]), "limit"),
        (msgpack.packb(["r", -1, None]), ">= 0"),
        (msgpack.packb(["r", True, None]), "int"),
        (msgpack.packb(["r", 1.5, None]), "int"),
        (msgpack.packb([b"r", None, None]), "str"),
        (msgpack.packb(["r", None, 5]), "mime"),
        (msgpack.packb(["r", None, None]) + b"\x00", "CacheRef"),
        (b"\xc1", "CacheRef"),
        (b"", "CacheRef"),
        (msgpack.packb([msgpack.ExtType(1, b""), None, None]), "str"),
        # Three-item values that are not a list: the hot path unpacks any 3-item sequence,
        # so each must still be refused (a str, a bin, a map of three str keys).
        (msgpack.packb("abc"), "CacheRef"),
        (msgpack.packb(b"abc"), "CacheRef"),
        (msgpack.packb({"ref": "r", "size": 1, "mime": None}), "CacheRef"),
        (msgpack.packb({"r": "r", "": "s", "m": "m"}), "CacheRef"),
    ],
)
@pytest.mark.parametrize("path", ["default limits", "explicit limits"])
def test_malformed_cache_ref_payloads(payload: bytes, match: str, path: str) -> None:
    """
    S5-3, S3-2: a ref from the wire is validated exactly like a constructed one, on the
    small-message hot path and on the path with explicit limits alike.
    """
    limits = {} if path == "default limits" else {"max_bytes": 1 << 20}
    assert_wire_error(ext(wire.EXT_CACHE_REF, payload), match, **limits)


def test_unpackb_signature_is_the_documented_one() -> None:
    """
    S5-3: `unpackb` is documented and introspected with its keyword-only limits, although
    at run time a fast path with ``**limits`` stands in front of it.
    """
    params = inspect.signature(wire.unpackb).parameters
    assert list(params) == [
        "data",
        "max_bytes",
        "max_depth",
        "max_container_len",
        "max_str_len",
        "max_bin_len",
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[1:])
    assert wire.unpackb.__name__ == "unpackb"
    assert "enforcing every wire rule" in (wire.unpackb.__doc__ or "")


def test_unpackb_refuses_unknown_and_positional_limits() -> None:
    """S5-3: a misspelt limit is a TypeError naming it, never silently ignored."""
    data = wire.packb([1, 2])
    with pytest.raises(TypeError, match="max_byts"):
        wire.unpackb(data, max_byts=10)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional"):
        wire.unpackb(data, 10)  # type: ignore[call-arg]
    assert wire.unpackb(data=data) == [1, 2]


@given(wire_values)
def test_fast_path_agrees_with_explicit_default_limits(value: object) -> None:
    """
    S5-3 (property): the small-message fast path and the checked path (taken whenever a
    limit is passed, even at its default) decode every value alike.
    """
    data = wire.packb(value)
    explicit = wire.unpackb(data, max_bytes=wire.DEFAULT_MAX_FRAME_BYTES, max_depth=512)
    assert wire.unpackb(data) == explicit


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb([None]),
        msgpack.packb([None, "text not bin"]),
        msgpack.packb([5, b"x"]),
        msgpack.packb([None, b"x", 1]),
        msgpack.packb(b"x"),
        b"\x92\xc0",
        b"",
    ],
)
def test_malformed_blob_payloads(payload: bytes) -> None:
    """S5-3"""
    assert_wire_error(ext(wire.EXT_BLOB, payload), "Blob")


# --- malformed input (S5-3) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated"),
        (b"\xc1", "malformed"),
        (b"\x91", "truncated"),
        (b"\x01\x02", "trailing"),
        (b"\xa3ab", "truncated"),
        (b"\xa2\xff\xfe", "UTF-8"),
        (b"\xd4", "truncated"),
    ],
)
def test_malformed_msgpack(data: bytes, match: str) -> None:
    assert_wire_error(data, match)


@given(wire_values, st.data())
def test_truncated_values_are_refused(value: object, data: st.DataObject) -> None:
    """S5-3 (property): any strict prefix of an encoding is refused."""
    encoded = wire.packb(value)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(tg.WireFormatError):
        wire.unpackb(encoded[:cut])


@given(st.binary(max_size=64))
def test_garbage_raises_only_wire_format_errors(data: bytes) -> None:
    """S5-3 (property): the decoder raises WireFormatError or returns a value."""
    with contextlib.suppress(tg.WireFormatError):
        wire.unpackb(data)


@pytest.mark.parametrize(
    "header",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 Gi items
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
        b"\xdc\xff\xff",  # array16
    ],
)
def test_huge_declared_lengths_allocate_nothing(header: bytes) -> None:
    """S5-3: a declared length is checked before anything of that size is allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(tg.WireFormatError):
            wire.unpackb(header + b"\x00" * 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_bytes_like_input_and_non_bytes() -> None:
    data = wire.packb([1, "x"])
    assert wire.unpackb(bytearray(data)) == [1, "x"]
    assert wire.unpackb(memoryview(data)) == [1, "x"]
    with pytest.raises(tg.WireFormatError, match="bytes-like"):
        wire.unpackb("not bytes")  # type: ignore[arg-type]


# --- frames (S5-4, S5-5) ---------------------------------------------------------------------


def frames_of(decoder: FrameDecoder) -> list[object]:
    out = []
    while (frame := decoder.next_frame()) is not NEED_DATA and frame is not CLOSED:
        out.append(frame)
    return out


def test_frame_format() -> None:
    """S5-4: a 4-byte big-endian length, then one msgpack value."""
    frame = encode_frame({"op": "get"})
    body = msgpack.packb({"op": "get"})
    assert frame == struct.pack(">I", len(body)) + body


@given(st.lists(wire_values, max_size=5), st.data())
def test_frames_survive_any_split(values: list[object], data: st.DataObject) -> None:
    """S5-4, S5-5 (property): frames decode the same however the bytes are chunked."""
    stream = b"".join(encode_frame(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    got: list[object] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        if cut == start:
            continue  # b"" would mean EOF
        decoder.receive_data(stream[start:cut])
        start = cut
        got.extend(frames_of(decoder))
    decoder.receive_data(b"")
    assert decoder.next_frame() is CLOSED
    assert got == [normalized(v) for v in values]
    assert decoder.buffered_bytes == 0


def test_byte_at_a_time() -> None:
    stream = encode_frame([1, 2]) + encode_frame(tg.CacheRef("r")) + encode_frame(None)
    decoder = FrameDecoder()
    got: list[object] = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        got.extend(frames_of(decoder))
    assert got == [[1, 2], tg.CacheRef("r"), None]


def test_many_frames_in_one_chunk_and_compaction() -> None:
    """S5-4: large buffers are consumed without quadratic copying, in order."""
    payloads = [bytes([i % 256]) * 3000 for i in range(100)]
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    decoder.receive_data(stream[: len(stream) // 2 + 7])
    first = frames_of(decoder)
    decoder.receive_data(stream[len(stream) // 2 + 7 :])
    assert first + frames_of(decoder) == payloads
    assert decoder.buffered_bytes == 0


def test_frame_size_at_and_past_the_limit() -> None:
    """S5-3, S5-4"""
    body = msgpack.packb(b"x" * 90)
    decoder = FrameDecoder(max_frame_bytes=len(body))
    decoder.receive_data(struct.pack(">I", len(body)) + body)
    assert decoder.next_frame() == b"x" * 90
    decoder = FrameDecoder(max_frame_bytes=len(body) - 1)
    with pytest.raises(tg.WireFormatError, match="max_frame_bytes"):
        decoder.receive_data(struct.pack(">I", len(body)))


def test_huge_declared_frame_is_refused_from_its_header_alone() -> None:
    """S5-4: refused before any of the body is buffered; nothing is kept."""
    decoder = FrameDecoder()
    good = encode_frame("ok")
    tracemalloc.start()
    try:
        with pytest.raises(tg.WireFormatError, match="4294967295"):
            decoder.receive_data(good + b"\xff\xff\xff\xff")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000
    assert decoder.buffered_bytes == 0
    assert decoder.broken


def test_header_split_across_chunks_is_checked_when_complete() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    decoder.receive_data(b"\x00\x00")
    with pytest.raises(tg.WireFormatError, match="max_frame_bytes"):
        decoder.receive_data(b"\x00\x0b")


def test_zero_length_frame() -> None:
    decoder = FrameDecoder()
    with pytest.raises(tg.WireFormatError, match="length 0"):
        decoder.receive_data(b"\x00\x00\x00\x00")


def test_clean_eof_and_truncated_frames() -> None:
    """S5-5"""
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(1))
    decoder.receive_data(b"")
    assert decoder.next_frame() == 1
    assert decoder.next_frame() is CLOSED
    assert decoder.next_frame() is CLOSED
    decoder.receive_data(b"")  # EOF twice is fine
    for partial in (b"\x00\x00", encode_frame("hello")[:-1]):
        decoder = FrameDecoder()
        decoder.receive_data(partial)
        assert decoder.next_frame() is NEED_DATA
        decoder.receive_data(b"")
        with pytest.raises(tg.WireFormatError, match="truncated frame"):
            decoder.next_frame()


def test_data_after_eof_is_refused() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(tg.WireFormatError, match="after EOF"):
        decoder.receive_data(b"\x00")


@pytest.mark.parametrize(
    "body", [b"\xc1", b"\x01\x02", ext(9, b""), nested_lists(600), b"\xa2\xff\xfe"]
)
def test_bad_frame_body_breaks_the_decoder(body: bytes) -> None:
    """S5-5: after an error every call raises WireFormatError; nothing is kept."""
    decoder = FrameDecoder()
    decoder.receive_data(
        encode_frame("first") + struct.pack(">I", len(body)) + body + encode_frame(3)
    )
    assert decoder.next_frame() == "first"
    with pytest.raises(tg.WireFormatError):
        decoder.next_frame()
    assert decoder.broken
    assert decoder.buffered_bytes == 0
    with pytest.raises(tg.WireFormatError, match="already failed"):
        decoder.next_frame()
    with pytest.raises(tg.WireFormatError, match="already failed"):
        decoder.receive_data(encode_frame(1))
    with pytest.raises(tg.WireFormatError, match="already failed"):
        decoder.receive_data(b"")


def test_frame_limits_apply_to_bodies() -> None:
    decoder = FrameDecoder(max_depth=2, max_container_len=2, max_str_len=2, max_bin_len=2)
    assert decoder.limits.max_depth == 2
    decoder.receive_data(encode_frame([[1, 2], "ab", b"cd"][:2]))
    assert decoder.next_frame() == [[1, 2], "ab"]
    decoder.receive_data(encode_frame([[[1]]]))
    with pytest.raises(tg.WireFormatError, match="max_depth"):
        decoder.next_frame()


def test_receive_data_needs_bytes() -> None:
    decoder = FrameDecoder()
    with pytest.raises(tg.WireFormatError, match="bytes"):
        decoder.receive_data("text")  # type: ignore[arg-type]
    decoder = FrameDecoder()
    decoder.receive_data(bytearray(encode_frame(1)))
    decoder.receive_data(memoryview(encode_frame(2)))
    assert frames_of(decoder) == [1, 2]


def test_encode_frame_refuses_what_a_peer_would_refuse() -> None:
    with pytest.raises(tg.WireFormatError, match="max_frame_bytes"):
        encode_frame("x" * 100, max_frame_bytes=50)
    with pytest.raises(tg.WireFormatError, match="set"):
        encode_frame({1})


def test_sentinels() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert repr(CLOSED) == "CLOSED"
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA
    assert wire.NEED_DATA is NEED_DATA


def test_limits_reach_inside_ext_payloads() -> None:
    """S5-3: a Blob's data and mime obey max_bin_len / max_str_len exactly."""
    at = wire.packb([tg.Blob(b"x" * 100, "abc"), "p" * 300])
    past = wire.packb([tg.Blob(b"x" * 101, "abc"), "p" * 300])
    long_mime = wire.packb([tg.Blob(b"x", "abcd"), "p" * 300])
    limits = {"max_bin_len": 100, "max_str_len": 300}
    assert wire.unpackb(at, **limits) == [tg.Blob(b"x" * 100, "abc"), "p" * 300]
    assert_wire_error(past, "max_bin_len", **limits)
    assert_wire_error(long_mime, "max_str_len", max_bin_len=100, max_str_len=3)
    ref = wire.packb([tg.CacheRef("r" * 20, 1, "m"), "p" * 300])
    assert wire.unpackb(ref, max_bin_len=100, max_str_len=300) == [
        tg.CacheRef("r" * 20, 1, "m"),
        "p" * 300,
    ]
    ref_only = wire.packb([tg.CacheRef("r" * 20, 1, "m"), *["q"] * 50])
    assert_wire_error(ref_only, "CacheRef ext payload: string too long", max_str_len=19)


def test_unknown_ext_types_under_explicit_limits() -> None:
    assert_wire_error(ext(7, b"p" * 50), "unknown ext type 7", max_str_len=10)
    assert_wire_error(ext(1, msgpack.packb(["r", 1])), "CacheRef", max_str_len=10)
    assert_wire_error(ext(2, b"\xc1"), "Blob", max_str_len=10)


# --- receiving into the decoder's buffer (S5-5, S5-16) -----------------------------------


def _feed_into(decoder: FrameDecoder, data: bytes, step: int) -> list[object]:
    frames: list[object] = []
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        view = decoder.receive_buffer(len(piece) + 3)
        view[: len(piece)] = piece
        view.release()
        decoder.commit_received(len(piece))
        while (frame := decoder.next_frame()) is not NEED_DATA:
            frames.append(frame)
    decoder.commit_received(0)
    frames.append(decoder.next_frame())
    return frames


@given(st.lists(wire_values, max_size=6), st.integers(1, 300), st.integers(0, 3))
def test_receive_buffer_is_receive_data(values: list[object], step: int, big: int) -> None:
    """S5-16 (property): receiving into the lent buffer in any split yields exactly the frames
    `receive_data` yields, large frames (which grow the buffer) included."""
    values = [*values, *([b"x" * 200_000] * big)]
    data = b"".join(encode_frame(v) for v in values)
    by_copy = FrameDecoder()
    expected: list[object] = []
    for start in range(0, len(data), step * 997):
        by_copy.receive_data(data[start : start + step * 997])
        while (frame := by_copy.next_frame()) is not NEED_DATA:
            expected.append(frame)
    by_copy.receive_data(b"")
    expected.append(by_copy.next_frame())
    got = _feed_into(FrameDecoder(), data, step * 997)
    assert got == expected
    assert got[-1] is CLOSED
    assert [normalized(v) for v in values] == got[:-1]


def test_receive_buffer_checks_headers_on_commit() -> None:
    """S5-4 via S5-16: a declared length over the limit is refused as its header is committed."""
    decoder = FrameDecoder(max_frame_bytes=1000)
    view = decoder.receive_buffer(4)
    view[:4] = struct.pack(">I", 1001)
    view.release()
    with pytest.raises(tg.WireFormatError, match="max_frame_bytes"):
        decoder.commit_received(4)
    assert decoder.buffered_bytes == 0
    with pytest.raises(tg.WireFormatError, match="already failed"):
        decoder.receive_buffer(10)


def test_receive_buffer_misuse() -> None:
    """S5-5: EOF is final; a commit larger than the lent room, or an empty lend, is refused."""
    decoder = FrameDecoder()
    with pytest.raises(ValueError, match="size"):
        decoder.receive_buffer(0)
    decoder.receive_buffer(8).release()
    with pytest.raises(ValueError, match="lent out"):
        decoder.commit_received(10**9)
    with pytest.raises(ValueError, match="lent out"):
        decoder.commit_received(-1)
    decoder.commit_received(0)  # EOF
    assert decoder.next_frame() is CLOSED
    with pytest.raises(tg.WireFormatError, match="after EOF"):
        decoder.receive_buffer(8)


def test_decoder_gives_back_a_large_frames_memory() -> None:
    """S5-16: the buffer grows for a large frame and is dropped once it is consumed."""
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"y" * (8 * 1024 * 1024)))
    assert decoder.next_frame() == b"y" * (8 * 1024 * 1024)
    assert decoder.buffered_bytes == 0
    tracemalloc.start()
    try:
        decoder.receive_data(encode_frame(1))
        assert decoder.next_frame() == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert len(decoder._buffer) < 1024 * 1024  # the 8 MiB buffer was let go


# --- detached binary payloads (S5-18) --------------------------------------------------------


def _stream_frame_values(sizes: list[int]) -> list[dict[str, object]]:
    """Chunk- and data-shaped maps (binary last), with other small frames between them."""
    values: list[dict[str, object]] = []
    for i, size in enumerate(sizes):
        payload = bytes([i % 251]) * size
        if i % 3 == 0:
            values.append({"id": i, "op": "chunk", "data": payload})
        elif i % 3 == 1:
            values.append({"id": i, "end": False, "op": "data", "data": payload})
        else:
            values.append({"op": "credit", "id": i, "n": size + 1})
    return values


def _decode_all(
    decoder: FrameDecoder, data: bytes, steps: list[int], *, lent: bool
) -> list[object]:
    frames: list[object] = []
    position = 0
    index = 0
    while True:
        frame = decoder.next_frame()
        if frame is CLOSED:
            return frames
        if frame is not NEED_DATA:
            frames.append(frame)
            continue
        step = steps[index % len(steps)]
        index += 1
        if lent:
            with decoder.receive_buffer(step) as view:
                count = min(len(view), len(data) - position)
                view[:count] = data[position : position + count]
            decoder.commit_received(count)
        else:
            piece = data[position : position + step]
            count = len(piece)
            decoder.receive_data(piece)
        position += count


@given(
    st.lists(st.sampled_from([0, 1, 100, 4095, 4096, 70_000, 300_000]), max_size=8),
    st.lists(st.sampled_from([1, 61, 4096, 65536, 400_000]), min_size=1, max_size=5).map(
        lambda steps: [*steps, 65536]  # a 1-byte step alone would make an example slow
    ),
    st.booleans(),
)
def test_detached_payloads_decode_as_the_ordinary_path(
    sizes: list[int], steps: list[int], lent: bool
) -> None:
    """S5-18 (property): a decoder that detaches binary payloads yields the same frames as
    one that does not (bytes payloads included), in any split and either way of
    receiving."""
    values = _stream_frame_values(sizes)
    data = b"".join(encode_frame(v) for v in values)
    ordinary = _decode_all(FrameDecoder(), data + b"", steps, lent=False)
    detaching = FrameDecoder(detach_bin_bytes=4096)
    got = _decode_all(detaching, data, steps, lent=lent)
    assert got == ordinary == values
    assert all(type(v.get("data", b"")) is bytes for v in got if isinstance(v, dict))
    assert detaching.buffered_bytes == 0


def test_without_the_bytes_allocator_nothing_is_detached(monkeypatch: pytest.MonkeyPatch) -> None:
    """S5-18: where the uninitialised-bytes allocator is unavailable (not CPython, or its
    import-time self-check failed), a detaching decoder takes the ordinary path: whole
    receive buffers, the same frames, bytes payloads."""
    monkeypatch.setattr(_codec, "_new_payload", None)
    values = _stream_frame_values([70_000, 1, 300_000, 5000])
    data = b"".join(encode_frame(v) for v in values)
    decoder = FrameDecoder(detach_bin_bytes=4096)
    decoder.receive_data(data[:100])  # the first frame's head: a detaching decoder would
    assert decoder.next_frame() is NEED_DATA  # lend a payload-sized view next
    with decoder.receive_buffer(1 << 20) as view:
        assert len(view) == 1 << 20
        view[: len(data) - 100] = data[100:]
    decoder.commit_received(len(data) - 100)
    got = [decoder.next_frame() for _ in values]
    assert got == values
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered_bytes == 0


def test_detached_payload_is_received_into_its_own_buffer() -> None:
    """S5-18: once a large chunk frame's head is here, the decoder lends views into the
    payload's own buffer, each ending where the payload does (nothing past the frame is
    read meanwhile), counts the bytes as buffered, and hands over that very buffer."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    frame = encode_frame({"id": 7, "op": "chunk", "data": payload})
    after = encode_frame({"op": "end", "id": 7})
    decoder = FrameDecoder(detach_bin_bytes=65536)
    decoder.receive_data(frame[:100])
    assert decoder.next_frame() is NEED_DATA
    position = 100
    lent: list[int] = []
    while position < len(frame):
        with decoder.receive_buffer(300_000) as view:
            lent.append(len(view))
            view[:] = frame[position : position + len(view)]
        decoder.commit_received(lent[-1])
        position += lent[-1]
        assert decoder.buffered_bytes == position - (len(frame) - len(payload))
    assert sum(lent) == len(frame) - 100  # the views ended exactly at the frame's end
    assert lent[-1] < 300_000
    with decoder.receive_buffer(1 << 20) as probe:
        assert len(probe) == 64  # a short read takes the next frame's head
        probe[: len(after)] = after
    decoder.commit_received(len(after))
    value = decoder.next_frame()
    assert value == {"id": 7, "op": "chunk", "data": payload}
    assert isinstance(value, dict)
    assert type(value["data"]) is bytes
    assert hash(value["data"]) == hash(payload)
    assert decoder.next_frame() == {"op": "end", "id": 7}
    assert decoder.buffered_bytes == 0


def test_detaching_keeps_every_rule() -> None:
    """S5-18, S5-3, S5-5: a detached frame is held to the ordinary rules: a bad head (an
    invalid UTF-8 key, a value the limits refuse) fails when the frame completes, as the
    ordinary path does; EOF inside the payload is a truncated frame; a payload over
    ``max_bin_len`` or over the 4 MiB reserve is not detached (the ordinary path refuses or
    buffers it)."""
    payload = b"p" * 100_000
    bad_key = msgpack.packb({"id": 1, "op": "chunk", "data": payload})
    bad_key = bad_key.replace(b"\xa2op", b"\xa2\xff\xfe", 1)
    decoder = FrameDecoder(detach_bin_bytes=4096)
    frame = struct.pack(">I", len(bad_key)) + bad_key
    decoder.receive_data(frame[:50])
    assert decoder.next_frame() is NEED_DATA
    with pytest.raises(tg.WireFormatError):
        decoder.receive_data(frame[50:])
    with pytest.raises(tg.WireFormatError, match="already failed"):
        decoder.next_frame()

    decoder = FrameDecoder(detach_bin_bytes=4096)
    good = encode_frame({"id": 1, "op": "chunk", "data": payload})
    decoder.receive_data(good[:60_000])
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered_bytes == 60_000 - (len(good) - len(payload))
    decoder.receive_data(b"")
    with pytest.raises(tg.WireFormatError, match="truncated frame"):
        decoder.next_frame()

    for limits in ({"max_bin_len": 50_000}, {"max_container_len": 2}):
        decoder = FrameDecoder(detach_bin_bytes=4096, **limits)
        decoder.receive_data(good[:100])
        assert decoder.next_frame() is NEED_DATA
        # From either method (S5-5): here as the payload completes the frame.
        with pytest.raises(tg.WireFormatError, match=next(iter(limits))):
            _decode_all(decoder, good[100:], [1 << 20], lent=False)

    huge = encode_frame({"id": 1, "op": "chunk", "data": b"h" * (5 * 1024 * 1024)})
    decoder = FrameDecoder(detach_bin_bytes=4096)
    decoder.receive_data(huge[:100])
    assert decoder.next_frame() is NEED_DATA
    with decoder.receive_buffer(1 << 20) as view:
        assert len(view) == 1 << 20  # not detached: the ordinary buffer
    decoder.commit_received(0)
    with pytest.raises(ValueError, match="detach_bin_bytes"):
        FrameDecoder(detach_bin_bytes=0)
