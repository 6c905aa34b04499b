"""
The cache-server protocol's messages (`_core/_messages.py`): every message round-trips
through a frame, structuring is strict (S5-7), and error kinds name the right family.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph._core import _messages as messages
from trio_taskgraph._core._codec import FrameDecoder, packb, unpackb
from trio_taskgraph._core._messages import (
    ERROR_KINDS,
    PROTOCOL_VERSION,
    Abort,
    ChunkMessage,
    ClearOlderThan,
    ClientMessage,
    Credit,
    Data,
    DeletePrefix,
    DeleteRef,
    EndStream,
    Failed,
    Gc,
    GetOutput,
    Hello,
    Ok,
    ReadStream,
    SaveOutput,
    SaveStream,
    ServerMessage,
    ServerStats,
    Stats,
    Welcome,
    decode_client,
    decode_server,
    encode_message,
    error_kind,
)

REF = tg.CacheRef("cache://" + "a" * 32 + "/default/" + "b" * 32 + "#" + "c" * 32, 3, "x/y")

CLIENT: list[ClientMessage] = [
    Hello(version=PROTOCOL_VERSION, namespace="default"),
    SaveOutput(
        id=1,
        ns="n",
        task_type="t",
        digest="0" * 64,
        output={"ref": REF, "blob": tg.Blob(b"\x00", "a/b"), "n": [1, 2.5, None, True]},
    ),
    GetOutput(id=2, ns="n", task_type="t", digest="1" * 64),
    SaveStream(id=3, ns="n", task_type="t", mime=None),
    SaveStream(id=4, ns="n", task_type="t", mime="image/png"),
    ChunkMessage(id=3, data=b"\x00" * 100),
    EndStream(id=3),
    Abort(id=4),
    ReadStream(id=5, ns="n", ref=REF),
    Credit(id=5, n=1024),
    DeleteRef(id=6, ns="n", ref=REF),
    ClearOlderThan(id=7, ns="n", seconds=3600.0),
    DeletePrefix(id=8, ns="n", prefix="a."),
    Stats(id=9, ns="n"),
    Gc(id=10, ns="n", min_age=0.0),
    ServerStats(id=11),
]

SERVER: list[ServerMessage] = [
    Welcome(version=PROTOCOL_VERSION, window=4096, chunk_bytes=1024, max_in_flight=8),
    Ok(id=1),
    Ok(id=2, value={"row": [REF, b"x"]}),
    Ok(id=3, value=REF),
    Failed(id=-1, kind="protocol", message="bye"),
    Data(id=5, data=b"abc"),
    Data(id=5, data=b"", end=True),
    Credit(id=3, n=7),
]


def _decoded(frame: bytes) -> object:
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    return decoder.next_frame()


@pytest.mark.parametrize("message", CLIENT, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message: ClientMessage) -> None:
    """S5-6: every client message survives a frame, refs and blobs as themselves."""
    assert decode_client(_decoded(encode_message(message))) == message


@pytest.mark.parametrize("message", SERVER, ids=lambda m: type(m).__name__)
def test_server_messages_round_trip(message: ServerMessage) -> None:
    """S5-6: every server message survives a frame."""
    assert decode_server(_decoded(encode_message(message))) == message


@given(
    request_id=st.integers(0, 2**63 - 1),
    data=st.binary(max_size=256),
    ns=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
)
def test_stream_messages_round_trip(request_id: int, data: bytes, ns: str) -> None:
    """S5-6: ids, namespaces and chunk bytes of any value round-trip."""
    for message in (
        ChunkMessage(id=request_id, data=data),
        Stats(id=request_id, ns=ns),
    ):
        assert decode_client(unpackb(encode_message(message)[4:])) == message
    reply = Data(id=request_id, data=data)
    assert decode_server(unpackb(encode_message(reply)[4:])) == reply


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"op": "chunk", "id": 1, "data": 5}, "expected bytes"),  # never bytes(5)
        ({"op": "chunk", "id": True, "data": b""}, "expected an int"),  # a bool is no int
        ({"op": "chunk", "id": 1.0, "data": b""}, "expected an int"),
        ({"op": "stats", "id": "1", "ns": "x"}, "expected an int"),  # never int("1")
        ({"op": "stats", "id": 1, "ns": b"x"}, "expected a str"),
        ({"op": "clear", "id": 1, "ns": "x", "seconds": True}, "expected a number"),
        ({"op": "clear", "id": 1, "ns": "x", "seconds": "1"}, "expected a number"),
        ({"op": "read", "id": 1, "ns": "x", "ref": {"$ref": "x"}}, "expected a CacheRef"),
        ({"op": "hello", "version": 1}, "namespace"),
        ({"op": "launch", "id": 1}, "launch"),
        ({"op": "ok", "id": 1}, "ok"),  # a server message sent by a client
        ({"op": 7}, "'op' tag"),
        ({}, "'op' tag"),
        ([1, 2], "is a map"),
        ("hello", "is a map"),
    ],
)
def test_client_structuring_is_strict(value: object, fragment: str) -> None:
    """S5-7: wrong types, unknown ops and non-maps are WireFormatError naming the problem."""
    with pytest.raises(tg.WireFormatError, match="client") as info:
        decode_client(value)
    assert fragment in str(info.value)


def test_server_structuring_is_strict() -> None:
    """S5-7: the client refuses client messages, bad fields, and a bad bool."""
    with pytest.raises(tg.WireFormatError, match="server"):
        decode_server({"op": "hello", "version": 1, "namespace": "x"})
    with pytest.raises(tg.WireFormatError, match="expected a bool"):
        decode_server({"op": "data", "id": 1, "data": b"", "end": 1})
    with pytest.raises(tg.WireFormatError, match="expected a str"):
        decode_server({"op": "failed", "id": 1, "kind": 3, "message": "m"})
    assert decode_server({"op": "credit", "id": 1, "n": 2}) == Credit(id=1, n=2)


def test_float_fields_take_ints() -> None:
    """S5-7: a number field takes an int (msgpack packs 0.0 as a float, peers may not)."""
    message = decode_client({"op": "gc", "id": 1, "ns": "x", "min_age": 0})
    assert message == Gc(id=1, ns="x", min_age=0.0)
    assert isinstance(message, Gc)
    assert type(message.min_age) is float


def test_what_the_wire_cannot_carry_is_refused_when_encoding() -> None:
    """S5-1: a row holding a set (or a class instance) is refused, never coerced to a list."""
    with pytest.raises(tg.WireFormatError, match="set"):
        encode_message(SaveOutput(id=1, ns="n", task_type="t", digest="0", output={"s": {1}}))
    with pytest.raises(tg.WireFormatError):
        encode_message(Ok(id=1, value=object()))


def test_tags_are_short_and_in_the_frame() -> None:
    """S5-6: the tag travels as ``op``."""
    assert unpackb(encode_message(Stats(id=1, ns="x"))[4:]) == {"op": "stats", "id": 1, "ns": "x"}
    assert packb({"op": "end", "id": 1})  # (the codec itself is S5-1..S5-5)


def test_error_kinds() -> None:
    """S5-14: each family has its kind; every kind is a documented one."""
    cases: list[tuple[BaseException, str]] = [
        (tg.ForeignRefError("x"), "foreign_ref"),
        (tg.DanglingRefError("x"), "dangling_ref"),
        (tg.WireFormatError("x"), "wire"),
        (tg.CacheServerError("x"), "protocol"),
        (tg.RepositoryError("x"), "repository"),
        (TypeError("x"), "type"),
        (ValueError("x"), "value"),
        (KeyError("x"), "internal"),
    ]
    for exc, kind in cases:
        assert error_kind(exc) == kind
        assert kind in ERROR_KINDS


_FIELD_VALUES = st.one_of(
    st.integers(-3, 3),
    st.booleans(),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(
    op=st.sampled_from(["get", "chunk", "credit", "ok", "data"]),
    fields=st.dictionaries(
        st.sampled_from(["id", "ns", "task_type", "digest", "data", "n", "value", "end", "x"]),
        _FIELD_VALUES,
    ),
)
def test_hot_paths_agree_with_the_converter(op: str, fields: dict[str, object]) -> None:
    """S5-7: a hot-path decoder accepts only what the converter accepts, and builds the same."""
    value: dict[str, object] = {**fields, "op": op}
    for fast, union in (
        (messages._FAST_CLIENT, messages.ClientMessage),
        (messages._FAST_SERVER, messages.ServerMessage),
    ):
        structure = fast.get(op)
        if structure is None:
            continue
        try:
            expected: object = messages._CONVERTER.structure(value, union)  # type: ignore[arg-type]
        except Exception:
            expected = "refused"
        got = structure(value)
        assert got is None or got == expected, (got, expected)
        if expected != "refused":
            assert got == expected, "a valid hot message must take the hot path"


@pytest.mark.parametrize("message", [*CLIENT, *SERVER], ids=lambda m: type(m).__name__)
def test_hot_encoders_agree_with_the_converter(message: ClientMessage | ServerMessage) -> None:
    """S5-6: hot-path encoding builds exactly the converter's dict."""
    fast = messages._FAST_UNSTRUCTURE.get(type(message))
    if fast is not None:
        union = messages.ServerMessage if type(message) in (Ok, Data) else messages.ClientMessage
        assert fast(message) == messages._CONVERTER.unstructure(message, union)


# --- stream frames built as parts (S5-16) ----------------------------------------------------

_BIN_EDGES = [0, 1, 255, 256, 65535, 65536, 70000]


@pytest.mark.parametrize("size", _BIN_EDGES)
@given(request_id=st.integers(0, 2**63 - 1), cut=st.integers(0, 70000))
def test_chunk_frame_parts_are_the_chunk_message(size: int, request_id: int, cut: int) -> None:
    """S5-16: the parts of a chunk frame concatenate to a frame holding exactly the
    `ChunkMessage` the converter would build, whatever the payload's split, at every bin
    header size (bin8/16/32)."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    cut = min(cut, size)
    parts = messages.encode_chunk_frame(request_id, [data[:cut], memoryview(data)[cut:]], size)
    frame = b"".join(parts)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert parts[1] == data[:cut]  # the payload is not copied into the head
    expected = encode_message(ChunkMessage(id=request_id, data=data))
    assert unpackb(frame[4:]) == unpackb(expected[4:])
    assert decode_client(unpackb(frame[4:])) == ChunkMessage(id=request_id, data=data)
    assert len(frame) == len(expected)  # same encoding sizes as msgpack's own


@pytest.mark.parametrize("size", _BIN_EDGES)
def test_data_frame_parts_are_the_data_message(size: int) -> None:
    """S5-16: a data frame's parts are its head and the payload itself (uncopied), and
    decode as the `Data` message the converter would build."""
    data = bytes(size)
    parts = messages.encode_data_frame(7, data)
    assert parts[-1] is data
    frame = b"".join(parts)
    expected = encode_message(Data(id=7, data=data))
    assert len(frame) == len(expected)
    assert decode_server(unpackb(frame[4:])) == Data(id=7, data=data)
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    assert decode_server(decoder.next_frame()) == Data(id=7, data=data)


@pytest.mark.parametrize("size", _BIN_EDGES)
def test_data_frame_head_then_the_payload_is_the_data_frame(size: int) -> None:
    """S5-16: the head the server sends before a payload it `os.sendfile`s from the blob
    file, followed by the payload bytes, is exactly `encode_data_frame`'s frame."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    head = messages.encode_data_frame_head(7, size)
    assert head + data == b"".join(messages.encode_data_frame(7, data))
    assert decode_server(unpackb((head + data)[4:])) == Data(id=7, data=data)


def test_stream_frames_refuse_what_a_peer_would_refuse() -> None:
    """S5-16, S5-4: a stream frame over the frame limit is refused before anything is sent."""
    with pytest.raises(tg.WireFormatError, match="max_frame_bytes"):
        messages.encode_chunk_frame(1, [], 64 * 1024 * 1024)
    with pytest.raises(tg.WireFormatError, match="max_frame_bytes"):
        messages.encode_data_frame(1, memoryview(bytearray(64 * 1024 * 1024)))
    with pytest.raises(tg.WireFormatError, match="max_frame_bytes"):
        messages.encode_data_frame_head(1, 64 * 1024 * 1024)
