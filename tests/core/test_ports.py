"""
Reading port schemas (S1-4, S1-5) and materialising binary chunks (S1-6).
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.strategies import binary_chunks, port_names
from tests.typed_hypothesis import given
from trio_taskgraph._core._events import BytesLike

SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "x-stream": "append"},
        "snap": {"x-stream": "replace"},
        "obj": {"type": "object", "x-stream": "object"},
        "image": {"x-stream": "binary", "contentMediaType": "image/png"},
        "raw": {"x-stream": "binary", "format": "binary"},
        "plain": {"type": "integer"},
        "anything": True,
    },
}


def test_streaming_ports_and_modes() -> None:
    assert tg.get_streaming_ports(SCHEMA) == {
        "text": "append",
        "snap": "replace",
        "obj": "object",
        "image": "binary",
        "raw": "binary",
    }
    assert tg.get_port_stream_mode(SCHEMA, "plain") == "none"
    assert tg.get_port_stream_mode(SCHEMA, "anything") == "none"
    assert tg.get_binary_port_id(SCHEMA) == "image"
    assert tg.get_output_stream_mode(SCHEMA) == "mixed"


def test_port_specs() -> None:
    specs = tg.parse_ports(SCHEMA)
    assert specs["image"] == tg.PortSpec(
        name="image", stream_mode="binary", binary_format="blob", mime="image/png"
    )
    assert specs["raw"].binary_format == "binary"
    assert specs["raw"].is_binary
    assert specs["plain"].binary_format is None
    assert not specs["plain"].is_binary


@pytest.mark.parametrize(
    ("schema", "mode"),
    [
        ({}, "none"),
        ({"properties": {}}, "none"),
        ({"properties": {"a": {"type": "string"}}}, "none"),
        ({"properties": {"a": {"x-stream": "append"}, "b": {"x-stream": "append"}}}, "append"),
        ({"properties": {"a": {"x-stream": "binary"}, "b": {}}}, "binary"),
        ({"properties": {"a": {"x-stream": "binary"}, "b": {"x-stream": "object"}}}, "mixed"),
    ],
)
def test_output_stream_mode(schema: dict[str, object], mode: str) -> None:
    assert tg.get_output_stream_mode(schema) == mode


def test_no_binary_port() -> None:
    assert tg.get_binary_port_id({"properties": {"a": {"x-stream": "append"}}}) is None


@pytest.mark.parametrize("value", ["Binary", "bytes", "stream", "", 1, None, True])
def test_unknown_x_stream_is_an_error(value: object) -> None:
    """S1-4: an unknown x-stream value is never a silent 'none'."""
    schema = {"properties": {"port_a": {"x-stream": value}}}
    if value is None:
        assert tg.get_streaming_ports(schema) == {}
        return
    with pytest.raises(tg.PortSchemaError, match="port_a") as info:
        tg.get_streaming_ports(schema)
    assert not isinstance(info.value, tg.BinaryFormatError)
    assert "x-stream" in str(info.value)


def test_absent_format_means_blob() -> None:
    """S1-5"""
    assert tg.assert_binary_format({"properties": {"p": {"x-stream": "binary"}}}, "p") == "blob"
    assert (
        tg.assert_binary_format(
            {"properties": {"p": {"x-stream": "binary", "format": "blob"}}}, "p"
        )
        == "blob"
    )


@pytest.mark.parametrize("fmt", ["Blob", "BINARY", "base64", "uri", "", 0, None, ["blob"]])
def test_bad_binary_format_is_refused(fmt: object) -> None:
    """S1-5: the casing typo "Blob" included; the message lists the allowed values."""
    schema = {"properties": {"picture": {"x-stream": "binary", "format": fmt}}}
    with pytest.raises(tg.BinaryFormatError, match="picture") as info:
        tg.assert_binary_format(schema, "picture")
    assert "'blob'" in str(info.value)
    assert "'binary'" in str(info.value)
    with pytest.raises(tg.BinaryFormatError, match="picture"):
        tg.parse_ports(schema)
    with pytest.raises(tg.BinaryFormatError):
        tg.get_binary_port_id(schema)


_ALLOWED = st.sampled_from(["blob", "binary"])
_BAD_FORMATS = st.one_of(
    st.text().filter(lambda s: s not in ("blob", "binary")),
    st.integers(),
    st.booleans(),
    st.lists(st.text(), max_size=2),
    st.floats(allow_nan=False),
)


@given(port=port_names, fmt=_BAD_FORMATS, others=st.dictionaries(port_names, _ALLOWED, max_size=3))
def test_property_bad_format_rejected_naming_port(
    port: str, fmt: object, others: dict[str, str]
) -> None:
    """S1-5 (property): a binary port with a format outside {absent, blob, binary} is refused,
    and the message names that port."""
    props: dict[str, object] = {
        name: {"x-stream": "binary", "format": f} for name, f in others.items() if name != port
    }
    props[port] = {"x-stream": "binary", "format": fmt}
    schema = {"properties": props}
    with pytest.raises(tg.BinaryFormatError) as info:
        tg.assert_binary_format(schema, port)
    assert repr(port) in str(info.value)
    with pytest.raises(tg.BinaryFormatError) as info2:
        tg.parse_ports(schema)
    assert repr(port) in str(info2.value)


def test_assert_binary_format_on_non_binary_or_missing_port() -> None:
    with pytest.raises(tg.PortSchemaError, match="not a binary port"):
        tg.assert_binary_format(SCHEMA, "text")
    with pytest.raises(tg.PortSchemaError, match="'missing' is not declared"):
        tg.assert_binary_format(SCHEMA, "missing")


@pytest.mark.parametrize(
    "schema",
    [
        [],
        "schema",
        {"properties": []},
        {"properties": {"a": "string"}},
        {"properties": {"": {}}},
        {"properties": {"a": {"contentMediaType": 3}}},
    ],
)
def test_malformed_schemas(schema: object) -> None:
    with pytest.raises(tg.PortSchemaError):
        tg.parse_ports(schema)


@given(chunks=binary_chunks, mime=st.none() | st.text(max_size=20))
def test_materialize_is_exact_concatenation(chunks: list[BytesLike], mime: str | None) -> None:
    """S1-6 (property): blob -> Blob(concat, mime); binary -> bytes(concat)."""
    expected = b"".join(bytes(c) for c in chunks)
    blob = tg.materialize_binary(chunks, "blob", mime=mime)
    assert isinstance(blob, tg.Blob)
    assert blob.data == expected
    assert blob.mime == mime
    raw = tg.materialize_binary(iter(chunks), "binary")
    assert type(raw) is bytes
    assert raw == expected


def test_materialize_rejects_unknown_format() -> None:
    with pytest.raises(tg.BinaryFormatError, match="'Blob'"):
        tg.materialize_binary([b"x"], "Blob")  # type: ignore[arg-type]


def test_materialize_rejects_non_bytes_chunks() -> None:
    with pytest.raises(TypeError):
        tg.materialize_binary(["text"], "binary")  # type: ignore[list-item]
