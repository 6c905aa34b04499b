"""
The cache server's socket helpers (`_cache_server.write_now`, `write_rest`, `receive_into`,
`tune_allocator`): frames leave whole through one scatter write and arrive straight in the
decoder's buffer (spec/S5-16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_taskgraph._cache_server import (
    receive_into,
    send_file,
    tune_allocator,
    write_now,
    write_rest,
)
from trio_taskgraph._core._codec import CLOSED, NEED_DATA, FrameDecoder, encode_frame


def _stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_write_now_sends_what_fits_and_write_rest_the_remainder() -> None:
    """S5-16: a write larger than the socket buffer is sent part now (no wait), the rest
    once the peer reads; the peer receives exactly the concatenation of the parts."""
    left, right = _stream_pair()
    payload = os.urandom(8 * 1024 * 1024)
    parts: list[bytes | bytearray | memoryview] = [
        b"head",
        memoryview(payload)[:5_000_000],
        bytearray(b"mid"),
        payload[5_000_000:],
    ]
    expected = b"".join(parts)
    rest = write_now(left, parts)
    assert rest  # 8 MiB does not fit a socket buffer
    assert sum(len(p) for p in rest) < len(expected)
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(expected):
            received.extend(await right.receive_some(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await write_rest(left, rest)
    assert received == expected
    assert write_now(left, [b"small"]) == []  # fits at once: nothing left
    assert await right.receive_some(100) == b"small"
    await left.aclose()
    await right.aclose()


async def test_send_file_sends_the_file_range_through_a_full_socket(tmp_path: Path) -> None:
    """S5-16: a file range larger than the socket buffer goes out whole with
    ``os.sendfile``, waiting for room as the peer reads; the peer receives exactly it."""
    left, right = _stream_pair()
    payload = os.urandom(6 * 1024 * 1024)
    path = tmp_path / "blob"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    received = bytearray()
    expected = payload[1000 : 1000 + 5_000_000]

    async def read_all() -> None:
        while len(received) < len(expected):
            received.extend(await right.receive_some(1 << 20))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await send_file(left, fd, 1000, len(expected))
    finally:
        os.close(fd)
    assert received == expected
    await left.aclose()
    await right.aclose()


async def test_send_file_past_the_end_of_the_file_is_broken(tmp_path: Path) -> None:
    """S5-10: a file shorter than the frame promised cannot finish the frame: the send is
    broken (the server tears the connection down) rather than leaving a torn frame."""
    left, right = _stream_pair()
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(trio.BrokenResourceError, match="ended before"):
            await send_file(left, fd, 0, 200)
    finally:
        os.close(fd)
    assert await right.receive_some(1000) == b"x" * 100
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_file(left, 0, 0, 1)
    await right.aclose()


async def test_write_now_to_a_gone_peer_is_broken() -> None:
    """S5-14: a peer that closed its socket makes the write a BrokenResourceError."""
    left, right = _stream_pair()
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        write_now(left, [b"x" * 100])
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        write_now(left, [b"x"])


async def test_write_now_gathers_many_parts() -> None:
    """S5-16: more parts than one scatter write takes are joined first, not refused."""
    left, right = _stream_pair()
    parts: list[bytes | bytearray | memoryview] = [bytes([i % 256]) for i in range(2000)]
    assert write_now(left, parts) == []
    got = bytearray()
    while len(got) < 2000:
        got.extend(await right.receive_some(4096))
    assert got == b"".join(parts)
    await left.aclose()
    await right.aclose()


async def test_receive_into_reads_into_the_decoder() -> None:
    """S5-16: frames read into the decoder's buffer decode as sent; EOF ends cleanly."""
    left, right = _stream_pair()
    decoder = FrameDecoder()
    await left.send_all(encode_frame({"a": 1}) + encode_frame(b"z" * 100_000))
    await left.aclose()
    frames: list[object] = []
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            await receive_into(right, decoder, 65536)
        elif frame is CLOSED:
            break
        else:
            frames.append(frame)
    assert frames == [{"a": 1}, b"z" * 100_000]
    await right.aclose()


async def test_receive_into_is_cancellable_and_takes_nothing() -> None:
    """S5-16: a receive parked on the socket is cancelled cleanly: nothing committed."""
    left, right = _stream_pair()
    decoder = FrameDecoder()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_into, right, decoder, 1024)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert decoder.buffered_bytes == 0
    await left.send_all(encode_frame(5))
    await receive_into(right, decoder, 1024)
    assert decoder.next_frame() == 5
    await left.aclose()
    await right.aclose()


def test_tune_allocator() -> None:
    """S5-16: 0 leaves the allocator alone; otherwise a best-effort bool (checked in a child
    process: the test runner's allocator is not ours to tune)."""
    assert tune_allocator(0) is False
    code = (
        "import sys; from trio_taskgraph._cache_server import tune_allocator; "
        "r = tune_allocator(); print(r); assert r is (sys.platform == 'linux')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
