"""
`CacheServerRepository`: an `OutputRepository` served by a cache-server process over a Unix
socket (spec/S5, S5-6 on).

Theory of operation:

- One connection per `connect_cache_server` (or `open_cache_server`) block: a handshake
  names the protocol version and the connection's namespace, then requests flow with ids
  chosen here, never reused, so many tasks share the connection and replies never cross
  (S5-8). One task at a time receives (S5-19): a caller whose reply is due and finds nobody
  receiving reads the socket itself, handing frames for other requests to their callers;
  the reader task (in the block's nursery) receives whenever a caller is parked behind
  another or a stream is open. Receiving never waits for anything but the socket.
- Namespaces: every request carries its namespace, which the server confines to the
  connection's namespace and those below it (S5-11). `with_namespace` returns a view on the
  same connection, so `RunPrivateRepository` (whose run namespaces sit below the backing's)
  works without a connection per run. A namespace outside the connection's needs its own
  `connect_cache_server`.
- Flow control (S5-9): an upload sends a chunk only within the credit the server granted;
  a download grants the server credit only as the caller takes chunks, so neither side
  buffers more than the window, however large the blob.
- Failure (S5-14): if the socket breaks or the server answers garbage, every request in
  flight and every later call raises `CacheServerError` at once. The client never
  restarts a server (it holds state); see `open_cache_server` for restarting one.
- Frames are sent whole: a frame interrupted half-way would corrupt the stream, so a send
  finishes under a shield (bounded by `SEND_TIMEOUT`; a server that stops reading for that
  long is treated as dead). A cancelled upload or download tells the server with `Abort`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from .._cache_server import (
    DETACH_BIN_BYTES,
    CacheServerStatistics,
    receive_into,
    widen_send_buffer,
    write_now,
    write_rest,
)
from .._core._codec import CLOSED, NEED_DATA, FrameDecoder
from .._core._keys import check_namespace, input_digest
from .._core._messages import (
    PROTOCOL_VERSION,
    Abort,
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
    ServerStats,
    Stats,
    Welcome,
    decode_server,
    encode_chunk_frame,
    encode_message,
)
from .._core._refs import MAX_REF_LENGTH, CacheRef
from .._errors import (
    CacheServerError,
    DanglingRefError,
    ForeignRefError,
    RefError,
    RepositoryError,
    WireFormatError,
)
from ._common import check_mime, check_task_type, iterate_closing, size_of_chunk
from ._protocol import DEFAULT_GC_MIN_AGE, GcReport, RepositoryStats

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

    from .._core._events import BytesLike

__all__ = [
    "CacheServerRepository",
    "CacheServerStatistics",
    "ClientStatistics",
    "connect_cache_server",
    "open_cache_server",
]

#: Seconds a frame may take to send (under a shield) before the server counts as dead.
SEND_TIMEOUT: Final = 30.0
#: Seconds the handshake may take.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds `open_cache_server` waits for the child's readiness line.
DEFAULT_STARTUP_TIMEOUT: Final = 30.0
#: Seconds between SIGTERM and SIGKILL when `open_cache_server` stops its child.
DEFAULT_STOP_GRACE: Final = 5.0
_RECEIVE_BYTES: Final = 1024 * 1024
#: Upload chunks at least this large (and immutable) join a frame uncopied.
_BY_REFERENCE: Final = 16 * 1024
#: Most buffers gathered into one upload frame.
_MAX_FRAME_PARTS: Final = 60

_KINDS: Final[dict[str, type[Exception]]] = {
    "foreign_ref": ForeignRefError,
    "dangling_ref": DanglingRefError,
    "wire": WireFormatError,
    "type": TypeError,
    "value": ValueError,
}


def _error_from(failed: Failed) -> Exception:
    # Invariant (S5-14): the server's error families come back as the same classes; anything
    # else the server reports (its repository, the protocol, shutdown, a bug) is ours.
    kind = _KINDS.get(failed.kind, CacheServerError)
    return kind(failed.message)


@final
@attrs.frozen(kw_only=True)
class ClientStatistics:
    """
    What a cache-server connection holds.

    Attributes:
        requests: requests in flight on the connection whose callers are still there.
        lingering_requests: requests whose callers left (cancelled, or a stream aborted)
            before the server's last message for them: each holds its slot until that
            message comes (S5-8), which the connection receives on its own (S5-19).
        buffered_bytes: download bytes received and not yet taken by the caller, plus frame
            bytes received and not yet decoded.
        peak_buffered_bytes: the most ``buffered_bytes`` has been.
        window: the credit window per stream the server announced.
    """

    requests: int
    lingering_requests: int
    buffered_bytes: int
    peak_buffered_bytes: int
    window: int


@attrs.define(eq=False)
class _Request:
    id: int
    lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    done: bool = False
    value: object = None
    error: Exception | None = None
    # its first message went out (a request never sent gets no reply)
    sent: bool = False
    # uploads: bytes we may still send; downloads: bytes the server may still send
    credit: int = 0
    # downloads
    download: bool = False
    opened: bool = False
    ended: bool = False
    chunks: collections.deque[bytes] = attrs.Factory(collections.deque)
    # messages (or the connection's failure) dispatched to this request so far: a caller
    # receiving for itself (S5-19) stops when this moves
    news: int = 0
    # tasks parked on ``lot`` that no message has woken yet (counted in `waiting`)
    parked: int = 0


@final
class _Connection:
    """One socket to the server, shared by a repository and its namespace views."""

    def __init__(self, stream: trio.SocketStream, socket_path: str, namespace: str) -> None:
        self.stream = stream
        self.socket_path = socket_path
        self.namespace = namespace
        # Invariant (S5-18): a download's payload is received straight into the bytes
        # object the caller gets (one copy, no msgpack copy).
        self.decoder = FrameDecoder(detach_bin_bytes=DETACH_BIN_BYTES)
        self.send_lock = trio.Lock()
        self.requests: dict[int, _Request] = {}
        self.next_id = 0
        self.failure: str | None = None
        self.window = 0
        self.chunk_bytes = 0
        # the server's max_in_flight request slots (S5-8), set by the handshake
        self.max_in_flight = 0
        self.slots = trio.Semaphore(0)
        self.buffered = 0
        self.peak = 0
        self.decoded = 0
        self.reader_scope = trio.CancelScope()
        # Invariant (S5-19): one task at a time receives from the socket. ``receiving``
        # says one does; the reader task takes over whenever a caller is parked behind
        # another (``waiting``) or a stream or a stalled send is open (``streams``).
        self.receiving = False
        self.waiting = 0
        self.streams = 0
        # requests whose callers left before the server's last message for them: each
        # keeps its slot until that message comes (S5-8)
        self.lingering: dict[int, _Request] = {}
        self.reader_lot = trio.lowlevel.ParkingLot()
        # the reader receives in this scope: one nobody needs any more is stopped at once
        # (cancelling a wait on the socket loses no byte)
        self.reader_pump: trio.CancelScope | None = None

    # -- failure --

    def dead(self) -> CacheServerError:
        """A fresh error for a caller of a dead connection (never a shared instance)."""
        return CacheServerError(self.failure or "the cache server connection is closed")

    def fail(self, reason: str) -> None:
        """Mark the connection dead and wake every request with `CacheServerError`."""
        if self.failure is None:
            self.failure = reason
            # Nothing more is read: what the decoder held is let go (a fresh decoder, in
            # case a receive in progress still writes into the old one).
            self._add_buffered(-self.decoded)
            self.decoded = 0
            self.decoder = FrameDecoder(detach_bin_bytes=DETACH_BIN_BYTES)
            # Nobody reads or writes the socket again (it is closed with the connection):
            # whoever waits on it, maybe a caller receiving for itself from a server that
            # stopped taking our frames, learns of the failure now.
            trio.lowlevel.notify_closing(self.stream.socket)
        for _ in self.lingering:
            self.slots.release()
        self.lingering.clear()
        for request in self.requests.values():
            if not request.done:
                request.done = True
                request.error = self.dead()
            self._wake(request)
        self.reader_lot.unpark_all()

    def _wake(self, request: _Request) -> None:
        """Tell ``request``'s caller something happened to it."""
        request.news += 1
        if request.parked:
            self.waiting -= request.parked
            request.parked = 0
            request.lot.unpark_all()

    def _add_buffered(self, delta: int) -> None:
        self.buffered += delta
        if self.buffered > self.peak:
            self.peak = self.buffered

    # -- sending --

    async def send(self, message: ClientMessage, *, checkpoint: bool = True) -> None:
        """
        Send one frame whole. Raises `CacheServerError` if the connection is (or goes) dead,
        `WireFormatError` if ``message`` cannot be encoded (nothing is sent then).

        A checkpoint, as trio's ``send_all`` is: a cancellation point before anything is
        sent (a cancelled caller sends nothing), then the frame goes whole, then a trip
        through the scheduler. With ``checkpoint`` false (for a caller that parks next) and
        a kernel that takes the frame at once, neither: no wake-up spent.
        """
        if self.failure is not None:
            await trio.lowlevel.checkpoint()
            raise self.dead()
        await self.send_parts([encode_message(message)], checkpoint=checkpoint)

    async def send_parts(
        self, parts: list[bytes | bytearray | memoryview], *, checkpoint: bool = True
    ) -> None:
        """Send whole frames (``parts`` concatenated, uncopied); see `send`."""
        if checkpoint:
            await trio.lowlevel.checkpoint_if_cancelled()
        lock = self.send_lock
        try:
            lock.acquire_nowait()  # uncontended: no extra trip through the scheduler
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self.failure is not None:
                raise self.dead()
            try:
                rest = write_now(self.stream, parts)
                if not rest:
                    if checkpoint:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                # While we wait for room, someone must keep reading: a server can only
                # take our bytes if its replies to us are taken (S5-19).
                self.open_stream()
                try:
                    with trio.CancelScope(shield=True) as scope:
                        scope.relative_deadline = SEND_TIMEOUT
                        await write_rest(self.stream, rest)
                finally:
                    self.close_stream()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.fail(f"the cache server connection broke: {str(exc) or type(exc).__name__}")
                raise self.dead() from None
            if scope.cancelled_caught:
                self.fail(f"the cache server took over {SEND_TIMEOUT} s to take a frame")
                raise self.dead()
        finally:
            lock.release()

    async def abort(self, request: _Request) -> None:
        """Tell the server to drop ``request`` (best effort; no reply)."""
        if self.failure is None:
            with trio.CancelScope(shield=True), contextlib.suppress(CacheServerError):
                await self.send(Abort(id=request.id))

    # -- receiving --

    def _next_buffered(self) -> object:
        """The next whole frame already received, or `NEED_DATA`; counts buffered bytes."""
        decoder = self.decoder
        frame = decoder.next_frame()
        held = decoder.buffered_bytes
        if held != self.decoded:
            self._add_buffered(held - self.decoded)
            self.decoded = held
        if frame is CLOSED:
            raise CacheServerError("the cache server closed the connection")
        return frame

    async def receive(self) -> object:
        """The next server message (used by the handshake and by whoever receives)."""
        while True:
            frame = self._next_buffered()
            if frame is not NEED_DATA:
                return decode_server(frame)
            await receive_into(self.stream, self.decoder, _RECEIVE_BYTES)

    async def handshake(self) -> None:
        await self.send(Hello(version=PROTOCOL_VERSION, namespace=self.namespace))
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            reply = await self.receive()
        if isinstance(reply, Failed):
            raise CacheServerError(f"the cache server refused the connection: {reply.message}")
        if not isinstance(reply, Welcome) or reply.version != PROTOCOL_VERSION:
            raise CacheServerError(f"the cache server answered the handshake with {reply!r}")
        if reply.chunk_bytes < 1 or reply.window < reply.chunk_bytes or reply.max_in_flight < 1:
            raise CacheServerError(f"the cache server announced bad limits: {reply!r}")
        self.window = reply.window
        self.chunk_bytes = reply.chunk_bytes
        self.max_in_flight = reply.max_in_flight
        self.slots = trio.Semaphore(reply.max_in_flight)

    async def _pump(self, more: Callable[[], bool]) -> None:
        """
        Receive and dispatch messages while ``more()``, then those already received; the
        caller holds ``receiving``. A broken connection or a server breaking the rules
        fails the connection (every request wakes with `CacheServerError`); only a
        cancellation leaves, and it leaves every received byte in the decoder.
        """
        try:
            while more():
                self._dispatch(await self.receive())
            # Replies that came in the same read go to their callers now, not after
            # another wake-up of whoever receives next.
            while (frame := self._next_buffered()) is not NEED_DATA:
                self._dispatch(decode_server(frame))
        except CacheServerError as exc:
            self.fail(str(exc))
        except WireFormatError as exc:
            self.fail(f"the cache server broke the wire rules: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(f"the cache server connection broke: {str(exc) or type(exc).__name__}")

    def _reader_wanted(self) -> bool:
        return (
            bool(self.waiting or self.streams or self.lingering or self.decoded)
            and self.failure is None
        )

    async def reader(self) -> None:
        """
        Receive for others (S5-19): whenever a caller is parked behind the one receiving,
        a stream or a stalled send is open, an aborted download's data may still come, or
        part of a frame has been read. Runs until the connection ends; never raises.
        """
        with self.reader_scope:
            while self.failure is None:
                if self.receiving or not self._reader_wanted():
                    await self.reader_lot.park()
                    continue
                self.receiving = True
                try:
                    with trio.CancelScope() as self.reader_pump:
                        await self._pump(self._reader_wanted)
                finally:
                    self.receiving = False
                    self.reader_pump = None
        # Cancelled by aclose: the connection is closed.
        self.fail("the cache server connection is closed")

    def open_stream(self) -> None:
        """An upload, download or stalled send begins: the reader keeps receiving."""
        self.streams += 1
        if not self.receiving:
            self.reader_lot.unpark_all()

    def close_stream(self) -> None:
        self.streams -= 1
        self._reader_may_stop()

    def _reader_may_stop(self) -> None:
        """
        The reader is waiting on the socket for nobody: stop it, so the next caller
        receives for itself (cancelling a wait on the socket loses no byte).
        """
        if self.reader_pump is not None and not self._reader_wanted():
            self.reader_pump.cancel()

    def _late(self, request_id: int, message: object) -> None:
        """
        A message for a request its caller left: dropped. If it is the server's last one
        for a lingering request (a reply, a download's end or failure), the request's slot
        is free again (S5-8).
        """
        request = self.lingering.get(request_id)
        if request is None:
            return  # nothing lingers under that id: a stray the server may send late
        if isinstance(message, Data):
            if not message.end:
                return  # data of an aborted download
        elif isinstance(message, Ok):
            if request.download and not request.opened:
                request.opened = True  # its data (then its end) follow
                return
        elif not isinstance(message, Failed):
            return  # credit for an abandoned upload
        del self.lingering[request_id]
        self.slots.release()

    async def wait(self, request: _Request) -> None:
        """
        Wait until something happens to ``request`` (a message for it, or the connection
        failing): callers loop ``while not <condition>: await conn.wait(request)``.

        Invariant (S5-19): if nobody is receiving, the caller receives for itself (and
        dispatches what it reads for others) until its own message is in: a round trip
        with nobody else waiting wakes the caller once, not the reader and then the caller.
        Otherwise it parks, and the one receiving wakes it.
        """
        if self.receiving:
            request.parked += 1
            self.waiting += 1
            try:
                await request.lot.park()
            finally:
                if request.parked:  # cancelled before a message woke it
                    request.parked -= 1
                    self.waiting -= 1
                    self._reader_may_stop()
            return
        self.receiving = True
        news = request.news
        try:
            await self._pump(lambda: request.news == news)
        finally:
            self.receiving = False
            if self._reader_wanted():
                self.reader_lot.unpark_all()

    def _dispatch(self, message: object) -> None:
        if isinstance(message, Failed) and message.id == -1:
            raise CacheServerError(f"the cache server closed the connection: {message.message}")
        request_id = getattr(message, "id", None)
        if not isinstance(request_id, int):
            raise CacheServerError(f"unexpected {type(message).__name__} after the handshake")
        request = self.requests.get(request_id)
        if request is None:
            self._late(request_id, message)  # the caller gave up on it (cancelled)
            return
        if isinstance(message, Data):
            if not request.download or not request.opened or request.ended:
                raise CacheServerError(f"unexpected data for request {request.id}")
            if message.end:
                request.ended = True
            elif message.data:
                # Invariant (S5-9): the server sends a download only within our credit.
                request.credit -= len(message.data)
                if request.credit < 0:
                    raise CacheServerError(
                        f"the cache server sent download {request.id} past its credit"
                    )
                request.chunks.append(message.data)
                self._add_buffered(len(message.data))
        elif isinstance(message, Credit):
            if message.n <= 0:
                raise CacheServerError(f"bad credit {message.n} for request {request.id}")
            request.credit += message.n
        elif isinstance(message, Ok):
            if request.download and not request.opened:
                request.opened = True
            else:
                request.done = True
                request.value = message.value
        elif isinstance(message, Failed):
            request.done = True
            request.error = _error_from(message)
        else:
            raise CacheServerError(f"unexpected {type(message).__name__} after the handshake")
        self._wake(request)

    # -- requests --

    async def open_request(self) -> _Request:
        """
        Take one of the server's ``max_in_flight`` request slots (S5-8), waiting for one
        if need be, and open a request in it. `close_request` gives the slot back.
        """
        if self.failure is not None:
            await trio.lowlevel.checkpoint()
            raise self.dead()
        slots = self.slots
        try:
            slots.acquire_nowait()  # a free slot costs no trip through the scheduler
        except trio.WouldBlock:
            await slots.acquire()
        return self.open_request_in_slot()

    def open_request_in_slot(self) -> _Request:
        """Open a request in a slot the caller holds (see `close_request`'s keep_slot)."""
        if self.failure is not None:
            self.slots.release()
            raise self.dead()
        self.next_id += 1
        request = _Request(id=self.next_id)
        self.requests[request.id] = request
        return request

    def close_request(self, request: _Request, *, keep_slot: bool = False) -> None:
        """
        The caller is done with ``request`` (a second call does nothing).

        Invariant (S5-8): its slot goes back only once the server has sent its last
        message for it (a reply; a download's end; a failure), so the server never counts
        more open requests than the client does. If that message has not come yet (the
        caller was cancelled, or aborted a stream), the request lingers and the one
        receiving frees the slot when it comes (S5-19). With ``keep_slot`` (a finished
        request only), the caller keeps the slot for `open_request_in_slot`.
        """
        if self.requests.pop(request.id, None) is None:
            return
        if request.chunks:
            self._add_buffered(-sum(len(c) for c in request.chunks))
            request.chunks.clear()
        finished = request.done or request.ended or not request.sent
        if keep_slot:
            assert finished, "only a finished request hands its slot on"
        elif finished or self.failure is not None:
            self.slots.release()
        else:
            self.lingering[request.id] = request
            if not self.receiving:
                self.reader_lot.unpark_all()

    async def call(self, build: Callable[[int], ClientMessage]) -> object:
        """Send ``build(request_id)`` and wait for its reply's value (or raise its error)."""
        # A cancelled caller sends nothing (S5-16): no request, so nothing lingers.
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self.call_in(await self.open_request(), build)

    async def call_in(self, request: _Request, build: Callable[[int], ClientMessage]) -> object:
        """As `call`, in ``request`` (just opened); closes it."""
        try:
            # No trip through the scheduler when the frame goes at once: the wait below
            # is this call's checkpoint (a round trip is one wake-up, S5-19).
            await self.send(build(request.id), checkpoint=False)
            request.sent = True
            while not request.done:
                await self.wait(request)
        finally:
            self.close_request(request)
        if request.error is not None:
            raise request.error
        return request.value

    async def aclose(self) -> None:
        self.fail("the cache server connection is closed")
        self.reader_scope.cancel()
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


@final
class _Download:
    """The chunks of one download, taken under flow control."""

    def __init__(self, conn: _Connection, request: _Request) -> None:
        self._conn = conn
        self._request = request
        self._ungranted = 0  # bytes the caller took that the server has no credit for yet
        self.closed = False

    def __aiter__(self) -> _Download:
        return self

    async def __anext__(self) -> bytes:
        request = self._request
        conn = self._conn
        if self.closed:
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the blob stream was used after its `async with` block")
        # A cancelled reader gets Cancelled, even when a chunk is already here (the credit
        # send below is shielded, so it would not raise).
        await trio.lowlevel.checkpoint_if_cancelled()
        while not request.chunks and not request.ended and not request.done:
            await conn.wait(request)
        if request.chunks:
            chunk = request.chunks.popleft()
            conn._add_buffered(-len(chunk))
            self._ungranted += len(chunk)
            if not request.ended and (
                not request.chunks or self._ungranted >= max(1, conn.window // 4)
            ):
                # Invariant (S5-9): credit goes back only for bytes the caller has taken: a
                # quarter window at a time, and always once nothing is left here (the
                # server then waits for it), so the stream never stalls on us.
                n, self._ungranted = self._ungranted, 0
                request.credit += n
                await conn.send(Credit(id=request.id, n=n))
            else:
                await trio.lowlevel.checkpoint()
            return chunk
        await trio.lowlevel.checkpoint()
        if request.error is not None:
            raise request.error
        raise StopAsyncIteration


@final
@attrs.define(eq=False, init=False)
class CacheServerRepository:
    """
    An `OutputRepository` whose rows and blobs live in a cache-server process.

    Made by `connect_cache_server` or `open_cache_server`, never directly. Rows are keyed by
    ``input_digest(inputs)`` computed here, so inputs never cross the wire. Every method is
    safe to call from many tasks at once; all share one connection.

    Attributes:
        socket_path: the server's socket.
        process: the server's process when `open_cache_server` started it, else None.
    """

    socket_path: str
    process: trio.Process | None
    _conn: _Connection
    _namespace: str
    _owner: bool
    _closed: bool

    def __init__(self) -> None:
        raise TypeError("use connect_cache_server() or open_cache_server()")

    @classmethod
    def _make(
        cls, conn: _Connection, namespace: str, *, owner: bool, process: trio.Process | None
    ) -> CacheServerRepository:
        repo = cls.__new__(cls)
        repo.socket_path = conn.socket_path
        repo.process = process
        repo._conn = conn
        repo._namespace = namespace
        repo._owner = owner
        repo._closed = False
        return repo

    @property
    def namespace(self) -> str:
        """This view's namespace."""
        return self._namespace

    def with_namespace(self, namespace: str) -> CacheServerRepository:
        """
        Return a view of the same server in ``namespace``, on the same connection.

        Raises:
            ValueError: ``namespace`` is invalid, or is not the connection's namespace or
                one below it (``<connection namespace>.<more>``): open another connection
                with `connect_cache_server` for another tenant.
        """
        own = self._conn.namespace
        check_namespace(namespace)
        if namespace != own and not namespace.startswith(own + "."):
            raise ValueError(
                f"namespace {namespace!r} is outside this connection's namespace {own!r}; "
                "use connect_cache_server(socket_path, namespace=...) for another tenant"
            )
        return CacheServerRepository._make(self._conn, namespace, owner=False, process=self.process)

    def _check_open(self) -> _Connection:
        if self._closed:
            raise RepositoryError("the repository is closed")
        return self._conn

    async def _call(self, build: Callable[[int, str], ClientMessage]) -> object:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the repository is closed")
        ns = self._namespace
        return await self._conn.call(lambda request_id: build(request_id, ns))

    # -- rows --

    async def save_output(
        self, task_type: str, inputs: object, output: Mapping[str, object]
    ) -> None:
        """
        Store ``output`` as the row of ``(task_type, inputs)``, replacing any older row.

        Raises:
            TypeError: ``output`` is not a str-keyed mapping of values the wire carries, or
                ``inputs`` cannot be keyed.
            CacheServerError: the server failed, died or refused.

        Cancellation: the row may or may not be stored (the server finishes a request it
        has received); the connection stays usable.
        """
        check_task_type(task_type)
        digest = input_digest(inputs)
        if not isinstance(output, Mapping):
            raise TypeError(f"an output must be a mapping, not {type(output).__name__}")
        output = dict(output)
        for key in output:
            if not isinstance(key, str):
                raise TypeError(f"output keys must be str, not {type(key).__name__}")
        try:
            await self._call(
                lambda i, ns: SaveOutput(
                    id=i, ns=ns, task_type=task_type, digest=digest, output=output
                )
            )
        except WireFormatError as exc:
            if self._conn.failure is not None:
                raise
            raise TypeError(f"output cannot be stored: {exc}") from None

    async def get_output(self, task_type: str, inputs: object) -> dict[str, object] | None:
        """
        Return the row of ``(task_type, inputs)``, or None.

        Raises:
            CacheServerError: the server failed, died or refused.

        Cancellation: nothing to leave behind.
        """
        check_task_type(task_type)
        digest = input_digest(inputs)
        value = await self._call(
            lambda i, ns: GetOutput(id=i, ns=ns, task_type=task_type, digest=digest)
        )
        if value is not None and not isinstance(value, dict):
            raise CacheServerError(f"the server sent a {type(value).__name__} as a row")
        return value

    # -- blobs --

    async def save_output_stream(
        self,
        task_type: str,
        inputs: object,
        port: str,
        chunks: AsyncIterable[BytesLike],
        *,
        mime: str | None = None,
    ) -> CacheRef:
        """
        Stream ``chunks`` to a new blob on the server and return its ref.

        Sends at most ``window`` bytes ahead of what the server has taken (S5-9), in frames
        of at most ``chunk_bytes``.

        Raises:
            TypeError: a chunk is not bytes-like, or ``mime`` is not a str.
            CacheServerError: the server failed, died or refused.
            Exception: whatever iterating ``chunks`` raised, unchanged.

        Cancellation: the server is told to abort; it discards the upload and leaves no
        temp file. No ref is returned, no blob published.
        """
        del inputs, port  # the server names blobs uniquely; nothing is derived from them
        async with iterate_closing(chunks) as iterator:
            if self._closed:
                await trio.lowlevel.checkpoint()
                raise RepositoryError("the repository is closed")
            check_task_type(task_type)
            check_mime(mime)
            return await self._upload(task_type, mime, iterator)

    async def _upload(
        self, task_type: str, mime: str | None, chunks: AsyncIterator[BytesLike]
    ) -> CacheRef:
        conn = self._conn
        request = await conn.open_request()
        request.credit = conn.window
        ended = False
        conn.open_stream()
        try:
            await conn.send(
                SaveStream(id=request.id, ns=self._namespace, task_type=task_type, mime=mime)
            )
            request.sent = True
            step = conn.chunk_bytes
            # Chunks are gathered into frames of up to chunk_bytes (a frame costs a trip
            # through the scheduler on both sides, whatever its size). Large immutable
            # chunks join a frame by reference and leave in one scatter write; small or
            # mutable ones (a producer may reuse its bytearray) are copied in.
            parts: list[bytes | bytearray | memoryview] = []
            gathered = 0  # bytes in parts
            pending = bytearray()  # small chunks, copied

            async def send_frame() -> None:
                nonlocal parts, gathered, pending
                if pending:
                    parts.append(pending)
                    gathered += len(pending)
                    pending = bytearray()
                frame, size = parts, gathered
                parts, gathered = [], 0
                if not size:
                    return
                # Invariant (S5-9): never send past the server's credit.
                while request.credit < size and not request.done:
                    await conn.wait(request)
                if not request.done:
                    request.credit -= size
                    await conn.send_parts(encode_chunk_frame(request.id, frame, size))

            async for chunk in chunks:
                size = size_of_chunk(chunk)
                if request.done:
                    break  # the server failed the upload: stop pulling chunks
                if not size:
                    continue
                view = memoryview(chunk).cast("B")
                offset = 0
                while offset < size and not request.done:
                    room = step - gathered - len(pending)
                    take = min(room, size - offset)
                    if type(chunk) is bytes and take >= _BY_REFERENCE:
                        if pending:
                            parts.append(pending)
                            gathered += len(pending)
                            pending = bytearray()
                        parts.append(chunk if take == size else view[offset : offset + take])
                        gathered += take
                    else:
                        pending += view[offset : offset + take]
                    offset += take
                    if gathered + len(pending) >= step or len(parts) >= _MAX_FRAME_PARTS:
                        await send_frame()
            if not request.done:
                await send_frame()
            if not request.done:
                await conn.send(EndStream(id=request.id))
                ended = True
                while not request.done:
                    await conn.wait(request)
            if request.error is not None:
                raise request.error
            if not ended:  # pragma: no cover - the server replied Ok before the end
                raise CacheServerError("the cache server finished an upload early")
        except BaseException:
            await self._abandon_upload(request, ended=ended)
            raise
        finally:
            conn.close_stream()
            conn.close_request(request)
        ref = request.value
        if type(ref) is not CacheRef:
            raise CacheServerError(f"the cache server returned a {type(ref).__name__} as a ref")
        return ref

    async def _abandon_upload(self, request: _Request, *, ended: bool) -> None:
        """
        Make sure an upload we give up on publishes nothing (S5-10): abort it, and if it
        was already complete (its last chunk sent), wait for the server's verdict and delete
        the blob if it was published before the abort arrived.
        """
        conn = self._conn
        if request.sent and not (ended and request.done):
            # Also after an early verdict: the server keeps the upload open until it sees
            # our end or abort (S5-8).
            await conn.abort(request)
        if not ended or conn.failure is not None:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.relative_deadline = SEND_TIMEOUT
            while not request.done:
                await conn.wait(request)
            ref = request.value
            if type(ref) is CacheRef:
                ns = self._namespace
                with contextlib.suppress(CacheServerError, RefError):
                    # In the upload's slot (S5-8): the upload is finished, and waiting for
                    # another slot could wait on other callers.
                    conn.close_request(request, keep_slot=True)
                    await conn.call_in(
                        conn.open_request_in_slot(), lambda i: DeleteRef(id=i, ns=ns, ref=ref)
                    )

    async def get_output_by_ref(self, ref: CacheRef) -> bytes:
        """
        Return the bytes of the blob ``ref`` names (streamed under flow control).

        Raises:
            ForeignRefError: the server (this namespace) did not issue ``ref``.
            DanglingRefError: the blob is gone.
            CacheServerError: the server failed or died.

        Cancellation: the download is aborted; nothing to leave behind.
        """
        out = bytearray()
        async with self.open_output_stream_by_ref(ref) as chunks:
            async for chunk in chunks:
                out += chunk
        return bytes(out)

    def _check_ref(self, ref: object) -> CacheRef:
        if type(ref) is not CacheRef:
            raise ForeignRefError(f"not a CacheRef: {type(ref).__name__}")
        text: object = ref.ref
        if not isinstance(text, str) or len(text) > MAX_REF_LENGTH:
            raise ForeignRefError("a CacheRef this repository could not have issued")
        return ref

    @asynccontextmanager
    async def open_output_stream_by_ref(self, ref: CacheRef) -> AsyncIterator[_Download]:
        """
        Open the blob ``ref`` names: ``async with repo.open_output_stream_by_ref(ref) as it``
        yields an async iterator of chunks (at most ``chunk_bytes`` each). The server sends
        a chunk only when the caller has taken enough earlier ones (S5-9).

        Raises (on entry):
            ForeignRefError: the server (this namespace) did not issue ``ref``.
            DanglingRefError: the blob is gone.
            CacheServerError: the server failed or died (also while iterating).

        Cancellation: leaving the block early (however) aborts the download on the server.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the repository is closed")
        try:
            checked = self._check_ref(ref)
        except ForeignRefError:
            await trio.lowlevel.checkpoint()
            raise
        conn = self._conn
        request = await conn.open_request()
        request.download = True
        request.credit = conn.window
        download = _Download(conn, request)
        conn.open_stream()
        try:
            try:
                await conn.send(ReadStream(id=request.id, ns=self._namespace, ref=checked))
                request.sent = True
            except WireFormatError:
                raise ForeignRefError("a CacheRef the wire cannot carry") from None
            while not request.opened and not request.done:
                await conn.wait(request)
            if request.error is not None:
                raise request.error
            yield download
        finally:
            download.closed = True
            if request.sent and not request.ended and not request.done:
                await conn.abort(request)
            conn.close_stream()
            conn.close_request(request)

    async def delete_output_by_ref(self, ref: CacheRef) -> None:
        """
        Remove the blob ``ref`` names; a blob already gone is no error.

        Raises:
            ForeignRefError: the server (this namespace) did not issue ``ref``.
            CacheServerError: the server failed or died.

        Cancellation: the blob may or may not be removed (never half-removed).
        """
        try:
            checked = self._check_ref(ref)
        except ForeignRefError:
            await trio.lowlevel.checkpoint()
            raise
        try:
            await self._call(lambda i, ns: DeleteRef(id=i, ns=ns, ref=checked))
        except WireFormatError:
            if self._conn.failure is not None:
                raise
            raise ForeignRefError("a CacheRef the wire cannot carry") from None

    # -- pruning --

    async def clear_older_than(self, seconds: float) -> int:
        """
        Remove rows at least ``seconds`` old with the blobs only they used; returns the
        number of rows removed.

        Cancellation: committed on the server entirely or not at all.
        """
        if seconds != seconds:
            raise ValueError("seconds must be a number, not NaN")
        value = await self._call(lambda i, ns: ClearOlderThan(id=i, ns=ns, seconds=float(seconds)))
        return _int(value)

    async def delete_by_task_type_prefix(self, prefix: str) -> int:
        """
        Remove rows whose task type starts with ``prefix`` (and blobs only they used);
        returns the number of rows removed.

        Cancellation: committed on the server entirely or not at all.
        """
        if not isinstance(prefix, str):
            raise TypeError("prefix must be a str")
        return _int(await self._call(lambda i, ns: DeletePrefix(id=i, ns=ns, prefix=prefix)))

    # -- capabilities, statistics, collection, closing --

    def supports_streaming(self) -> bool:
        """True: uploads stream under flow control."""
        return True

    def supports_streaming_reads(self) -> bool:
        """True: downloads stream under flow control."""
        return True

    async def stats(self) -> RepositoryStats:
        """
        Count this namespace's rows, blobs and blob bytes (on the server).

        Cancellation: nothing to leave behind.
        """
        rows, blobs, size = _ints(await self._call(lambda i, ns: Stats(id=i, ns=ns)), 3)
        return RepositoryStats(rows=rows, blobs=blobs, bytes=size)

    async def gc(self, *, min_age: float = DEFAULT_GC_MIN_AGE) -> GcReport:
        """
        Collect this namespace's unreferenced blobs on the server (see
        `FsOutputRepository.gc`).

        Cancellation: each step commits on the server entirely or not at all.
        """
        blobs, size, temps = _ints(
            await self._call(lambda i, ns: Gc(id=i, ns=ns, min_age=float(min_age))), 3
        )
        return GcReport(blobs=blobs, bytes=size, temp_files=temps)

    async def server_stats(self) -> CacheServerStatistics:
        """
        The server's own counters: connections, open requests, buffered and peak buffered
        bytes (S5-9).

        Cancellation: nothing to leave behind.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise RepositoryError("the repository is closed")
        value = await self._conn.call(lambda i: ServerStats(id=i))
        if not isinstance(value, dict):
            raise CacheServerError("the server sent malformed statistics")
        try:
            return CacheServerStatistics(**{str(k): _int(v) for k, v in value.items()})
        except TypeError:
            raise CacheServerError("the server sent malformed statistics") from None

    def statistics(self) -> ClientStatistics:
        """This connection's counters (shared by every view of it)."""
        conn = self._conn
        return ClientStatistics(
            requests=len(conn.requests),
            lingering_requests=len(conn.lingering),
            buffered_bytes=conn.buffered,
            peak_buffered_bytes=conn.peak,
            window=conn.window,
        )

    async def aclose(self) -> None:
        """
        Close this repository: the connection if this is the repository the views came
        from, just this view otherwise. Idempotent.

        Cancellation: closed even when cancelled.
        """
        self._closed = True
        if self._owner:
            await self._conn.aclose()
        await trio.lowlevel.checkpoint()


def _int(value: object) -> int:
    if type(value) is not int:
        raise CacheServerError(f"the cache server sent a {type(value).__name__}, not an int")
    return value


def _ints(value: object, n: int) -> list[int]:
    if not isinstance(value, list) or len(value) != n:
        raise CacheServerError("the cache server sent a malformed reply")
    return [_int(v) for v in value]


@asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """Let the body's own exception leave a nursery as itself, not in a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner = group.exceptions
        real = [e for e in inner if not isinstance(e, trio.Cancelled)]
        if len(real) == 1 and not isinstance(real[0], BaseExceptionGroup):
            exc = real[0]
            context = exc.__context__
            try:
                raise exc
            finally:
                exc.__context__ = context
                del exc, group, real, inner
        raise


@asynccontextmanager
async def connect_cache_server(
    socket_path: str | os.PathLike[str],
    *,
    namespace: str = "default",
    _process: trio.Process | None = None,
) -> AsyncIterator[CacheServerRepository]:
    """
    Connect to a running cache server: ``async with connect_cache_server(path) as repo``.

    Args:
        socket_path: the server's Unix socket.
        namespace: the connection's namespace (tenant): every request is confined to it and
            to the namespaces below it (S5-11).

    Yields:
        A `CacheServerRepository`; it is closed when the block exits.

    Raises:
        CacheServerError: nothing listens there, or the server refused the handshake.

    Cancellation: the connection is closed; open uploads are discarded by the server.
    """
    check_namespace(namespace)
    path = os.fspath(socket_path)
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise CacheServerError(f"cannot connect to the cache server at {path!r}: {exc}") from None
    widen_send_buffer(stream)
    conn = _Connection(stream, path, namespace)
    try:
        try:
            await conn.handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, OSError, WireFormatError) as exc:
            raise CacheServerError(
                f"the cache server at {path!r} failed the handshake: {str(exc) or type(exc).__name__}"
            ) from None
        repo = CacheServerRepository._make(conn, namespace, owner=True, process=_process)
        async with _unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(conn.reader)
            try:
                yield repo
            finally:
                await repo.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()


# --- starting a server ------------------------------------------------------------------


def _make_private_dir() -> str:
    # Short, under /tmp: Unix socket paths are limited to ~107 bytes. mkdtemp is mode 0700.
    return tempfile.mkdtemp(prefix="tg-", dir="/tmp" if os.path.isdir("/tmp") else None)


async def _read_ready_line(stdout: trio.abc.ReceiveStream) -> bytes:
    line = bytearray()
    while b"\n" not in line:
        data = await stdout.receive_some(4096)
        if not data:
            break
        line += data
        if len(line) > 65536:
            break
    return bytes(line)


@asynccontextmanager
async def open_cache_server(
    path: str | os.PathLike[str],
    *,
    socket_path: str | os.PathLike[str] | None = None,
    namespace: str = "default",
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    stop_grace: float = DEFAULT_STOP_GRACE,
) -> AsyncIterator[CacheServerRepository]:
    """
    Start a cache server for the folder ``path`` as a child process and connect to it.

    ``async with open_cache_server(folder) as repo`` runs ``python -m
    trio_taskgraph.cache_server --root path --socket socket_path`` in a nursery, waits for
    its readiness line, and yields a connected `CacheServerRepository` (``repo.socket_path``
    names the socket, ``repo.process`` is the child). On exit (also on error or
    cancellation) the connection is closed and the child stopped: SIGTERM, then SIGKILL
    after ``stop_grace`` seconds; it is reaped (no zombie) and its socket removed.

    If the server dies, every call raises `CacheServerError`; the client never restarts a
    server by itself, because the server holds state. To restart, leave the block and open
    a new one on the same folder: the folder is crash-safe (S4-3, S4-5), so blobs published
    before the crash are whole and temp files of the dead server are swept.

    Args:
        path: the repository folder.
        socket_path: where the server listens (its folder must be ``0700``); default: a new
            private folder under ``/tmp``, removed on exit.
        namespace: the connection's namespace.
        startup_timeout: seconds to wait for the server to listen.
        stop_grace: seconds between SIGTERM and SIGKILL on exit.

    Raises:
        CacheServerError: the server did not start in time or exited; the message includes
            its stderr.

    Cancellation: the child is stopped and reaped, the socket and private folder removed.
    """
    private = await trio.to_thread.run_sync(_make_private_dir)
    sock = os.fspath(socket_path) if socket_path is not None else os.path.join(private, "s")
    errlog_path = Path(private) / "stderr.log"
    command = [
        sys.executable,
        "-m",
        "trio_taskgraph.cache_server",
        "--root",
        os.fspath(path),
        "--socket",
        sock,
    ]

    async def stop(process: trio.Process) -> None:
        # Invariant (S5-12): SIGTERM, a grace period, then SIGKILL; always reaped.
        with contextlib.suppress(OSError):
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(stop_grace):
            await process.wait()
            return
        with contextlib.suppress(OSError):
            process.kill()

    try:
        errlog = await trio.to_thread.run_sync(errlog_path.open, "wb")
        try:
            async with _unwrapped(), trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    _run_child, command, errlog.fileno(), stop
                )
                assert process.stdout is not None
                with trio.move_on_after(startup_timeout):
                    line = await _read_ready_line(process.stdout)
                if not line.startswith(b"READY"):
                    await stop(process)
                    await process.wait()
                    stderr = await trio.to_thread.run_sync(
                        errlog_path.read_text, "utf-8", "replace"
                    )
                    why = (
                        f"exited with code {process.returncode}"
                        if process.returncode is not None
                        else f"was not ready within {startup_timeout} s"
                    )
                    raise CacheServerError(
                        f"the cache server for {os.fspath(path)!r} {why}; its stderr:\n"
                        f"{stderr.strip()[-4000:]}"
                    )
                try:
                    async with connect_cache_server(
                        sock, namespace=namespace, _process=process
                    ) as repo:
                        yield repo
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            errlog.close()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_cleanup, sock, private)


async def _run_child(
    command: list[str],
    stderr: int,
    stop: Callable[[trio.Process], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    await trio.run_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        check=False,
        deliver_cancel=stop,
        task_status=task_status,
    )


def _cleanup(sock: str, private: str) -> None:
    with contextlib.suppress(OSError):
        if Path(sock).is_socket():
            os.unlink(sock)
    shutil.rmtree(private, ignore_errors=True)
