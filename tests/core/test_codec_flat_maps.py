"""
The codec's shortcut for small flat maps (protocol messages carrying a chunk): it skips the
byte scans, never the rules (S5-3).
"""

from __future__ import annotations

import msgpack
import pytest

import trio_taskgraph as tg
from trio_taskgraph._core._codec import FrameDecoder, encode_frame, packb, unpackb


def test_flat_maps_decode_as_before() -> None:
    """S5-3: a flat map with a large binary value decodes, refs and blobs intact."""
    value = {"op": "chunk", "id": 1, "data": bytes(range(256)) * 4096, "x": None, "f": 1.5}
    assert unpackb(packb(value)) == value
    ref = tg.CacheRef("cache://x", 1)
    assert unpackb(packb({"r": ref, "b": tg.Blob(b"\xff\xd6\xff")})) == {
        "r": ref,
        "b": tg.Blob(b"\xff\xd6\xff"),
    }
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(value))
    assert decoder.next_frame() == value


def test_flat_maps_still_obey_depth_and_timestamps() -> None:
    """S5-3: max_depth 0 refuses even a flat map; a timestamp value is refused."""
    with pytest.raises(tg.WireFormatError, match="max_depth"):
        unpackb(packb({"a": 1}), max_depth=0)
    stamped = msgpack.packb({"a": msgpack.Timestamp(1, 0)})
    with pytest.raises(tg.WireFormatError, match="ext type -1"):
        unpackb(stamped)
    with pytest.raises(tg.WireFormatError, match="ext type -1"):
        unpackb(msgpack.packb({msgpack.Timestamp(1, 0): 1}))
    nested = {"a": {"b": [1]}}
    assert unpackb(packb(nested)) == nested
    with pytest.raises(tg.WireFormatError, match="max_depth"):
        unpackb(packb(nested), max_depth=2)
