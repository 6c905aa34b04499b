"""
The cache-server protocol's messages: frozen attrs values and the one private cattrs
converter that turns them into msgpack-ready dicts and back (spec/S5, S5-6 onward).

Rules:

- Every message is a frozen attrs class; on the wire it is a msgpack map holding its fields
  and a tag ``"op"`` naming the class (`configure_tagged_union`). Client messages and server
  messages are two unions: a server never accepts a server message and vice versa.
- Structuring is strict: an ``int`` field takes an int (not a bool, a float or a numeric
  string), ``bytes`` takes bytes, ``str`` takes a str; a missing field, an unknown tag or a
  wrong type raises `WireFormatError` naming the problem (S5-7). cattrs' permissive defaults
  (``bytes(5)`` allocates five bytes, ``int("7")`` parses) never run on peer input.
- Fields typed ``object`` (a row, a result) pass through as msgpack decoded them: `CacheRef`
  and `Blob` ext values keep their types (S5-1).
- Pure: no I/O, no trio. `encode_message` returns a complete frame; `decode_client` and
  `decode_server` take one decoded frame value (from `FrameDecoder`).

Theory of operation: a request carries an ``id`` chosen by the client, unique on its
connection for the connection's life; every reply and stream message carries the ``id`` of
its request, so many requests share one connection and their replies never cross (S5-8).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar, final

import attrs
from cattrs.errors import BaseValidationError
from cattrs.preconf.msgpack import MsgpackConverter, make_converter
from cattrs.strategies import configure_tagged_union

from .._errors import (
    CacheServerError,
    DanglingRefError,
    ForeignRefError,
    RepositoryError,
    WireFormatError,
)
from ._codec import DEFAULT_MAX_FRAME_BYTES, encode_frame, packb
from ._events import Blob
from ._refs import CacheRef

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "ERROR_KINDS",
    "PROTOCOL_VERSION",
    "Abort",
    "ChunkMessage",
    "ClearOlderThan",
    "ClientMessage",
    "Credit",
    "Data",
    "DeletePrefix",
    "DeleteRef",
    "EndStream",
    "Failed",
    "Gc",
    "GetOutput",
    "Hello",
    "Ok",
    "ReadStream",
    "SaveOutput",
    "SaveStream",
    "ServerMessage",
    "ServerStats",
    "Stats",
    "Welcome",
    "decode_client",
    "decode_server",
    "encode_chunk_frame",
    "encode_data_frame",
    "encode_data_frame_head",
    "encode_message",
    "error_kind",
]

#: The protocol version a client sends in `Hello`; the server refuses any other.
PROTOCOL_VERSION: Final = 2


# --- client -> server ------------------------------------------------------------------------


@final
@attrs.frozen(kw_only=True)
class Hello:
    """First frame of a connection: the protocol version and the connection's namespace."""

    version: int
    namespace: str


@final
@attrs.frozen(kw_only=True)
class SaveOutput:
    """Store ``output`` as the row of ``(task_type, digest)`` in ``ns``."""

    id: int
    ns: str
    task_type: str
    digest: str
    output: object


@final
@attrs.frozen(kw_only=True)
class GetOutput:
    """Read the row of ``(task_type, digest)`` in ``ns``; the reply's value is a dict or nil."""

    id: int
    ns: str
    task_type: str
    digest: str


@final
@attrs.frozen(kw_only=True)
class SaveStream:
    """Open a streamed upload; `ChunkMessage` frames follow, then `EndStream` (or `Abort`)."""

    id: int
    ns: str
    task_type: str
    mime: str | None = None


@final
@attrs.frozen(kw_only=True)
class ChunkMessage:
    """Bytes of an upload; never more than the credit the server granted (S5-9)."""

    id: int
    data: bytes


@final
@attrs.frozen(kw_only=True)
class EndStream:
    """The upload ``id`` is complete: publish it and reply with its ref."""

    id: int


@final
@attrs.frozen(kw_only=True)
class Abort:
    """Give up request ``id`` (an upload is discarded, a download stops); no reply."""

    id: int


@final
@attrs.frozen(kw_only=True)
class ReadStream:
    """Open a download of ``ref``; `Data` frames follow under the credit window (S5-9)."""

    id: int
    ns: str
    ref: CacheRef


@final
@attrs.frozen(kw_only=True)
class Credit:
    """
    ``n`` more bytes may be sent on stream ``id`` (both directions: the server grants upload
    credit, the client grants download credit).
    """

    id: int
    n: int


@final
@attrs.frozen(kw_only=True)
class DeleteRef:
    """Delete the blob ``ref`` names."""

    id: int
    ns: str
    ref: CacheRef


@final
@attrs.frozen(kw_only=True)
class ClearOlderThan:
    """Prune rows (and their blobs) at least ``seconds`` old; the reply's value is a count."""

    id: int
    ns: str
    seconds: float


@final
@attrs.frozen(kw_only=True)
class DeletePrefix:
    """Delete rows whose task type starts with ``prefix``; the reply's value is a count."""

    id: int
    ns: str
    prefix: str


@final
@attrs.frozen(kw_only=True)
class Stats:
    """Count the rows and blobs of ``ns``; the reply's value is ``[rows, blobs, bytes]``."""

    id: int
    ns: str


@final
@attrs.frozen(kw_only=True)
class Gc:
    """Collect unreferenced blobs of ``ns``; the value is ``[blobs, bytes, temp_files]``."""

    id: int
    ns: str
    min_age: float


@final
@attrs.frozen(kw_only=True)
class ServerStats:
    """The server's own counters; the value is a str-keyed map of ints."""

    id: int


ClientMessage: TypeAlias = (
    Hello
    | SaveOutput
    | GetOutput
    | SaveStream
    | ChunkMessage
    | EndStream
    | Abort
    | ReadStream
    | Credit
    | DeleteRef
    | ClearOlderThan
    | DeletePrefix
    | Stats
    | Gc
    | ServerStats
)


# --- server -> client ------------------------------------------------------------------------


@final
@attrs.frozen(kw_only=True)
class Welcome:
    """
    The server accepted the handshake.

    Attributes:
        version: the protocol version (equal to the client's).
        window: bytes of credit each stream starts with, in both directions (S5-9).
        chunk_bytes: the largest chunk either side sends in one frame.
        max_in_flight: requests a connection may have open at once (S5-8).
    """

    version: int
    window: int
    chunk_bytes: int
    max_in_flight: int


@final
@attrs.frozen(kw_only=True)
class Ok:
    """Request ``id`` succeeded with ``value`` (for a download: it is open, ``value`` nil)."""

    id: int
    value: object = None


@final
@attrs.frozen(kw_only=True)
class Failed:
    """
    Request ``id`` failed (``id`` is -1 for a connection-level failure, after which the server
    closes the connection). ``kind`` names the exception family (`error_kind`).
    """

    id: int
    kind: str
    message: str


@final
@attrs.frozen(kw_only=True)
class Data:
    """Bytes of a download (``data`` empty and ``end`` true: the download is complete)."""

    id: int
    data: bytes
    end: bool = False


ServerMessage: TypeAlias = Welcome | Ok | Failed | Data | Credit

_TAGS: Final[dict[type, str]] = {
    Hello: "hello",
    SaveOutput: "save",
    GetOutput: "get",
    SaveStream: "put",
    ChunkMessage: "chunk",
    EndStream: "end",
    Abort: "abort",
    ReadStream: "read",
    Credit: "credit",
    DeleteRef: "delete",
    ClearOlderThan: "clear",
    DeletePrefix: "prefix",
    Stats: "stats",
    Gc: "gc",
    ServerStats: "server_stats",
    Welcome: "welcome",
    Ok: "ok",
    Failed: "failed",
    Data: "data",
}

#: Error kinds a `Failed` reply may name, and what they mean on the client.
ERROR_KINDS: Final = frozenset(
    {
        "foreign_ref",  # ForeignRefError
        "dangling_ref",  # DanglingRefError
        "repository",  # RepositoryError (the client raises CacheServerError)
        "wire",  # WireFormatError: a frame or message broke the wire rules
        "protocol",  # CacheServerError: the peer broke the protocol
        "type",  # TypeError
        "value",  # ValueError
        "shutdown",  # CacheServerError: the server is shutting down
        "aborted",  # CacheServerError: the client aborted the stream; nothing published, none sent after
        "internal",  # CacheServerError: a bug in the server
    }
)


# --- the converter ---------------------------------------------------------------------------

T = TypeVar("T")


def _strict(kind: type[T], name: str) -> Callable[[object, object], T]:
    def structure(value: object, _type: object) -> T:
        # Invariant (S5-7): exact types from the peer, never cattrs' coercions.
        if type(value) is not kind:
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value  # checked: exactly `kind`

    return structure


def _structure_float(value: object, _type: object) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def _structure_ref(value: object, _type: object) -> CacheRef:
    if type(value) is not CacheRef:
        raise TypeError(f"expected a CacheRef (ext type 1), got {type(value).__name__}")
    return value


def _passthrough(value: object, _type: object) -> object:
    return value


def _is_object(type_: object) -> bool:
    return type_ is object


def _identity(value: object) -> object:
    return value


def _make_converter() -> MsgpackConverter:
    converter = make_converter()
    converter.register_structure_hook(int, _strict(int, "an int"))
    converter.register_structure_hook(str, _strict(str, "a str"))
    converter.register_structure_hook(bytes, _strict(bytes, "bytes"))
    converter.register_structure_hook(bool, _strict(bool, "a bool"))
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(CacheRef, _structure_ref)
    converter.register_structure_hook_func(_is_object, _passthrough)
    # Refs and blobs leave as themselves: the codec packs them as ext types (S5-1).
    converter.register_unstructure_hook(CacheRef, _identity)
    converter.register_unstructure_hook(Blob, _identity)
    converter.register_unstructure_hook_func(_is_object, _identity)
    configure_tagged_union(ClientMessage, converter, tag_generator=_TAGS.__getitem__, tag_name="op")
    configure_tagged_union(ServerMessage, converter, tag_generator=_TAGS.__getitem__, tag_name="op")
    return converter


_CONVERTER: Final = _make_converter()
_unstructure: Final = _CONVERTER.unstructure
_structure: Final = _CONVERTER.structure


def encode_message(message: ClientMessage | ServerMessage) -> bytes:
    """
    Encode ``message`` as one complete frame (length prefix included, S5-4).

    Raises:
        WireFormatError: a field holds a value the wire cannot carry (a row with a set, a
            class instance...); the message names it.
    """
    kind = type(message)
    fast = _FAST_UNSTRUCTURE.get(kind)
    if fast is not None:
        value: object = fast(message)
    else:
        union = ServerMessage if kind in _SERVER_TYPES else ClientMessage
        value = _unstructure(message, union)
    frame: bytes = encode_frame(value)
    return frame


# --- stream frames without copying their payload -----------------------------------------
#
# A chunk or data frame is the same msgpack map `encode_message` builds (the wire is
# unchanged), but its payload is not copied into it: the frame is returned as parts, the
# length prefix and the map up to the binary's header, then the payload's own buffers, for
# one scatter write (``os.writev``). The binary field comes last in the map, so its bytes are
# the frame's tail. Values are exactly as msgpack encodes them (the smallest bin header).


def _bin_header(size: int) -> bytes:
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


_CHUNK_HEAD: Final = packb("op") + packb("chunk") + packb("data")
_DATA_HEAD: Final = packb("op") + packb("data") + packb("data")
_ID_KEY: Final = packb("id")
_END_KEY: Final = packb("end")


def _stream_frame(
    head: bytes, payload: list[bytes | bytearray | memoryview], size: int
) -> list[bytes | bytearray | memoryview]:
    total = len(head) + size
    if total > DEFAULT_MAX_FRAME_BYTES:
        raise WireFormatError(
            f"frame body is {total} bytes; max_frame_bytes is {DEFAULT_MAX_FRAME_BYTES}"
        )
    return [total.to_bytes(4, "big") + head, *payload]


def encode_chunk_frame(
    request_id: int, payload: list[bytes | bytearray | memoryview], size: int
) -> list[bytes | bytearray | memoryview]:
    """
    Encode ``ChunkMessage(id=request_id, data=b"".join(payload))`` as frame parts whose
    concatenation is the frame, without copying ``payload`` (each part a byte buffer whose
    ``len`` is its size in bytes; ``size`` is their total).

    Raises:
        WireFormatError: the frame would be longer than the default frame limit.
    """
    head = b"\x83" + _ID_KEY + packb(request_id) + _CHUNK_HEAD + _bin_header(size)
    return _stream_frame(head, payload, size)


def encode_data_frame(
    request_id: int, data: bytes | bytearray | memoryview
) -> list[bytes | bytearray | memoryview]:
    """
    Encode ``Data(id=request_id, data=data)`` as frame parts (see `encode_chunk_frame`):
    the frame's head, then ``data`` itself, uncopied.

    Raises:
        WireFormatError: the frame would be longer than the default frame limit.
    """
    return [encode_data_frame_head(request_id, len(data)), data]


def encode_data_frame_head(request_id: int, size: int) -> bytes:
    """
    The head of `encode_data_frame`'s frame for a payload of ``size`` bytes: the length
    prefix and the map up to the binary header. The head followed by exactly ``size``
    payload bytes (from anywhere, e.g. a file through ``os.sendfile``) is the frame of
    ``Data(id=request_id, data=payload)`` (S5-16).

    Raises:
        WireFormatError: the frame would be longer than the default frame limit.
    """
    head = b"\x84" + _ID_KEY + packb(request_id) + _END_KEY + b"\xc2" + _DATA_HEAD
    (prefixed,) = _stream_frame(head + _bin_header(size), [], size)
    assert isinstance(prefixed, bytes)
    return prefixed


# --- hot paths -------------------------------------------------------------------------------
#
# The messages of every round trip and every chunk skip cattrs' generated hooks (a Python call
# per field) for a few lines that build exactly what the converter builds and accept exactly
# what it accepts: anything a fast decoder does not accept goes to the converter, which
# accepts it or names the problem (S5-7). tests/core/test_messages.py checks the agreement.


def _unstructure_get(m: object) -> dict[str, object]:
    assert type(m) is GetOutput
    return {"id": m.id, "ns": m.ns, "task_type": m.task_type, "digest": m.digest, "op": "get"}


def _unstructure_ok(m: object) -> dict[str, object]:
    assert type(m) is Ok
    return {"id": m.id, "value": m.value, "op": "ok"}


def _unstructure_chunk(m: object) -> dict[str, object]:
    assert type(m) is ChunkMessage
    return {"id": m.id, "data": m.data, "op": "chunk"}


def _unstructure_data(m: object) -> dict[str, object]:
    assert type(m) is Data
    return {"id": m.id, "data": m.data, "end": m.end, "op": "data"}


def _unstructure_credit(m: object) -> dict[str, object]:
    assert type(m) is Credit
    return {"id": m.id, "n": m.n, "op": "credit"}


_FAST_UNSTRUCTURE: Final[dict[type, Callable[[object], dict[str, object]]]] = {
    GetOutput: _unstructure_get,
    Ok: _unstructure_ok,
    ChunkMessage: _unstructure_chunk,
    Data: _unstructure_data,
    Credit: _unstructure_credit,
}


def _structure_get(v: dict[str, object]) -> object:
    i, ns, tt, d = v.get("id"), v.get("ns"), v.get("task_type"), v.get("digest")
    if type(i) is int and type(ns) is str and type(tt) is str and type(d) is str:
        return GetOutput(id=i, ns=ns, task_type=tt, digest=d)
    return None


def _structure_chunk(v: dict[str, object]) -> object:
    i, data = v.get("id"), v.get("data")
    if type(i) is int and type(data) is bytes:
        return ChunkMessage(id=i, data=data)
    return None


def _structure_credit(v: dict[str, object]) -> object:
    i, n = v.get("id"), v.get("n")
    if type(i) is int and type(n) is int:
        return Credit(id=i, n=n)
    return None


def _structure_ok(v: dict[str, object]) -> object:
    i = v.get("id")
    if type(i) is int:
        return Ok(id=i, value=v.get("value"))
    return None


def _structure_data(v: dict[str, object]) -> object:
    i, data, end = v.get("id"), v.get("data"), v.get("end", False)
    if type(i) is int and type(data) is bytes and type(end) is bool:
        return Data(id=i, data=data, end=end)
    return None


_FAST_CLIENT: Final[dict[str, Callable[[dict[str, object]], object]]] = {
    "get": _structure_get,
    "chunk": _structure_chunk,
    "credit": _structure_credit,
}
_FAST_SERVER: Final[dict[str, Callable[[dict[str, object]], object]]] = {
    "ok": _structure_ok,
    "data": _structure_data,
    "credit": _structure_credit,
}


_SERVER_TYPES: Final = frozenset({Welcome, Ok, Failed, Data})


def _decode(
    value: object,
    union: object,
    side: str,
    fast: dict[str, Callable[[dict[str, object]], object]],
) -> object:
    if type(value) is not dict:
        raise WireFormatError(f"a {side} message is a map, not a {type(value).__name__}")
    op = value.get("op")
    if type(op) is not str:
        raise WireFormatError(f"a {side} message needs a str 'op' tag")
    structure_fast = fast.get(op)
    if structure_fast is not None:
        message = structure_fast(value)
        if message is not None:
            return message
    try:
        structured: object = _structure(value, union)  # type: ignore[arg-type]  # a union
        return structured
    except BaseValidationError as exc:
        details = "; ".join(f"{type(e).__name__}: {e}" for e in exc.exceptions)
        raise WireFormatError(f"malformed {side} message {op[:40]!r}: {details}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise WireFormatError(
            f"malformed {side} message {op[:40]!r}: {type(exc).__name__}: {exc}"
        ) from None


def decode_client(value: object) -> ClientMessage:
    """
    Structure one decoded frame as a client message.

    Raises:
        WireFormatError: ``value`` is not a map with a known client ``op`` and well-typed
            fields (S5-7).
    """
    return _decode(value, ClientMessage, "client", _FAST_CLIENT)  # type: ignore[return-value]


def decode_server(value: object) -> ServerMessage:
    """
    Structure one decoded frame as a server message.

    Raises:
        WireFormatError: ``value`` is not a map with a known server ``op`` and well-typed
            fields (S5-7).
    """
    return _decode(value, ServerMessage, "server", _FAST_SERVER)  # type: ignore[return-value]


def error_kind(exc: BaseException) -> str:
    """The `Failed.kind` that carries ``exc`` to the client (the most specific family)."""
    if isinstance(exc, ForeignRefError):
        return "foreign_ref"
    if isinstance(exc, DanglingRefError):
        return "dangling_ref"
    if isinstance(exc, WireFormatError):
        return "wire"
    if isinstance(exc, CacheServerError):
        return "protocol"
    if isinstance(exc, RepositoryError):
        return "repository"
    if isinstance(exc, TypeError):
        return "type"
    if isinstance(exc, ValueError):
        return "value"
    return "internal"
