"""
The cache server: one `FsOutputRepository` served over a Unix socket (spec/S5, S5-6 on).

Theory of operation:

- One task accepts connections; each connection runs one reader task and one task per open
  request, all in the connection's own nursery. The reader never blocks on anything but the
  socket: it decodes frames with a `FrameDecoder`, structures them with the protocol's
  converter (`_core._messages`), and dispatches synchronously (a request starts a task; a
  chunk goes into its upload's byte channel with ``send_nowait``; a credit wakes a download).
- Flow control (S5-9) is a credit window in bytes per stream, in both directions. An upload
  starts with ``window`` bytes of credit; the server grants more only as the repository
  takes chunks out of the upload's channel, so the channel never holds more than ``window``
  bytes, and a client that sends past its credit has broken the protocol. A download sends a
  chunk only when the client has granted room for it, so a slow reader makes the server hold
  at most one chunk of its blob.
- Bad input (S5-10) never takes the server down: a malformed or over-limit frame, an unknown
  operation, or a protocol violation gets a connection-level `Failed` reply (``id`` -1) where
  the socket still takes it, and closes that connection only. Closing a connection cancels its
  requests; a cancelled upload leaves no temp file (the repository's guarantee, S4-3).
- Every request is confined to the connection's namespace or a namespace below it (S5-11):
  a ref issued in another tenant's namespace is `ForeignRefError`, whatever its tag.
- Shutdown (S5-12): `CacheServer.shutdown` stops accepting, refuses new requests with a
  ``shutdown`` failure, lets open requests finish within a grace period, then cancels the
  rest; `serve_cache_server` removes its socket on the way out.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import math
import os
import socket as _stdlib_socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVarTuple, Unpack, final

import attrs
import trio

from ._byte_channel import open_byte_channel
from ._core._codec import CLOSED, DEFAULT_MAX_FRAME_BYTES, NEED_DATA, FrameDecoder, packb
from ._core._keys import check_namespace
from ._core._messages import (
    PROTOCOL_VERSION,
    Abort,
    ChunkMessage,
    ClearOlderThan,
    ClientMessage,
    Credit,
    Data,
    DeletePrefix,
    DeleteRef,
    EndStream,
    Failed,
    Gc,
    GetOutput,
    Hello,
    Ok,
    ReadStream,
    SaveOutput,
    SaveStream,
    ServerMessage,
    ServerStats,
    Stats,
    Welcome,
    decode_client,
    encode_data_frame,
    encode_data_frame_head,
    encode_message,
    error_kind,
)
from ._errors import CacheServerError, WireFormatError
from ._repository._filesystem import FsOutputRepository

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ._byte_channel import ByteReceiveChannel, ByteSendChannel
    from ._core._events import BytesLike
    from ._core._refs import CacheRef

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_WINDOW",
    "CacheServer",
    "CacheServerStatistics",
    "prepare_socket_path",
    "receive_into",
    "send_file",
    "send_file_frames",
    "serve_cache_server",
    "tune_allocator",
    "widen_send_buffer",
    "write_now",
    "write_rest",
]

Ts = TypeVarTuple("Ts")

#: Credit each stream starts with, in bytes (S5-9).
DEFAULT_WINDOW: Final = 8 * 1024 * 1024
#: Largest chunk sent in one frame, either way.
DEFAULT_CHUNK_BYTES: Final = 1024 * 1024
#: Requests one connection may have open at once.
DEFAULT_MAX_IN_FLIGHT: Final = 256
#: Seconds a new connection has to send its `Hello`.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds a connection-level error reply may take to send before the socket is just closed.
_GOODBYE_TIMEOUT: Final = 1.0
_RECEIVE_BYTES: Final = 1024 * 1024
#: Upload payloads at least this large are received into buffers of their own (S5-18).
DETACH_BIN_BYTES: Final = 64 * 1024


@final
@attrs.frozen(kw_only=True)
class CacheServerStatistics:
    """
    What a cache server holds and has done (S5-9).

    Attributes:
        connections: open connections.
        requests: open requests over all connections.
        buffered_bytes: bytes the server holds for streams right now: received frames not
            yet decoded, upload chunks not yet taken by the repository, and download chunks
            waiting for credit. (The repository's own write batches, at most two of
            ``write_batch_bytes`` per upload, come on top.)
        peak_buffered_bytes: the most ``buffered_bytes`` has been.
        window: the credit window per stream.
        chunk_bytes: the largest chunk per frame.
        protocol_errors: connections closed for breaking the wire or the protocol.
    """

    connections: int
    requests: int
    buffered_bytes: int
    peak_buffered_bytes: int
    window: int
    chunk_bytes: int
    protocol_errors: int


#: Bytes of rows the server keeps in memory by default (S5-15).
DEFAULT_ROW_CACHE_BYTES: Final = 64 * 1024 * 1024

_RowKey = tuple[str, str, str]


@final
@attrs.define(eq=False)
class _RowCache:
    """
    Rows the server has read, kept so a hot row costs no thread hop (S5-15).

    Invariant (S5-15): a read fills the cache only if no write or prune went through the
    server between the read's start and its end (``epoch`` unchanged), and every write or
    prune invalidates before and after it runs; so the cache never serves a row older than
    the last write this server made.
    """

    max_bytes: int
    entries: collections.OrderedDict[_RowKey, tuple[dict[str, object] | None, int]] = attrs.Factory(
        collections.OrderedDict
    )
    size: int = 0
    epoch: int = 0
    hits: int = 0

    def lookup(self, key: _RowKey) -> tuple[bool, dict[str, object] | None]:
        entry = self.entries.get(key)
        if entry is None:
            return False, None
        self.entries.move_to_end(key)
        self.hits += 1
        return True, entry[0]

    def fill(self, key: _RowKey, value: dict[str, object] | None, epoch: int) -> None:
        if epoch != self.epoch or not self.max_bytes:
            return
        try:
            size = 64 + (0 if value is None else len(packb(value)))
        except WireFormatError:  # pragma: no cover - rows are msgpack already
            return
        if size > self.max_bytes // 16:
            return  # a big row would evict many small ones; read it from disk
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= old[1]
        self.entries[key] = (value, size)
        self.size += size
        while self.size > self.max_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.size -= dropped

    def invalidate(self, key: _RowKey | None = None) -> None:
        self.epoch += 1
        if key is None:
            self.entries.clear()
            self.size = 0
        else:
            old = self.entries.pop(key, None)
            if old is not None:
                self.size -= old[1]


class _Violation(Exception):
    """The peer broke the protocol: reply at connection level and close."""


@attrs.define(eq=False)
class _Upload:
    id: int
    send: ByteSendChannel[BytesLike]
    receive: ByteReceiveChannel[BytesLike]
    # Invariant (S5-9): bytes the client may still send = window - bytes held - bytes
    # taken but not yet granted back.
    credit: int
    ungranted: int = 0
    ended: bool = False  # the client sent EndStream or Abort
    finished: bool = False  # the task is done
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


@attrs.define(eq=False)
class _Download:
    id: int
    credit: int
    # Invariant (S5-17): a frame being sent from the blob file is never cut by an abort;
    # the abort (``aborted``) takes effect when the frame is done.
    in_frame: bool = False
    aborted: bool = False
    lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


_Entry = _Upload | _Download | None


@final
class _UploadChunks:
    """The repository's view of an upload: chunks out of the channel, credit back to the client."""

    def __init__(self, conn: _Connection, upload: _Upload) -> None:
        self._conn = conn
        self._upload = upload
        # Credit goes back a quarter window at a time (and always before waiting): fewer
        # frames and wake-ups on both sides than one per chunk.
        self._threshold = max(1, conn.server.window // 4)

    def __aiter__(self) -> _UploadChunks:
        return self

    async def __anext__(self) -> BytesLike:
        upload = self._upload
        try:
            try:
                chunk = upload.receive.receive_nowait()
            except trio.WouldBlock:
                # About to wait for the client: hand back every byte it may resend first,
                # so a client short of credit is never left waiting on us (no deadlock).
                await self._grant()
                chunk = await upload.receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        size = len(chunk)
        self._conn.server._add_buffered(-size)
        upload.ungranted += size
        if upload.ungranted >= self._threshold:
            await self._grant()
        return chunk

    async def _grant(self) -> None:
        upload = self._upload
        if upload.ungranted and not upload.ended:
            n, upload.ungranted = upload.ungranted, 0
            upload.credit += n
            await self._conn.send(Credit(id=upload.id, n=n))


@final
class _Connection:
    def __init__(self, server: CacheServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        # Invariant (S5-18): upload payloads arrive in buffers of their own, uncopied.
        self.decoder = FrameDecoder(
            max_frame_bytes=server.max_frame_bytes, detach_bin_bytes=DETACH_BIN_BYTES
        )
        self.send_lock = trio.Lock()
        # A frame was cut short (S5-17): nothing more may be sent; the connection goes.
        self.broken = False
        self.requests: dict[int, _Entry] = {}
        # Invariant (S5-8): ids of open requests not yet given their last message. Only
        # these count against max_in_flight: a client frees a request's slot when that
        # message arrives, which may be before the request's task has closed it here.
        self.unfinished: set[int] = set()
        self.namespace = ""
        self.views: dict[str, FsOutputRepository] = {}
        self.nursery: trio.Nursery | None = None
        self.decoded_bytes = 0  # what this connection's decoder holds, as last counted
        self.idle = trio.Event()
        self.idle.set()
        self.outbox: list[
            bytes | bytearray | memoryview
        ] = []  # replies the reader sends before it next waits

    # -- sending --

    async def send(self, message: ServerMessage) -> None:
        """Send one frame; a frame is sent whole or the connection is torn down."""
        await self._send_parts([encode_message(message)])

    async def _send_parts(
        self, parts: list[bytes | bytearray | memoryview], *, checkpoint: bool = True
    ) -> None:
        """
        Send whole frames (``parts`` concatenated). Always a trip through the scheduler
        (never a cancellation point) unless ``checkpoint`` is false and the kernel takes
        the bytes at once: the reader, which waits on the socket next anyway, skips it.
        """
        lock = self.send_lock
        try:
            lock.acquire_nowait()  # uncontended: no extra trip through the scheduler
        except trio.WouldBlock:
            await lock.acquire()
        try:
            try:
                if self.broken:
                    raise trio.BrokenResourceError("a frame was cut short on this connection")
                rest = write_now(self.stream, parts)
                if rest:
                    # A frame cut by a cancellation would corrupt the stream: finish it.
                    with trio.CancelScope(shield=True):
                        await write_rest(self.stream, rest)
                elif checkpoint:
                    await trio.lowlevel.cancel_shielded_checkpoint()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._tear_down()
                raise
        finally:
            lock.release()

    def _tear_down(self) -> None:
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _reply(self, message: Ok | Failed | Data) -> None:
        """
        Send a request's last message: its reply, or a download's end or failure.

        Invariant (S5-8): the request stops counting against max_in_flight first, since
        the client frees its slot the moment this message arrives.
        """
        self.unfinished.discard(message.id)
        try:
            await self.send(message)
        except WireFormatError as exc:
            # A result the wire cannot carry (cannot happen for rows we stored): say so.
            assert isinstance(message, Ok)
            await self.send(Failed(id=message.id, kind="wire", message=str(exc)))

    # -- the connection's life --

    async def run(self) -> None:
        server = self.server
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        hello = await self._next_message()
                    self._handshake(hello)
                    await self.send(
                        Welcome(
                            version=PROTOCOL_VERSION,
                            window=server.window,
                            chunk_bytes=server.chunk_bytes,
                            max_in_flight=server.max_in_flight,
                        )
                    )
                    while True:
                        self._dispatch(await self._next_message())
                except _CleanClose:
                    pass
                except (WireFormatError, _Violation, trio.TooSlowError) as exc:
                    server._protocol_errors += 1
                    kind = "wire" if isinstance(exc, WireFormatError) else "protocol"
                    text = "handshake timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                    await self._goodbye(Failed(id=-1, kind=kind, message=text))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                # The reader is done: the connection goes, and its open requests with it.
                nursery.cancel_scope.cancel()
        finally:
            server._add_buffered(-self.decoded_bytes)
            self.decoded_bytes = 0
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _goodbye(self, message: Failed) -> None:
        with (
            trio.move_on_after(_GOODBYE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.send(message)

    async def _next_message(self) -> ClientMessage:
        decoder = self.decoder
        server = self.server
        while True:
            frame = decoder.next_frame()
            held = decoder.buffered_bytes
            if held != self.decoded_bytes:
                server._add_buffered(held - self.decoded_bytes)
                self.decoded_bytes = held
            if frame is NEED_DATA:
                if self.outbox:
                    # Replies made while dispatching this batch leave in one write.
                    frames, self.outbox = self.outbox, []
                    await self._send_parts(frames, checkpoint=False)
                await receive_into(self.stream, decoder, _RECEIVE_BYTES)
                continue
            if frame is CLOSED:
                raise _CleanClose
            return decode_client(frame)

    def _handshake(self, hello: ClientMessage) -> None:
        if not isinstance(hello, Hello):
            raise _Violation(f"the first message must be 'hello', not {type(hello).__name__}")
        if hello.version != PROTOCOL_VERSION:
            raise _Violation(
                f"protocol version {hello.version} is not supported (server speaks "
                f"{PROTOCOL_VERSION})"
            )
        try:
            self.namespace = check_namespace(hello.namespace)
        except (TypeError, ValueError) as exc:
            raise _Violation(str(exc)) from None

    def _view(self, ns: str) -> FsOutputRepository:
        view = self.views.get(ns)
        if view is None:
            # Invariant (S5-11): a connection reaches its namespace and those below it only.
            own = self.namespace
            if ns != own and not ns.startswith(own + "."):
                raise CacheServerError(
                    f"namespace {ns[:80]!r} is outside this connection's namespace {own!r}"
                )
            check_namespace(ns)
            view = self.server.repository.with_namespace(ns)
            self.views[ns] = view
        return view

    # -- dispatch (synchronous: the reader never waits for a request) --

    def _open(self, request_id: int, entry: _Entry) -> None:
        if request_id in self.requests:
            raise _Violation(f"request id {request_id} is already in use")
        if request_id < 0:
            raise _Violation(f"request id {request_id} is negative")
        if len(self.unfinished) >= self.server.max_in_flight:
            raise _Violation(
                f"more than {self.server.max_in_flight} requests in flight on one connection"
            )
        self.requests[request_id] = entry
        self.unfinished.add(request_id)
        self.idle = trio.Event() if self.idle.is_set() else self.idle

    def _close(self, request_id: int) -> None:
        self.unfinished.discard(request_id)
        self.requests.pop(request_id, None)
        if not self.requests:
            self.idle.set()
            self.server._wake()

    def _dispatch(self, message: ClientMessage) -> None:
        nursery = self.nursery
        assert nursery is not None
        if isinstance(message, ChunkMessage):
            self._on_chunk(message)
        elif isinstance(message, Credit):
            self._on_credit(message)
        elif isinstance(message, EndStream | Abort):
            self._on_end(message)
        elif isinstance(message, Hello):
            raise _Violation("'hello' after the handshake")
        elif isinstance(message, SaveStream):
            if self.server._draining:
                self._refuse(message.id)
                return
            send, receive = open_byte_channel(self.server.window + 1)
            upload = _Upload(id=message.id, send=send, receive=receive, credit=self.server.window)
            self._open(message.id, upload)
            nursery.start_soon(self._guard, self._run_upload, upload, message)
        elif isinstance(message, ReadStream):
            if self.server._draining:
                self._refuse(message.id)
                return
            download = _Download(id=message.id, credit=self.server.window)
            self._open(message.id, download)
            nursery.start_soon(self._guard, self._run_download, download, message)
        else:
            if self.server._draining:
                self._refuse(message.id)
                return
            if isinstance(message, GetOutput) and self._answer_from_cache(message):
                return
            self._open(message.id, None)
            nursery.start_soon(self._guard, self._run_unary, message)

    def _answer_from_cache(self, message: GetOutput) -> bool:
        """Answer a get of a cached row at once, in the reader: no task, no thread (S5-15)."""
        hit, row = self.server._rows.lookup((message.ns, message.task_type, message.digest))
        own = self.namespace
        ns = message.ns
        if (
            not hit
            or (ns != own and not ns.startswith(own + "."))
            or message.id in self.requests
            or message.id < 0
        ):
            return False  # the task path refuses or answers it
        self.outbox.append(encode_message(Ok(id=message.id, value=row)))
        return True

    def _refuse(self, request_id: int) -> None:
        assert self.nursery is not None
        self._open(request_id, None)
        failed = Failed(id=request_id, kind="shutdown", message="the cache server is shutting down")

        async def refuse() -> None:
            try:
                await self._reply(failed)
            finally:
                self._close(request_id)

        self.nursery.start_soon(self._guard, refuse)

    def _on_chunk(self, message: ChunkMessage) -> None:
        upload = self.requests.get(message.id, None)
        if not isinstance(upload, _Upload) or upload.ended:
            raise _Violation(f"chunk for request {message.id}, which is not an open upload")
        size = len(message.data)
        if size > upload.credit:
            raise _Violation(
                f"upload {message.id} sent {size} bytes with {upload.credit} bytes of credit"
            )
        upload.credit -= size
        if upload.finished or not size:
            return  # the upload already failed: drop what was in flight
        try:
            upload.send.send_nowait(message.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the repository stopped reading (the upload failed): drop it
        except trio.WouldBlock:  # pragma: no cover - credit keeps the channel under its mark
            raise _Violation(f"upload {message.id} overflowed its window") from None
        self.server._add_buffered(size)

    def _on_credit(self, message: Credit) -> None:
        entry = self.requests.get(message.id, None)
        if entry is None:
            return  # the download already ended: late credit is harmless
        if not isinstance(entry, _Download) or message.n <= 0:
            raise _Violation(f"bad credit {message.n} for request {message.id}")
        entry.credit += message.n
        if entry.credit > self.server.window:
            raise _Violation(f"download {message.id} was granted more than the window")
        entry.lot.unpark_all()

    def _on_end(self, message: EndStream | Abort) -> None:
        entry = self.requests.get(message.id, None)
        if isinstance(message, Abort):
            if isinstance(entry, _Download) and entry.in_frame:
                entry.aborted = True  # cancelled once its frame is whole (S5-17)
            elif isinstance(entry, _Upload | _Download):
                entry.scope.cancel()
            if isinstance(entry, _Upload):
                entry.ended = True
                entry.send.close()
                if entry.finished:
                    self._close(entry.id)
            return  # aborting a finished request is harmless
        if not isinstance(entry, _Upload) or entry.ended:
            raise _Violation(f"end of request {message.id}, which is not an open upload")
        entry.ended = True
        entry.send.close()
        if entry.finished:
            self._close(entry.id)

    # -- requests --

    async def _guard(self, fn: Callable[[Unpack[Ts]], Awaitable[None]], *args: *Ts) -> None:
        """Run a request task: a dead socket or a bug ends this connection, never the server."""
        try:
            await fn(*args)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._tear_down()
        except Exception as exc:  # pragma: no cover - a bug; keep serving the others
            print(f"cache server: internal error on a connection: {exc!r}", file=sys.stderr)
            self._tear_down()

    async def _run_unary(self, message: ClientMessage) -> None:
        request_id: int = message.id  # type: ignore[union-attr]
        try:
            try:
                value = await self._perform(message)
                reply: Ok | Failed = Ok(id=request_id, value=value)
            except Exception as exc:
                reply = Failed(id=request_id, kind=error_kind(exc), message=str(exc))
            await self._reply(reply)
        finally:
            self._close(request_id)

    async def _perform(self, message: ClientMessage) -> object:
        rows = self.server._rows
        if isinstance(message, GetOutput):
            view = self._view(message.ns)
            key = (message.ns, message.task_type, message.digest)
            hit, row = rows.lookup(key)
            if hit:
                await trio.lowlevel.checkpoint()
                return row
            epoch = rows.epoch
            row = await view.get_output_by_digest(message.task_type, message.digest)
            rows.fill(key, row, epoch)
            return row
        if isinstance(message, SaveOutput):
            view = self._view(message.ns)
            if not isinstance(message.output, dict):
                raise TypeError(f"an output must be a map, not {type(message.output).__name__}")
            key = (message.ns, message.task_type, message.digest)
            rows.invalidate(key)
            try:
                await view.save_output_by_digest(message.task_type, message.digest, message.output)
            finally:
                rows.invalidate(key)
            return None
        if isinstance(message, DeleteRef):
            await self._view(message.ns).delete_output_by_ref(message.ref)
            return None
        if isinstance(message, ClearOlderThan):
            view = self._view(message.ns)
            rows.invalidate()
            try:
                return await view.clear_older_than(message.seconds)
            finally:
                rows.invalidate()
        if isinstance(message, DeletePrefix):
            view = self._view(message.ns)
            rows.invalidate()
            try:
                return await view.delete_by_task_type_prefix(message.prefix)
            finally:
                rows.invalidate()
        if isinstance(message, Stats):
            stats = await self._view(message.ns).stats()
            return [stats.rows, stats.blobs, stats.bytes]
        if isinstance(message, Gc):
            if math.isnan(message.min_age):
                raise ValueError("min_age must be a number, not NaN")
            report = await self._view(message.ns).gc(min_age=message.min_age)
            return [report.blobs, report.bytes, report.temp_files]
        if isinstance(message, ServerStats):
            await trio.lowlevel.checkpoint()
            return attrs.asdict(self.server.statistics())
        raise AssertionError(f"unhandled {type(message).__name__}")  # pragma: no cover

    async def _run_upload(self, upload: _Upload, message: SaveStream) -> None:
        reply: Ok | Failed | None = None
        try:
            with upload.scope:
                try:
                    view = self._view(message.ns)
                    ref: CacheRef = await view.save_output_stream(
                        message.task_type,
                        None,
                        "",
                        _UploadChunks(self, upload),
                        mime=message.mime,
                    )
                    reply = Ok(id=upload.id, value=ref)
                except Exception as exc:
                    reply = Failed(id=upload.id, kind=error_kind(exc), message=str(exc))
        finally:
            upload.finished = True
            # Chunks still held are dropped; later ones are dropped on arrival.
            held = upload.receive.statistics().buffered_bytes
            self.server._add_buffered(-held)
            upload.receive.close()
            if upload.ended:
                self._close(upload.id)
        if reply is None:
            # Aborted: say so, so a client that aborted after its last chunk learns that
            # nothing was published (S5-10).
            reply = Failed(id=upload.id, kind="aborted", message="the upload was aborted")
        await self._reply(reply)

    async def _run_download(self, download: _Download, message: ReadStream) -> None:
        reply: Data | Failed | None = None
        try:
            with download.scope:
                try:
                    view = self._view(message.ns)
                    async with view.open_output_stream_by_ref(message.ref) as pieces:
                        await self.send(Ok(id=download.id, value=None))
                        if isinstance(self.stream, trio.SocketStream):
                            await self._sendfile_pieces(download, pieces.fileno())
                        else:
                            await self._stream_pieces(download, pieces)
                    reply = Data(id=download.id, data=b"", end=True)
                except Exception as exc:
                    reply = Failed(id=download.id, kind=error_kind(exc), message=str(exc))
            if reply is None:
                # Aborted (only an abort cancels this scope): say so after the last data
                # frame, so the client knows nothing more comes for it (S5-8, S5-19).
                reply = Failed(id=download.id, kind="aborted", message="the download was aborted")
            await self._reply(reply)
        finally:
            self._close(download.id)

    async def _stream_pieces(self, download: _Download, pieces: AsyncIterator[bytes]) -> None:
        """
        Send ``pieces`` under the client's credit, reading the next piece from disk while
        the current one goes out (so a thread hop per read does not stall the socket). At
        most two pieces are held: the one being sent and the one read ahead.
        """
        server = self.server
        chunk_bytes = server.chunk_bytes
        send_piece, receive_piece = trio.open_memory_channel[bytes](0)
        failure: list[Exception] = []

        async def read_ahead() -> None:
            async with send_piece:
                try:
                    async for piece in pieces:
                        server._add_buffered(len(piece))
                        try:
                            await send_piece.send(piece)
                        except BaseException:
                            server._add_buffered(-len(piece))
                            raise
                except Exception as exc:
                    failure.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_ahead)
            async with receive_piece:
                async for piece in receive_piece:
                    try:
                        for start in range(0, len(piece), chunk_bytes):
                            part: bytes | memoryview = (
                                memoryview(piece)[start : start + chunk_bytes]
                                if start or len(piece) > chunk_bytes
                                else piece
                            )
                            # Invariant (S5-9): never send past the client's credit.
                            while download.credit < len(part):
                                await download.lot.park()
                            download.credit -= len(part)
                            await self._send_parts(encode_data_frame(download.id, part))
                    finally:
                        server._add_buffered(-len(piece))
        if failure:
            raise failure[0]

    async def _sendfile_pieces(self, download: _Download, fd: int) -> None:
        """
        Send the published blob file ``fd`` as data frames straight from the kernel's page
        cache to the socket (``os.sendfile`` in a worker thread: no copy through this
        process, nothing buffered here, and a cold disk read never blocks the event loop),
        under the client's credit. The bytes on the wire are exactly those `_stream_pieces`
        sends (S5-16): each frame's head, then ``chunk_bytes`` of the file. Every frame the
        credit allows goes in one run (one thread hop when the socket takes it all).
        """
        chunk_bytes = self.server.chunk_bytes
        size = (await trio.to_thread.run_sync(os.fstat, fd)).st_size
        offset = 0
        while offset < size:
            # Invariant (S5-9): never send past the client's credit.
            while download.credit < min(chunk_bytes, size - offset):
                await download.lot.park()
            frames: list[tuple[bytes, int, int]] = []
            while offset < size and download.credit >= min(chunk_bytes, size - offset):
                count = min(chunk_bytes, size - offset)
                download.credit -= count
                frames.append((encode_data_frame_head(download.id, count), offset, count))
                offset += count
            # An abort (or a teardown) that came while we did not wait takes effect here,
            # before the run starts; one arriving from now on waits for the run (S5-17).
            await trio.lowlevel.checkpoint_if_cancelled()
            download.in_frame = True
            try:
                await self._send_file_frames(fd, frames)
            finally:
                download.in_frame = False
                if download.aborted:
                    download.scope.cancel()

    async def _send_file_frames(self, fd: int, frames: list[tuple[bytes, int, int]]) -> None:
        """
        Send whole frames, each ``(head, offset, count)``: ``head``, then ``count`` bytes of
        file ``fd`` from ``offset``.

        Not shielded, unlike `_send_parts`: the frames go out in worker-thread hops that wait
        for a writable socket, and a peer that stops reading must not pin the server. Only
        the connection itself is ever cancelled mid-run (an abort waits for the run, S5-17),
        so a run cut short, by cancellation or by an error, breaks the connection: nothing
        else is sent on it and it is torn down (S5-10).
        """
        stream = self.stream
        assert isinstance(stream, trio.SocketStream)
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self.broken:
                raise trio.BrokenResourceError("a frame was cut short on this connection")
            try:
                await send_file_frames(stream, fd, frames)
            except BaseException:
                # Conservatively broken, even if nothing went out: only a teardown (or a
                # broken socket) gets here, and the connection goes either way.
                self.broken = True
                self._tear_down()
                raise
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._tear_down()
            raise
        finally:
            lock.release()


class _CleanClose(Exception):
    """The peer closed its side between frames."""


@final
@attrs.define(eq=False)
class CacheServer:
    """
    Serves one `FsOutputRepository` to clients of the cache-server protocol.

    Args:
        repository: the store; the server uses its namespace views, never closes it.
        window: credit per stream in bytes (S5-9); at least ``chunk_bytes``.
        chunk_bytes: the largest chunk per frame.
        max_in_flight: requests one connection may have open at once.
        row_cache_bytes: rows kept in memory (S5-15); 0 turns the cache off. The server
            assumes it is the only writer of its folder's rows: if another process writes
            or prunes them, turn the cache off.
        max_frame_bytes: the largest frame accepted (a row travels in one frame); a
            connection holds at most one partial frame, so this bounds what a client can
            make the server buffer outside the stream windows.
    """

    repository: FsOutputRepository
    window: int = DEFAULT_WINDOW
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    row_cache_bytes: int = DEFAULT_ROW_CACHE_BYTES
    _rows: _RowCache = attrs.field(init=False)
    _connections: set[_Connection] = attrs.field(factory=set, init=False)
    _buffered: int = attrs.field(default=0, init=False)
    _peak: int = attrs.field(default=0, init=False)
    _protocol_errors: int = attrs.field(default=0, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _changed: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _accepting: trio.CancelScope | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._rows = _RowCache(max_bytes=max(0, self.row_cache_bytes))
        if (
            self.chunk_bytes < 1
            or self.window < self.chunk_bytes
            or self.max_in_flight < 1
            or self.max_frame_bytes < self.chunk_bytes + 4096
        ):
            raise ValueError(
                "need chunk_bytes >= 1, window >= chunk_bytes, max_in_flight >= 1 and "
                "max_frame_bytes >= chunk_bytes + 4096"
            )

    def _add_buffered(self, delta: int) -> None:
        self._buffered += delta
        if self._buffered > self._peak:
            self._peak = self._buffered

    def _wake(self) -> None:
        self._changed.unpark_all()

    def statistics(self) -> CacheServerStatistics:
        """The server's counters now."""
        return CacheServerStatistics(
            connections=len(self._connections),
            requests=sum(len(c.requests) for c in self._connections),
            buffered_bytes=self._buffered,
            peak_buffered_bytes=self._peak,
            window=self.window,
            chunk_bytes=self.chunk_bytes,
            protocol_errors=self._protocol_errors,
        )

    async def serve(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """
        Accept and serve connections on ``listener`` until cancelled or shut down.

        Cancellation: every connection is closed and its open requests cancelled (uploads
        leave no temp file); the listener is closed.
        """
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            with trio.CancelScope() as accepting:
                self._accepting = accepting
                task_status.started()
                async with listener:
                    while True:
                        try:
                            stream = await listener.accept()
                        except OSError as exc:  # pragma: no cover - EMFILE and friends
                            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
                                await trio.sleep(0.1)
                                continue
                            raise
                        nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        widen_send_buffer(stream)
        conn = _Connection(self, stream)
        self._connections.add(conn)
        try:
            await conn.run()
        except Exception as exc:  # pragma: no cover - a bug; keep serving the others
            print(f"cache server: internal error on a connection: {exc!r}", file=sys.stderr)
        finally:
            self._connections.discard(conn)
            self._wake()

    async def shutdown(self, grace: float = 10.0) -> None:
        """
        Stop accepting, refuse new requests, let open requests finish for up to ``grace``
        seconds, then cancel whatever is left (S5-12).

        Cancellation: the server is cancelled at once (as after the grace period).
        """
        self._draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        try:
            with trio.move_on_after(grace):
                while any(c.requests for c in self._connections):
                    await self._changed.park()
        finally:
            if self._scope is not None:
                self._scope.cancel()
        await trio.lowlevel.checkpoint()


# --- the socket -------------------------------------------------------------------------

#: Most buffers handed to one ``os.writev`` (IOV_MAX is 1024 on Linux).
_MAX_PARTS: Final = 64


def write_now(
    stream: trio.abc.Stream, parts: list[bytes | bytearray | memoryview]
) -> list[bytes | bytearray | memoryview]:
    """
    Write as much of the concatenation of ``parts`` as the kernel takes at once, with one
    non-blocking scatter write (``os.writev``) on ``stream``'s socket: no copy to join the
    parts and no trip through the scheduler. Returns the parts still to send (empty: all
    sent), for `write_rest`. A stream that is not a socket gets nothing written here.

    Each part's ``len`` must be its size in bytes (bytes, bytearray, or a byte memoryview).
    Hold the connection's send lock from this call until `write_rest` returns: a frame is
    sent whole or the connection is torn down.

    Raises:
        trio.BrokenResourceError: the socket broke (the peer is gone).
        trio.ClosedResourceError: the socket is closed.
    """
    if not isinstance(stream, trio.SocketStream):
        return parts
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket is closed")
    pending: list[bytes | bytearray | memoryview] = (
        parts if len(parts) <= _MAX_PARTS else [b"".join(parts)]
    )
    try:
        written = os.writev(fd, pending)
    except BlockingIOError:
        return pending
    except OSError as exc:
        raise trio.BrokenResourceError(f"the socket broke: {exc}") from exc
    index = 0
    while index < len(pending) and written >= len(pending[index]):
        written -= len(pending[index])
        index += 1
    rest = pending[index:]
    if written:
        rest[0] = memoryview(rest[0])[written:]
    return rest


async def receive_into(stream: trio.abc.Stream, decoder: FrameDecoder, size: int) -> None:
    """
    Receive up to ``size`` bytes from ``stream`` into ``decoder`` (an empty read is EOF).

    A socket reads straight into the decoder's reused buffer (`FrameDecoder.receive_buffer`):
    no fresh memory per read, which costs more than the copy it saves.

    Raises:
        trio.BrokenResourceError: the socket broke.
        WireFormatError: the bytes break a frame rule (see `FrameDecoder.receive_data`).

    Cancellation: nothing is taken from the socket (as ``receive_some``).
    """
    if not isinstance(stream, trio.SocketStream):
        decoder.receive_data(await stream.receive_some(size))
        return
    with decoder.receive_buffer(size) as view:
        try:
            count = await stream.socket.recv_into(view)
        except OSError as exc:
            raise trio.BrokenResourceError(f"the socket broke: {exc}") from exc
    decoder.commit_received(count)


def _send_frames_some(
    sock_fd: int, fd: int, frames: list[tuple[bytes, int, int]], done: int
) -> int:
    """
    In a worker thread: send the byte stream ``frames`` stands for (each frame its head,
    then ``count`` bytes of ``fd`` from ``offset``), from position ``done`` on, to the
    non-blocking socket ``sock_fd`` (``os.write`` for heads, ``os.sendfile`` for payloads)
    until all is sent or the socket is full. Returns the new position, or -1 if the file
    ended before a frame did.
    """
    start = 0  # where the current segment starts in the stream
    for head, offset, count in frames:
        end = start + len(head)
        while done < end:
            try:
                done += os.write(sock_fd, memoryview(head)[done - start :])
            except BlockingIOError:
                return done
        start = end
        end = start + count
        while done < end:
            try:
                sent = os.sendfile(sock_fd, fd, offset + done - start, end - done)
            except BlockingIOError:
                return done
            if not sent:
                return -1
            done += sent
        start = end
    return done


async def send_file_frames(
    stream: trio.SocketStream, fd: int, frames: list[tuple[bytes, int, int]]
) -> None:
    """
    Send ``frames`` (each ``(head, offset, count)``: ``head``, then ``count`` bytes of file
    ``fd`` from ``offset``) to ``stream``'s socket, whole and in order.

    Each step waits until the socket is writable, then runs ``os.write``/``os.sendfile`` in
    a worker thread (`trio.to_thread.run_sync`) until the socket is full: the kernel reads
    the file (from its page cache, or from disk when cold: blocking file I/O never runs on
    the event loop, as DESIGN asks) and copies it to the socket; no payload byte passes
    through this process. One thread hop per run when the reader keeps up.

    Raises:
        trio.BrokenResourceError: the socket broke, or the file ended before a frame did
            (the frame cannot be finished: the connection must be torn down).
        trio.ClosedResourceError: the socket is closed.

    Cancellation: a cancellation point while waiting for room (or before a hop), never
    during one; the bytes already sent stay sent, so a caller cancelled part-way must
    treat the connection as broken.
    """
    sock = stream.socket
    total = sum(len(head) + count for head, _, count in frames)
    done = 0
    while done < total:
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("the socket is closed")
        await trio.lowlevel.wait_writable(sock)
        sock_fd = sock.fileno()
        if sock_fd < 0:
            raise trio.ClosedResourceError("the socket is closed")
        try:
            done = await trio.to_thread.run_sync(_send_frames_some, sock_fd, fd, frames, done)
        except OSError as exc:
            raise trio.BrokenResourceError(f"the socket broke: {exc}") from exc
        if done < 0:
            raise trio.BrokenResourceError("the blob file ended before its frame did")


async def send_file(stream: trio.SocketStream, fd: int, offset: int, count: int) -> None:
    """
    Send ``count`` bytes of file ``fd`` from ``offset`` to ``stream``'s socket (a run of one
    headless frame, see `send_file_frames`).

    Raises:
        trio.BrokenResourceError: the socket broke, or the file ended first.
        trio.ClosedResourceError: the socket is closed.

    Cancellation: as `send_file_frames`.
    """
    await send_file_frames(stream, fd, [(b"", offset, count)])


async def write_rest(stream: trio.abc.Stream, rest: list[bytes | bytearray | memoryview]) -> None:
    """
    Send ``rest`` (what `write_now` left) with ``send_all``.

    Cancellation: call it under a shield; a frame cut half-way would corrupt the stream.
    """
    for part in rest:
        await stream.send_all(part)


#: Send buffer asked for on both ends: a whole chunk frame fits, so it moves in one wake-up
#: of each side instead of a dozen (the kernel caps it at net.core.wmem_max).
SEND_BUFFER_BYTES: Final = 2 * 1024 * 1024


def widen_send_buffer(stream: object) -> None:
    """Ask for `SEND_BUFFER_BYTES` of send buffer on a socket stream (best effort)."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.setsockopt(
                _stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_SNDBUF, SEND_BUFFER_BYTES
            )


#: Freed heap memory the server process keeps for reuse by default (`tune_allocator`).
DEFAULT_KEEP_FREED_BYTES: Final = 64 * 1024 * 1024
_M_TRIM_THRESHOLD: Final = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD: Final = -3
_MMAP_THRESHOLD: Final = 4 * 1024 * 1024


def tune_allocator(keep_freed_bytes: int = DEFAULT_KEEP_FREED_BYTES) -> bool:
    """
    Let this process's allocator (glibc) keep up to ``keep_freed_bytes`` of freed memory
    instead of handing it back to the kernel, and serve blocks up to 4 MiB from its heap.

    A stream moves through the server in megabyte chunks; by default glibc maps each one
    fresh and unmaps it when freed, so every chunk costs page faults on fresh memory (about
    0.7 s per GiB here, more than the copies). Only for a process that is a cache server:
    `python -m trio_taskgraph.cache_server` calls it (``--keep-freed-bytes 0`` skips it),
    never the library in a user's process. Best effort: False where there is no glibc.
    """
    if keep_freed_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    keep = min(keep_freed_bytes, 2**31 - 1)
    trimmed: object = mallopt(_M_TRIM_THRESHOLD, keep)
    mapped: object = mallopt(_M_MMAP_THRESHOLD, min(_MMAP_THRESHOLD, keep))
    return trimmed == 1 and mapped == 1


def prepare_socket_path(socket_path: str | os.PathLike[str]) -> Path:
    """
    Check (or create) the socket's folder and clear a stale socket file (S5-13).

    The folder must belong to this user and be closed to everyone else (mode ``0700`` or
    stricter); it is created that way if missing. A socket file nobody listens on (left by
    a killed server) is removed; one a live server listens on is an error.

    Raises:
        CacheServerError: the folder is open to others or not ours, the path is taken by
            something that is not a socket, or a live server already listens there.
    """
    path = Path(socket_path)
    if len(os.fsencode(path)) > 107:
        raise CacheServerError(f"socket path {str(path)!r} is longer than 107 bytes")
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise CacheServerError(
            f"the socket folder {str(folder)!r} must belong to this user with mode 0700 "
            f"(it has {stat.filemode(info.st_mode)}): other users could connect"
        )
    try:
        existing = path.lstat()
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(existing.st_mode):
        raise CacheServerError(f"{str(path)!r} exists and is not a socket")
    probe = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink(missing_ok=True)  # stale: its server is gone
        return path
    finally:
        probe.close()
    raise CacheServerError(f"a server already listens on {str(path)!r}")


async def serve_cache_server(
    root: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    *,
    window: int = DEFAULT_WINDOW,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    row_cache_bytes: int = DEFAULT_ROW_CACHE_BYTES,
    repository: FsOutputRepository | None = None,
    task_status: trio.TaskStatus[CacheServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Listen on ``socket_path`` and serve the folder ``root`` until cancelled or shut down.

    Use with ``await nursery.start(serve_cache_server, root, socket_path)``, which returns
    the `CacheServer` once the socket listens (mode ``0600``, in a folder only this user can
    enter). The socket file is removed on the way out.

    Args:
        root: the repository folder.
        socket_path: where to listen.
        window, chunk_bytes, max_in_flight, max_frame_bytes, row_cache_bytes: see
            `CacheServer`.
        repository: serve this repository instead of opening ``root`` (tests inject slow
            ones); it is not closed.

    Cancellation: connections are closed, uploads leave no temp file, the socket goes.
    """
    path = await trio.to_thread.run_sync(prepare_socket_path, socket_path)
    owned = repository is None
    if repository is None:
        repository = FsOutputRepository(root, read_chunk_bytes=chunk_bytes)
        # (a read per chunk: a download holds at most two chunks, S5-9)
    sock = trio.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        # Invariant (S5-13): only this user may connect (the folder is 0700 as well).
        os.chmod(path, 0o600)
        inode = os.stat(path).st_ino
        sock.listen(128)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    server = CacheServer(
        repository,
        window=window,
        chunk_bytes=chunk_bytes,
        max_in_flight=max_in_flight,
        max_frame_bytes=max_frame_bytes,
        row_cache_bytes=row_cache_bytes,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, trio.SocketListener(sock))
            task_status.started(server)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()
        sock.close()
        if owned:
            with trio.CancelScope(shield=True):
                await repository.aclose()
