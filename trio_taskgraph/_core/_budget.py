"""
`ByteBudget`: the sans-io accounting behind `open_byte_channel`.

A byte-budget channel bounds its buffer by the bytes it holds, not by the number of items.
This module decides everything about that: which send is admitted, which one parks, which
parked senders a receive releases, who is woken when a handle closes. It never parks or wakes
anything itself: it takes values (items, sizes, opaque *tokens* standing for parked tasks,
opaque *owners* standing for handles) and returns decisions (which tokens to wake, and how).
The trio shell in ``trio_taskgraph/_byte_channel.py`` turns the decisions into
``trio.lowlevel.reschedule`` calls. Nothing here imports trio, so the whole state machine can
be driven by hypothesis and by ``fuzz/fuzz_budget.py`` without an event loop.

Rules (spec/S2-byte-budget.md):

- S2-2 admission: a send of ``size`` bytes is admitted when no sender is parked ahead of it
  and either the buffer holds no bytes, or it holds fewer than ``high_water_bytes`` and
  ``size <= high_water_bytes``. A chunk larger than the mark therefore waits for an empty
  buffer and then enters alone. Otherwise the send parks.
- S2-3 peak: hence ``peak_buffered_bytes <= high_water_bytes + largest admitted chunk``.
- S2-4 FIFO: parked senders are admitted strictly in the order they parked; a new send never
  overtakes a parked one, and a large parked chunk is never overtaken by small ones.
- S2-5 exact wake-ups: whenever room is freed (a receive, a cancelled or closed parked
  sender), the longest FIFO prefix of parked senders that the rule admits is admitted *at
  that moment*: its items enter the buffer and its tokens are returned for waking. So a
  woken sender is already admitted (it can never find itself over the mark: no thundering
  herd, the seed's M-2), and the head of the queue is never admissible while parked (no lost
  wake-up).
- S2-6 order and conservation: items leave in the order they were admitted; ``buffered_bytes``
  is always the sum of the sizes of the buffered items.
- S2-7 atomic cancellation: cancelling a parked sender removes its item without counting a
  byte; cancelling a parked receiver takes nothing.
- S2-8 exclusion: parked senders imply buffered bytes > 0; parked receivers imply an empty
  buffer; never both at once.
- S2-9 / S2-10 / S2-11 closing: see `ByteBudget.close_receive_handle` and
  `ByteBudget.close_send_handle`.

Theory of operation:

The state is a buffer (two parallel deques: items and their sizes), an ordered map of parked
senders ``token -> (item, size, owner)``, an ordered map of parked receivers
``token -> owner``, and the open handle counts. The hot path (`send` that fits, `receive`
from a non-empty buffer) touches only the deques and two integers; the ordered maps are
consulted only when someone is parked. `send` and `receive` return the sentinel `PARK`
instead of raising when the caller must park, because the trio shell hits that case on
almost every item of a saturated stream. The terminal conditions raise `BudgetRefused`
subclasses, which the shell translates into trio's exceptions.

Transitions (``B`` = buffered bytes, ``H`` = high_water_bytes):

=====================  =====================================  ==============================
event                  condition                              decision
=====================  =====================================  ==============================
send(item, size)       no open receive handle                 raise `ReceiveSideClosed`
send(item, size)       a receiver is parked                   hand item to the first one
send(item, size)       no parked sender, admissible(B, size)  buffer it
send(item, size)       otherwise                              `PARK` (then `park_sender`)
receive()              buffer non-empty                       pop head, admit parked prefix
receive()              empty, no open send handle             raise `SendSideClosed`
receive()              empty                                  `PARK` (then `park_receiver`)
cancel_sender(t)       t parked                               drop it, admit parked prefix
cancel_receiver(t)     t parked                               drop it
close_send_handle(o)   --                                     o's senders closed, admit
                                                              prefix, last: receivers ended
close_receive_handle   --                                     o's receivers closed, last:
                                                              senders broken, buffer dropped
=====================  =====================================  ==============================

``admissible(B, size)`` is ``B == 0 or (B < H and size <= H)``.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Final, Generic, TypeVar, final

import attrs

__all__ = [
    "PARK",
    "BudgetRefused",
    "ByteBudget",
    "ByteChannelStatistics",
    "CloseOutcome",
    "Verdict",
    "ReceiveSideClosed",
    "SendSideClosed",
    "check_high_water_bytes",
    "check_size",
]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class Verdict(enum.Enum):
    """What `ByteBudget.send` / `ByteBudget.receive` return when the caller must park."""

    PARK = "park"


#: The caller must park (with `ByteBudget.park_sender` / `ByteBudget.park_receiver`).
PARK: Final = Verdict.PARK


class BudgetRefused(Exception):
    """The core refuses an operation for good; the shell decides what the caller sees."""


class ReceiveSideClosed(BudgetRefused):
    """Every receive handle is closed: sends can never be received (trio: broken)."""


class SendSideClosed(BudgetRefused):
    """Every send handle is closed and the buffer is drained (trio: end of channel)."""


def check_high_water_bytes(value: object) -> int:
    """
    Validate a byte budget.

    Raises:
        TypeError: ``value`` is not an int (``bool`` is refused).
        ValueError: ``value`` is not positive.
    """
    # Invariant (S2-1): the mark is a positive int.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"high_water_bytes must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"high_water_bytes must be > 0, got {value}")
    return value


def check_size(value: object, what: str = "size") -> int:
    """
    Validate a chunk size.

    Raises:
        TypeError: ``value`` is not an int (``bool`` is refused); the message names ``what``.
        ValueError: ``value`` is negative; the message names ``what``.
    """
    # Invariant (S2-1): a chunk size is an int >= 0.
    if type(value) is int and value >= 0:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what}: a chunk size must be an int, not {type(value).__name__}")
    raise ValueError(f"{what}: a chunk size must be >= 0, got {value}")


@final
@attrs.frozen(kw_only=True)
class ByteChannelStatistics:
    """
    A snapshot of a byte-budget channel, as returned by ``statistics()``.

    Attributes:
        buffered_bytes: bytes sent and admitted but not yet received.
        buffered_items: items sent and admitted but not yet received.
        peak_buffered_bytes: the largest ``buffered_bytes`` since the channel opened.
        high_water_bytes: the mark sends park at (the channel's budget).
        parked_senders: tasks parked in ``send`` (over all clones).
        parked_sender_bytes: the bytes those parked sends are waiting to add.
        parked_receivers: tasks parked in ``receive`` (over all clones).
        open_send_channels: open send handles (the original and its clones).
        open_receive_channels: open receive handles.
    """

    buffered_bytes: int
    buffered_items: int
    peak_buffered_bytes: int
    high_water_bytes: int
    parked_senders: int
    parked_sender_bytes: int
    parked_receivers: int
    open_send_channels: int
    open_receive_channels: int


@final
@attrs.frozen(kw_only=True)
class CloseOutcome(Generic[K]):
    """
    Who to wake, and how, after a handle closed.

    Attributes:
        closed: parked on the closing handle itself: wake with "closed resource".
        admitted: parked senders of other handles that the freed room admitted: wake normally.
        broken: parked senders whose last receive handle just closed: wake with "broken".
        ended: parked receivers whose last send handle just closed: wake with "end of channel".
    """

    closed: tuple[K, ...] = ()
    admitted: tuple[K, ...] = ()
    broken: tuple[K, ...] = ()
    ended: tuple[K, ...] = ()


_NOTHING: Final[tuple[()]] = ()


@final
# on_setattr=NO_OP: attrs.define would run converters/validators on every assignment, which
# costs ~1 us per item on the hot path; the mark is validated once, at construction.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class ByteBudget(Generic[T, K]):
    """
    The accounting of one byte-budget channel (see the module docstring for the rules).

    ``T`` is the item type; ``K`` is the type of the tokens that stand for parked tasks.
    Handles are identified by any hashable *owner*; the caller counts them in with
    `open_send_handle` / `open_receive_handle` (one of each is open at construction).
    """

    # Invariant (S2-1): a positive int, checked once here.
    high_water_bytes: int = attrs.field(converter=check_high_water_bytes)
    # Invariant (S2-6): buffered_bytes == sum(_sizes); len(_items) == len(_sizes).
    buffered_bytes: int = 0
    # Invariant (S2-3): buffered_bytes <= peak_buffered_bytes <= high_water_bytes + largest.
    peak_buffered_bytes: int = 0
    open_send_handles: int = 1
    open_receive_handles: int = 1
    _items: deque[T] = attrs.field(factory=deque, init=False)
    _sizes: deque[int] = attrs.field(factory=deque, init=False)
    # Invariant (S2-4): insertion order is park order, and admission order.
    _senders: OrderedDict[K, tuple[T, int, object]] = attrs.field(factory=OrderedDict, init=False)
    _receivers: OrderedDict[K, object] = attrs.field(factory=OrderedDict, init=False)

    # ----------------------------------------------------------------------------- queries

    def statistics(self) -> ByteChannelStatistics:
        """Return a frozen snapshot of the accounting."""
        return ByteChannelStatistics(
            buffered_bytes=self.buffered_bytes,
            buffered_items=len(self._items),
            peak_buffered_bytes=self.peak_buffered_bytes,
            high_water_bytes=self.high_water_bytes,
            parked_senders=len(self._senders),
            parked_sender_bytes=sum(size for _, size, _ in self._senders.values()),
            parked_receivers=len(self._receivers),
            open_send_channels=self.open_send_handles,
            open_receive_channels=self.open_receive_handles,
        )

    def admissible(self, size: int) -> bool:
        """Whether a chunk of ``size`` bytes fits now, ignoring the queue (rule S2-2)."""
        buffered = self.buffered_bytes
        # Invariant (S2-2): empty buffer admits anything, alone; else below the mark and a
        # chunk no larger than the mark.
        return buffered == 0 or (buffered < self.high_water_bytes and size <= self.high_water_bytes)

    def buffered_sizes(self) -> tuple[int, ...]:
        """The sizes of the buffered items, oldest first (for tests and fuzzing)."""
        return tuple(self._sizes)

    def parked_sender_tokens(self) -> tuple[K, ...]:
        """The parked senders' tokens in FIFO order (for tests and fuzzing)."""
        return tuple(self._senders)

    def parked_receiver_tokens(self) -> tuple[K, ...]:
        """The parked receivers' tokens in FIFO order (for tests and fuzzing)."""
        return tuple(self._receivers)

    # ------------------------------------------------------------------------------- send

    def send(self, item: T, size: int) -> K | Verdict | None:
        """
        Offer ``item`` of ``size`` bytes (already validated with `check_size`).

        Returns:
            ``None`` when the item was buffered; `PARK` when the caller must park (nothing
            changed: call `park_sender` to queue it); otherwise the token of a parked
            receiver that now owns the item and must be woken with it.

        Raises:
            ReceiveSideClosed: every receive handle is closed.
        """
        if not self.open_receive_handles:
            raise ReceiveSideClosed
        if self._receivers:
            # Invariant (S2-8): a parked receiver means an empty buffer: hand over directly.
            token, _owner = self._receivers.popitem(last=False)
            return token
        buffered = self.buffered_bytes
        # Invariant (S2-4): nobody overtakes a parked sender.
        if self._senders or (
            buffered and (buffered >= self.high_water_bytes or size > self.high_water_bytes)
        ):
            return PARK
        self._items.append(item)
        self._sizes.append(size)
        buffered += size
        self.buffered_bytes = buffered
        if buffered > self.peak_buffered_bytes:
            self.peak_buffered_bytes = buffered
        return None

    def park_sender(self, token: K, item: T, size: int, owner: object) -> None:
        """
        Queue a sender that `send` told to park. ``owner`` names its handle.

        Raises:
            ValueError: ``token`` is already parked.
        """
        if token in self._senders or token in self._receivers:
            raise ValueError(f"token {token!r} is already parked")
        self._senders[token] = (item, size, owner)

    def cancel_sender(self, token: K) -> tuple[K, ...]:
        """
        Withdraw a parked sender (its send was cancelled): its item is dropped uncounted.

        Returns:
            The tokens of the parked senders that the withdrawal admitted (wake them
            normally: their items are already buffered).
        """
        # Invariant (S2-7): a cancelled send leaves no item and no byte behind.
        del self._senders[token]
        return self._admit_parked()

    def _admit_parked(self) -> tuple[K, ...]:
        # Invariant (S2-5): admit exactly the longest admissible FIFO prefix, now.
        senders = self._senders
        if not senders:
            return _NOTHING
        mark = self.high_water_bytes
        buffered = self.buffered_bytes
        woken: list[K] = []
        while senders:
            token = next(iter(senders))
            item, size, _owner = senders[token]
            if buffered and (buffered >= mark or size > mark):
                break
            del senders[token]
            self._items.append(item)
            self._sizes.append(size)
            buffered += size
            woken.append(token)
        self.buffered_bytes = buffered
        if buffered > self.peak_buffered_bytes:
            self.peak_buffered_bytes = buffered
        return tuple(woken)

    # ---------------------------------------------------------------------------- receive

    def receive(self) -> tuple[T, tuple[K, ...]] | Verdict:
        """
        Take the oldest buffered item.

        Returns:
            ``(item, admitted)``: the item, and the tokens of the parked senders the freed
            room admitted (their items are already buffered; wake them normally). Or `PARK`
            when the buffer is empty and a send handle is open (nothing changed: call
            `park_receiver`).

        Raises:
            SendSideClosed: the buffer is empty and every send handle is closed.
        """
        items = self._items
        if items:
            item = items.popleft()
            self.buffered_bytes -= self._sizes.popleft()
            if self._senders:
                return item, self._admit_parked()
            return item, _NOTHING
        if not self.open_send_handles:
            raise SendSideClosed
        return PARK

    def park_receiver(self, token: K, owner: object) -> None:
        """
        Queue a receiver that `receive` told to park. ``owner`` names its handle.

        Raises:
            ValueError: ``token`` is already parked.
        """
        if token in self._senders or token in self._receivers:
            raise ValueError(f"token {token!r} is already parked")
        self._receivers[token] = owner

    def cancel_receiver(self, token: K) -> None:
        """Withdraw a parked receiver (its receive was cancelled): it took nothing."""
        # Invariant (S2-7): a cancelled receive takes nothing.
        del self._receivers[token]

    # ---------------------------------------------------------------------------- handles

    def open_send_handle(self) -> None:
        """Count one more open send handle (a clone)."""
        self.open_send_handles += 1

    def open_receive_handle(self) -> None:
        """Count one more open receive handle (a clone)."""
        self.open_receive_handles += 1

    def close_send_handle(self, owner: object) -> CloseOutcome[K]:
        """
        Count one send handle, ``owner``, as closed.

        Its parked senders are withdrawn (their items uncounted) and reported as ``closed``;
        senders of other handles the withdrawal admits are reported as ``admitted``. When
        it was the last send handle, every parked receiver is reported as ``ended``;
        receivers then drain the buffer and `receive` raises `SendSideClosed`.

        Raises:
            ValueError: no send handle is open.
        """
        if self.open_send_handles <= 0:
            raise ValueError("no send handle is open")
        closed = tuple(t for t, (_i, _s, o) in self._senders.items() if o is owner)
        for token in closed:
            del self._senders[token]
        self.open_send_handles -= 1
        admitted = self._admit_parked()
        ended: tuple[K, ...] = ()
        if not self.open_send_handles:
            # Invariant (S2-10): no sender can be parked once every send handle closed.
            ended = tuple(self._receivers)
            self._receivers.clear()
        return CloseOutcome(closed=closed, admitted=admitted, ended=ended)

    def close_receive_handle(self, owner: object) -> CloseOutcome[K]:
        """
        Count one receive handle, ``owner``, as closed.

        Its parked receivers are reported as ``closed``. When it was the last receive
        handle, every parked sender is reported as ``broken`` (their items uncounted) and
        the buffer is dropped; later sends raise `ReceiveSideClosed`.

        Raises:
            ValueError: no receive handle is open.
        """
        if self.open_receive_handles <= 0:
            raise ValueError("no receive handle is open")
        closed = tuple(t for t, o in self._receivers.items() if o is owner)
        for token in closed:
            del self._receivers[token]
        self.open_receive_handles -= 1
        broken: tuple[K, ...] = ()
        if not self.open_receive_handles:
            # Invariant (S2-9): everyone parked in send is released at once; nothing stays
            # buffered for a receiver that can never come.
            broken = tuple(self._senders)
            self._senders.clear()
            self._items.clear()
            self._sizes.clear()
            self.buffered_bytes = 0
        return CloseOutcome(closed=closed, broken=broken)
