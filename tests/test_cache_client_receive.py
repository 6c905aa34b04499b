"""
Who receives on a `CacheServerRepository` connection (spec/S5-19): a caller whose reply is
due and finds nobody receiving reads the socket itself; the reader task takes over for
callers parked behind another, for open streams and for stalled sends.

Most tests play the server by hand (`scripted_server`), so what arrives when is decided by
the test, not by timing.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings, strategies as st

from tests.server_harness import ScriptedPeer, in_process_server, scripted_server
from tests.typed_hypothesis import given
from trio_taskgraph import CacheServerError, CacheServerRepository, connect_cache_server
from trio_taskgraph._core._messages import Failed, GetOutput, Ok, SaveOutput, encode_message
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


def _assert_idle(conn: _Connection) -> None:
    """Nothing in flight, nobody receiving or parked, nothing buffered."""
    assert conn.requests == {}
    assert not conn.receiving
    assert conn.waiting == 0
    assert conn.streams == 0
    assert conn.buffered == 0


async def _next_get(peer: ScriptedPeer) -> GetOutput:
    message = await peer.receive()
    assert isinstance(message, GetOutput), message
    return message


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
        _assert_idle(_conn(repo))


async def test_a_receiving_caller_hands_other_callers_their_replies() -> None:
    """S5-19, S5-8: A receives while B is parked behind it; replies for both come in one
    write, A's first: A dispatches B's too before it returns (the reader never runs)."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        results: dict[str, object] = {}

        async def get(name: str) -> None:
            results[name] = await repo.get_output(name, {})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "a")
            first = await _next_get(peer)
            nursery.start_soon(get, "b")
            second = await _next_get(peer)
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
        assert results == {"a": {"who": "a"}, "b": {"who": "b"}}
        assert counter.steps.get(READER, 0) == 0
        _assert_idle(conn)


async def test_replies_for_a_parked_caller_first_are_dispatched_by_the_receiving_one() -> None:
    """S5-19: B's reply arrives before A's: A (receiving) wakes B and goes on for its own."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        results: dict[str, object] = {}

        async def get(name: str) -> None:
            results[name] = await repo.get_output(name, {})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "a")
            first = await _next_get(peer)
            nursery.start_soon(get, "b")
            second = await _next_get(peer)
            await peer.send(Ok(id=second.id, value={"who": "b"}))
            await trio.testing.wait_all_tasks_blocked()
            assert results == {"b": {"who": "b"}}
            assert _conn(repo).receiving  # a still receives for itself
            await peer.send(Ok(id=first.id, value={"who": "a"}))
        assert results == {"a": {"who": "a"}, "b": {"who": "b"}}
        _assert_idle(_conn(repo))


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
        results: dict[str, object] = {}
        a_scope = trio.CancelScope()

        async def get_a() -> None:
            with a_scope:
                results["a"] = await repo.get_output("a", {})

        async def get_b() -> None:
            results["b"] = await repo.get_output("b", {})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_a)
            first = await _next_get(peer)
            nursery.start_soon(get_b)
            second = await _next_get(peer)
            b_reply = encode_message(Ok(id=second.id, value={"who": "b"}))
            if partial_frame:
                await peer.send_raw(b_reply[:7])
            await trio.testing.wait_all_tasks_blocked()
            assert conn.receiving
            assert conn.waiting == 1
            a_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert "a" not in results
            assert a_scope.cancelled_caught
            # The reader now receives for b.
            assert conn.receiving
            assert conn.waiting == 1
            await peer.send_raw(b_reply[7:] if partial_frame else b_reply)
            await peer.send(Ok(id=first.id, value={"who": "a, too late"}))
        assert results == {"b": {"who": "b"}}
        # The late reply is read (by the next receiver) and dropped; the connection works.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_b)
            third = await _next_get(peer)
            await peer.send(Ok(id=third.id, value={"who": "b again"}))
        assert results["b"] == {"who": "b again"}
        _assert_idle(conn)


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
        _assert_idle(conn)


async def test_the_server_closing_while_a_caller_receives_fails_every_caller() -> None:
    """S5-19, S5-14: the receiving caller sees the end of the connection: it and the
    caller parked behind it raise `CacheServerError`, and so does every later call."""
    async with scripted_server() as (path, peer), connect_cache_server(path) as repo:
        errors: list[BaseException] = []

        async def get(name: str) -> None:
            with pytest.raises(CacheServerError) as info:
                await repo.get_output(name, {})
            errors.append(info.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "a")
            await _next_get(peer)
            nursery.start_soon(get, "b")
            await _next_get(peer)
            await trio.testing.wait_all_tasks_blocked()
            await peer.send(Failed(id=-1, kind="protocol", message="going away"))
            await peer.aclose()
        assert len(errors) == 2
        assert all("going away" in str(e) for e in errors)
        with pytest.raises(CacheServerError, match="going away"):
            await repo.get_output("c", {})
        conn = _conn(repo)
        assert not conn.receiving
        assert conn.waiting == 0


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
            _assert_idle(conn)
            # Still usable: one more round trip (late replies to cancelled callers, if
            # any, are read first and dropped).
            scopes[0] = trio.CancelScope()
            results.pop(0, None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, 0)
                message = await _next_get(peer)
                await peer.send(Ok(id=message.id, value={"i": 0}))
            assert results[0] == {"i": 0}
            _assert_idle(conn)

    trio.run(scenario)
