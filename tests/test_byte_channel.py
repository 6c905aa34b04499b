"""
`open_byte_channel`: the trio shell over the byte budget (spec/S2-byte-budget.md).

Every park point (a send parked at the mark, a receive parked on an empty buffer) has a
deterministic cancel test: park in a nursery, ``wait_all_tasks_blocked``, cancel or close,
then check ``statistics()`` and what each task saw. Time only ever passes on the
``autojump_clock``.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import AsyncIterator, Callable

import attrs
import pytest
import trio
import trio.testing
from hypothesis import example, settings, strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph import ByteReceiveChannel, ByteSendChannel, open_byte_channel
from trio_taskgraph._core._events import BytesLike

KIB = 1024
MIB = 1024 * KIB


async def park_sender(nursery: trio.Nursery, send: ByteSendChannel[bytes], item: bytes) -> _Outcome:
    """Start a task sending ``item``; return once every task is blocked."""
    outcome = _Outcome()
    nursery.start_soon(_send_task, send, item, outcome)
    await trio.testing.wait_all_tasks_blocked()
    return outcome


@attrs.define
class _Outcome:
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: bool = False
    result: str = "pending"
    value: object = None


async def _send_task(send: ByteSendChannel[bytes], item: bytes, outcome: _Outcome) -> None:
    with outcome.scope:
        try:
            await send.send(item)
            outcome.result = "sent"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome.result = type(exc).__name__
    if outcome.scope.cancelled_caught:
        outcome.result = "cancelled"
    outcome.done = True


async def _receive_task(receive: ByteReceiveChannel[BytesLike], outcome: _Outcome) -> None:
    with outcome.scope:
        try:
            outcome.value = await receive.receive()
            outcome.result = "received"
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            outcome.result = type(exc).__name__
    if outcome.scope.cancelled_caught:
        outcome.result = "cancelled"
    outcome.done = True


async def park_receiver(nursery: trio.Nursery, receive: ByteReceiveChannel[BytesLike]) -> _Outcome:
    outcome = _Outcome()
    nursery.start_soon(_receive_task, receive, outcome)
    await trio.testing.wait_all_tasks_blocked()
    return outcome


def drain(receive: ByteReceiveChannel[BytesLike]) -> list[BytesLike]:
    items: list[BytesLike] = []
    while True:
        try:
            items.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("bad", [0, -5])
def test_high_water_must_be_positive(bad: int) -> None:
    """S2-1"""
    with pytest.raises(ValueError, match="high_water_bytes"):
        open_byte_channel(bad)


@pytest.mark.parametrize("bad", [1.5, "1024", None, True])
def test_high_water_must_be_an_int(bad: object) -> None:
    """S2-1"""
    with pytest.raises(TypeError, match="high_water_bytes"):
        open_byte_channel(bad)  # type: ignore[call-overload]


def test_size_of_must_be_callable() -> None:
    """S2-1"""
    with pytest.raises(TypeError, match="size_of"):
        open_byte_channel(10, size_of=3)  # type: ignore[call-overload]


def test_default_high_water() -> None:
    send, receive = open_byte_channel()
    assert send.statistics().high_water_bytes == tg.DEFAULT_HIGH_WATER_BYTES
    assert receive.statistics() == send.statistics()


def test_default_size_is_buffer_size() -> None:
    """S2-1: bytes, bytearray and memoryview count their nbytes."""
    send, receive = open_byte_channel(1000)
    send.send_nowait(b"abc")
    send.send_nowait(bytearray(5))
    send.send_nowait(memoryview(bytes(16)).cast("Q"))  # 2 items, 16 bytes
    assert send.statistics().buffered_bytes == 3 + 5 + 16
    assert [bytes(x) for x in drain(receive)] == [b"abc", bytes(5), bytes(16)]


@pytest.mark.parametrize("item", ["text", 3, None, [b"x"]])
def test_default_size_refuses_other_items(item: object) -> None:
    """S2-1: nothing is counted for a refused item."""
    send, _receive = open_byte_channel(10)
    with pytest.raises(TypeError, match="size_of"):
        send.send_nowait(item)  # type: ignore[arg-type]
    assert send.statistics().buffered_items == 0


@pytest.mark.parametrize(
    ("size_of", "error"),
    [
        (lambda item: -1, ValueError),
        (lambda item: 1.5, TypeError),
        (lambda item: True, TypeError),
        (lambda item: "3", TypeError),
        (lambda item: item["missing"], TypeError),  # raises KeyError
    ],
)
async def test_bad_size_of_is_a_clear_error(
    size_of: Callable[[dict[str, int]], int], error: type[Exception]
) -> None:
    """S2-1: the error names size_of; nothing is counted; the channel stays usable."""
    send, receive = open_byte_channel(10, size_of=size_of)
    with pytest.raises(error, match="size_of"):
        send.send_nowait({"a": 1})
    with pytest.raises(error, match="size_of"):
        await send.send({"a": 1})
    stats = send.statistics()
    assert (stats.buffered_items, stats.buffered_bytes, stats.parked_senders) == (0, 0, 0)
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


def test_size_of_raising_chains_the_cause() -> None:
    """S2-1"""
    send, _ = open_byte_channel(10, size_of=lambda item: {}[item])
    with pytest.raises(TypeError, match="size_of raised KeyError") as info:
        send.send_nowait("k")
    assert isinstance(info.value.__cause__, KeyError)


async def test_events_budgeted_by_payload_size() -> None:
    """S2-1: size_of lets a channel of stream events be budgeted by payload bytes."""

    def payload(event: tg.StreamEvent) -> int:
        return event.size if isinstance(event, tg.BinaryDelta) else 0

    send, receive = open_byte_channel(8, size_of=payload)
    send.send_nowait(tg.Phase("start"))
    send.send_nowait(tg.BinaryDelta("out", b"12345678"))
    with pytest.raises(trio.WouldBlock):
        send.send_nowait(tg.Phase("over the mark"))
    assert send.statistics().buffered_bytes == 8
    assert await receive.receive() == tg.Phase("start")
    assert await receive.receive() == tg.BinaryDelta("out", b"12345678")


# ------------------------------------------------------------------------- basic behaviour


async def test_items_arrive_in_order_and_iteration_ends() -> None:
    """S2-6, S2-10"""
    send, receive = open_byte_channel(16)
    items = [bytes([i]) * i for i in range(40)]
    got: list[bytes] = []

    async def produce() -> None:
        async with send:
            for item in items:
                await send.send(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with receive:
            async for item in receive:
                got.append(bytes(item))
                assert receive.statistics().buffered_bytes <= 16 + 39
    assert got == items


def test_nowait_variants() -> None:
    """S2-2, S2-4, S2-13: WouldBlock instead of parking, EndOfChannel after a drain."""
    send, receive = open_byte_channel(4)
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()
    send.send_nowait(b"1234")
    with pytest.raises(trio.WouldBlock):
        send.send_nowait(b"")  # at the mark, even zero bytes wait
    assert receive.receive_nowait() == b"1234"
    send.send_nowait(b"123456789")  # larger than the mark, buffer empty: alone
    with pytest.raises(trio.WouldBlock):
        send.send_nowait(b"x")
    send.close()
    assert receive.receive_nowait() == b"123456789"
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()


async def test_checkpoints() -> None:
    """S2-13"""
    send, receive = open_byte_channel(4)
    with trio.testing.assert_checkpoints():
        await send.send(b"ab")
    with trio.testing.assert_checkpoints():
        assert await receive.receive() == b"ab"
    with trio.testing.assert_no_checkpoints():
        send.send_nowait(b"c")
        receive.receive_nowait()
        clone = send.clone()
        clone.close()
        rclone = receive.clone()
        rclone.close()
    with trio.testing.assert_checkpoints():
        await send.aclose()
    with trio.testing.assert_checkpoints():
        await receive.aclose()


async def test_aclose_closes_even_when_cancelled() -> None:
    """S2-11, S2-13"""
    send, receive = open_byte_channel(4)
    with trio.CancelScope() as scope:
        scope.cancel()
        await send.aclose()
    assert scope.cancelled_caught
    assert send.statistics().open_send_channels == 0
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()


async def test_closed_handles_raise_closed_resource_error() -> None:
    """S2-11"""
    send, receive = open_byte_channel(4)
    keep_send, keep_receive = send.clone(), receive.clone()
    send.close()
    send.close()  # idempotent
    receive.close()
    with pytest.raises(trio.ClosedResourceError):
        send.send_nowait(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await send.send(b"x")
    with pytest.raises(trio.ClosedResourceError):
        send.clone()
    with pytest.raises(trio.ClosedResourceError):
        receive.receive_nowait()
    with pytest.raises(trio.ClosedResourceError):
        await receive.receive()
    with pytest.raises(trio.ClosedResourceError):
        receive.clone()
    # The clones still work.
    await keep_send.send(b"ok")
    assert await keep_receive.receive() == b"ok"


def test_context_managers_close() -> None:
    """S2-11"""
    send, receive = open_byte_channel(4)
    with send, receive:
        pass
    stats = receive.statistics()
    assert (stats.open_send_channels, stats.open_receive_channels) == (0, 0)
    assert "byte send channel" in repr(send)
    assert "byte receive channel" in repr(receive)


def test_statistics_snapshot_from_every_clone() -> None:
    """S2-14, L-5: frozen snapshots, equal from every handle of either end."""
    send, receive = open_byte_channel(10)
    clone = send.clone()
    send.send_nowait(b"abc")
    snapshot = receive.statistics()
    assert snapshot == send.statistics() == clone.statistics()
    assert isinstance(snapshot, tg.ByteChannelStatistics)
    receive.receive_nowait()
    assert snapshot.buffered_bytes == 3  # unchanged: a snapshot
    assert receive.statistics().buffered_bytes == 0
    assert receive.statistics().peak_buffered_bytes == 3
    assert snapshot.open_send_channels == 2
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.buffered_bytes = 7  # type: ignore[misc]


# ------------------------------------------------------------------- park points, cancelled


async def test_cancel_send_parked_at_the_mark() -> None:
    """S2-7: a cancelled parked send enqueued nothing and counted nothing."""
    send, receive = open_byte_channel(4)
    send.send_nowait(b"1234")
    async with trio.open_nursery() as nursery:
        parked = await park_sender(nursery, send, b"parked")
        stats = send.statistics()
        assert (stats.parked_senders, stats.parked_sender_bytes) == (1, 6)
        parked.scope.cancel()
    assert parked.result == "cancelled"
    stats = send.statistics()
    assert (stats.parked_senders, stats.parked_sender_bytes, stats.buffered_bytes) == (0, 0, 4)
    send.close()
    assert drain(receive) == [b"1234"]


async def test_cancel_receive_parked_on_empty() -> None:
    """S2-7: a cancelled parked receive took nothing; the next item stays in the buffer."""
    send, receive = open_byte_channel(4)
    async with trio.open_nursery() as nursery:
        parked = await park_receiver(nursery, receive)
        assert receive.statistics().parked_receivers == 1
        parked.scope.cancel()
    assert parked.result == "cancelled"
    assert receive.statistics().parked_receivers == 0
    send.send_nowait(b"kept")
    assert receive.statistics().buffered_bytes == 4
    assert receive.receive_nowait() == b"kept"


async def test_cancelling_the_parked_head_admits_the_next() -> None:
    """S2-5, S2-7: a big parked chunk is cancelled; the small one behind it enters at once."""
    send, receive = open_byte_channel(10)
    send.send_nowait(b"x" * 5)
    async with trio.open_nursery() as nursery:
        big = await park_sender(nursery, send, b"B" * 50)
        small = await park_sender(nursery, send, b"s")
        assert send.statistics().parked_senders == 2
        big.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert small.done
    assert (big.result, small.result) == ("cancelled", "sent")
    assert send.statistics().buffered_bytes == 6
    send.close()
    assert drain(receive) == [b"x" * 5, b"s"]


async def test_send_hands_over_to_a_parked_receiver() -> None:
    """S2-8: direct hand-over, never buffered."""
    send, receive = open_byte_channel(4)
    async with trio.open_nursery() as nursery:
        first = await park_receiver(nursery, receive)
        second = await park_receiver(nursery, receive)
        await send.send(b"big chunk, larger than the mark")
        await send.send(b"2")
    assert first.value == b"big chunk, larger than the mark"
    assert second.value == b"2"
    assert receive.statistics().peak_buffered_bytes == 0


# ------------------------------------------------------------------ FIFO and exact wake-ups


async def test_parked_senders_are_fifo_and_large_is_not_overtaken() -> None:
    """S2-4"""
    send, receive = open_byte_channel(10)
    send.send_nowait(b"a" * 5)
    async with trio.open_nursery() as nursery:
        big = await park_sender(nursery, send, b"B" * 30)
        small = [await park_sender(nursery, send, bytes([i])) for i in range(3)]
        with pytest.raises(trio.WouldBlock):
            send.send_nowait(b"z")  # no overtaking from send_nowait either
        assert receive.receive_nowait() == b"a" * 5
        await trio.testing.wait_all_tasks_blocked()
        assert big.done
        assert not any(s.done for s in small)  # the big chunk is alone
        assert receive.receive_nowait() == b"B" * 30
    assert [s.result for s in small] == ["sent"] * 3
    assert drain(receive) == [b"\x00", b"\x01", b"\x02"]


async def test_receive_wakes_only_the_senders_it_admits() -> None:
    """S2-5, M-2: no thundering herd; a woken sender never finds itself over the mark."""
    mark = 100
    send, receive = open_byte_channel(mark)
    send.send_nowait(b"h" * 60)
    send.send_nowait(b"h" * 60)
    async with trio.open_nursery() as nursery:
        parked = [await park_sender(nursery, send, bytes([i]) * 15) for i in range(10)]
        assert send.statistics().parked_senders == 10
        receive.receive_nowait()  # frees 60: room for exactly three 15-byte chunks
        await trio.testing.wait_all_tasks_blocked()
        assert [p.done for p in parked] == [True] * 3 + [False] * 7
        stats = send.statistics()
        assert (stats.parked_senders, stats.buffered_bytes) == (7, 60 + 45)
        assert stats.peak_buffered_bytes <= mark + 60
        send.close()  # the rest get ClosedResourceError, nothing left parked
    assert [p.result for p in parked] == ["sent"] * 3 + ["ClosedResourceError"] * 7
    assert drain(receive) == [b"h" * 60] + [bytes([i]) * 15 for i in range(3)]


# ------------------------------------------------------------------------------ closing


async def test_closing_last_receive_handle_breaks_every_parked_sender() -> None:
    """S2-9, S2-12: all at once, from every clone; buffer dropped; later sends broken."""
    send, receive = open_byte_channel(4)
    other = send.clone()
    rclone = receive.clone()
    send.send_nowait(b"1234")
    async with trio.open_nursery() as nursery:
        a = await park_sender(nursery, send, b"a")
        b = await park_sender(nursery, other, b"b")
        rclone.close()  # not the last: nothing happens
        await trio.testing.wait_all_tasks_blocked()
        assert not a.done
        receive.close()
    assert (a.result, b.result) == ("BrokenResourceError", "BrokenResourceError")
    stats = send.statistics()
    assert (stats.parked_senders, stats.buffered_bytes, stats.buffered_items) == (0, 0, 0)
    with pytest.raises(trio.BrokenResourceError):
        await send.send(b"late")
    with pytest.raises(trio.BrokenResourceError):
        other.send_nowait(b"late")


async def test_closing_a_send_handle_releases_its_parked_sender() -> None:
    """S2-11: closed from another task while parked; a clone's sender behind it enters."""
    send, receive = open_byte_channel(4)
    other = send.clone()
    send.send_nowait(b"12")
    async with trio.open_nursery() as nursery:
        big = await park_sender(nursery, send, b"B" * 10)
        small = await park_sender(nursery, other, b"s")
        send.close()
    assert (big.result, small.result) == ("ClosedResourceError", "sent")
    assert receive.statistics().open_send_channels == 1
    other.close()
    assert drain(receive) == [b"12", b"s"]


async def test_closing_last_send_handle_ends_parked_receivers() -> None:
    """S2-10, S2-12"""
    send, receive = open_byte_channel(4)
    clone = send.clone()
    async with trio.open_nursery() as nursery:
        first = await park_receiver(nursery, receive)
        second = await park_receiver(nursery, receive.clone())
        send.close()
        await trio.testing.wait_all_tasks_blocked()
        assert not first.done
        clone.close()
    assert (first.result, second.result) == ("EndOfChannel", "EndOfChannel")
    assert receive.statistics().parked_receivers == 0


async def test_closing_a_receive_clone_releases_its_parked_receiver() -> None:
    """S2-11"""
    send, receive = open_byte_channel(4)
    clone = receive.clone()
    async with trio.open_nursery() as nursery:
        mine = await park_receiver(nursery, clone)
        theirs = await park_receiver(nursery, receive)
        clone.close()
        await trio.testing.wait_all_tasks_blocked()
        assert mine.result == "ClosedResourceError"
        send.send_nowait(b"x")
    assert theirs.value == b"x"


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_cancel_and_close_in_the_same_tick(cancel_first: bool) -> None:
    """S2-7, S2-9, S2-12: whichever wins, the task ends once and nothing stays counted."""
    send, receive = open_byte_channel(1)
    send.send_nowait(b"1")
    async with trio.open_nursery() as nursery:
        parked = await park_sender(nursery, send, b"2")
        if cancel_first:
            parked.scope.cancel()
            receive.close()
        else:
            receive.close()
            parked.scope.cancel()
    assert parked.result == ("cancelled" if cancel_first else "BrokenResourceError")
    stats = send.statistics()
    assert (stats.parked_senders, stats.buffered_bytes) == (0, 0)


async def test_clone_and_close_race_with_a_sequencer() -> None:
    """S2-10, S2-11, S2-12: closing the original while a clone's sender is parked.

    The receivers must not see EndOfChannel while the clone is open, the parked sender on
    the clone must stay parked (and later be admitted), and the last close ends the stream.
    """
    send, receive = open_byte_channel(2)
    seq = trio.testing.Sequencer()
    send.send_nowait(b"12")
    clones: list[ByteSendChannel[BytesLike]] = []
    got: list[BytesLike] = []

    async def producer() -> None:
        async with seq(0):
            clones.append(send.clone())
        async with seq(2):
            send.close()  # the original closes; the clone keeps the channel open
            stats = receive.statistics()
            assert (stats.open_send_channels, stats.parked_senders) == (1, 1)
        async with seq(4):
            await clones[0].aclose()

    async def sender() -> None:
        async with seq(1):
            pass
        await clones[0].send(b"34")  # parks at the mark until the receive at step 3

    async def consumer() -> None:
        async with seq(3):
            got.append(await receive.receive())
        got.extend([item async for item in receive])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        nursery.start_soon(sender)
        nursery.start_soon(consumer)
    assert got == [b"12", b"34"]
    assert receive.statistics().parked_senders == 0


# ---------------------------------------------------------------------- the seed's cases


@pytest.mark.slow
async def test_seed_slow_consumer_100_x_1mib(autojump_clock: trio.abc.Clock) -> None:
    """S2-3, S2-6: 100 x 1 MiB through a slow consumer, 4 MiB mark: bounded, all delivered."""
    mark, chunk = 4 * MIB, MIB
    send, receive = open_byte_channel(mark)
    seen_peak = 0
    received = 0

    async def produce() -> None:
        async with send:
            for i in range(100):
                await send.send(bytes([i]) * chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with receive:
            async for i, item in _aenumerate(receive):
                await trio.sleep(0.05)  # slow sink (virtual time)
                seen_peak = max(seen_peak, receive.statistics().buffered_bytes)
                assert item == bytes([i]) * chunk
                received += len(item)
    assert received == 100 * chunk
    peak = receive.statistics().peak_buffered_bytes
    assert peak <= mark + chunk
    assert peak >= mark - chunk  # the budget was actually exercised
    assert seen_peak <= peak


async def _aenumerate(
    receive: ByteReceiveChannel[BytesLike],
) -> AsyncIterator[tuple[int, BytesLike]]:
    i = 0
    async for item in receive:
        yield i, item
        i += 1


@pytest.mark.slow
async def test_seed_100_mib_end_to_end() -> None:
    """S2-3, S2-6: 100 MiB with a 4 MiB mark: every byte, in order."""
    mark, chunk, count = 4 * MIB, 64 * KIB, 1600
    send, receive = open_byte_channel(mark)
    sent_crc = 0
    got_crc = 0
    got_bytes = 0

    async def produce() -> None:
        nonlocal sent_crc
        async with send:
            for i in range(count):
                item = i.to_bytes(4, "big") * (chunk // 4)
                sent_crc = zlib.crc32(item, sent_crc)
                await send.send(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async for item in receive:
            got_crc = zlib.crc32(item, got_crc)
            got_bytes += len(item)
    assert got_bytes == count * chunk == 100 * MIB
    assert got_crc == sent_crc
    assert receive.statistics().peak_buffered_bytes <= mark + chunk


@pytest.mark.parametrize("how", ["close", "fail"])
async def test_seed_parked_sender_released_when_receiver_goes(
    how: str, autojump_clock: trio.abc.Clock
) -> None:
    """S2-9, late HIGH 2: a sink that closes or dies before reading releases the producer."""
    send, receive = open_byte_channel(4 * MIB)
    parked = trio.Event()
    released: list[type[BaseException]] = []

    async def producer() -> None:
        with trio.fail_after(0.1):  # virtual time: a hang fails here, promptly
            async with send:
                await send.send(bytes(4 * MIB))
                parked.set()
                try:
                    await send.send(b"more")  # parks at the mark
                except BaseException as exc:
                    released.append(type(exc))
                    raise

    async def sink() -> None:
        async with receive:
            await parked.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert receive.statistics().parked_senders == 1
            if how == "fail":
                raise OSError("EACCES: the sink died before reading")

    if how == "close":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink)
            with pytest.raises(trio.BrokenResourceError):
                await producer()
    else:
        # The producer's BrokenResourceError is then replaced by the nursery's Cancelled at
        # its own aclose() checkpoint; what matters is that its parked send was released.
        with pytest.RaisesGroup(OSError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink)
                nursery.start_soon(producer)
    assert released == [trio.BrokenResourceError]
    assert trio.current_time() < 0.1
    assert send.statistics().parked_senders == 0


# ------------------------------------------------------- random schedules with real tasks


_ACTIONS = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 16), st.integers(0, 3)),
    st.tuples(st.just("send"), st.integers(0, 16), st.integers(0, 3)),
    st.tuples(st.just("recv"), st.integers(0, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 3)),  # mostly the oldest (head) tasks
    st.tuples(st.just("clone_send")),
    st.tuples(st.just("clone_recv")),
    st.tuples(st.just("close_send"), st.integers(0, 3)),
    st.tuples(st.just("close_recv"), st.integers(0, 3)),
)


def _profile_max_examples() -> int:
    profile = settings.default
    assert profile is not None  # conftest.py loads one
    return profile.max_examples


@settings(max_examples=max(_profile_max_examples(), 150))
@given(mark=st.integers(1, 8), actions=st.lists(_ACTIONS, max_size=50))
def test_random_schedules_of_real_tasks(mark: int, actions: list[tuple[object, ...]]) -> None:
    """S2-3, S2-4, S2-6, S2-7, S2-9, S2-10, S2-12 with real trio tasks.

    Random producers and consumers on random clones, random cancellations and closes; the
    scheduler is stepped with ``wait_all_tasks_blocked``, so after each step every task is
    either finished or parked. Checks: parked counts match the tasks actually blocked, the
    peak bound, receive order equals admission order (nothing lost or duplicated), cancelled
    sends never arrive, and once every handle is closed no task is left.
    """
    trio.run(_random_schedule, mark, actions)


def _int(value: object) -> int:
    """An action's integer argument (the strategy draws ints there)."""
    assert isinstance(value, int)
    return value


async def _random_schedule(mark: int, actions: list[tuple[object, ...]]) -> None:
    def size_of(item: tuple[int, int]) -> int:
        return item[1]

    send0, recv0 = open_byte_channel(mark, size_of=size_of)
    sends: list[ByteSendChannel[tuple[int, int]]] = [send0]
    recvs: list[ByteReceiveChannel[tuple[int, int]]] = [recv0]
    senders: list[tuple[tuple[int, int], _Outcome]] = []
    receivers: list[_Outcome] = []
    uid = 0
    closed: set[int] = set()  # ids of the handles this schedule closed
    largest = 0

    async def do_send(
        handle: ByteSendChannel[tuple[int, int]], item: tuple[int, int], o: _Outcome
    ) -> None:
        with o.scope:
            try:
                await handle.send(item)
                o.result = "sent"
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                o.result = type(exc).__name__
        if o.scope.cancelled_caught:
            o.result = "cancelled"
        o.done = True

    async def do_receive(handle: ByteReceiveChannel[tuple[int, int]], o: _Outcome) -> None:
        with o.scope:
            try:
                o.value = await handle.receive()
                o.result = "received"
            except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
                o.result = type(exc).__name__
        if o.scope.cancelled_caught:
            o.result = "cancelled"
        o.done = True

    async with trio.open_nursery() as nursery:
        for action in actions:
            kind = action[0]
            if kind == "send":
                size, index = _int(action[1]), _int(action[2])
                uid += 1
                item = (uid, size)
                largest = max(largest, size)
                outcome = _Outcome()
                senders.append((item, outcome))
                nursery.start_soon(do_send, sends[index % len(sends)], item, outcome)
            elif kind == "recv":
                outcome = _Outcome()
                receivers.append(outcome)
                index = _int(action[1])
                nursery.start_soon(do_receive, recvs[index % len(recvs)], outcome)
            elif kind == "cancel":
                active = [o for _, o in senders if not o.done] + [
                    o for o in receivers if not o.done
                ]
                if active:
                    active[_int(action[1]) % len(active)].scope.cancel()
            elif kind == "clone_send":
                open_sends = [s for s in sends if id(s) not in closed]
                if open_sends:
                    sends.append(open_sends[0].clone())
            elif kind == "clone_recv":
                open_recvs = [r for r in recvs if id(r) not in closed]
                if open_recvs:
                    recvs.append(open_recvs[0].clone())
            elif kind == "close_send":
                send_handle = sends[_int(action[1]) % len(sends)]
                send_handle.close()
                closed.add(id(send_handle))
            else:
                recv_handle = recvs[_int(action[1]) % len(recvs)]
                recv_handle.close()
                closed.add(id(recv_handle))
            await trio.testing.wait_all_tasks_blocked()
            stats = send0.statistics()
            # Every unfinished task is parked, and the core counts exactly those (S2-12).
            assert stats.parked_senders == sum(not o.done for _, o in senders)
            assert stats.parked_receivers == sum(not o.done for o in receivers)
            assert not (stats.parked_senders and stats.parked_receivers)  # S2-8
            assert stats.peak_buffered_bytes <= mark + largest  # S2-3

        # Finish: close every send handle, drain what is left, close every receive handle.
        for s in sends:
            s.close()
        await trio.testing.wait_all_tasks_blocked()
        drained: list[tuple[int, int]] = []
        open_recvs = [r for r in recvs if id(r) not in closed]
        if open_recvs:
            while True:
                try:
                    drained.append(open_recvs[0].receive_nowait())
                except trio.EndOfChannel:
                    break
        for r in recvs:
            r.close()
        await trio.testing.wait_all_tasks_blocked()
        stuck = [o for _, o in senders if not o.done] + [o for o in receivers if not o.done]
        if stuck:  # pragma: no cover - a failure: do not hang the test run
            nursery.cancel_scope.cancel()
        assert not stuck, "a task was left parked (S2-12)"

    sent = [item for item, o in senders if o.result == "sent"]
    received = [o.value for o in receivers if o.result == "received"] + drained
    # S2-6: received in admission order (= start order of successful sends), no duplicates;
    # only the tail buffered when the receive side closed may be missing.
    assert received == sent[: len(received)]
    if open_recvs:
        assert received == sent
    cancelled = {item for item, o in senders if o.result == "cancelled"}
    assert not cancelled & set(received)  # S2-7
    final = send0.statistics()
    assert (final.parked_senders, final.parked_receivers) == (0, 0)
    assert final.peak_buffered_bytes <= mark + largest


@given(
    mark=st.integers(1, 10),
    prefill=st.lists(st.integers(0, 10), max_size=4),
    parked_sizes=st.lists(st.integers(0, 25), min_size=1, max_size=8),
    ops=st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, "head", "recv"]), max_size=12),
)
@example(mark=10, prefill=[5], parked_sizes=[25, 1], ops=["head"])  # lost wake-up bait
@example(mark=100, prefill=[60, 60], parked_sizes=[15] * 8, ops=["recv"])  # M-2 bait
def test_random_cancellation_of_parked_senders(
    mark: int, prefill: list[int], parked_sizes: list[int], ops: list[int | str]
) -> None:
    """S2-4, S2-5, S2-7, S2-12: parked senders cancelled at random points, between receives.

    After every step the core's parked count equals the tasks actually blocked (a lost
    wake-up would leave a task blocked that the core no longer counts), and the final
    stream is the prefill, then the surviving sends in order.
    """
    trio.run(_cancel_parked, mark, prefill, parked_sizes, ops)


async def _cancel_parked(
    mark: int, prefill: list[int], parked_sizes: list[int], ops: list[int | str]
) -> None:
    send, receive = open_byte_channel(mark)
    admitted_first: list[bytes] = []
    for i, size in enumerate(prefill):
        item = bytes([100 + i]) * size
        try:
            send.send_nowait(item)
        except trio.WouldBlock:
            break
        admitted_first.append(item)
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        parked = [
            (item, await park_sender(nursery, send, item))
            for item in (bytes([i]) * size for i, size in enumerate(parked_sizes))
        ]
        for op in ops:
            if op == "recv":
                with contextlib.suppress(trio.WouldBlock):
                    received.append(bytes(receive.receive_nowait()))
            elif op == "head":
                waiting = [o for _, o in parked if not o.done]
                if waiting:
                    waiting[0].scope.cancel()
            else:
                parked[int(op) % len(parked)][1].scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            stats = send.statistics()
            assert stats.parked_senders == sum(not o.done for _, o in parked)
            assert stats.peak_buffered_bytes <= mark + max([*prefill, *parked_sizes])
            if stats.parked_senders:  # S2-5: the head is not admissible
                head = next(item for item, o in parked if not o.done)
                assert stats.buffered_bytes
                assert stats.buffered_bytes >= mark or len(head) > mark
        send.close()
    received.extend(bytes(x) for x in drain(receive))
    sent = [item for item, o in parked if o.result == "sent"]
    assert received == admitted_first + sent
    assert {o.result for _, o in parked} <= {"sent", "cancelled", "ClosedResourceError"}


# ------------------------------------------------------------- cancellation torture (S7)


@attrs.define
class _Pipeline:
    """Two producers on send clones, two consumers on receive clones (one slower, so sends
    park at the mark); rebuilt afresh on every run of the torture toolkit.

    Each consumer records what it receives in its own list: two consumers woken in the same
    tick may run in either order, so only each consumer's own sequence has an order to check.
    """

    mark: int = 5
    items: int = 6
    send: ByteSendChannel[BytesLike] | None = None
    sent: list[bytes] = attrs.Factory(list)
    received: tuple[list[bytes], list[bytes]] = attrs.Factory(lambda: ([], []))

    async def scenario(self) -> None:
        send, receive = open_byte_channel(self.mark)
        self.send, self.sent, self.received = send, [], ([], [])
        sent = self.sent

        async def produce(handle: ByteSendChannel[BytesLike], tag: int) -> None:
            async with handle:
                for i in range(self.items):
                    item = bytes([tag, i]) * (1 + i % 3)
                    await handle.send(item)
                    sent.append(item)  # no checkpoint between the send and this line

        async def consume(handle: ByteReceiveChannel[BytesLike], into: list[bytes]) -> None:
            async with handle:
                async for item in handle:
                    into.append(bytes(item))
                    if into is self.received[0]:  # the slow one
                        await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, send.clone(), 1)
            nursery.start_soon(produce, send, 2)
            nursery.start_soon(consume, receive.clone(), self.received[0])
            nursery.start_soon(consume, receive, self.received[1])

    def check(self) -> None:
        assert self.send is not None
        stats = self.send.statistics()
        assert (stats.parked_senders, stats.parked_receivers) == (0, 0)  # S2-12
        assert (stats.open_send_channels, stats.open_receive_channels) == (0, 0)  # S2-11
        everything = self.received[0] + self.received[1]
        assert len(set(everything)) == len(everything)  # S2-6: no duplicates
        assert set(everything) <= set(self.sent)  # S2-7: cancelled sends never arrive
        for mine in self.received:  # S2-6: each consumer sees each producer's items in order
            for tag in (1, 2):
                order = [self.sent.index(x) for x in mine if x[0] == tag]
                assert order == sorted(order)
        assert stats.peak_buffered_bytes <= self.mark + 3 * 2  # S2-3


async def test_pipeline_cancelled_at_each_checkpoint() -> None:
    """S2-3, S2-6, S2-7, S2-11, S2-12 under `cancel_at_each_checkpoint` (S7).

    After every run: no task parked, every handle closed by its ``async with``, nothing
    received that was not sent (atomic sends), no duplicates, each producer's items in order.
    """
    from trio_taskgraph.testing import cancel_at_each_checkpoint, torture_max_points

    pipeline = _Pipeline()
    report = await cancel_at_each_checkpoint(
        pipeline.scenario, check=pipeline.check, max_points=torture_max_points(25)
    )
    assert report.points_exercised >= 2


@given(data=st.data())
async def test_pipeline_cancelled_at_random_checkpoints(data: st.DataObject) -> None:
    """S2-3, S2-6, S2-7, S2-11, S2-12 under `cancel_at_random_checkpoints` (S7).

    Hypothesis draws the mark, the number of items, the scheduler seed and the cancel points.
    """
    from trio_taskgraph.testing import cancel_at_random_checkpoints

    pipeline = _Pipeline(
        mark=data.draw(st.integers(1, 8), label="mark"),
        items=data.draw(st.integers(0, 6), label="items"),
    )
    await cancel_at_random_checkpoints(pipeline.scenario, check=pipeline.check, data=data, points=2)
