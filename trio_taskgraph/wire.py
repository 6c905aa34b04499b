"""
The wire codec: msgpack with ext types that keep `CacheRef` and `Blob` as their own types,
strict decoding limits, and a sans-io frame decoder for the cache server and its client.

Anything that breaks a wire rule raises `WireFormatError`, naming the rule
(spec/S5-wire-and-server.md, S5-1 to S5-5).
"""

from __future__ import annotations

from ._core._codec import (
    CLOSED as CLOSED,
    DEFAULT_MAX_CONTAINER_LEN as DEFAULT_MAX_CONTAINER_LEN,
    DEFAULT_MAX_DEPTH as DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME_BYTES as DEFAULT_MAX_FRAME_BYTES,
    EXT_BLOB as EXT_BLOB,
    EXT_CACHE_REF as EXT_CACHE_REF,
    FRAME_HEADER_SIZE as FRAME_HEADER_SIZE,
    NEED_DATA as NEED_DATA,
    FrameDecoder as FrameDecoder,
    WireLimits as WireLimits,
    encode_frame as encode_frame,
    packb as packb,
    unpackb as unpackb,
)

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
