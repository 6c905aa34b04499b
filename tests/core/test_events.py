"""
Stream events and Blob: frozen values that cannot be built invalid (S1-1, S1-2, S1-3).
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph._core._events import chunk_size


@pytest.mark.parametrize(
    "event",
    [
        tg.TextDelta("p", "t"),
        tg.ObjectDelta("p", {"a": 1}),
        tg.Snapshot({"a": 1}),
        tg.BinaryDelta("p", b"x"),
        tg.Finish({"a": 1}),
        tg.StreamError(RuntimeError("x")),
        tg.Phase("download"),
        tg.Blob(b"x"),
    ],
)
def test_events_are_frozen_and_slotted(event: object) -> None:
    """S1-1"""
    assert not hasattr(event, "__dict__")
    cls = type(event)
    assert attrs.has(cls)
    field = attrs.fields(cls)[0].name
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(event, field, "other")


@pytest.mark.parametrize("port", ["", None, 3, b"p"])
def test_port_must_be_non_empty_str(port: object) -> None:
    """S1-2"""
    with pytest.raises((TypeError, ValueError), match="port"):
        tg.TextDelta(port, "t")  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="port"):
        tg.BinaryDelta(port, b"x")  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="port"):
        tg.ObjectDelta(port, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", ["text", 3, None, [1, 2], {"a": 1}])
def test_binary_chunk_must_be_bytes_like(chunk: object) -> None:
    """S1-2"""
    with pytest.raises(TypeError, match="bytes"):
        tg.BinaryDelta("p", chunk)  # type: ignore[arg-type]


def test_binary_chunk_sizes() -> None:
    assert tg.BinaryDelta("p", b"abc").size == 3
    assert tg.BinaryDelta("p", bytearray(5)).size == 5
    assert tg.BinaryDelta("p", memoryview(b"abcd")[1:]).size == 3
    assert chunk_size(memoryview(bytes(8)).cast("Q")) == 8  # nbytes, not item count


def test_text_must_be_str_and_data_a_mapping() -> None:
    with pytest.raises(TypeError, match="text"):
        tg.TextDelta("p", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data"):
        tg.Finish([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data"):
        tg.Snapshot("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tg.StreamError("not an exception")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        tg.Phase("")


def test_finish_defaults_to_empty_output() -> None:
    assert tg.Finish().data == {}


@given(st.binary(max_size=256), st.none() | st.text(max_size=10))
def test_blob_holds_bytes_and_its_size(data: bytes, mime: str | None) -> None:
    """S1-3"""
    for given_data in (data, bytearray(data), memoryview(data)):
        blob = tg.Blob(given_data, mime)
        assert type(blob.data) is bytes
        assert blob.data == data
        assert len(blob) == len(data)
        assert blob.mime == mime
        assert blob == tg.Blob(data, mime)
        assert hash(blob) == hash(tg.Blob(data, mime))
        assert blob  # a value, truthy even when empty


def test_blob_does_not_copy_bytes() -> None:
    data = b"x" * 100
    assert tg.Blob(data).data is data


def test_blob_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="bytes"):
        tg.Blob("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mime"):
        tg.Blob(b"x", mime=3)  # type: ignore[arg-type]


def test_blob_repr_is_short() -> None:
    text = repr(tg.Blob(b"a" * 10_000, "x/y"))
    assert len(text) < 100
    assert "size=10000" in text


def test_errors_hierarchy() -> None:
    assert issubclass(tg.BinaryFormatError, tg.PortSchemaError)
    assert issubclass(tg.PortSchemaError, ValueError)
    assert issubclass(tg.WireFormatError, ValueError)
    for cls in (tg.DanglingRefError, tg.ForeignRefError):
        assert issubclass(cls, tg.RefError)
    assert issubclass(tg.CacheServerError, tg.RepositoryError)
    for name in tg.__all__:
        obj = getattr(tg, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, tg.TaskGraphError), name
            assert obj.__doc__, f"{name} has no docstring"


def test_task_failed_error_names_task_and_node() -> None:
    err = tg.TaskFailedError("resize", "node-3", "disk full")
    assert "resize" in str(err)
    assert "node-3" in str(err)
    assert "disk full" in str(err)
    assert tg.TaskFailedError("t", "n").task_type == "t"
