"""
Who receives on a `CacheServerRepository` connection (spec/S5-19): a caller whose reply is
due and finds nobody receiving reads the socket itself; the reader task takes over for
callers parked behind another, for open streams and for stalled sends.

Most tests play the server by hand (`scripted_server`), so what arrives when is decided by
the test, not by timing.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings, strategies as st

from tests.polling import wait_until
from tests.server_harness import (
    ScriptedPeer,
    in_process_server,
    scripted_server,
    server_process,
)
from tests.typed_hypothesis import given
from trio_taskgraph import CacheRef, CacheServerError, CacheServerRepository, connect_cache_server
from trio_taskgraph._core._messages import (
    Abort,
    Credit,
    Data,
    EndStream,
    Failed,
    GetOutput,
    Ok,
    ReadStream,
    SaveOutput,
    SaveStream,
    encode_message,
)
from trio_taskgraph._repository._client import _Connection

READER = "trio_taskgraph._repository._client._Connection.reader"


@attrs.define(eq=False)
class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of tasks by name."""

    steps: dict[str, int] = attrs.Factory(dict)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


def _conn(repo: CacheServerRepository) -> _Connection:
    return repo._conn


async def _assert_idle(conn: _Connection) -> None:
    """Once every task has settled: nothing in flight, nobody receiving or parked,
    nothing buffered."""
    await trio.testing.wait_all_tasks_blocked()
    assert conn.requests == {}
    assert conn.lingering == {}
    assert conn.slots.value == conn.max_in_flight  # every slot back
    assert not conn.receiving
    assert conn.waiting == 0
    assert conn.streams == 0
    assert conn.buffered == 0


async def _next_get(peer: ScriptedPeer) -> GetOutput:
    message = await peer.receive()
    assert isinstance(message, GetOutput), message
    return message


@attrs.define
class Callers:
    """Gets of rows named by their task type, each in a task of its own: ``outcomes``
    holds what each returned, or the `CacheServerError` it raised."""

    repo: CacheServerRepository
    outcomes: dict[str, object] = attrs.Factory(dict)

    async def get(self, name: str, scope: trio.CancelScope | None = None) -> None:
        with scope if scope is not None else contextlib.nullcontext():
            try:
                self.outcomes[name] = await self.repo.get_output(name, {})
            except CacheServerError as exc:
                self.outcomes[name] = exc

    async def start(
        self,
        nursery: trio.Nursery,
        peer: ScriptedPeer,
        name: str,
        scope: trio.CancelScope | None = None,
    ) -> GetOutput:
        """Start a get of ``name``; return its request once the server has read it."""
        nursery.start_soon(self.get, name, scope)
        return await _next_get(peer)

    async def leave_lingering(self, peer: ScriptedPeer, name: str) -> GetOutput:
        """A get of ``name`` whose caller is cancelled once the server has it: it lingers
        (S5-8). Returns its request."""
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            request = await self.start(nursery, peer, name, scope)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        assert name not in self.outcomes
        assert self.repo.statistics().requests == 0
        assert self.repo.statistics().lingering_requests == 1
        return request


async def test_a_lone_round_trip_is_received_by_its_caller(tmp_path: Path) -> None:
    """S5-19: sequential gets against a real server never wake the reader task: each
    caller reads its own reply (one wake-up per round trip, not two)."""
    async with (
        in_process_server(tmp_path / "root") as (_server, sock),
        connect_cache_server(sock) as repo,
    ):
        await repo.save_output("row", {"k": 1}, {"v": b"x" * 100})
        await trio.testing.wait_all_tasks_blocked()
        counter = StepCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(20):
                assert await repo.get_output("row", {"k": 1}) == {"v": b"x" * 100}
                assert await repo.get_output("row", {"k": 2}) is None
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps.get(READER, 0) == 0
        await _assert_idle(_conn(repo))


async def test_a_receiving_caller_hands_other_callers_their_replies() -> None:
    """S5-19, S5-8: A receives while B is parked behind it; replies for both come in one
    write, A's first: A dispatches B's too before it returns (the reader never runs)."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        callers = Callers(repo)
        async with trio.open_nursery() as nursery:
            first = await callers.start(nursery, peer, "a")
            second = await callers.start(nursery, peer, "b")
            await trio.testing.wait_all_tasks_blocked()
            conn = _conn(repo)
            assert conn.receiving
            assert conn.waiting == 1
            counter = StepCounter()
            trio.lowlevel.add_instrument(counter)
            await peer.send(
                Ok(id=first.id, value={"who": first.task_type}),
                Ok(id=second.id, value={"who": second.task_type}),
            )
        trio.lowlevel.remove_instrument(counter)
        assert callers.outcomes == {"a": {"who": "a"}, "b": {"who": "b"}}
        assert counter.steps.get(READER, 0) == 0
        await _assert_idle(conn)


async def test_replies_for_a_parked_caller_first_are_dispatched_by_the_receiving_one() -> None:
    """S5-19: B's reply arrives before A's: A (receiving) wakes B and goes on for its own."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        callers = Callers(repo)
        async with trio.open_nursery() as nursery:
            first = await callers.start(nursery, peer, "a")
            second = await callers.start(nursery, peer, "b")
            await peer.send(Ok(id=second.id, value={"who": "b"}))
            await trio.testing.wait_all_tasks_blocked()
            assert callers.outcomes == {"b": {"who": "b"}}
            assert _conn(repo).receiving  # a still receives for itself
            await peer.send(Ok(id=first.id, value={"who": "a"}))
        assert callers.outcomes == {"a": {"who": "a"}, "b": {"who": "b"}}
        await _assert_idle(_conn(repo))


@pytest.mark.parametrize("partial_frame", [False, True])
async def test_a_cancelled_receiving_caller_hands_receiving_to_the_reader(
    partial_frame: bool,
) -> None:
    """S5-19 (every park point has a cancel test): A is cancelled where it waits on the
    socket, with B parked behind it (and, in one case, half of B's reply already read):
    the reader takes over, B gets its whole reply, A's late reply is dropped, nothing is
    left buffered and the connection keeps working."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        conn = _conn(repo)
        callers = Callers(repo)
        a_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            first = await callers.start(nursery, peer, "a", a_scope)
            second = await callers.start(nursery, peer, "b")
            b_reply = encode_message(Ok(id=second.id, value={"who": "b"}))
            if partial_frame:
                await peer.send_raw(b_reply[:7])
            await trio.testing.wait_all_tasks_blocked()
            assert conn.receiving
            assert conn.waiting == 1
            a_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert "a" not in callers.outcomes
            assert a_scope.cancelled_caught
            # The reader now receives for b.
            assert conn.receiving
            assert conn.waiting == 1
            await peer.send_raw(b_reply[7:] if partial_frame else b_reply)
            await peer.send(Ok(id=first.id, value={"who": "a, too late"}))
        assert callers.outcomes == {"b": {"who": "b"}}
        # The late reply is read (by the next receiver) and dropped; the connection works.
        async with trio.open_nursery() as nursery:
            third = await callers.start(nursery, peer, "b")
            await peer.send(Ok(id=third.id, value={"who": "b again"}))
        assert callers.outcomes["b"] == {"who": "b again"}
        await _assert_idle(conn)


async def test_a_stalled_send_keeps_the_reader_receiving() -> None:
    """S5-19: a send that waits for room while nobody receives makes the reader receive,
    so a server that only reads once its own writes are taken is never deadlocked with us
    (without it, the send would hit the 30 s SEND_TIMEOUT and kill the connection)."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        conn = _conn(repo)
        big = b"x" * (8 << 20)  # more than both socket buffers hold
        flood = [Ok(id=10_000 + i, value={"pad": b"p" * 60_000}) for i in range(150)]
        # Replies for ids the client never sent are dropped, but they must be read.
        async with trio.open_nursery() as nursery:
            saved = trio.Event()

            async def save() -> None:
                await repo.save_output("big", {}, {"v": big})
                saved.set()

            async def serve() -> None:
                await peer.send(*flood)  # returns only once the client has read most of it
                message = await peer.receive()
                assert isinstance(message, SaveOutput)
                assert message.output == {"v": big}
                await peer.send(Ok(id=message.id, value=None))

            nursery.start_soon(save)
            nursery.start_soon(serve)
            await saved.wait()
        await _assert_idle(conn)


async def test_the_server_closing_while_a_caller_receives_fails_every_caller() -> None:
    """S5-19, S5-14: the receiving caller sees the end of the connection: it and the
    caller parked behind it raise `CacheServerError`, and so does every later call."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        callers = Callers(repo)
        async with trio.open_nursery() as nursery:
            await callers.start(nursery, peer, "a")
            await callers.start(nursery, peer, "b")
            await trio.testing.wait_all_tasks_blocked()
            await peer.send(Failed(id=-1, kind="protocol", message="going away"))
            await peer.aclose()
        assert set(callers.outcomes) == {"a", "b"}
        for error in callers.outcomes.values():
            assert isinstance(error, CacheServerError)
            assert "going away" in str(error)
        with pytest.raises(CacheServerError, match="going away"):
            await repo.get_output("c", {})
        conn = _conn(repo)
        assert not conn.receiving
        assert conn.waiting == 0


async def test_part_of_a_frame_read_after_a_reply_is_finished_by_the_reader() -> None:
    """S5-19: the receiving caller's read also brought the start of a later frame; once
    the caller leaves, the reader reads the rest, so no half frame stays in the decoder."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        conn = _conn(repo)
        late = encode_message(Ok(id=999, value={"pad": b"p" * 100}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repo.get_output, "a", {})
            first = await _next_get(peer)
            await peer.send_raw(encode_message(Ok(id=first.id, value=None)) + late[:10])
        await trio.testing.wait_all_tasks_blocked()
        assert conn.buffered == 10
        assert conn.receiving  # the reader, waiting for the rest
        await peer.send_raw(late[10:])
        await trio.testing.wait_all_tasks_blocked()
        await _assert_idle(conn)


async def test_an_aborted_download_is_drained_so_the_server_finishes_it(tmp_path: Path) -> None:
    """S5-19, S5-9, S5-10: a caller takes one chunk of a blob far larger than the socket
    buffers, leaves the block (abort) and makes no further call: the reader still takes
    (and drops) what the server had credit to send, so the server's download finishes and
    nothing is left buffered on either side."""
    window = 8 << 20
    async with (
        in_process_server(tmp_path / "root", window=window, chunk_bytes=1 << 20) as (server, sock),
        connect_cache_server(sock) as repo,
    ):
        data = bytes(range(256)) * (96 << 12)  # 96 MiB
        ref = await repo.save_output_stream("t", {}, "out", _one(data))
        async with repo.open_output_stream_by_ref(ref) as chunks:
            async for chunk in chunks:
                assert chunk == data[: len(chunk)]
                break
        conn = _conn(repo)
        await wait_until(
            lambda: not server.statistics().requests, "the server to finish the aborted download"
        )
        await wait_until(lambda: not conn.lingering, "the client to take what was in flight")
        await trio.testing.wait_all_tasks_blocked()
        await _assert_idle(conn)
        assert server.statistics().buffered_bytes == 0


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_server_sending_a_download_past_its_credit_is_dead() -> None:
    """S5-9, S5-14: data beyond the credit the client granted breaks flow control: the
    connection fails with `CacheServerError` naming it (the server is not trusted to be
    right)."""
    window = 64 * 1024
    async with (
        scripted_server(window=window, chunk_bytes=window) as (path, peer),
        connect_cache_server(path) as repo,
    ):
        ref = CacheRef(ref="cache://x/default/y#z", size=3 * window)

        failures: list[BaseException] = []

        async def read() -> None:
            try:
                async with repo.open_output_stream_by_ref(ref) as chunks:
                    async for _ in chunks:
                        pass
            except CacheServerError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            message = await peer.receive()
            assert isinstance(message, ReadStream)
            await peer.send(Ok(id=message.id, value=None))
            # The whole window, then a byte nothing granted, before the client takes any.
            await peer.send(Data(id=message.id, data=b"a" * window), Data(id=message.id, data=b"b"))
        assert len(failures) == 1
        assert "past its credit" in str(failures[0])
        with pytest.raises(CacheServerError, match="past its credit"):
            await repo.get_output("a", {})


async def test_credit_granted_for_a_download_is_counted() -> None:
    """S5-9: the credit the client sends is what it lets the server send: data up to the
    window plus every grant is accepted; the grants are what the caller took."""
    window = 64 * 1024
    async with (
        scripted_server(window=window, chunk_bytes=window // 4) as (path, peer),
        connect_cache_server(path) as repo,
    ):
        ref = CacheRef(ref="cache://x/default/y#z", size=2 * window)
        got = bytearray()

        async def read() -> None:
            async with repo.open_output_stream_by_ref(ref) as chunks:
                async for chunk in chunks:
                    got.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            message = await peer.receive()
            assert isinstance(message, ReadStream)
            await peer.send(Ok(id=message.id, value=None))
            sent = 0
            credit = window
            while sent < 2 * window:
                while credit >= window // 4 and sent < 2 * window:
                    await peer.send(Data(id=message.id, data=b"c" * (window // 4)))
                    credit -= window // 4
                    sent += window // 4
                if sent < 2 * window:
                    grant = await peer.receive()
                    assert isinstance(grant, Credit)
                    assert grant.id == message.id
                    credit += grant.n
            await peer.send(Data(id=message.id, data=b"", end=True))
        assert got == b"c" * (2 * window)
        await _assert_idle(_conn(repo))


async def test_a_failure_found_by_a_send_wakes_the_caller_receiving_for_itself() -> None:
    """S5-19, S5-14: A waits on the socket for its reply (receiving for itself) when B's
    send finds the connection broken (the server stopped reading): A raises
    `CacheServerError` at once instead of waiting on a socket nobody will speak on."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        callers = Callers(repo)
        # (a bound, not a wait: without the fix, a waits on the socket for good)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await callers.start(nursery, peer, "a")
                await trio.testing.wait_all_tasks_blocked()
                assert _conn(repo).receiving  # a, for itself
                peer._stream().socket.shutdown(socket.SHUT_RD)  # our sends now break
                nursery.start_soon(callers.get, "b")
        assert set(callers.outcomes) == {"a", "b"}
        assert all(isinstance(e, CacheServerError) for e in callers.outcomes.values())
        assert "broke" in str(callers.outcomes["a"])
        await _assert_idle(_conn(repo))


async def test_a_call_cancelled_before_it_starts_sends_nothing() -> None:
    """S5-16, S5-8: a caller already cancelled raises at once and sends no request, so
    nothing lingers and no slot is held."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        with trio.CancelScope() as scope:
            scope.cancel()
            await repo.get_output("a", {})
        assert scope.cancelled_caught
        await _assert_idle(_conn(repo))
        assert peer.pending() == 0


async def test_a_cancelled_call_keeps_its_slot_until_its_reply() -> None:
    """S5-8: the server counts a request until it has sent its reply, so a caller that
    leaves first does not give its slot back: with one slot, the next call is not sent
    until the late reply is in (sending it sooner would break the server's limit)."""
    async with (
        scripted_server(max_in_flight=1) as (path, peer),
        connect_cache_server(path) as repo,
    ):
        conn = _conn(repo)
        callers = Callers(repo)
        first = await callers.leave_lingering(peer, "a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(callers.get, "b")
            await trio.testing.wait_all_tasks_blocked()
            assert peer.pending() == 0  # b waits for the slot: nothing sent
            await peer.send(Ok(id=first.id, value={"late": True}))
            second = await _next_get(peer)
            assert second.task_type == "b"
            await peer.send(Ok(id=second.id, value={"who": "b"}))
        assert callers.outcomes == {"b": {"who": "b"}}
        await _assert_idle(conn)


async def test_a_connection_lost_with_a_request_lingering_frees_every_slot() -> None:
    """S5-8, S5-14: a cancelled call lingers in the only slot and B waits for that slot;
    the server then goes away. The reader (receiving for the lingering request) sees it:
    the lingering slot comes back, B takes it, finds the connection dead, gives it back
    and raises `CacheServerError`."""
    async with (
        scripted_server(max_in_flight=1) as (path, peer),
        connect_cache_server(path) as repo,
    ):
        conn = _conn(repo)
        callers = Callers(repo)
        await callers.leave_lingering(peer, "a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(callers.get, "b")
            await trio.testing.wait_all_tasks_blocked()
            assert conn.slots.value == 0
            assert peer.pending() == 0  # b is waiting for the slot
            await peer.aclose()
        assert set(callers.outcomes) == {"b"}
        assert isinstance(callers.outcomes["b"], CacheServerError)
        assert repo.statistics().lingering_requests == 0
        assert conn.slots.value == conn.max_in_flight
        assert not conn.receiving


async def test_an_aborted_download_keeps_its_slot_until_the_server_says_so() -> None:
    """S5-8, S5-19: a download left after one chunk is aborted; its data still on the way
    is read and dropped, and its slot comes back only with the server's `failed` (kind
    aborted), its last message."""
    async with (
        scripted_server(max_in_flight=1) as (path, peer),
        connect_cache_server(path) as repo,
    ):
        conn = _conn(repo)
        ref = CacheRef(ref="cache://x/default/y#z", size=300)
        got: list[bytes] = []

        async def read_one() -> None:
            async with repo.open_output_stream_by_ref(ref) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
                    break

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_one)
            message = await peer.receive()
            assert isinstance(message, ReadStream)
            await peer.send(Ok(id=message.id, value=None), Data(id=message.id, data=b"1" * 100))
            sent = [await peer.receive()]
            while not isinstance(sent[-1], Abort):
                sent.append(await peer.receive())
        assert got == [b"1" * 100]
        # The credit for the chunk taken (S5-9), then the abort.
        assert sent == [Credit(id=message.id, n=100), Abort(id=message.id)]
        assert repo.statistics().lingering_requests == 1
        callers = Callers(repo)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(callers.get, "b")
            # Data sent before the server saw the abort, then its last word.
            await peer.send(Data(id=message.id, data=b"2" * 100))
            await trio.testing.wait_all_tasks_blocked()
            assert peer.pending() == 0  # still no slot for b
            assert conn.buffered == 0  # the late chunk was dropped, not kept
            await peer.send(Failed(id=message.id, kind="aborted", message="aborted"))
            second = await _next_get(peer)
            await peer.send(Ok(id=second.id, value=None))
        assert callers.outcomes == {"b": None}
        await _assert_idle(conn)


async def test_an_upload_the_server_failed_early_is_ended_with_an_abort() -> None:
    """S5-8, S5-10: the server refuses an upload while its chunks still come; the client
    raises its error and tells the server it is done (an abort), without which the server
    would keep the upload open, holding one of the connection's slots, for good."""
    async with (
        scripted_server(max_in_flight=1) as (path, peer),
        connect_cache_server(path) as repo,
    ):
        conn = _conn(repo)
        gate = trio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"x" * 10
            await gate.wait()
            yield b"y" * 10

        async def upload() -> None:
            with pytest.raises(ValueError, match="no room"):
                await repo.save_output_stream("t", {}, "out", chunks())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            start = await peer.receive()
            assert isinstance(start, SaveStream)
            await peer.send(Failed(id=start.id, kind="value", message="no room"))
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            rest = [await peer.receive()]
            while not isinstance(rest[-1], Abort):
                rest.append(await peer.receive())
        assert all(getattr(m, "id", None) == start.id for m in rest)
        assert not any(isinstance(m, EndStream) for m in rest)
        await _assert_idle(conn)


async def test_many_callers_on_few_slots_never_break_the_servers_limit() -> None:
    """S5-8 (regression): six tasks share a connection whose server allows two requests
    in flight. The server frees a request before it sends its last message, so a client
    that sends its next request the moment a reply arrives is never over the limit (it
    was: the server still counted the answered request, and closed the connection)."""
    with server_process("--max-in-flight", "2", "--row-cache-bytes", "0") as server:
        async with connect_cache_server(server.socket_path) as repo:
            await repo.save_output("t", {"j": 0}, {"v": 0})

            async def worker(i: int) -> None:
                for j in range(400):
                    row = await repo.get_output("t", {"j": j % 3})
                    assert row == ({"v": 0} if j % 3 == 0 else None)

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(worker, i)
            await _assert_idle(_conn(repo))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n=st.integers(1, 6),
    data=st.data(),
)
def test_any_order_of_replies_and_cancellations_reaches_every_caller(
    n: int, data: st.DataObject
) -> None:
    """S5-19, S5-8: n callers in flight; the server answers in any order, some replies
    sharing a write, and any callers are cancelled at any point between writes. Every
    caller still waiting gets exactly its own reply; afterwards nobody receives, nobody is
    parked and nothing is buffered."""
    order = data.draw(st.permutations(range(n)), label="reply order")
    cuts = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="write cuts")
    cancel_at = data.draw(
        st.lists(st.one_of(st.none(), st.integers(0, n)), min_size=n, max_size=n),
        label="cancel caller before reply number",
    )

    async def scenario() -> None:
        async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
            conn = _conn(repo)
            results: dict[int, object] = {}
            scopes = [trio.CancelScope() for _ in range(n)]

            async def get(i: int) -> None:
                with scopes[i]:
                    results[i] = await repo.get_output(f"t{i}", {})

            async with trio.open_nursery() as nursery:
                ids: dict[int, int] = {}
                for i in range(n):
                    nursery.start_soon(get, i)
                    message = await _next_get(peer)
                    ids[int(message.task_type[1:])] = message.id
                pending = []
                for step, i in enumerate(order):
                    for k in range(n):
                        if cancel_at[k] == step:
                            await trio.testing.wait_all_tasks_blocked()
                            scopes[k].cancel()
                    pending.append(Ok(id=ids[i], value={"i": i}))
                    if cuts[step] or step == n - 1:
                        await peer.send(*pending)
                        pending = []
                        await trio.testing.wait_all_tasks_blocked()
            for i in range(n):
                if cancel_at[i] is None or cancel_at[i] == n:  # never cancelled
                    assert results[i] == {"i": i}
            for i, value in results.items():
                assert value == {"i": i}
            await trio.testing.wait_all_tasks_blocked()
            await _assert_idle(conn)
            # Still usable: one more round trip (late replies to cancelled callers, if
            # any, are read first and dropped).
            scopes[0] = trio.CancelScope()
            results.pop(0, None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, 0)
                message = await _next_get(peer)
                await peer.send(Ok(id=message.id, value={"i": 0}))
            assert results[0] == {"i": 0}
            await _assert_idle(conn)

    trio.run(scenario)
