"""
Helpers shared by the cache-server tests: a subprocess server for a whole module, an
in-process server for tests that inject faults or read the server's counters, and a raw
protocol client (h11's ConnectionPair idea: the real codec on both ends, no mocks).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import TypedDict, Unpack

import attrs
import trio

from tests.polling import wait_until
from trio_taskgraph import CacheServerRepository, FsOutputRepository
from trio_taskgraph._cache_server import CacheServer, serve_cache_server
from trio_taskgraph._core._codec import CLOSED, NEED_DATA, FrameDecoder
from trio_taskgraph._core._messages import (
    PROTOCOL_VERSION,
    ClientMessage,
    Hello,
    ServerMessage,
    Welcome,
    decode_client,
    decode_server,
    encode_message,
)


def short_tempdir() -> str:
    """A fresh 0700 folder under /tmp (Unix socket paths must stay under ~107 bytes)."""
    return tempfile.mkdtemp(prefix="tg-", dir="/tmp")


@attrs.define
class ServerProcess:
    """A cache server started with subprocess for a whole test module."""

    process: subprocess.Popen[bytes]
    folder: str
    root: str
    socket_path: str


def start_server_process(folder: str, *extra: str) -> ServerProcess:
    """Start ``python -m trio_taskgraph.cache_server`` in ``folder`` and wait for READY."""
    root = os.path.join(folder, "root")
    sock = os.path.join(folder, "s")
    with open(os.path.join(folder, "stderr.log"), "wb") as errlog:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_taskgraph.cache_server",
                "--root",
                root,
                "--socket",
                sock,
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errlog,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(b"READY"):
        process.kill()
        process.wait()
        raise AssertionError(
            "server did not start: " + Path(folder, "stderr.log").read_text(errors="replace")
        )
    return ServerProcess(process=process, folder=folder, root=root, socket_path=sock)


def stop_server_process(server: ServerProcess) -> int:
    """SIGTERM, wait (SIGKILL after 10 s); return the exit status."""
    process = server.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.stdout is not None
    process.stdout.close()
    return process.returncode


@contextmanager
def server_process(*extra: str) -> Iterator[ServerProcess]:
    """A subprocess server in a private folder; stopped, checked and removed afterwards."""
    folder = short_tempdir()
    try:
        server = start_server_process(folder, *extra)
        try:
            yield server
        finally:
            status = stop_server_process(server)
            assert status == 0, f"server exited with {status}"
            assert not os.path.exists(server.socket_path), "socket file left behind"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ServerOptions(TypedDict, total=False):
    """The keyword options of `serve_cache_server` a test may set."""

    window: int
    chunk_bytes: int
    max_in_flight: int
    max_frame_bytes: int
    row_cache_bytes: int
    repository: FsOutputRepository | None


@asynccontextmanager
async def in_process_server(
    root: str | os.PathLike[str], **options: Unpack[ServerOptions]
) -> AsyncIterator[tuple[CacheServer, str]]:
    """Serve ``root`` in this trio run; yields the server and its socket path."""
    folder = short_tempdir()
    sock = os.path.join(folder, "s")
    try:
        async with trio.open_nursery() as nursery:
            server: CacheServer = await nursery.start(
                partial(serve_cache_server, root, sock, **options)
            )
            try:
                yield server, sock
            finally:
                nursery.cancel_scope.cancel()
        assert not await trio.Path(sock).exists(), "socket file left behind"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def next_frame(stream: trio.SocketStream, decoder: FrameDecoder) -> object:
    """The next whole frame from ``stream``, or `CLOSED` once the peer closed or broke it."""
    while (frame := decoder.next_frame()) is NEED_DATA:
        try:
            data = await stream.receive_some(1 << 20)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        decoder.receive_data(data)
    return frame


class RawClient:
    """The protocol by hand: send any bytes, read whatever frames come back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, socket_path: str, *, namespace: str | None = "default"
    ) -> AsyncIterator[RawClient]:
        stream = await trio.open_unix_socket(socket_path)
        client = cls(stream)
        try:
            if namespace is not None:
                await client.send(Hello(version=PROTOCOL_VERSION, namespace=namespace))
                welcome = await client.receive()
                assert isinstance(welcome, Welcome), welcome
            yield client
        finally:
            await stream.aclose()

    async def send(self, message: ClientMessage) -> None:
        await self.stream.send_all(encode_message(message))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> ServerMessage | None:
        """The next message, or None once the server closed the connection."""
        frame = await next_frame(self.stream, self.decoder)
        return None if frame is CLOSED else decode_server(frame)

    async def receive_until_closed(self) -> list[ServerMessage]:
        out = []
        while (message := await self.receive()) is not None:
            out.append(message)
        return out


class ScriptedPeer:
    """
    The server end of one client connection, played by the test: `scripted_server` does
    the handshake; the test reads the client's messages and answers (or not) as it likes.
    """

    def __init__(self) -> None:
        self.stream: trio.SocketStream | None = None
        self.decoder = FrameDecoder()
        self.connected = trio.Event()

    def _stream(self) -> trio.SocketStream:
        assert self.stream is not None, "no client has connected"
        return self.stream

    async def receive(self) -> ClientMessage | None:
        """The client's next message, or None once it closed the connection."""
        frame = await next_frame(self._stream(), self.decoder)
        return None if frame is CLOSED else decode_client(frame)

    def pending(self) -> int:
        """Bytes the client sent that the test has not read yet (FIONREAD, and decoded)."""
        raw = fcntl.ioctl(self._stream().socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0]) + self.decoder.buffered_bytes

    async def send(self, *messages: ServerMessage) -> None:
        """Send ``messages`` in one write (the client may read them in one receive)."""
        await self._stream().send_all(b"".join(encode_message(m) for m in messages))

    async def send_raw(self, data: bytes) -> None:
        await self._stream().send_all(data)

    async def aclose(self) -> None:
        await self._stream().aclose()


@asynccontextmanager
async def scripted_server(
    *, window: int = 1 << 20, chunk_bytes: int = 64 * 1024, max_in_flight: int = 16
) -> AsyncIterator[tuple[str, ScriptedPeer]]:
    """
    A socket whose one client connection the test serves by hand: yields the socket path
    and the `ScriptedPeer` (connected, handshake done, once ``peer.connected`` is set).
    """
    folder = short_tempdir()
    path = os.path.join(folder, "s")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    peer = ScriptedPeer()
    try:
        await listener.bind(path)
        listener.listen(1)

        async def accept() -> None:
            sock, _ = await listener.accept()
            peer.stream = trio.SocketStream(sock)
            hello = await peer.receive()
            assert isinstance(hello, Hello), hello
            await peer.send(
                Welcome(
                    version=PROTOCOL_VERSION,
                    window=window,
                    chunk_bytes=chunk_bytes,
                    max_in_flight=max_in_flight,
                )
            )
            peer.connected.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            try:
                yield path, peer
            finally:
                nursery.cancel_scope.cancel()
    finally:
        listener.close()
        if peer.stream is not None:
            with trio.CancelScope(shield=True):
                await peer.stream.aclose()
        shutil.rmtree(folder, ignore_errors=True)


async def wait_client_settled(repo: CacheServerRepository) -> None:
    """
    Wait until ``repo``'s connection has heard the server's last message for every request
    whose caller left (S5-8, S5-19): the reader takes those off the socket on its own,
    in its own time, after the server has sent them.
    """
    await wait_until(
        lambda: not repo.statistics().lingering_requests,
        "the client to hear the last message of every request",
    )
