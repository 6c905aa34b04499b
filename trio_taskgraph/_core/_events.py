"""
Stream events a task yields, and `Blob`, the materialised value of a ``"blob"`` binary port.

Rules (spec/S1-streaming.md):

- S1-1: every event is a frozen, slotted value; an invalid one cannot be constructed (the
  validators run in ``__init__``, as h11's events do).
- S1-2: a ``port`` is a non-empty ``str``; a `BinaryDelta` chunk is ``bytes``, ``bytearray`` or
  a byte-format ``memoryview``. A producer must not mutate a mutable chunk after yielding it.
- S1-3: `Blob.data` is always ``bytes`` (other bytes-like values are copied once at
  construction), so a Blob is immutable and hashable, and ``len(blob)`` is its byte size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias, final

import attrs

__all__ = [
    "Blob",
    "BinaryDelta",
    "BytesLike",
    "Finish",
    "ObjectDelta",
    "Phase",
    "Snapshot",
    "StreamError",
    "StreamEvent",
    "TextDelta",
    "chunk_size",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview


def chunk_size(chunk: object) -> int:
    """
    Return the byte size of a bytes-like ``chunk``.

    Raises:
        TypeError: ``chunk`` is not ``bytes``, ``bytearray`` or ``memoryview``.
    """
    if isinstance(chunk, bytes | bytearray):
        return len(chunk)
    if isinstance(chunk, memoryview):
        return chunk.nbytes
    raise TypeError(
        f"a binary chunk must be bytes, bytearray or memoryview, not {type(chunk).__name__}"
    )


def _check_port(_instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    # Invariant (S1-2): a port is a non-empty str.
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{attribute.name} must be a non-empty str")


def _check_chunk(_instance: object, _attribute: attrs.Attribute[BytesLike], value: object) -> None:
    # Invariant (S1-2): a binary chunk is bytes-like.
    chunk_size(value)


def _check_str(_instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, not {type(value).__name__}")


def _check_mapping(
    _instance: object, attribute: attrs.Attribute[Mapping[str, object]], value: object
) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{attribute.name} must be a mapping, not {type(value).__name__}")


def _to_bytes(value: BytesLike) -> bytes:
    # Invariant (S1-3): Blob.data is bytes. bytes(b) returns b itself for exact bytes.
    # The annotation types Blob's ``data`` parameter; the check is for untyped callers.
    checked: object = value
    if isinstance(checked, bytes | bytearray | memoryview):
        return bytes(checked)
    raise TypeError(f"Blob data must be bytes-like, not {type(checked).__name__}")


def _check_mime(_instance: object, _attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"mime must be a str or None, not {type(value).__name__}")


@final
@attrs.frozen
class Blob:
    """
    Binary data with an optional MIME type: what a ``"format": "blob"`` port materialises to.

    ``len(blob)`` is the byte size. Bytes-like input is copied into ``bytes`` once.
    """

    data: bytes = attrs.field(converter=_to_bytes)
    mime: str | None = attrs.field(default=None, validator=_check_mime)

    def __len__(self) -> int:
        return len(self.data)

    def __bool__(self) -> bool:
        # A Blob is a value, not a container: an empty Blob is still a Blob.
        return True

    def __repr__(self) -> str:
        head = self.data[:16]
        more = "..." if len(self.data) > 16 else ""
        return f"Blob({head!r}{more}, mime={self.mime!r}, size={len(self.data)})"


@final
@attrs.frozen
class TextDelta:
    """A fragment of text for an ``append`` port; fragments concatenate per port."""

    port: str = attrs.field(validator=_check_port)
    text: str = attrs.field(validator=_check_str)


@final
@attrs.frozen
class ObjectDelta:
    """
    A partial object for an ``object`` port: it replaces the port's previous value, or, when
    both are lists, upserts items by their ``"id"``.
    """

    port: str = attrs.field(validator=_check_port)
    delta: object


@final
@attrs.frozen
class Snapshot:
    """A full snapshot of the task's output so far (``replace`` ports)."""

    data: Mapping[str, object] = attrs.field(validator=_check_mapping)


@final
@attrs.frozen
class BinaryDelta:
    """
    A chunk of bytes for a ``binary`` port. The producer must not mutate a mutable chunk
    after yielding it.
    """

    port: str = attrs.field(validator=_check_port)
    chunk: BytesLike = attrs.field(validator=_check_chunk)

    @property
    def size(self) -> int:
        """The chunk's size in bytes."""
        return chunk_size(self.chunk)


@final
@attrs.frozen
class Finish:
    """
    End of the stream, with the explicit parts of the output. An explicit value at a binary
    port wins over the chunks accumulated for it.
    """

    data: Mapping[str, object] = attrs.field(factory=dict, validator=_check_mapping)


@final
@attrs.frozen
class StreamError:
    """The task failed; ``error`` is the exception it failed with."""

    error: BaseException = attrs.field(validator=attrs.validators.instance_of(BaseException))


@final
@attrs.frozen
class Phase:
    """A named progress phase (``"download"``, ``"encode"``...), for observers only."""

    name: str = attrs.field(validator=_check_port)


StreamEvent: TypeAlias = (
    TextDelta | ObjectDelta | Snapshot | BinaryDelta | Finish | StreamError | Phase
)
