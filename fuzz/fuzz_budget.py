# Invariant tested: S2-2, S2-3, S2-4, S2-5, S2-6, S2-7, S2-8, S2-9, S2-10, S2-11, S2-12
"""
Fuzz the pure byte-budget core (`trio_taskgraph._core._budget.ByteBudget`) from raw bytes.

Each input is read as a program: the first byte picks the mark, then each byte is an
operation (send, receive, cancel a parked sender or receiver, clone, close either side)
whose operands are the following bytes. A naive model (lists, recomputed sums) runs beside
the core; every decision must agree with it and every invariant of spec/S2-byte-budget.md
is checked after every operation. Any exception is a finding.

    python fuzz/fuzz_budget.py --seconds 60

Uses atheris when it is importable, otherwise random bytes and mutations of the corpus in
``fuzz/corpus/budget/``.
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _harness  # noqa: E402

from trio_taskgraph._core._budget import (  # noqa: E402
    PARK,
    ByteBudget,
    ReceiveSideClosed,
    SendSideClosed,
)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int | None:
        if self.pos >= len(self.data):
            return None
        value = self.data[self.pos]
        self.pos += 1
        return value


class _Harness:
    """The core and a naive model side by side."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.budget: ByteBudget[int, int] = ByteBudget(mark)
        self.buffer: deque[tuple[int, int]] = deque()  # (item, size)
        self.senders: list[tuple[int, int, int, int]] = []  # (token, item, size, owner)
        self.receivers: list[tuple[int, int]] = []  # (token, owner)
        self.send_owners = [0]
        self.receive_owners = [1]
        self.next_id = 2
        self.largest = 0
        self.admitted: list[int] = []
        self.delivered: list[int] = []

    def fresh(self) -> int:
        self.next_id += 1
        return self.next_id

    def fits(self, size: int) -> bool:
        buffered = sum(s for _, s in self.buffer)
        return buffered == 0 or (buffered < self.mark and size <= self.mark)

    def admit(self) -> list[int]:
        woken = []
        while self.senders and self.fits(self.senders[0][2]):
            token, item, size, _ = self.senders.pop(0)
            self.buffer.append((item, size))
            self.admitted.append(item)
            self.largest = max(self.largest, size)
            woken.append(token)
        return woken

    # ------------------------------------------------------------------------ operations

    def send(self, size: int, pick: int) -> None:
        if not self.send_owners:
            return
        owner = self.send_owners[pick % len(self.send_owners)]
        item = self.fresh()
        if not self.receive_owners:
            try:
                self.budget.send(item, size)
            except ReceiveSideClosed:
                return
            raise AssertionError("S2-9: send after the receive side closed was not refused")
        verdict = self.budget.send(item, size)
        if self.receivers:
            token, _ = self.receivers.pop(0)
            assert verdict == token, "S2-8: not handed to the first parked receiver"
            self.admitted.append(item)
            self.delivered.append(item)
        elif self.senders or not self.fits(size):
            assert verdict is PARK, "S2-2/S2-4: admitted a send that must park"
            token = self.fresh()
            self.budget.park_sender(token, item, size, owner)
            self.senders.append((token, item, size, owner))
        else:
            assert verdict is None, "S2-2: refused an admissible send"
            self.buffer.append((item, size))
            self.admitted.append(item)
            self.largest = max(self.largest, size)

    def receive(self, pick: int) -> None:
        if not self.receive_owners:
            return
        owner = self.receive_owners[pick % len(self.receive_owners)]
        if self.buffer:
            verdict = self.budget.receive()
            assert verdict is not PARK, "S2-6: parked with items buffered"
            item, woken = verdict
            assert item == self.buffer.popleft()[0], "S2-6: out of order"
            self.delivered.append(item)
            assert list(woken) == self.admit(), "S2-5: wrong senders woken"
        elif not self.send_owners:
            try:
                self.budget.receive()
            except SendSideClosed:
                return
            raise AssertionError("S2-10: drained channel with no sender did not end")
        else:
            assert self.budget.receive() is PARK, "S2-8: empty receive did not park"
            token = self.fresh()
            self.budget.park_receiver(token, owner)
            self.receivers.append((token, owner))

    def cancel_sender(self, pick: int) -> None:
        if not self.senders:
            return
        token = self.senders.pop(pick % len(self.senders))[0]
        before = self.budget.buffered_bytes
        woken = self.budget.cancel_sender(token)
        assert list(woken) == self.admit(), "S2-5: wrong senders woken after a cancel"
        if not woken:
            assert self.budget.buffered_bytes == before, "S2-7: a cancel changed the count"

    def cancel_receiver(self, pick: int) -> None:
        if not self.receivers:
            return
        token = self.receivers.pop(pick % len(self.receivers))[0]
        self.budget.cancel_receiver(token)

    def clone(self, pick: int) -> None:
        if pick % 2 and self.send_owners:
            self.budget.open_send_handle()
            self.send_owners.append(self.fresh())
        elif self.receive_owners:
            self.budget.open_receive_handle()
            self.receive_owners.append(self.fresh())

    def close_send(self, pick: int) -> None:
        if not self.send_owners:
            return
        owner = self.send_owners.pop(pick % len(self.send_owners))
        outcome = self.budget.close_send_handle(owner)
        mine = [t for t, _, _, o in self.senders if o == owner]
        assert list(outcome.closed) == mine, "S2-11: wrong senders closed"
        self.senders = [s for s in self.senders if s[3] != owner]
        assert list(outcome.admitted) == self.admit(), "S2-5: wrong senders admitted on close"
        if self.send_owners:
            assert not outcome.ended, "S2-10: ended while a send handle is open"
        else:
            assert list(outcome.ended) == [t for t, _ in self.receivers], "S2-10/S2-12"
            self.receivers.clear()

    def close_receive(self, pick: int) -> None:
        if not self.receive_owners:
            return
        owner = self.receive_owners.pop(pick % len(self.receive_owners))
        outcome = self.budget.close_receive_handle(owner)
        mine = [t for t, o in self.receivers if o == owner]
        assert list(outcome.closed) == mine, "S2-11: wrong receivers closed"
        self.receivers = [r for r in self.receivers if r[1] != owner]
        if self.receive_owners:
            assert not outcome.broken, "S2-9: broken while a receive handle is open"
        else:
            assert list(outcome.broken) == [t for t, *_ in self.senders], "S2-9/S2-12"
            self.senders.clear()
            self.buffer.clear()

    # ------------------------------------------------------------------------ invariants

    def check(self) -> None:
        budget = self.budget
        stats = budget.statistics()
        sizes = tuple(s for _, s in self.buffer)
        assert budget.buffered_sizes() == sizes, "S2-6: buffer differs from the model"
        assert stats.buffered_bytes == sum(sizes), "S2-6: buffered_bytes is not the sum"
        assert stats.buffered_bytes <= stats.peak_buffered_bytes, "S2-3: peak below buffered"
        assert stats.peak_buffered_bytes <= self.mark + self.largest, "S2-3: peak bound"
        tokens = tuple(t for t, *_ in self.senders)
        assert budget.parked_sender_tokens() == tokens, "S2-4: parked senders out of order"
        receivers = tuple(t for t, _ in self.receivers)
        assert budget.parked_receiver_tokens() == receivers, "S2-4: receivers out of order"
        if self.senders:
            assert not budget.admissible(self.senders[0][2]), "S2-5: lost wake-up"
            assert stats.buffered_bytes > 0, "S2-8"
            assert not self.receivers, "S2-8"
        if self.receivers:
            assert stats.buffered_items == 0, "S2-8"
        assert self.delivered == self.admitted[: len(self.delivered)], "S2-6: order or loss"
        assert stats.open_send_channels == len(self.send_owners)
        assert stats.open_receive_channels == len(self.receive_owners)
        if not self.send_owners:
            assert stats.parked_senders == stats.parked_receivers == 0, "S2-12"
        if not self.receive_owners:
            assert stats.parked_senders == stats.buffered_bytes == 0, "S2-9/S2-12"


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    reader = _Reader(data)
    first = reader.byte()
    if first is None:
        return
    harness = _Harness(mark=first % 64 + 1)
    while (op := reader.byte()) is not None:
        arg = reader.byte() or 0
        kind = op % 9
        if kind in (0, 1):
            harness.send(arg, op >> 4)
        elif kind in (2, 3):
            harness.receive(arg)
        elif kind == 4:
            harness.cancel_sender(arg)
        elif kind == 5:
            harness.cancel_receiver(arg)
        elif kind == 6:
            harness.clone(arg)
        elif kind == 7:
            harness.close_send(arg)
        else:
            harness.close_receive(arg)
        harness.check()


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz for about ``seconds`` (corpus first); return the number of inputs run."""
    return _harness.run_inputs(TestOneInput, name="budget", seconds=seconds, seed=seed, max_len=400)


if __name__ == "__main__":
    sys.exit(_harness.main(name="budget", description=__doc__, check=TestOneInput, run=run))
