"""
Reading port declarations from JSON-Schema dicts.

A task's ports are the ``properties`` of its input and output schemas. Two annotations
matter to the runtime:

- ``"x-stream"``: how an output port streams. ``"append"`` (text deltas concatenate),
  ``"replace"`` (snapshots), ``"object"`` (partial objects), ``"binary"`` (byte chunks).
  Absent means ``"none"``. Any other value is a `PortSchemaError` (S1-4): the seed's base
  silently turned unknown values into ``none``, which hid typos.
- ``"format"`` on a binary port: ``"blob"`` (the default; materialises to `Blob`) or
  ``"binary"`` (materialises to ``bytes``). Anything else, including the casing typo
  ``"Blob"``, is a `BinaryFormatError` naming the port and the allowed values (S1-5).

Everything here is pure: it reads mappings and returns values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal, TypeAlias, cast, final, get_args

import attrs

from .._errors import BinaryFormatError, PortSchemaError
from ._events import Blob, BytesLike

__all__ = [
    "BINARY_FORMATS",
    "STREAM_MODES",
    "BinaryFormat",
    "OutputStreamMode",
    "PortSpec",
    "StreamMode",
    "assert_binary_format",
    "get_binary_port_id",
    "get_binary_ports",
    "get_output_stream_mode",
    "get_port_stream_mode",
    "get_streaming_ports",
    "materialize_binary",
    "parse_ports",
]

StreamMode: TypeAlias = Literal["none", "append", "replace", "object", "binary"]
OutputStreamMode: TypeAlias = Literal["none", "append", "replace", "object", "binary", "mixed"]
BinaryFormat: TypeAlias = Literal["blob", "binary"]

STREAM_MODES: Final[tuple[StreamMode, ...]] = get_args(StreamMode)
BINARY_FORMATS: Final[tuple[BinaryFormat, ...]] = get_args(BinaryFormat)
_DECLARABLE_MODES: Final = tuple(m for m in STREAM_MODES if m != "none")


@final
@attrs.frozen(kw_only=True)
class PortSpec:
    """
    What the runtime needs to know about one port.

    Attributes:
        name: the property name.
        stream_mode: ``"none"`` or the port's ``x-stream`` mode.
        binary_format: ``"blob"``/``"binary"`` for a binary port, else ``None``.
        mime: the port's ``contentMediaType``, if any (a default MIME type for its Blob).
    """

    name: str
    stream_mode: StreamMode
    binary_format: BinaryFormat | None = None
    mime: str | None = None

    @property
    def is_binary(self) -> bool:
        """True for an ``"x-stream": "binary"`` port."""
        return self.stream_mode == "binary"


def _properties(schema: object) -> Mapping[str, object]:
    if not isinstance(schema, Mapping):
        raise PortSchemaError(f"a port schema must be a mapping, not {type(schema).__name__}")
    props = schema.get("properties")
    if props is None:
        return {}
    if not isinstance(props, Mapping):
        raise PortSchemaError(
            f"a schema's 'properties' must be a mapping, not {type(props).__name__}"
        )
    for name in props:
        if not isinstance(name, str) or not name:
            raise PortSchemaError(f"port names must be non-empty strings, got {name!r}")
    return cast("Mapping[str, object]", props)


def _port_schema(schema: object, port: str) -> Mapping[str, object]:
    props = _properties(schema)
    if port not in props:
        known = ", ".join(sorted(props)) or "none"
        raise PortSchemaError(f"port {port!r} is not declared (declared ports: {known})")
    sub = props[port]
    if isinstance(sub, bool):
        # JSON Schema allows `true`/`false` as a property schema: no annotations.
        return {}
    if not isinstance(sub, Mapping):
        raise PortSchemaError(
            f"port {port!r}: its schema must be a mapping, not {type(sub).__name__}"
        )
    return cast("Mapping[str, object]", sub)


def _mode_of(port: str, sub: Mapping[str, object]) -> StreamMode:
    raw = sub.get("x-stream")
    if raw is None:
        return "none"
    if raw not in _DECLARABLE_MODES:
        # Invariant (S1-4): an unknown x-stream value is an error, never a silent "none".
        allowed = ", ".join(repr(m) for m in _DECLARABLE_MODES)
        raise PortSchemaError(f"port {port!r}: unknown x-stream value {raw!r} (allowed: {allowed})")
    return cast("StreamMode", raw)


def _format_of(port: str, sub: Mapping[str, object]) -> BinaryFormat:
    raw = sub.get("format", "blob")
    if raw not in BINARY_FORMATS or not isinstance(raw, str):
        # Invariant (S1-5): only "blob" and "binary"; no case folding, no coercion.
        allowed = ", ".join(repr(f) for f in BINARY_FORMATS)
        raise BinaryFormatError(
            f"binary port {port!r} declares format {raw!r}; allowed: {allowed} (absent means 'blob')"
        )
    return raw


def _spec_of(port: str, sub: Mapping[str, object]) -> PortSpec:
    mode = _mode_of(port, sub)
    fmt = _format_of(port, sub) if mode == "binary" else None
    mime = sub.get("contentMediaType")
    if mime is not None and not isinstance(mime, str):
        raise PortSchemaError(f"port {port!r}: contentMediaType must be a str, got {mime!r}")
    return PortSpec(name=port, stream_mode=mode, binary_format=fmt, mime=mime)


def parse_ports(schema: object) -> dict[str, PortSpec]:
    """
    Validate every port of ``schema`` and describe it.

    Raises:
        PortSchemaError: the schema is not a mapping, a port's schema is malformed, or a port
            has an unknown ``x-stream`` value.
        BinaryFormatError: a binary port has a ``format`` other than ``"blob"``/``"binary"``.
    """
    props = _properties(schema)
    return {port: _spec_of(port, _port_schema(schema, port)) for port in props}


def get_port_stream_mode(schema: object, port: str) -> StreamMode:
    """Return the stream mode of ``port`` (``"none"`` when it has no ``x-stream``)."""
    return _mode_of(port, _port_schema(schema, port))


def get_streaming_ports(schema: object) -> dict[str, str]:
    """Return ``{port: mode}`` for every port that streams (mode other than ``"none"``)."""
    return {
        port: spec.stream_mode
        for port, spec in parse_ports(schema).items()
        if spec.stream_mode != "none"
    }


def get_binary_ports(schema: object) -> list[str]:
    """Return every binary port of ``schema``, in declaration order."""
    return [port for port, spec in parse_ports(schema).items() if spec.is_binary]


def get_binary_port_id(schema: object) -> str | None:
    """Return the first binary port of ``schema``, or ``None`` when it has none."""
    ports = get_binary_ports(schema)
    return ports[0] if ports else None


def assert_binary_format(schema: object, port: str) -> BinaryFormat:
    """
    Return the materialisation format of binary ``port``: ``"blob"`` when ``format`` is absent.

    Raises:
        BinaryFormatError: ``format`` is neither ``"blob"`` nor ``"binary"``.
        PortSchemaError: ``port`` is not declared, or is not a binary port.
    """
    sub = _port_schema(schema, port)
    if _mode_of(port, sub) != "binary":
        raise PortSchemaError(f"port {port!r} is not a binary port (x-stream is not 'binary')")
    return _format_of(port, sub)


def get_output_stream_mode(schema: object) -> OutputStreamMode:
    """
    Return the task-level stream mode: ``"none"`` when no port streams, the shared mode when
    every streaming port uses the same one, else ``"mixed"``.
    """
    modes = set(get_streaming_ports(schema).values())
    if not modes:
        return "none"
    if len(modes) == 1:
        return cast("OutputStreamMode", modes.pop())
    return "mixed"


def materialize_binary(
    chunks: Iterable[BytesLike], fmt: BinaryFormat, *, mime: str | None = None
) -> Blob | bytes:
    """
    Join ``chunks`` into one value: a `Blob` (with ``mime``) for ``"blob"``, ``bytes`` for
    ``"binary"`` (which has no place for ``mime``). The bytes are exactly the concatenation of
    the chunks (S1-6).

    Raises:
        BinaryFormatError: ``fmt`` is not ``"blob"``/``"binary"``.
        TypeError: a chunk is not bytes-like.
    """
    if fmt not in BINARY_FORMATS:
        allowed = ", ".join(repr(f) for f in BINARY_FORMATS)
        raise BinaryFormatError(f"unknown binary format {fmt!r}; allowed: {allowed}")
    data = b"".join(chunks)
    if fmt == "blob":
        return Blob(data, mime)
    return data
