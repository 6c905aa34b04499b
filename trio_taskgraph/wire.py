"""
The wire codec: msgpack with ext types that keep `CacheRef` and `Blob` as their own types.

Anything that breaks a wire rule raises `WireFormatError`, naming the rule.
"""

from __future__ import annotations

from ._core._codec import packb as packb, unpackb as unpackb

__all__ = ["packb", "unpackb"]
