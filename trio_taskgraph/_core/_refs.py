"""
`CacheRef`: the small, branded handle a large binary result travels as.

Rules (spec/S3-refs.md):

- S3-1: a ref is a `CacheRef` instance and nothing else. A dict with a ``$ref`` key (a
  JSON-Schema pointer, or an attacker's ``{"$ref": "cache://OTHER_RUN/secret"}``, even one
  carrying the brand string) is plain data and is never resolved.
- S3-2: ``ref`` is a non-empty str of at most `MAX_REF_LENGTH` characters with no NUL;
  ``size`` is ``None`` or an int >= 0; ``mime`` is ``None`` or a str.
"""

from __future__ import annotations

from typing import Final, final

import attrs

__all__ = ["CACHE_REF_KIND", "MAX_REF_LENGTH", "CacheRef", "is_cache_ref", "make_cache_ref"]

#: The brand every ref carries, on the wire and in ``CacheRef.kind``.
CACHE_REF_KIND: Final = "task-graph/CacheRef"

#: Refs longer than this are refused at construction (and on the wire).
MAX_REF_LENGTH: Final = 1024


def _check_ref(_instance: object, _attribute: attrs.Attribute[str], value: object) -> None:
    # Invariant (S3-2): a non-empty, bounded str with no NUL.
    if not isinstance(value, str):
        raise TypeError(f"CacheRef.ref must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError("CacheRef.ref must be a non-empty str")
    if len(value) > MAX_REF_LENGTH:
        raise ValueError(f"CacheRef.ref is {len(value)} characters; the limit is {MAX_REF_LENGTH}")
    if "\x00" in value:
        raise ValueError("CacheRef.ref must not contain NUL")


def _check_size(_instance: object, _attribute: attrs.Attribute[int | None], value: object) -> None:
    # Invariant (S3-2): None or an int >= 0 (bool is not a size).
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"CacheRef.size must be an int or None, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"CacheRef.size must be >= 0, got {value}")


def _check_mime(_instance: object, _attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"CacheRef.mime must be a str or None, not {type(value).__name__}")


@final
@attrs.frozen
class CacheRef:
    """
    A reference to a blob held by an output repository.

    Attributes:
        ref: the opaque name the issuing repository gave the blob.
        size: the blob's size in bytes, when the repository knows it.
        mime: the blob's MIME type, if any.
        kind: always ``"task-graph/CacheRef"`` (the brand; not an argument).
    """

    ref: str = attrs.field(validator=_check_ref)
    size: int | None = attrs.field(default=None, validator=_check_size)
    mime: str | None = attrs.field(default=None, validator=_check_mime)

    @property
    def kind(self) -> str:
        """The brand: ``"task-graph/CacheRef"``."""
        return CACHE_REF_KIND


def make_cache_ref(ref: str, *, size: int | None = None, mime: str | None = None) -> CacheRef:
    """Build a `CacheRef` (validated: see `CacheRef`)."""
    return CacheRef(ref, size, mime)


def is_cache_ref(value: object) -> bool:
    """True only for `CacheRef` instances: a dict carrying ``$ref`` or the brand is data."""
    return isinstance(value, CacheRef)
