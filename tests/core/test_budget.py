"""
The pure byte-budget accounting (`trio_taskgraph._core._budget`), driven without trio.

Unit tests pin each rule of spec/S2-byte-budget.md; a hypothesis state machine drives random
sends, receives, cancellations, clones and closes against an independent model and checks
the invariants after every step.
"""

from __future__ import annotations

from collections import deque

import attrs
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition

from tests.typed_hypothesis import initialize, rule
from trio_taskgraph._core._budget import (
    PARK,
    ByteBudget,
    ByteChannelStatistics,
    ReceiveSideClosed,
    SendSideClosed,
    check_high_water_bytes,
    check_size,
)

OWNER = "send-0"
ROWNER = "recv-0"


def take(budget: ByteBudget[str, str]) -> tuple[str, tuple[str, ...]]:
    """``budget.receive()`` where an item is known to be buffered: ``(item, admitted)``."""
    result = budget.receive()
    assert isinstance(result, tuple)
    return result


def fill(budget: ByteBudget[str, str], *sizes: int) -> None:
    for i, size in enumerate(sizes):
        assert budget.send(f"f{i}", size) is None


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("bad", [0, -1, -(2**70)])
def test_high_water_must_be_positive(bad: int) -> None:
    """S2-1"""
    with pytest.raises(ValueError, match="high_water_bytes"):
        check_high_water_bytes(bad)
    with pytest.raises(ValueError, match="high_water_bytes"):
        ByteBudget(bad)


@pytest.mark.parametrize("bad", [1.5, "8", None, True, b"1"])
def test_high_water_must_be_int(bad: object) -> None:
    """S2-1"""
    with pytest.raises(TypeError, match="high_water_bytes"):
        check_high_water_bytes(bad)


@pytest.mark.parametrize("bad", [1.0, "3", None, False, True])
def test_size_must_be_int(bad: object) -> None:
    """S2-1"""
    with pytest.raises(TypeError, match="size_of"):
        check_size(bad, "size_of")


def test_size_must_not_be_negative() -> None:
    """S2-1"""
    with pytest.raises(ValueError, match="size_of"):
        check_size(-1, "size_of")
    assert check_size(0) == 0
    assert check_size(2**70) == 2**70


# ------------------------------------------------------------------------------ admission


@pytest.mark.parametrize(
    ("buffered", "size", "admitted"),
    [
        ((), 0, True),
        ((), 10, True),
        ((), 1000, True),  # larger than the mark: admitted on an empty buffer
        ((9,), 1, True),  # below the mark: admitted, may end over it
        ((9,), 10, True),
        ((9,), 11, False),  # larger than the mark, buffer not empty
        ((10,), 0, False),  # at the mark
        ((10,), 1, False),
        ((0,), 1000, True),  # zero bytes buffered counts as empty
        ((3, 3), 5, True),
    ],
)
def test_admission_rule(buffered: tuple[int, ...], size: int, admitted: bool) -> None:
    """S2-2"""
    budget: ByteBudget[str, str] = ByteBudget(10)
    fill(budget, *buffered)
    assert budget.admissible(size) is admitted
    verdict = budget.send("x", size)
    assert (verdict is None) is admitted
    if not admitted:
        assert verdict is PARK
        # A refused send changed nothing.
        assert budget.buffered_sizes() == buffered


def test_large_chunk_enters_alone_and_peak_is_bounded() -> None:
    """S2-2, S2-3"""
    budget: ByteBudget[str, str] = ByteBudget(10)
    fill(budget, 4)
    assert budget.send("big", 25) is PARK
    budget.park_sender("t-big", "big", 25, OWNER)
    item, admitted = take(budget)
    assert (item, admitted) == ("f0", ("t-big",))
    assert budget.buffered_sizes() == (25,)
    # The big chunk is alone: the next small send parks.
    assert budget.send("small", 1) is PARK
    assert budget.peak_buffered_bytes == 25 <= 10 + 25


def test_parked_large_chunk_is_not_overtaken() -> None:
    """S2-4"""
    budget: ByteBudget[str, str] = ByteBudget(10)
    fill(budget, 5)
    assert budget.send("big", 30) is PARK
    budget.park_sender("t-big", "big", 30, OWNER)
    # Room for a small chunk exists (5 < 10), but the big one is ahead.
    assert budget.admissible(1)
    assert budget.send("small", 1) is PARK
    budget.park_sender("t-small", "small", 1, OWNER)
    assert budget.parked_sender_tokens() == ("t-big", "t-small")
    _, admitted = take(budget)
    assert admitted == ("t-big",)  # the small one still waits behind it
    _, admitted = take(budget)
    assert admitted == ("t-small",)


def test_receive_wakes_exactly_the_admitted_prefix() -> None:
    """S2-5, M-2: one receive frees room for some parked senders, not all of them."""
    budget: ByteBudget[str, str] = ByteBudget(100)
    fill(budget, 60, 60)  # 120 buffered: over the mark
    for i in range(10):
        assert budget.send(f"p{i}", 15) is PARK
        budget.park_sender(f"t{i}", f"p{i}", 15, OWNER)
    item, admitted = take(budget)
    # 60 left: admit 15 (75), 15 (90), 15 (105): the third crosses the mark, then stop.
    assert item == "f0"
    assert admitted == ("t0", "t1", "t2")
    assert budget.buffered_bytes == 105
    assert budget.statistics().parked_senders == 7
    assert not budget.admissible(15)  # the new head is not admissible: no lost wake-up


def test_cancelling_the_head_admits_the_next() -> None:
    """S2-5, S2-7: withdrawing a parked sender frees the queue behind it (no lost wake-up)."""
    budget: ByteBudget[str, str] = ByteBudget(10)
    fill(budget, 5)
    assert budget.send("big", 30) is PARK
    budget.park_sender("t-big", "big", 30, OWNER)
    assert budget.send("small", 2) is PARK
    budget.park_sender("t-small", "small", 2, OWNER)
    admitted = budget.cancel_sender("t-big")
    assert admitted == ("t-small",)
    assert budget.buffered_sizes() == (5, 2)
    assert budget.statistics().parked_sender_bytes == 0


def test_cancelled_receiver_takes_nothing() -> None:
    """S2-7"""
    budget: ByteBudget[str, str] = ByteBudget(10)
    assert budget.receive() is PARK
    budget.park_receiver("r1", ROWNER)
    assert budget.receive() is PARK
    budget.park_receiver("r2", ROWNER)
    budget.cancel_receiver("r1")
    assert budget.send("x", 3) == "r2"
    assert budget.buffered_bytes == 0  # handed over, never buffered (S2-3, S2-8)
    assert budget.peak_buffered_bytes == 0


def test_double_park_is_refused() -> None:
    budget: ByteBudget[str, str] = ByteBudget(1)
    fill(budget, 1)
    budget.park_sender("t", "x", 1, OWNER)
    with pytest.raises(ValueError, match="already parked"):
        budget.park_sender("t", "y", 1, OWNER)
    with pytest.raises(ValueError, match="already parked"):
        budget.park_receiver("t", ROWNER)


# -------------------------------------------------------------------------------- closing


def test_closing_last_receive_handle_breaks_every_parked_sender() -> None:
    """S2-9: the seed's late HIGH 2 (a sink that dies must not leave producers parked)."""
    budget: ByteBudget[str, str] = ByteBudget(4)
    fill(budget, 4)
    for i in range(3):
        assert budget.send(f"p{i}", 1) is PARK
        budget.park_sender(f"t{i}", f"p{i}", 1, OWNER if i else "send-1")
    budget.open_receive_handle()
    first = budget.close_receive_handle("recv-1")
    assert first == type(first)()  # a clone remains: nothing to wake
    outcome = budget.close_receive_handle(ROWNER)
    assert outcome.broken == ("t0", "t1", "t2")
    stats = budget.statistics()
    assert (stats.buffered_bytes, stats.buffered_items, stats.parked_senders) == (0, 0, 0)
    assert stats.peak_buffered_bytes == 4
    with pytest.raises(ReceiveSideClosed):
        budget.send("late", 0)


def test_closing_a_receive_clone_closes_its_own_receivers() -> None:
    """S2-11"""
    budget: ByteBudget[str, str] = ByteBudget(4)
    budget.open_receive_handle()
    for token, owner in [("a", ROWNER), ("b", "recv-1"), ("c", ROWNER)]:
        assert budget.receive() is PARK
        budget.park_receiver(token, owner)
    outcome = budget.close_receive_handle(ROWNER)
    assert outcome.closed == ("a", "c")
    assert budget.parked_receiver_tokens() == ("b",)


def test_closing_last_send_handle_drains_then_ends() -> None:
    """S2-10"""
    budget: ByteBudget[str, str] = ByteBudget(4)
    fill(budget, 1, 2)
    outcome = budget.close_send_handle(OWNER)
    assert outcome == type(outcome)()
    assert budget.receive() == ("f0", ())
    assert budget.receive() == ("f1", ())
    with pytest.raises(SendSideClosed):
        budget.receive()


def test_closing_last_send_handle_ends_parked_receivers() -> None:
    """S2-10, S2-12"""
    budget: ByteBudget[str, str] = ByteBudget(4)
    budget.park_receiver("r1", ROWNER)
    budget.park_receiver("r2", ROWNER)
    budget.open_send_handle()
    assert budget.close_send_handle("send-1").ended == ()
    assert budget.close_send_handle(OWNER).ended == ("r1", "r2")
    assert budget.statistics().parked_receivers == 0


def test_closing_a_send_clone_withdraws_its_senders_and_admits_others() -> None:
    """S2-11, S2-5: a closed handle's parked senders leave; the ones behind may enter."""
    budget: ByteBudget[str, str] = ByteBudget(10)
    budget.open_send_handle()
    fill(budget, 5)
    budget.park_sender("big", "B", 50, "send-1")
    budget.park_sender("small", "s", 2, OWNER)
    outcome = budget.close_send_handle("send-1")
    assert outcome.closed == ("big",)
    assert outcome.admitted == ("small",)
    assert outcome.ended == ()
    assert budget.buffered_sizes() == (5, 2)


def test_closing_more_handles_than_open_is_refused() -> None:
    budget: ByteBudget[str, str] = ByteBudget(1)
    budget.close_send_handle(OWNER)
    budget.close_receive_handle(ROWNER)
    with pytest.raises(ValueError, match="send"):
        budget.close_send_handle(OWNER)
    with pytest.raises(ValueError, match="receive"):
        budget.close_receive_handle(ROWNER)


def test_statistics_are_frozen_snapshots() -> None:
    """S2-14, L-5: a snapshot, not a window onto internals."""
    budget: ByteBudget[str, str] = ByteBudget(10)
    before = budget.statistics()
    fill(budget, 3)
    after = budget.statistics()
    assert before.buffered_bytes == 0
    assert after.buffered_bytes == 3
    assert isinstance(after, ByteChannelStatistics)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        after.buffered_bytes = 0  # type: ignore[misc]
    assert set(attrs.asdict(after)) == {
        "buffered_bytes",
        "buffered_items",
        "peak_buffered_bytes",
        "high_water_bytes",
        "parked_senders",
        "parked_sender_bytes",
        "parked_receivers",
        "open_send_channels",
        "open_receive_channels",
    }


# ----------------------------------------------------------------------- stateful testing


@attrs.define
class _Model:
    """An independent oracle: the rules of S2 written the naive way."""

    mark: int
    buffer: deque[tuple[int, int]] = attrs.Factory(deque)  # (item, size)
    senders: list[tuple[int, int, int, str]] = attrs.Factory(list)  # (token, item, size, owner)
    receivers: list[tuple[int, str]] = attrs.Factory(list)  # (token, owner)
    send_owners: list[str] = attrs.Factory(lambda: ["s0"])
    receive_owners: list[str] = attrs.Factory(lambda: ["r0"])

    def buffered(self) -> int:
        return sum(size for _, size in self.buffer)

    def fits(self, size: int) -> bool:
        b = self.buffered()
        return b == 0 or (b < self.mark and size <= self.mark)

    def admit(self) -> list[int]:
        woken = []
        while self.senders and self.fits(self.senders[0][2]):
            token, item, size, _ = self.senders.pop(0)
            self.buffer.append((item, size))
            woken.append(token)
        return woken


class BudgetMachine(RuleBasedStateMachine):
    """S2-2 .. S2-12 on the pure core, against `_Model`."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0
        self.largest = 0
        self.delivered: list[int] = []
        self.admission_log: list[int] = []

    @initialize(mark=st.integers(1, 64))
    def start(self, mark: int) -> None:
        self.budget: ByteBudget[int, int] = ByteBudget(mark)
        self.model = _Model(mark)

    def fresh(self) -> int:
        self.counter += 1
        return self.counter

    def note_admitted(self, items: list[int]) -> None:
        self.admission_log.extend(items)

    @rule(size=st.integers(0, 100), data=st.data())
    def send(self, size: int, data: st.DataObject) -> None:
        model = self.model
        if not model.send_owners:
            return
        owner = data.draw(st.sampled_from(model.send_owners))
        item = self.fresh()
        if not model.receive_owners:
            with pytest.raises(ReceiveSideClosed):
                self.budget.send(item, size)
            return
        verdict = self.budget.send(item, size)
        if model.receivers:
            token, _ = model.receivers.pop(0)
            assert verdict == token
            self.delivered.append(item)
            self.note_admitted([item])
        elif model.senders or not model.fits(size):
            assert verdict is PARK
            token = self.fresh()
            self.budget.park_sender(token, item, size, owner)
            model.senders.append((token, item, size, owner))
        else:
            assert verdict is None
            model.buffer.append((item, size))
            self.note_admitted([item])
            self.largest = max(self.largest, size)

    def note_woken(self, tokens: tuple[int, ...], expected: list[int]) -> None:
        assert list(tokens) == expected
        admitted_items = [item for item, _ in list(self.model.buffer)[-len(expected) :]]
        if expected:
            self.note_admitted(admitted_items)
            self.largest = max(self.largest, *(s for _, s in list(self.model.buffer)))

    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        model = self.model
        if not model.receive_owners:
            return
        owner = data.draw(st.sampled_from(model.receive_owners))
        if model.buffer:
            verdict = self.budget.receive()
            assert verdict is not PARK
            item, woken = verdict
            expected_item, _ = model.buffer.popleft()
            assert item == expected_item  # S2-6: admission order
            self.delivered.append(item)
            self.note_woken(woken, model.admit())
        elif not model.send_owners:
            with pytest.raises(SendSideClosed):
                self.budget.receive()
        else:
            assert self.budget.receive() is PARK
            token = self.fresh()
            self.budget.park_receiver(token, owner)
            model.receivers.append((token, owner))

    @precondition(lambda self: bool(self.model.senders))
    @rule(data=st.data())
    def cancel_sender(self, data: st.DataObject) -> None:
        model = self.model
        index = data.draw(st.integers(0, len(model.senders) - 1))
        token = model.senders.pop(index)[0]
        before = self.budget.buffered_bytes
        woken = self.budget.cancel_sender(token)
        self.note_woken(woken, model.admit())
        if not woken:
            assert self.budget.buffered_bytes == before  # S2-7: nothing counted

    @precondition(lambda self: bool(self.model.receivers))
    @rule(data=st.data())
    def cancel_receiver(self, data: st.DataObject) -> None:
        model = self.model
        index = data.draw(st.integers(0, len(model.receivers) - 1))
        token = model.receivers.pop(index)[0]
        self.budget.cancel_receiver(token)

    @precondition(lambda self: bool(self.model.send_owners))
    @rule()
    def clone_send(self) -> None:
        self.budget.open_send_handle()
        self.model.send_owners.append(f"s{self.fresh()}")

    @precondition(lambda self: bool(self.model.receive_owners))
    @rule()
    def clone_receive(self) -> None:
        self.budget.open_receive_handle()
        self.model.receive_owners.append(f"r{self.fresh()}")

    @precondition(lambda self: bool(self.model.send_owners))
    @rule(data=st.data())
    def close_send(self, data: st.DataObject) -> None:
        model = self.model
        owner = data.draw(st.sampled_from(model.send_owners))
        model.send_owners.remove(owner)
        outcome = self.budget.close_send_handle(owner)
        assert list(outcome.closed) == [t for t, _, _, o in model.senders if o == owner]
        model.senders = [s for s in model.senders if s[3] != owner]
        self.note_woken(outcome.admitted, model.admit())
        assert outcome.broken == ()
        if model.send_owners:
            assert outcome.ended == ()
        else:
            assert list(outcome.ended) == [t for t, _ in model.receivers]
            model.receivers.clear()

    @precondition(lambda self: bool(self.model.receive_owners))
    @rule(data=st.data())
    def close_receive(self, data: st.DataObject) -> None:
        model = self.model
        owner = data.draw(st.sampled_from(model.receive_owners))
        model.receive_owners.remove(owner)
        outcome = self.budget.close_receive_handle(owner)
        assert list(outcome.closed) == [t for t, o in model.receivers if o == owner]
        model.receivers = [r for r in model.receivers if r[1] != owner]
        assert outcome.admitted == outcome.ended == ()
        if model.receive_owners:
            assert outcome.broken == ()
        else:
            assert list(outcome.broken) == [t for t, _, _, _ in model.senders]
            model.senders.clear()
            model.buffer.clear()

    # ----------------------------------------------------------------------- invariants

    @invariant()
    def conservation(self) -> None:
        """S2-6"""
        if not hasattr(self, "budget"):
            return
        sizes = self.budget.buffered_sizes()
        assert sizes == tuple(size for _, size in self.model.buffer)
        assert self.budget.buffered_bytes == sum(sizes)

    @invariant()
    def peak_bound(self) -> None:
        """S2-3"""
        if not hasattr(self, "budget"):
            return
        budget = self.budget
        assert budget.buffered_bytes <= budget.peak_buffered_bytes
        assert budget.peak_buffered_bytes <= budget.high_water_bytes + self.largest

    @invariant()
    def fifo_and_no_lost_wakeup(self) -> None:
        """S2-4, S2-5: parked in order; the head is never admissible while parked."""
        if not hasattr(self, "budget"):
            return
        expected = tuple(t for t, _, _, _ in self.model.senders)
        assert self.budget.parked_sender_tokens() == expected
        if self.model.senders:
            assert not self.budget.admissible(self.model.senders[0][2])

    @invariant()
    def exclusion(self) -> None:
        """S2-8"""
        if not hasattr(self, "budget"):
            return
        stats = self.budget.statistics()
        if stats.parked_senders:
            assert stats.buffered_bytes > 0
            assert stats.parked_receivers == 0
        if stats.parked_receivers:
            assert stats.buffered_items == 0
        assert self.budget.parked_receiver_tokens() == tuple(t for t, _ in self.model.receivers)

    @invariant()
    def order_and_no_duplicates(self) -> None:
        """S2-6: delivered items are a prefix of the admission order, each once."""
        assert len(set(self.delivered)) == len(self.delivered)
        assert len(set(self.admission_log)) == len(self.admission_log)
        assert self.delivered == self.admission_log[: len(self.delivered)]

    @invariant()
    def nothing_parked_once_closed(self) -> None:
        """S2-12"""
        if not hasattr(self, "budget"):
            return
        stats = self.budget.statistics()
        assert stats.open_send_channels == len(self.model.send_owners)
        assert stats.open_receive_channels == len(self.model.receive_owners)
        if not stats.open_send_channels:
            assert stats.parked_senders == 0
            assert stats.parked_receivers == 0
        if not stats.open_receive_channels:
            assert stats.parked_senders == 0
            assert stats.buffered_bytes == 0


TestBudgetMachine = BudgetMachine.TestCase
