"""
Byte-budget channels: trio memory channels whose buffer is bounded by bytes, not items.

This is the trio shell over `trio_taskgraph._core._budget.ByteBudget`, shaped like trio's own
``_channel.py`` (one shared state, thin send and receive endpoints, ``clone``/``close``). The
shell measures items, parks and wakes tasks; every decision (admit, park, whom to wake) is
the core's. The rules are in spec/S2-byte-budget.md and the core's module docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar, final, overload

import attrs
import trio
from outcome import Error, Value

from ._core._budget import (
    PARK,
    ByteBudget,
    ByteChannelStatistics,
    ReceiveSideClosed,
    SendSideClosed,
    check_high_water_bytes,
    check_size,
)
from ._core._constants import DEFAULT_HIGH_WATER_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import Self

    from ._core._events import BytesLike

__all__ = ["ByteReceiveChannel", "ByteSendChannel", "open_byte_channel"]

T = TypeVar("T")
SendT = TypeVar("SendT", contravariant=True)
ReceiveT = TypeVar("ReceiveT", covariant=True)

_Task = trio.lowlevel.Task
_reschedule = trio.lowlevel.reschedule


def _default_size(item: object) -> int:
    # Invariant (S2-1): the default size is the item's buffer size in bytes.
    if isinstance(item, bytes | bytearray):
        return len(item)
    if isinstance(item, memoryview):
        return item.nbytes
    raise TypeError(
        "a byte channel opened without size_of carries bytes, bytearray or memoryview, "
        f"not {type(item).__name__}; pass size_of= to budget other items"
    )


def _measure(size_of: Callable[[T], int] | None, item: T) -> int:
    if size_of is None:
        return _default_size(item)
    try:
        size = size_of(item)
    except Exception as exc:
        raise TypeError(
            f"size_of raised {type(exc).__name__} for a {type(item).__name__} item: {exc}"
        ) from exc
    return check_size(size, "size_of")


@overload
def open_byte_channel(
    high_water_bytes: int = ..., *, size_of: None = None
) -> tuple[ByteSendChannel[BytesLike], ByteReceiveChannel[BytesLike]]: ...


@overload
def open_byte_channel(
    high_water_bytes: int = ..., *, size_of: Callable[[T], int]
) -> tuple[ByteSendChannel[T], ByteReceiveChannel[T]]: ...


def open_byte_channel(
    high_water_bytes: int = DEFAULT_HIGH_WATER_BYTES,
    *,
    size_of: Callable[[T], int] | None = None,
) -> tuple[ByteSendChannel[T], ByteReceiveChannel[T]]:
    """
    Open a channel whose buffer is bounded by the bytes it holds.

    A send is admitted while fewer than ``high_water_bytes`` are buffered and parks
    otherwise; a chunk larger than the mark waits for an empty buffer and enters alone, so
    the buffer never holds more than ``high_water_bytes`` plus one chunk. Parked senders are
    admitted strictly in order, and each receive wakes exactly the senders its freed room
    admits. Everything else is as for `trio.open_memory_channel`: ``clone``, ``close``,
    ``aclose``, ``send_nowait`` / ``receive_nowait`` raising `trio.WouldBlock`, async
    iteration, `trio.BrokenResourceError` once every receive handle is closed,
    `trio.EndOfChannel` once every send handle is closed and the buffer is drained.

    Args:
        high_water_bytes: the byte budget (a positive int).
        size_of: ``size_of(item) -> int``, the bytes an item counts for. By default an item
            must be ``bytes``, ``bytearray`` or ``memoryview`` and counts its buffer size
            (``nbytes``); pass a function to budget, say, stream events by payload size.
            An item is measured once, when it is sent, and never copied: do not resize a
            ``bytearray`` after sending it (as for `BinaryDelta` chunks, S1-2).

    Returns:
        ``(send_channel, receive_channel)``: data flows from left to right.

    Raises:
        TypeError: ``high_water_bytes`` is not an int.
        ValueError: ``high_water_bytes`` is not positive.
    """
    if size_of is not None and not callable(size_of):
        raise TypeError(f"size_of must be callable or None, not {type(size_of).__name__}")
    budget: ByteBudget[T, _Task] = ByteBudget(check_high_water_bytes(high_water_bytes))
    return ByteSendChannel(budget, size_of), ByteReceiveChannel(budget)


@final
@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class ByteSendChannel(trio.abc.SendChannel[SendT]):
    """
    The sending end of a byte-budget channel; made by `open_byte_channel` or `clone`.
    """

    _budget: ByteBudget[SendT, _Task]
    _size_of: Callable[[SendT], int] | None
    _closed: bool = False

    def __repr__(self) -> str:
        return f"<byte send channel at {id(self):#x}, using budget at {id(self._budget):#x}>"

    def statistics(self) -> ByteChannelStatistics:
        """Return a frozen `ByteChannelStatistics` snapshot of the channel (all clones)."""
        return self._budget.statistics()

    @trio.lowlevel.enable_ki_protection
    def send_nowait(self, value: SendT) -> None:
        """
        Like `send`, but raise `trio.WouldBlock` instead of parking.

        Raises:
            trio.WouldBlock: the budget does not admit ``value`` now, or a sender is parked.
            trio.ClosedResourceError: this handle is closed.
            trio.BrokenResourceError: every receive handle is closed.
            TypeError, ValueError: ``value`` cannot be measured (see ``size_of``).
        """
        if self._closed:
            raise trio.ClosedResourceError("this byte send channel is closed")
        size_of = self._size_of
        size = (
            len(value) if size_of is None and isinstance(value, bytes) else _measure(size_of, value)
        )
        try:
            verdict = self._budget.send(value, size)
        except ReceiveSideClosed:
            raise trio.BrokenResourceError("every receive channel is closed") from None
        if verdict is None:
            return
        if verdict is PARK:
            raise trio.WouldBlock
        _reschedule(verdict, Value(value))

    @trio.lowlevel.enable_ki_protection
    async def send(self, value: SendT) -> None:
        """
        Send ``value``, parking while the byte budget does not admit it.

        Raises:
            trio.ClosedResourceError: this handle is closed (also if it is closed while the
                send is parked).
            trio.BrokenResourceError: every receive handle is closed (also while parked).
            TypeError, ValueError: ``value`` cannot be measured (see ``size_of``).

        Cancellation:
            Atomic: either ``value`` was admitted (and will be received in order) and
            ``send`` returns, or it raises `trio.Cancelled` and nothing was enqueued or
            counted. A cancelled parked sender may let the senders behind it in.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("this byte send channel is closed")
        size_of = self._size_of
        size = (
            len(value) if size_of is None and isinstance(value, bytes) else _measure(size_of, value)
        )
        budget = self._budget
        try:
            verdict = budget.send(value, size)
        except ReceiveSideClosed:
            raise trio.BrokenResourceError("every receive channel is closed") from None
        if verdict is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if verdict is not PARK:
            _reschedule(verdict, Value(value))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return

        task = trio.lowlevel.current_task()
        budget.park_sender(task, value, size, self)

        def abort_fn(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            for admitted in budget.cancel_sender(task):
                _reschedule(admitted)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort_fn)

    @trio.lowlevel.enable_ki_protection
    def clone(self) -> ByteSendChannel[SendT]:
        """
        Return another send handle on the same channel.

        Receivers see `trio.EndOfChannel` only once every send handle is closed.

        Raises:
            trio.ClosedResourceError: this handle is closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this byte send channel is closed")
        self._budget.open_send_handle()
        return ByteSendChannel(self._budget, self._size_of)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @trio.lowlevel.enable_ki_protection
    def close(self) -> None:
        """
        Close this handle (idempotent, not a checkpoint).

        Tasks parked in `send` on this handle get `trio.ClosedResourceError`, their values
        not enqueued. Closing the last send handle lets receivers drain the buffer, then
        `trio.EndOfChannel`; receivers parked on an empty buffer get it at once.
        """
        if self._closed:
            return
        self._closed = True
        outcome = self._budget.close_send_handle(self)
        for task in outcome.closed:
            _reschedule(task, Error(trio.ClosedResourceError("this byte send channel is closed")))
        for task in outcome.admitted:
            _reschedule(task)
        for task in outcome.ended:
            _reschedule(task, Error(trio.EndOfChannel()))

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """
        Close this handle, then checkpoint. See `close`.

        Cancellation:
            The handle is closed even if the checkpoint raises `trio.Cancelled`.
        """
        self.close()
        await trio.lowlevel.checkpoint()


@final
@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class ByteReceiveChannel(trio.abc.ReceiveChannel[ReceiveT]):
    """
    The receiving end of a byte-budget channel; made by `open_byte_channel` or `clone`.

    ``async for item in receive_channel`` receives until every send handle is closed and
    the buffer is drained.
    """

    _budget: ByteBudget[ReceiveT, _Task]
    _closed: bool = False

    def __repr__(self) -> str:
        return f"<byte receive channel at {id(self):#x}, using budget at {id(self._budget):#x}>"

    def statistics(self) -> ByteChannelStatistics:
        """Return a frozen `ByteChannelStatistics` snapshot of the channel (all clones)."""
        return self._budget.statistics()

    @trio.lowlevel.enable_ki_protection
    def receive_nowait(self) -> ReceiveT:
        """
        Like `receive`, but raise `trio.WouldBlock` instead of parking.

        Raises:
            trio.WouldBlock: the buffer is empty and a send handle is open.
            trio.EndOfChannel: the buffer is empty and every send handle is closed.
            trio.ClosedResourceError: this handle is closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this byte receive channel is closed")
        try:
            verdict = self._budget.receive()
        except SendSideClosed:
            raise trio.EndOfChannel from None
        if verdict is PARK:
            raise trio.WouldBlock
        item, admitted = verdict
        for task in admitted:
            _reschedule(task)
        return item

    @trio.lowlevel.enable_ki_protection
    async def receive(self) -> ReceiveT:
        """
        Receive the oldest item, parking while the buffer is empty.

        Several tasks may receive at once: they are served in the order they parked.

        Raises:
            trio.EndOfChannel: every send handle is closed and the buffer is drained.
            trio.ClosedResourceError: this handle is closed (also while parked).

        Cancellation:
            Atomic: either an item is returned (and removed from the channel), or
            `trio.Cancelled` is raised and the channel is unchanged.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("this byte receive channel is closed")
        budget = self._budget
        try:
            verdict = budget.receive()
        except SendSideClosed:
            raise trio.EndOfChannel from None
        if verdict is not PARK:
            item, admitted = verdict
            for task in admitted:
                _reschedule(task)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item

        task = trio.lowlevel.current_task()
        budget.park_receiver(task, self)

        def abort_fn(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            budget.cancel_receiver(task)
            return trio.lowlevel.Abort.SUCCEEDED

        # The waker hands over the item with Value(item): see ByteSendChannel.send.
        received: ReceiveT = await trio.lowlevel.wait_task_rescheduled(abort_fn)
        return received

    @trio.lowlevel.enable_ki_protection
    def clone(self) -> ByteReceiveChannel[ReceiveT]:
        """
        Return another receive handle on the same channel (each item goes to one of them).

        Senders see `trio.BrokenResourceError` only once every receive handle is closed.

        Raises:
            trio.ClosedResourceError: this handle is closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this byte receive channel is closed")
        self._budget.open_receive_handle()
        return ByteReceiveChannel(self._budget)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @trio.lowlevel.enable_ki_protection
    def close(self) -> None:
        """
        Close this handle (idempotent, not a checkpoint).

        Tasks parked in `receive` on this handle get `trio.ClosedResourceError`. Closing
        the last receive handle wakes every parked sender at once with
        `trio.BrokenResourceError` and drops the buffer; later sends raise the same.
        """
        if self._closed:
            return
        self._closed = True
        outcome = self._budget.close_receive_handle(self)
        for task in outcome.closed:
            _reschedule(
                task, Error(trio.ClosedResourceError("this byte receive channel is closed"))
            )
        for task in outcome.broken:
            _reschedule(task, Error(trio.BrokenResourceError("every receive channel is closed")))

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """
        Close this handle, then checkpoint. See `close`.

        Cancellation:
            The handle is closed even if the checkpoint raises `trio.Cancelled`.
        """
        self.close()
        await trio.lowlevel.checkpoint()
