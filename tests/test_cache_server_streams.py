"""
The cache server's stream paths (spec/S5-16, S5-17): downloads sent from the blob file with
``os.sendfile`` in worker threads, and what cancellation leaves when a frame is part-sent.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_taskgraph as tg
from tests.polling import wait_until
from trio_taskgraph._cache_server import CacheServer, _Download, send_file, send_file_frames
from trio_taskgraph._core._messages import Abort, Data, Failed, Ok, ReadStream, ServerStats

from .server_harness import RawClient, in_process_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

MiB = 1024 * 1024
#: A frame larger than what a Unix socket holds in flight (the server asks for a 2 MiB send
#: buffer, which the kernel doubles), so the server parks part-way through it.
BIG = 8 * MiB


async def _chunks(n: int, size: int) -> AsyncIterator[bytes]:
    for i in range(n):
        await trio.lowlevel.checkpoint()
        yield bytes([i % 256]) * size


def _pending(stream: trio.SocketStream) -> int:
    """Bytes waiting in ``stream``'s receive queue (FIONREAD)."""
    raw = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    (count,) = struct.unpack("i", raw)
    return int(count)


def _the_download(server: CacheServer) -> _Download:
    (conn,) = server._connections
    (entry,) = [e for e in conn.requests.values() if isinstance(e, _Download)]
    return entry


async def _park_mid_frame(server: CacheServer, raw: RawClient, ref: tg.CacheRef) -> _Download:
    """Open a download of a BIG-chunk blob and let the server stall inside its first frame."""
    await raw.send(ReadStream(id=1, ns="default", ref=ref))
    assert await raw.receive() == Ok(id=1, value=None)
    await wait_until(lambda: _pending(raw.stream) > MiB, "over 1 MiB unread in the socket")
    download = _the_download(server)
    # The client reads nothing and the frame is larger than the socket holds: the server
    # is inside the frame and cannot finish it.
    await wait_until(lambda: download.in_frame, "a sendfile run to be mid-frame")
    await trio.testing.wait_all_tasks_blocked()
    assert download.in_frame
    return download


async def test_downloads_sendfile_in_worker_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S5-17: every ``os.sendfile`` of a download runs in a worker thread, never on the event
    loop's thread (a cold page cache must not stall other connections), and the bytes the
    client reads are the blob's."""
    threads: list[bool] = []
    real = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", spy)  # the module the server calls it through
    async with (
        in_process_server(tmp_path / "root", window=MiB, chunk_bytes=256 * 1024) as (_, sock),
        tg.connect_cache_server(sock) as repo,
    ):
        ref = await repo.save_output_stream("t", {}, "p", _chunks(12, 300_000))
        data = await repo.get_output_by_ref(ref)
    assert data == b"".join(bytes([i]) * 300_000 for i in range(12))
    assert threads  # the sendfile path was taken
    assert not any(threads)


async def test_abort_mid_frame_waits_for_the_frame_and_keeps_the_connection(
    tmp_path: Path,
) -> None:
    """S5-17: an abort that arrives while a download's frame is part-sent (the client stopped
    reading, the socket is full) does not cut the frame: once the client reads, the frame
    arrives whole, the download ends without another data frame, with its last message
    `failed` (kind aborted, S5-8), and the connection still serves requests."""
    async with in_process_server(tmp_path / "root", window=BIG, chunk_bytes=BIG) as (server, sock):
        async with tg.connect_cache_server(sock) as repo:
            ref = await repo.save_output_stream("t", {}, "p", _chunks(2, BIG))
        async with RawClient.connect(sock) as raw:
            download = await _park_mid_frame(server, raw, ref)
            await raw.send(Abort(id=1))
            await wait_until(lambda: download.aborted, "the server to see the abort")
            await trio.testing.wait_all_tasks_blocked()
            assert download.in_frame  # still sending the frame: not cut
            frame = await raw.receive()
            assert isinstance(frame, Data)
            assert frame.data == bytes([0]) * BIG
            assert not frame.end
            last = await raw.receive()
            # No second data frame and no end: the aborted download says it was aborted.
            assert isinstance(last, Failed), last
            assert (last.id, last.kind) == (1, "aborted")
            await raw.send(ServerStats(id=2))
            reply = await raw.receive()
            assert reply is not None
            assert getattr(reply, "id", None) == 2, reply
            await wait_until(
                lambda: server.statistics().requests == 0, "the server to finish every request"
            )
            await trio.testing.wait_all_tasks_blocked()
            assert _pending(raw.stream) == 0  # nothing more came for the download


async def test_server_stopping_mid_frame_closes_the_connection(tmp_path: Path) -> None:
    """S5-17, S5-12: a server cancelled while a frame is part-sent to a client that reads
    nothing stops at once (the frame is not shielded, so a stalled peer cannot pin it) and
    closes that connection: the client sees the cut frame, then EOF, never another frame."""
    root = tmp_path / "root"
    async with in_process_server(root) as (_, sock):
        async with tg.connect_cache_server(sock) as repo:
            ref = await repo.save_output_stream("t", {}, "p", _chunks(2, BIG))
    stream: trio.SocketStream | None = None
    with trio.fail_after(10):
        async with in_process_server(root, window=BIG, chunk_bytes=BIG) as (server, sock):
            raw_cm = RawClient.connect(sock)
            raw = await raw_cm.__aenter__()
            stream = raw.stream
            await _park_mid_frame(server, raw, ref)
        # The server is gone although its peer never read the frame.
        received = 0
        while data := await stream.receive_some(MiB):
            received += len(data)
        # The Ok reply, then part of the data frame: never the whole of it.
        assert 0 < received < BIG
        await raw_cm.__aexit__(None, None, None)


async def test_send_file_parked_for_room_is_cancelled_with_nothing_sent(tmp_path: Path) -> None:
    """S5-17: `send_file` waiting for a full socket is a cancellation point: cancelled there,
    it sends nothing (no thread hop was made)."""
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    filler = 0
    while True:
        try:
            filler += os.write(left.socket.fileno(), b"f" * 65536)
        except BlockingIOError:
            break
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_file, left, fd, 0, 1000)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    await left.aclose()
    received = 0
    while data := await right.receive_some(MiB):
        assert set(data) == {ord("f")}
        received += len(data)
    assert received == filler
    await right.aclose()


async def test_send_file_frames_sends_a_run_of_frames_whole(tmp_path: Path) -> None:
    """S5-16, S5-17: a run of frames (heads written, payloads sendfile'd from the blob file,
    in worker threads) larger than the socket buffer arrives exactly as the concatenation
    of each head and its file range, in order."""
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    payload = os.urandom(7 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(payload)
    frames = [(b"head-%d" % i, i * MiB, MiB if i < 6 else MiB - 5) for i in range(7)]
    expected = b"".join(head + payload[o : o + n] for head, o, n in frames)
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(expected):
            received.extend(await right.receive_some(MiB))

    fd = os.open(path, os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await send_file_frames(left, fd, frames)
    finally:
        os.close(fd)
    assert received == expected
    await left.aclose()
    await right.aclose()


async def test_sendfile_download_yields_bounded_bytes_chunks(tmp_path: Path) -> None:
    """S5-18, S5-9 (seed M-6: a reader gets bounded chunks, never the whole blob): a blob
    sent with sendfile and received into detached payloads reaches the caller as ``bytes``
    chunks of at most ``chunk_bytes``, exactly the blob, and the client holds at most the
    window (plus the frame being received)."""
    chunk = 256 * 1024
    async with (
        in_process_server(tmp_path / "root", window=4 * chunk, chunk_bytes=chunk) as (_, sock),
        tg.connect_cache_server(sock) as repo,
    ):
        ref = await repo.save_output_stream("t", {}, "p", _chunks(9, 300_000))
        async with repo.open_output_stream_by_ref(ref) as stream:
            pieces = [piece async for piece in stream]
        assert all(type(p) is bytes for p in pieces)
        assert max(len(p) for p in pieces) == chunk
        assert b"".join(pieces) == b"".join(bytes([i]) * 300_000 for i in range(9))
        assert repo.statistics().peak_buffered_bytes <= 4 * chunk + chunk + 4096
