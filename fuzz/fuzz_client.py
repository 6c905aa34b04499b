# Invariant tested: S5-7, S5-8, S5-9, S5-14, S5-19 (the client's side)
"""
Fuzz the cache-server client with whatever a broken or hostile server might send.

For every input, a server played by this harness (a Unix socket in a temp folder) does the
handshake, waits for the client's three requests (a row get, id 1; a download, id 2; a row
save, id 3), sends the input as its whole answer and closes its side. Then:

- every caller ends within a few seconds (no hang, S5-14), with a result of the right type
  (a row is a dict or None, a chunk is bytes) or an exception of ours (`TaskGraphError`,
  or the `TypeError`/`ValueError` a server failure maps to, S5-14) — never anything else;
- a download yields only bytes chunks (data past its credit fails the connection, S5-9);
- afterwards nobody receives or is parked, nothing is buffered, and every request slot is
  free or held by a request still waiting for its last message (S5-8, S5-19).

Run ``python fuzz/fuzz_client.py [--seconds N]`` (atheris when installed, else a seeded
mutation loop over ``fuzz/corpus/client/``). ``run(seconds)`` is what the test calls.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

import _harness
import trio
import trio.testing

from trio_taskgraph import CacheRef, TaskGraphError, connect_cache_server
from trio_taskgraph._core._codec import CLOSED, NEED_DATA, FrameDecoder
from trio_taskgraph._core._messages import (
    PROTOCOL_VERSION,
    Data,
    Failed,
    Hello,
    Ok,
    Welcome,
    decode_client,
    encode_message,
)

if TYPE_CHECKING:
    import random
    from collections.abc import Awaitable, Callable, Sequence

    from trio_taskgraph._repository._client import _Connection

#: Seconds every caller has to finish once the server has said its piece and closed.
CLOSE_TIMEOUT = 5.0
WINDOW = 4096
CHUNK = 1024
SLOTS = 4
REF = CacheRef(ref="cache://x/default/y#z", size=10_000)


class Finding(AssertionError):
    """The client broke an invariant on this input."""


async def _serve(listener: trio.socket.SocketType, data: bytes, seen: list[trio.Event]) -> None:
    """Accept the client, shake hands, note its requests, answer ``data``, close."""
    sock, _ = await listener.accept()
    stream = trio.SocketStream(sock)
    decoder = FrameDecoder()
    async with stream:
        requests = 0
        sent = False
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                decoder.receive_data(chunk)
                continue
            if frame is CLOSED:
                return  # the client is gone
            message = decode_client(frame)
            if isinstance(message, Hello):
                welcome = Welcome(
                    version=PROTOCOL_VERSION, window=WINDOW, chunk_bytes=CHUNK, max_in_flight=SLOTS
                )
                await stream.send_all(encode_message(welcome))
                continue
            if requests < len(seen):
                seen[requests].set()
                requests += 1
            if requests == len(seen) and not sent:
                sent = True
                try:
                    await stream.send_all(data)
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def _caller(
    name: str, call: Callable[[], Awaitable[object]], outcomes: dict[str, object]
) -> None:
    try:
        outcomes[name] = await call()
    except (TaskGraphError, TypeError, ValueError) as exc:
        outcomes[name] = exc
    except Exception as exc:
        raise Finding(f"the {name} raised {type(exc).__name__}: {exc}") from exc


async def _scenario(data: bytes) -> None:
    folder = tempfile.mkdtemp(prefix="tg-", dir="/tmp")
    path = os.path.join(folder, "s")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    outcomes: dict[str, object] = {}
    seen = [trio.Event() for _ in range(3)]
    try:
        await listener.bind(path)
        listener.listen(1)
        with trio.fail_after(CLOSE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve, listener, data, seen)
                async with connect_cache_server(path) as repo:
                    conn: _Connection = repo._conn

                    async def download() -> object:
                        async with repo.open_output_stream_by_ref(REF) as it:
                            return [chunk async for chunk in it]

                    async with trio.open_nursery() as callers:
                        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                            ("get", lambda: repo.get_output("t", {})),
                            ("download", download),
                            ("save", lambda: repo.save_output("t", {"k": 1}, {"v": 1})),
                        ]
                        for (name, call), event in zip(calls, seen, strict=True):
                            callers.start_soon(_caller, name, call, outcomes)
                            await event.wait()  # ids 1, 2, 3 in this order
                    await trio.testing.wait_all_tasks_blocked()
                    _check_idle(conn)
    except trio.TooSlowError:
        hung = sorted({"get", "download", "save"} - set(outcomes))
        raise Finding(f"a caller hung: {hung}") from None
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    _check_outcomes(outcomes)


def _check_idle(conn: _Connection) -> None:
    if conn.receiving and conn.failure is None and not conn.lingering:
        raise Finding("the reader kept receiving for nobody")
    if conn.waiting or conn.requests:
        raise Finding(f"callers still parked: {conn.waiting}, open: {sorted(conn.requests)}")
    if conn.buffered:
        raise Finding(f"{conn.buffered} bytes left buffered")
    if conn.failure is None and conn.slots.value + len(conn.lingering) != SLOTS:
        raise Finding(f"slots leaked: {conn.slots.value} free, {len(conn.lingering)} lingering")


def _check_outcomes(outcomes: dict[str, object]) -> None:
    row = outcomes["get"]
    if not (row is None or isinstance(row, dict | Exception)):
        raise Finding(f"get returned a {type(row).__name__}")
    chunks = outcomes["download"]
    if isinstance(chunks, list):
        if not all(type(c) is bytes for c in chunks):
            raise Finding("the download yielded a non-bytes chunk")
    elif not isinstance(chunks, Exception):
        raise Finding(f"the download returned a {type(chunks).__name__}")
    saved = outcomes["save"]
    if not (saved is None or isinstance(saved, Exception)):
        raise Finding(f"save returned a {type(saved).__name__}")


def check(data: bytes) -> None:
    trio.run(_scenario, data)


#: Frames a server sends: answers to each request, and things it should never send.
SEEDS_IF_NONE = [
    encode_message(Ok(id=1, value={"a": 1}))
    + encode_message(Ok(id=2, value=None))
    + encode_message(Data(id=2, data=b"x" * 100))
    + encode_message(Data(id=2, data=b"", end=True))
    + encode_message(Ok(id=3, value=None)),
    encode_message(Failed(id=-1, kind="protocol", message="bye")),
]
MAGIC = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xc1", b"\x01", b"\x02", b"\x03")


def _mutate(rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    return _harness.mutate(rng, corpus or SEEDS_IF_NONE, fresh=1 / 8, max_len=64, magic=MAGIC)


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz the client for about ``seconds``; return how many inputs ran."""
    return _harness.run_inputs(check, name="client", seconds=seconds, seed=seed, mutator=_mutate)


if __name__ == "__main__":
    sys.exit(_harness.main(name="client", description=__doc__, check=check, run=run))
