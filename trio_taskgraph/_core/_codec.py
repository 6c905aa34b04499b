"""
The wire codec: msgpack values with ext types for `CacheRef` and `Blob`, strict limits, and a
sans-io frame decoder (h11's shape) for the cache server and its client.

Rules (spec/S5-wire-and-server.md):

- S5-1: values. ``None``, ``bool``, ``int`` (-2**63 .. 2**64-1), ``float``, ``str``, bytes-like
  (decoded as ``bytes``), lists and tuples (both decoded as ``list``: a tuple, namedtuple
  included, does not survive as a tuple), dicts (any ``dict`` subclass decodes as ``dict``),
  `CacheRef` (ext type 1) and `Blob` (ext type 2), which decode as themselves. Anything else
  (``set``, ``frozenset``, class instances, out-of-range ints, lone surrogates, cycles, nesting
  msgpack cannot pack) makes `packb` raise `WireFormatError`, never a bare ``TypeError``.
- S5-2: map keys are scalars: ``str``, ``bytes``, ``int``, ``float``, ``bool``, ``None`` (and
  the hashable `CacheRef` and `Blob`). A tuple key packs as an array, which is unhashable
  once decoded, so the decoder refuses it (`WireFormatError`); do not send container keys.
- S5-3: limits. Decoding checks, and names in the error, each of: total size (``max_bytes``,
  a frame's length), nesting depth (``max_depth``: ``[]`` is depth 1, a scalar depth 0),
  container length (``max_container_len``, arrays and maps), string and binary length
  (``max_str_len``, ``max_bin_len``), ext types (only 1 and 2; msgpack's own timestamp type
  -1 included in the refusal), and the shape of each ext payload. Every broken rule raises
  `WireFormatError`; nothing else escapes the decoder.
- S5-4: frames. A frame is a 4-byte big-endian unsigned length ``N`` (1 <= N <=
  ``max_frame_bytes``) followed by exactly ``N`` bytes holding one msgpack value. A declared
  length over the limit (or zero) is refused as soon as its header arrives, before any of
  its body is buffered.
- S5-5: the decoder is sans-io (`FrameDecoder.receive_data` / `FrameDecoder.next_frame`);
  ``receive_data(b"")`` means EOF. A clean EOF between frames yields `CLOSED`; EOF inside a
  frame is a `WireFormatError` (truncated frame). After any error the decoder refuses all
  further calls with `WireFormatError`.

Ext payloads (both are msgpack arrays inside the ext body):

- ``EXT_CACHE_REF = 1``: ``[ref: str, size: int | nil, mime: str | nil]``; the ext code is the
  brand on the wire, and the fields are validated exactly as `CacheRef` does (S3-2).
- ``EXT_BLOB = 2``: ``[mime: str | nil, data: bin]``.

Theory of operation: msgpack's C unpacker enforces the length limits (``max_*_len``) before it
allocates, and our ``ext_hook`` validates ext payloads. Two rules it cannot check, nesting
depth and msgpack's built-in timestamp ext, are checked after decoding, cheaply: a value can
only be deeper than ``max_depth`` if the data holds more than ``max_depth`` bytes that could be
container headers (counted in one C-level ``bytes.translate`` pass, skipped entirely for data
no longer than ``max_depth``), and can only hold a timestamp if the data contains ``0xff``
right after one of the eleven timestamp-shaped ext headers. Only when a bound fails is the
decoded value walked (iteratively) to check exactly. Small messages under the default limits
take an inlined path (`unpackb`) that skips everything msgpack already guarantees.

At run time `unpackb` is that fast path, taking ``**limits``; it hands any call that passes a
limit to the checked function, whose name, docstring and keyword-only signature it carries
(so type checkers, ``help`` and misspelt keywords see the documented API). The reason is
CPython 3.11's call protocol: every keyword-only default is looked up in a dict on every
call, which cost about a tenth of a small message's decode (`bench/bench_wire.py`).
"""

from __future__ import annotations

import ctypes
import functools
import struct
import sys
from typing import TYPE_CHECKING, Final, final

import attrs
import msgpack

from .._errors import WireFormatError
from ._events import Blob
from ._refs import CacheRef

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_CONTAINER_LEN",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_FRAME_BYTES",
    "EXT_BLOB",
    "EXT_CACHE_REF",
    "FRAME_HEADER_SIZE",
    "NEED_DATA",
    "FrameDecoder",
    "WireLimits",
    "encode_frame",
    "packb",
    "unpackb",
]

EXT_CACHE_REF: Final = 1
EXT_BLOB: Final = 2

#: A frame (and a value given to `unpackb`) may be at most this many bytes.
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
#: Deepest nesting of arrays and maps accepted (``[]`` is depth 1).
DEFAULT_MAX_DEPTH: Final = 512
#: Longest array or map accepted (items, or key/value pairs).
DEFAULT_MAX_CONTAINER_LEN: Final = 1 << 20
#: Bytes of the length prefix of a frame.
FRAME_HEADER_SIZE: Final = 4

_HEADER: Final = struct.Struct(">I")
# FrameDecoder's buffer: allocated at least this large, and dropped (to be allocated again
# when needed) once it is empty and larger than _KEEP_CAPACITY.
_MIN_CAPACITY: Final = 64 * 1024
_KEEP_CAPACITY: Final = 4 * 1024 * 1024
_MAX_FRAME_LENGTH: Final = (1 << 32) - 1  # what a 4-byte prefix can declare
# After a detached frame (S5-18) the next read is this small, so it takes the next frame's
# head and little of its payload (which would be copied if that frame is detached too).
_PROBE_BYTES: Final = 64
# The largest payload detached (S5-18): its buffer is reserved when its frame's head
# arrives, so a peer's declared length never reserves more than this ahead of its bytes.
_MAX_DETACH_BYTES: Final = 4 * 1024 * 1024
# Bytes a scalar map value takes, by its first byte (fixed-size scalars only).
_FIXED_SCALAR_SIZE: Final = {
    0xC0: 1, 0xC2: 1, 0xC3: 1,  # nil, false, true
    0xCC: 2, 0xD0: 2, 0xCD: 3, 0xD1: 3,  # uint8, int8, uint16, int16
    0xCE: 5, 0xD2: 5, 0xCA: 5,  # uint32, int32, float32
    0xCF: 9, 0xD3: 9, 0xCB: 9,  # uint64, int64, float64
}  # fmt: skip
_BIN_HEADER_SIZE: Final = {0xC4: 2, 0xC5: 3, 0xC6: 5}


def _bytes_allocator() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """
    ``new(size) -> (payload, view)``: a new ``bytes`` object of ``size`` bytes, left
    uninitialised, and a writable view of its contents to receive into (S5-18). The object
    is not shared until the decoder hands it over whole, so nothing can see it change; this
    saves both msgpack's copy of a payload and the zeroing a ``bytearray`` would cost.
    CPython only (it writes into the object's own storage, as CPython's ``bytes``
    constructors do); None elsewhere, or if the layout is not what a self-check expects.
    """
    if sys.implementation.name != "cpython":  # pragma: no cover - CPython here
        return None
    try:
        make = ctypes.pythonapi.PyBytes_FromStringAndSize
        make.restype = ctypes.py_object
        make.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        offset = bytes.__basicsize__ - 1  # ob_sval: where a bytes object keeps its data
    except (AttributeError, OSError):  # pragma: no cover - not a standard CPython
        return None

    def new(size: int) -> tuple[bytes, memoryview]:
        # size >= 2: CPython shares its empty and one-byte bytes objects.
        assert size >= 2
        payload: bytes = make(None, size)
        storage = (ctypes.c_char * size).from_address(id(payload) + offset)
        return payload, memoryview(storage).cast("B")

    try:
        probe, view = new(16)
        view[:] = b"S5-18 self-check"
        view.release()
    except (TypeError, ValueError):  # pragma: no cover - an unexpected layout
        return None
    if probe != b"S5-18 self-check" or type(probe) is not bytes:  # pragma: no cover
        return None
    return new


_new_payload: Final = _bytes_allocator()


def _bin_tail(body: memoryview, frame_length: int) -> tuple[int, int, int, bytes] | None:
    """
    Where a frame's binary tail starts, if the frame's body (``body`` is its start, of a
    body ``frame_length`` bytes long) is a fixmap of fixstr keys and scalar values whose
    last value is a binary ending exactly at the frame's end (the layout of chunk and data
    frames, S5-16): ``(binary header offset, payload offset, payload length, last key)``.
    None otherwise, or if too little of the body is here to tell.
    """
    n = len(body)
    if n < 1 or not 0x80 < body[0] <= 0x8F:
        return None
    count = body[0] & 0x0F
    pos = 1
    for index in range(count):
        if pos >= n or not 0xA0 <= body[pos] <= 0xBF:
            return None
        key_end = pos + 1 + (body[pos] & 0x1F)
        if key_end >= n:
            return None
        key = bytes(body[pos + 1 : key_end])
        pos = key_end
        kind = body[pos]
        if index == count - 1:
            header = _BIN_HEADER_SIZE.get(kind)
            if header is None or pos + header > n:
                return None
            size = int.from_bytes(body[pos + 1 : pos + header], "big")
            start = pos + header
            return (pos, start, size, key) if start + size == frame_length else None
        if kind <= 0x7F or kind >= 0xE0:
            pos += 1
        elif 0xA0 <= kind <= 0xBF:
            pos += 1 + (kind & 0x1F)
        else:
            step = _FIXED_SCALAR_SIZE.get(kind)
            if step is None:
                return None
            pos += step
    return None  # pragma: no cover - the loop returns on its last key


# Bytes that can start an array or a map: fixmap 0x80-0x8f, fixarray 0x90-0x9f,
# array16/32 0xdc/0xdd, map16/32 0xde/0xdf. Everything else is deleted by translate().
_CONTAINER_HEADERS: Final = frozenset(range(0x80, 0xA0)) | frozenset(range(0xDC, 0xE0))
_NOT_CONTAINER_HEADERS: Final = bytes(b for b in range(256) if b not in _CONTAINER_HEADERS)
# Every encoding msgpack decodes as its timestamp (ext type -1, byte 0xff, with a 4, 8 or
# 12-byte payload): fixext4, fixext8, and ext8/16/32 with those lengths. Any other length
# for type -1 is a decode error already. (fuzz_codec found the ext8/16/32 forms.)
_TIMESTAMP_HEADERS: Final = (
    b"\xd6\xff",
    b"\xd7\xff",
    *(b"\xc7" + bytes([n]) + b"\xff" for n in (4, 8, 12)),
    *(b"\xc8" + struct.pack(">H", n) + b"\xff" for n in (4, 8, 12)),
    *(b"\xc9" + struct.pack(">I", n) + b"\xff" for n in (4, 8, 12)),
)


@final
class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


#: `FrameDecoder.next_frame` returns this when it needs more data to finish a frame.
NEED_DATA: Final = _Sentinel("NEED_DATA")
#: `FrameDecoder.next_frame` returns this after a clean EOF between frames.
CLOSED: Final = _Sentinel("CLOSED")


def _positive(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _non_negative(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _frame_limit(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    _positive(instance, attribute, value)
    assert isinstance(value, int)
    if value > _MAX_FRAME_LENGTH:
        raise ValueError(f"{attribute.name} must be < 2**32 (a 4-byte length), got {value}")


@final
@attrs.frozen(kw_only=True)
class WireLimits:
    """
    The decoding limits (S5-3). ``max_str_len`` and ``max_bin_len`` default to
    ``max_bytes``; a ``Blob`` payload is bounded by ``max_bin_len``, a `CacheRef` by its own
    rules (S3-2).
    """

    max_bytes: int = attrs.field(default=DEFAULT_MAX_FRAME_BYTES, validator=_frame_limit)
    max_depth: int = attrs.field(default=DEFAULT_MAX_DEPTH, validator=_non_negative)
    max_container_len: int = attrs.field(default=DEFAULT_MAX_CONTAINER_LEN, validator=_non_negative)
    max_str_len: int = attrs.field(
        default=attrs.Factory(lambda self: self.max_bytes, takes_self=True),
        validator=_non_negative,
    )
    max_bin_len: int = attrs.field(
        default=attrs.Factory(lambda self: self.max_bytes, takes_self=True),
        validator=_non_negative,
    )


_DEFAULT_LIMITS: Final = WireLimits()
_msgpack_unpackb: Final = msgpack.unpackb
_msgpack_packb: Final = msgpack.packb


# --- encoding --------------------------------------------------------------------------------


def _default(obj: object) -> object:
    if type(obj) is CacheRef:
        return msgpack.ExtType(EXT_CACHE_REF, _msgpack_packb([obj.ref, obj.size, obj.mime]))
    if type(obj) is Blob:
        return msgpack.ExtType(EXT_BLOB, _msgpack_packb([obj.mime, obj.data]))
    # Invariant (S5-1): what we cannot encode is a WireFormatError, never a bare TypeError.
    if isinstance(obj, set | frozenset):
        raise WireFormatError(
            f"cannot encode a {type(obj).__name__} on the wire (no msgpack type; send a list)"
        )
    if isinstance(obj, int):
        raise WireFormatError(
            f"cannot encode int {obj}: out of msgpack's range (-2**63 .. 2**64-1)"
        )
    raise WireFormatError(f"cannot encode an object of type {type(obj).__name__} on the wire")


def packb(obj: object) -> bytes:
    """
    Encode ``obj`` as one msgpack value.

    Tuples (namedtuples too) become arrays and decode as lists; bytes-like values decode as
    ``bytes``; `CacheRef` and `Blob` keep their types (S5-1).

    Raises:
        WireFormatError: ``obj`` holds a value the wire cannot carry (a set, a class
            instance, an int out of msgpack's range, a lone surrogate, a cycle, nesting
            deeper than msgpack packs); the message names it.
    """
    try:
        out: bytes = _msgpack_packb(obj, default=_default)
    except WireFormatError:
        raise
    except OverflowError as exc:  # pragma: no cover - msgpack hands big ints to _default
        raise WireFormatError(f"cannot encode an int out of msgpack's range: {exc}") from None
    except UnicodeEncodeError as exc:
        raise WireFormatError(f"cannot encode a str that is not valid UTF-8: {exc}") from None
    except ValueError as exc:
        # msgpack's "recursion limit exceeded": a cycle or very deep nesting.
        raise WireFormatError(f"cannot encode: nesting too deep or cyclic ({exc})") from None
    except TypeError as exc:  # pragma: no cover - _default raises for every unknown type
        raise WireFormatError(f"cannot encode: {exc}") from None
    return out


# --- decoding --------------------------------------------------------------------------------


def _ext_value(code: int, fields: object) -> object:
    # Invariant (S5-3): a well-formed payload for a known ext type, validated as the type's
    # own constructor does (S3-2 for refs).
    if code == 1:  # EXT_CACHE_REF
        if type(fields) is list and len(fields) == 3:
            try:
                return CacheRef(*fields)
            except (TypeError, ValueError) as exc:
                raise WireFormatError(f"malformed CacheRef ext payload: {exc}") from None
        raise WireFormatError("malformed CacheRef ext payload: want [ref, size, mime]")
    if type(fields) is list and len(fields) == 2 and type(fields[1]) is bytes:
        try:
            return Blob(fields[1], fields[0])
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"malformed Blob ext payload: {exc}") from None
    raise WireFormatError("malformed Blob ext payload: want [mime, data: bin]")


def _ext_hook(code: int, data: bytes) -> object:
    """The ext hook for data no longer than every length limit (msgpack's own bounds)."""
    if code == 1:  # EXT_CACHE_REF, inlined: it is on the hot path of every ref message
        try:
            # Unpacking accepts any 3-item sequence: a str or bytes of length 3, or a map of
            # three str keys (strict_map_key), but then ``size`` is a str or an int with a
            # str ``ref`` ... and `CacheRef` refuses it, so no shape slips through (S5-3).
            ref, size, mime = _msgpack_unpackb(data)
            return CacheRef(ref, size, mime)
        except (ValueError, TypeError):
            raise _malformed_ref(data) from None
    # Invariant (S5-3): known ext types only.
    if code != 2:
        raise WireFormatError(f"unknown ext type {code} (known: {EXT_CACHE_REF}, {EXT_BLOB})")
    try:
        fields = _msgpack_unpackb(data)
    except (ValueError, TypeError) as exc:
        raise WireFormatError(f"malformed Blob ext payload: {exc}") from None
    return _ext_value(code, fields)


def _malformed_ref(data: bytes) -> WireFormatError:
    """The error for a CacheRef ext payload the hot path refused, naming what was wrong."""
    try:
        fields = _msgpack_unpackb(data)
    except (ValueError, TypeError) as exc:
        return WireFormatError(f"malformed CacheRef ext payload: {exc}")
    try:
        _ext_value(EXT_CACHE_REF, fields)
    except WireFormatError as exc:
        return exc
    raise AssertionError("unreachable: the payload decodes to a valid CacheRef")  # pragma: no cover


def _limited_ext_hook(limits: WireLimits, code: int, data: bytes) -> object:
    """The ext hook under explicit limits: strings and binaries in a payload obey them."""
    if code != 1 and code != 2:
        raise WireFormatError(f"unknown ext type {code} (known: {EXT_CACHE_REF}, {EXT_BLOB})")
    try:
        fields = _msgpack_unpackb(
            data,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=3,
            max_map_len=3,
        )
    except (ValueError, TypeError) as exc:
        name = "CacheRef" if code == 1 else "Blob"
        raise _translate_unpack_error(exc, f"malformed {name} ext payload: ") from None
    return _ext_value(code, fields)


def _translate_unpack_error(exc: Exception, prefix: str = "") -> WireFormatError:
    """Name the rule a msgpack exception stands for (S5-3)."""
    error = _name_the_rule(exc)
    if prefix:
        return WireFormatError(f"{prefix}{error}")
    return error


def _name_the_rule(exc: Exception) -> WireFormatError:
    text = str(exc)
    if isinstance(exc, msgpack.StackError):
        return WireFormatError("nesting too deep for the decoder (max_depth)")
    if isinstance(exc, msgpack.ExtraData):
        return WireFormatError("trailing bytes after the value (one value per frame)")
    if isinstance(exc, msgpack.FormatError):
        return WireFormatError("malformed msgpack (reserved type byte 0xc1)")
    if "exceeds max_str_len" in text:
        return WireFormatError(f"string too long (max_str_len): {text}")
    if "exceeds max_bin_len" in text:
        return WireFormatError(f"binary too long (max_bin_len): {text}")
    if "exceeds max_array_len" in text or "exceeds max_map_len" in text:
        return WireFormatError(f"container too long (max_container_len): {text}")
    if "exceeds max_ext_len" in text:
        return WireFormatError(f"ext payload too long (max_bin_len): {text}")
    if isinstance(exc, UnicodeDecodeError):
        return WireFormatError(f"string is not valid UTF-8: {exc}")
    if isinstance(exc, TypeError):
        return WireFormatError(f"map key is not a scalar (unhashable once decoded): {text}")
    if "incomplete" in text:
        return WireFormatError("truncated value (incomplete msgpack)")
    if "timestamp" in text.lower():
        # msgpack's own ext type -1 with a payload length it cannot read.
        return WireFormatError(f"unknown ext type -1 (known: {EXT_CACHE_REF}, {EXT_BLOB})")
    return WireFormatError(f"malformed msgpack: {text}")  # pragma: no cover - any other


def _deeper_than(value: object, max_depth: int) -> bool:
    """True when arrays and maps in ``value`` nest more than ``max_depth`` deep."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        tp = type(node)
        if tp is list:
            items = node
        elif tp is dict:
            items = node.values()  # type: ignore[attr-defined]
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((c, depth + 1) for c in items if type(c) is list or type(c) is dict)  # type: ignore[attr-defined]
    return False


def _holds_timestamp(value: object) -> bool:
    stack: list[object] = [value]
    while stack:
        node = stack.pop()
        tp = type(node)
        if tp is list:
            stack.extend(node)  # type: ignore[arg-type]
        elif tp is dict:
            stack.extend(node.values())  # type: ignore[attr-defined]
            stack.extend(node.keys())  # type: ignore[attr-defined]
        elif tp is msgpack.Timestamp:
            return True
    return False


def _timestamp_in(data: bytes, value: object) -> bool:
    """Exact check, for data that holds a 0xff byte: could it, and does it, hold one?"""
    return any(h in data for h in _TIMESTAMP_HEADERS) and _holds_timestamp(value)


#: Types a value of a "flat" map may have: no containers, no msgpack Timestamp.
_FLAT_TYPES: Final = frozenset({str, bytes, int, float, bool, type(None), CacheRef, Blob})
_FLAT_MAP_ITEMS: Final = 32


def _decode(data: bytes | memoryview, limits: WireLimits) -> object:
    size = len(data)
    if size > limits.max_bytes:
        raise WireFormatError(f"value is {size} bytes; max_bytes is {limits.max_bytes}")
    try:
        if (
            size <= limits.max_container_len
            and size <= limits.max_str_len
            and size <= limits.max_bin_len
        ):
            # No string, binary, ext payload or container can be longer than the data
            # itself (one byte per item at least), and msgpack already bounds them all by
            # len(data): passing our limits would check nothing more.
            value = _msgpack_unpackb(data, ext_hook=_ext_hook, strict_map_key=False)
        else:
            max_len = limits.max_container_len
            value = msgpack.unpackb(
                data,
                ext_hook=functools.partial(_limited_ext_hook, limits),
                strict_map_key=False,
                max_str_len=limits.max_str_len,
                max_bin_len=limits.max_bin_len,
                max_array_len=max_len,
                max_map_len=max_len,
                # A Blob payload is its data plus a small header (its mime included).
                max_ext_len=limits.max_bin_len + limits.max_str_len + 16,
            )
    except WireFormatError:
        raise
    except (ValueError, TypeError) as exc:
        raise _translate_unpack_error(exc) from None
    max_depth = limits.max_depth
    if (
        type(value) is dict
        and max_depth >= 1
        and len(value) <= _FLAT_MAP_ITEMS
        and all(type(v) in _FLAT_TYPES for v in value.values())
        and all(type(k) is str for k in value)
    ):
        # A small map of str keys to scalars, bytes and our ext values (a protocol message
        # carrying a chunk, say) is depth 1 and holds no timestamp: skip the byte scans
        # below, which cost time in proportion to its binary payload (S5-3 still holds).
        return value
    if type(data) is not bytes:
        data = bytes(data)  # the scans below need bytes
    # Invariant (S5-3): depth, checked exactly only when the cheap bound fails.
    if (
        size > max_depth
        and len(data.translate(None, _NOT_CONTAINER_HEADERS)) > max_depth
        and _deeper_than(value, max_depth)
    ):
        raise WireFormatError(f"nesting deeper than max_depth ({max_depth})")
    # Invariant (S5-3): msgpack decodes ext type -1 itself (no ext_hook): refuse it too.
    if 0xFF in data and _timestamp_in(data, value):
        raise WireFormatError(f"unknown ext type -1 (known: {EXT_CACHE_REF}, {EXT_BLOB})")
    return value


def unpackb(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
    max_str_len: int | None = None,
    max_bin_len: int | None = None,
) -> object:
    """
    Decode exactly one msgpack value from ``data``, enforcing every wire rule (S5-3).

    Args:
        data: the encoded value (no frame header).
        max_bytes: ``data`` may be at most this long.
        max_depth: arrays and maps may nest at most this deep (``[]`` is depth 1).
        max_container_len: arrays and maps may hold at most this many items / pairs.
        max_str_len: strings may be at most this many bytes (default: ``max_bytes``).
        max_bin_len: binaries may be at most this many bytes (default: ``max_bytes``).

    Returns:
        The value; `CacheRef` and `Blob` decode as themselves, arrays as lists.

    Raises:
        WireFormatError: ``data`` breaks a rule (the message names it): too large, too deep,
            a container or string too long, an unknown ext type, a malformed ext payload,
            truncated or trailing bytes, invalid UTF-8, a container map key.
    """
    if (
        max_bytes is DEFAULT_MAX_FRAME_BYTES
        and max_depth is DEFAULT_MAX_DEPTH
        and max_container_len is DEFAULT_MAX_CONTAINER_LEN
        and max_str_len is None
        and max_bin_len is None
    ):
        limits = _DEFAULT_LIMITS
    else:
        try:
            limits = WireLimits(
                max_bytes=max_bytes,
                max_depth=max_depth,
                max_container_len=max_container_len,
                max_str_len=max_bytes if max_str_len is None else max_str_len,
                max_bin_len=max_bytes if max_bin_len is None else max_bin_len,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad wire limits: {exc}") from None
    if type(data) is not bytes:
        if not isinstance(data, bytearray | memoryview):
            raise WireFormatError(f"can only decode bytes-like data, not {type(data).__name__}")
        data = bytes(data)
    return _decode(data, limits)


_unpackb_checked: Final = unpackb


def _unpackb_fast(data: bytes | bytearray | memoryview, **limits: int | None) -> object:
    # The hot path (small messages, default limits), inlined: every rule still holds.
    # Data no longer than max_depth cannot nest deeper, is far below every length limit
    # (msgpack bounds lengths by len(data)), and only the timestamp check remains.
    # ``**limits``, not keyword-only parameters: see the module docstring.
    if not limits and type(data) is bytes and len(data) <= DEFAULT_MAX_DEPTH:
        try:
            value = _msgpack_unpackb(data, ext_hook=_ext_hook, strict_map_key=False)
        except WireFormatError:
            raise
        except (ValueError, TypeError) as exc:
            raise _translate_unpack_error(exc) from None
        if 0xFF in data and _timestamp_in(data, value):
            raise WireFormatError(f"unknown ext type -1 (known: {EXT_CACHE_REF}, {EXT_BLOB})")
        return value
    return _unpackb_checked(data, **limits)  # type: ignore[arg-type]


if not TYPE_CHECKING:
    # At run time `unpackb` is the fast path, which hands anything else to the checked
    # function; it keeps that function's name, docstring and signature (``__wrapped__``).
    # Type checkers see the checked function's exact keyword-only signature.
    unpackb = functools.update_wrapper(_unpackb_fast, _unpackb_checked)


# --- frames ----------------------------------------------------------------------------------


def encode_frame(obj: object, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """
    Encode ``obj`` as one frame: a 4-byte big-endian length, then the msgpack value (S5-4).

    Raises:
        WireFormatError: ``obj`` cannot be encoded (see `packb`), or its encoding is longer
            than ``max_frame_bytes`` (a peer with the same limit would refuse it).
    """
    body = packb(obj)
    if len(body) > max_frame_bytes or len(body) > _MAX_FRAME_LENGTH:
        raise WireFormatError(
            f"frame body is {len(body)} bytes; max_frame_bytes is {max_frame_bytes}"
        )
    return _HEADER.pack(len(body)) + body


@final
class FrameDecoder:
    """
    A sans-io decoder of length-prefixed msgpack frames (S5-4, S5-5), in h11's shape.

    Feed it bytes as they arrive with `receive_data` (``b""`` means EOF), then call
    `next_frame` until it returns `NEED_DATA` (or `CLOSED` after a clean EOF)::

        decoder = FrameDecoder()
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                decoder.receive_data(await stream.receive_some(65536))
            elif frame is CLOSED:
                break
            else:
                handle(frame)

    Every declared frame length is checked the moment its 4-byte header is buffered, so a
    huge declared length is refused before any of its body is kept. Frames are decoded with
    the same rules as `unpackb` (its ``max_bytes`` is the frame limit).

    Any exception other than `WireFormatError` escaping this class is a bug (the fuzz
    harness ``fuzz/fuzz_codec.py`` checks exactly that). After the first `WireFormatError`
    the decoder is broken: every later call raises `WireFormatError` again.
    """

    __slots__ = (
        "_buffer",
        "_detach_bytes",
        "_end",
        "_eof",
        "_error",
        "_limits",
        "_probe",
        "_ready",
        "_ready_bytes",
        "_scanned",
        "_start",
        "_tail",
        "_tail_filled",
        "_tail_head",
        "_tail_key",
        "_tail_view",
    )

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
        max_str_len: int | None = None,
        max_bin_len: int | None = None,
        detach_bin_bytes: int | None = None,
    ) -> None:
        if detach_bin_bytes is not None and detach_bin_bytes < 2:
            raise ValueError(f"detach_bin_bytes must be >= 2 or None, got {detach_bin_bytes}")
        self._detach_bytes = detach_bin_bytes
        self._limits = WireLimits(
            max_bytes=max_frame_bytes,
            max_depth=max_depth,
            max_container_len=max_container_len,
            max_str_len=max_frame_bytes if max_str_len is None else max_str_len,
            max_bin_len=max_frame_bytes if max_bin_len is None else max_bin_len,
        )
        # Theory of operation: bytes live in one reused buffer (fresh memory costs far more
        # than copying into memory already touched): buffer[_start:_end] is unconsumed;
        # the capacity beyond _end takes the next receive (`receive_buffer` lends it out
        # so a socket reads straight into it). Consumed bytes are dropped by moving the
        # live tail to the front only when room is short; the buffer grows for a frame
        # larger than it, and goes back to its usual size once such a frame is consumed.
        self._buffer = bytearray()
        self._start = 0  # offset of the first unconsumed byte
        self._end = 0  # offset just past the last received byte
        self._scanned = 0  # offset of the first frame header not yet checked
        self._eof = False
        self._error: WireFormatError | None = None
        # A frame being detached (S5-18): its binary payload is received into ``_tail``
        # through ``_tail_view`` (``_tail_filled`` bytes so far); ``_tail_head`` is the body
        # before the binary's header, ``_tail_key`` the binary's key. A completed frame
        # waits in ``_ready``.
        self._tail: bytes | None = None
        self._tail_view = memoryview(b"")
        self._tail_filled = 0
        self._tail_head = b""
        self._tail_key = b""
        self._ready: object = NEED_DATA
        self._ready_bytes = 0
        self._probe = False

    @property
    def limits(self) -> WireLimits:
        """The limits this decoder enforces."""
        return self._limits

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned as frames."""
        return self._end - self._start + self._tail_filled + self._ready_bytes

    @property
    def broken(self) -> bool:
        """True once the decoder has raised: every later call raises too."""
        return self._error is not None

    def _fail(self, message: str) -> WireFormatError:
        error = WireFormatError(message)
        self._error = error
        # Drop what is buffered: a broken decoder holds no memory.
        self._buffer = bytearray()
        self._start = self._end = self._scanned = 0
        self._tail = None
        self._tail_view.release()
        self._tail_filled = self._ready_bytes = 0
        self._ready = NEED_DATA
        return error

    def _check_broken(self) -> None:
        if self._error is not None:
            raise WireFormatError(f"decoder already failed: {self._error}")

    def _reserve(self, size: int) -> None:
        """Make room for ``size`` more bytes after ``_end``."""
        buffer = self._buffer
        if len(buffer) - self._end >= size:
            return
        start, live = self._start, self._end - self._start
        if live + size <= len(buffer) and live <= start:
            # Move the live tail to the front (no overlap: it is no longer than the gap).
            with memoryview(buffer) as view:
                view[:live] = view[start : start + live]
        else:
            grown = bytearray(max(2 * len(buffer), live + size, _MIN_CAPACITY))
            with memoryview(buffer) as view:
                grown[:live] = view[start : start + live]
            self._buffer = grown
        self._start = 0
        self._end = live
        self._scanned -= start

    def _check_headers(self) -> None:
        # Invariant (S5-4): check each declared length as soon as its header is buffered.
        buffer = self._buffer
        limit = self._limits.max_bytes
        scanned = self._scanned
        end = self._end
        while scanned + FRAME_HEADER_SIZE <= end:
            (length,) = _HEADER.unpack_from(buffer, scanned)
            if length == 0:
                raise self._fail("frame declares length 0 (a frame holds one value)")
            if length > limit:
                raise self._fail(f"frame declares {length} bytes; max_frame_bytes is {limit}")
            scanned += FRAME_HEADER_SIZE + length
        self._scanned = scanned

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """
        Buffer ``data``; ``b""`` marks EOF (the peer closed its side).

        Every frame header completed by ``data`` is checked at once (S5-4).

        Raises:
            WireFormatError: a declared frame length is zero or over ``max_frame_bytes``;
                data arrived after EOF; ``data`` is not bytes-like; or the decoder already
                failed.
        """
        self._check_broken()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise self._fail(f"receive_data needs bytes, not {type(data).__name__}")
        if self._eof:
            if data:
                raise self._fail("data received after EOF")
            return
        if not data:
            self._eof = True
            return
        with memoryview(data) as source, source.cast("B") as raw:
            taken = self._fill_tail(raw) if self._tail is not None else 0
            size = len(raw) - taken
            if size:
                self._reserve(size)
                self._buffer[self._end : self._end + size] = raw[taken:]
        if size:
            self._end += size
            self._check_headers()

    def receive_buffer(self, size: int) -> memoryview:
        """
        Lend out room for up to ``size`` bytes to receive into (``socket.recv_into``), then
        call `commit_received` with the count received. The view is only valid until the
        next call on this decoder. This is `receive_data` without a copy: the same rules
        apply. The view is shorter than ``size`` while a detached payload is received (it
        ends where the payload does) and right after one (a short read takes the next
        frame's head), see ``detach_bin_bytes``.

        Raises:
            WireFormatError: the decoder already failed, or EOF was received.
            ValueError: ``size`` is below 1.
        """
        self._check_broken()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if self._eof:
            raise self._fail("data received after EOF")
        tail = self._tail
        if tail is not None:
            # Invariant (S5-18): a detached payload is received into its own buffer, and
            # nothing past its frame's end is read meanwhile.
            room = min(size, len(tail) - self._tail_filled)
            return self._tail_view[self._tail_filled : self._tail_filled + room]
        if self._probe and self._end == self._start:
            size = min(size, _PROBE_BYTES)
        self._probe = False
        self._reserve(size)
        return memoryview(self._buffer)[self._end : self._end + size]

    def commit_received(self, count: int) -> None:
        """
        Take ``count`` bytes received into the last `receive_buffer` view; ``0`` marks EOF.

        Raises:
            WireFormatError: as `receive_data`.
            ValueError: ``count`` is negative or more than the view lent out.
        """
        self._check_broken()
        tail = self._tail
        room = len(tail) - self._tail_filled if tail is not None else len(self._buffer) - self._end
        if count < 0 or count > room:
            raise ValueError(f"commit_received({count}) is more than was lent out")
        if count == 0:
            self._eof = True
            return
        if self._eof:
            raise self._fail("data received after EOF")
        if tail is not None:
            self._tail_filled += count
            if self._tail_filled == len(tail):
                self._finish_tail()
            return
        self._end += count
        self._check_headers()

    def _fill_tail(self, raw: memoryview) -> int:
        """Copy the start of ``raw`` into the detached payload; returns the bytes taken."""
        tail = self._tail
        assert tail is not None
        filled = self._tail_filled
        taken = min(len(raw), len(tail) - filled)
        self._tail_view[filled : filled + taken] = raw[:taken]
        self._tail_filled = filled + taken
        if self._tail_filled == len(tail):
            self._finish_tail()
        return taken

    def _finish_tail(self) -> None:
        """The detached payload is whole: decode its frame's head and keep the frame ready."""
        tail = self._tail
        assert tail is not None
        try:
            # The head with an empty binary in the payload's place: every rule is checked
            # by the one decoder (the payload's length was checked when it was detached).
            value = _decode(self._tail_head + b"\xc4\x00", self._limits)
        except WireFormatError as exc:
            raise self._fail(str(exc)) from None
        assert type(value) is dict  # a fixmap, checked by _bin_tail
        value[self._tail_key.decode()] = tail  # the key decoded above: valid UTF-8
        self._ready = value
        self._ready_bytes = len(tail)
        self._tail = None
        self._tail_view.release()
        self._tail_filled = 0
        self._probe = True

    def _detach(self) -> None:
        """
        If the frame at the front is incomplete and ends in a binary of at least
        ``detach_bin_bytes`` (S5-18), move its payload to a buffer of its own.
        """
        threshold = self._detach_bytes
        start = self._start
        new_payload = _new_payload
        if threshold is None or new_payload is None or self._end - start < FRAME_HEADER_SIZE:
            return
        buffer = self._buffer
        (length,) = _HEADER.unpack_from(buffer, start)
        body = start + FRAME_HEADER_SIZE
        if length < threshold or body + length <= self._end:
            return
        with memoryview(buffer) as view, view[body : self._end] as here:
            found = _bin_tail(here, length)
            if found is None:
                return
            head_end, offset, size, key = found
            if size < threshold or size > min(self._limits.max_bin_len, _MAX_DETACH_BYTES):
                # Too small to pay; or refused by the ordinary path; or larger than a
                # payload may reserve before its bytes arrive.
                return
            self._tail_head = bytes(here[:head_end])
            tail, tail_view = new_payload(size)
            taken = len(here) - offset
            tail_view[:taken] = here[offset:]
        self._tail = tail
        self._tail_view = tail_view
        self._tail_filled = taken
        self._tail_key = key
        # The frame was the last thing buffered: the buffer is empty now, and the next frame
        # header comes right after the payload.
        self._scanned = self._start = self._end = 0
        if len(buffer) > _KEEP_CAPACITY:
            self._buffer = bytearray()

    def next_frame(self) -> object:
        """
        Return the next decoded frame, `NEED_DATA`, or `CLOSED` (clean EOF between frames).

        Raises:
            WireFormatError: the frame breaks a wire rule, EOF arrived inside a frame, or the
                decoder already failed.
        """
        self._check_broken()
        ready = self._ready
        if ready is not NEED_DATA:
            self._ready = NEED_DATA
            self._ready_bytes = 0
            return ready
        if self._tail is not None:
            if self._eof:
                raise self._fail(
                    f"truncated frame: EOF after {self._tail_filled} bytes of a detached payload"
                )
            return NEED_DATA
        buffer = self._buffer
        start = self._start
        available = self._end - start
        if available >= FRAME_HEADER_SIZE:
            (length,) = _HEADER.unpack_from(buffer, start)
            end = start + FRAME_HEADER_SIZE + length
            if end <= self._end:
                try:
                    # Decoded straight out of the buffer: no copy of the body (msgpack
                    # copies what it keeps, a binary payload once).
                    with memoryview(buffer) as view, view[start + FRAME_HEADER_SIZE : end] as body:
                        value = _decode(body, self._limits)
                except WireFormatError as exc:
                    raise self._fail(str(exc)) from None
                if end == self._end:
                    # Everything consumed: start over at the front of the buffer (and give
                    # back the memory a large frame made it take).
                    self._scanned -= end
                    self._start = self._end = 0
                    if len(buffer) > _KEEP_CAPACITY:
                        self._buffer = bytearray()
                else:
                    self._start = end
                return value
        if self._eof:
            if available == 0:
                return CLOSED
            raise self._fail(f"truncated frame: EOF after {available} bytes of a frame")
        if self._detach_bytes is not None:
            self._detach()
        return NEED_DATA
