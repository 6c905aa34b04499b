"""
msgpack encoding with ext types for `CacheRef` and `Blob`.

(First cut: the limits and the sans-io `FrameDecoder` land with the wire issue.)
"""

from __future__ import annotations

from typing import Final

import msgpack

from .._errors import WireFormatError
from ._events import Blob
from ._refs import CacheRef

__all__ = ["EXT_BLOB", "EXT_CACHE_REF", "packb", "unpackb"]

EXT_CACHE_REF: Final = 1
EXT_BLOB: Final = 2


def _default(obj: object) -> object:
    if isinstance(obj, CacheRef):
        return msgpack.ExtType(
            EXT_CACHE_REF, msgpack.packb([obj.ref, obj.size, obj.mime], use_bin_type=True)
        )
    if isinstance(obj, Blob):
        return msgpack.ExtType(EXT_BLOB, msgpack.packb([obj.mime, obj.data], use_bin_type=True))
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def _ext_hook(code: int, data: bytes) -> object:
    try:
        if code == EXT_CACHE_REF:
            ref, size, mime = msgpack.unpackb(data, raw=False)
            return CacheRef(ref, size, mime)
        if code == EXT_BLOB:
            mime, payload = msgpack.unpackb(data, raw=False)
            return Blob(payload, mime)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireFormatError(f"malformed payload for ext type {code}: {exc}") from None
    raise WireFormatError(f"unknown ext type {code}")


def packb(obj: object) -> bytes:
    """Encode ``obj`` (tuples become lists; `CacheRef` and `Blob` keep their types)."""
    out: bytes = msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=False)
    return out


def unpackb(data: bytes) -> object:
    """Decode one msgpack value; any malformed input raises `WireFormatError`."""
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except WireFormatError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireFormatError(f"malformed msgpack: {exc}") from None
