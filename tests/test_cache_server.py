"""
The cache server and its client beyond the repository contract (spec/S5, S5-6 on): many
requests and clients on one server, tenants, bad input, flow control, cancellation, a
server that dies, restarts, shutdown and the socket's permissions.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import shutil
import signal
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_taskgraph as tg
from tests.polling import wait_until
from trio_taskgraph._cache_server import CacheServer, prepare_socket_path
from trio_taskgraph._core._codec import CLOSED, NEED_DATA, FrameDecoder, encode_frame, packb
from trio_taskgraph._core._keys import input_digest as tg_input_digest
from trio_taskgraph._core._messages import (
    PROTOCOL_VERSION,
    Abort,
    ChunkMessage,
    Credit,
    Data,
    EndStream,
    Failed,
    GetOutput,
    Hello,
    Ok,
    ReadStream,
    SaveStream,
    Stats,
    Welcome,
    decode_server,
    encode_message,
)
from trio_taskgraph._repository import _filesystem
from trio_taskgraph.testing import cancel_at_each_checkpoint, torture_max_points

from .server_harness import (
    RawClient,
    ServerProcess,
    in_process_server,
    server_process,
    short_tempdir,
    wait_client_settled,
)

MiB = 1024 * 1024
DIGEST = "0" * 64


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with server_process() as running:
        yield running


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = short_tempdir()
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _chunks(n: int, size: int, *, fill: int = 0) -> AsyncIterator[bytes]:
    for i in range(n):
        await trio.lowlevel.checkpoint()
        yield bytes([(fill + i) % 256]) * size


def _temp_files(root: str | Path) -> list[str]:
    blobs = Path(root) / "blobs"
    return sorted(p.name for p in blobs.glob("*.tmp")) if blobs.exists() else []


# --- sharing a connection, many clients -----------------------------------------------------


async def test_many_requests_on_one_connection_never_cross(server: ServerProcess) -> None:
    """S5-8: 200 concurrent rows and 20 concurrent blobs on one connection; no reply crosses."""
    async with tg.connect_cache_server(server.socket_path, namespace="share") as repo:
        results: dict[int, object] = {}

        async def row(i: int) -> None:
            await repo.save_output("t", {"i": i}, {"v": i, "pad": b"x" * (i % 7)})
            results[i] = await repo.get_output("t", {"i": i})

        async def blob(i: int) -> None:
            ref = await repo.save_output_stream("b", {}, "p", _chunks(3, 100_000 + i, fill=i))
            data = await repo.get_output_by_ref(ref)
            assert data == b"".join([bytes([(i + k) % 256]) * (100_000 + i) for k in range(3)])

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(row, i)
            for i in range(20):
                nursery.start_soon(blob, i)
        assert results == {i: {"v": i, "pad": b"x" * (i % 7)} for i in range(200)}
        assert repo.statistics().requests == 0


async def test_many_clients_share_a_server(server: ServerProcess) -> None:
    """S5-8: eight connections at once, each sees its own writes and the others'."""

    async def client(k: int) -> None:
        async with tg.connect_cache_server(server.socket_path, namespace="many") as repo:
            for i in range(20):
                await repo.save_output("t", {"k": k, "i": i}, {"v": [k, i]})
            for i in range(20):
                assert await repo.get_output("t", {"k": k, "i": i}) == {"v": [k, i]}

    async with trio.open_nursery() as nursery:
        for k in range(8):
            nursery.start_soon(client, k)
    async with tg.connect_cache_server(server.socket_path, namespace="many") as repo:
        assert await repo.get_output("t", {"k": 3, "i": 19}) == {"v": [3, 19]}
        assert (await repo.stats()).rows == 160


# --- tenants ---------------------------------------------------------------------------------


async def test_a_ref_of_another_tenant_is_foreign(server: ServerProcess) -> None:
    """S5-11: a valid ref issued to namespace A is ForeignRefError on a B connection."""
    async with (
        tg.connect_cache_server(server.socket_path, namespace="tenant-a") as a,
        tg.connect_cache_server(server.socket_path, namespace="tenant-b") as b,
    ):
        ref = await a.save_output_stream("t", {}, "p", _chunks(1, 10))
        assert await a.get_output_by_ref(ref) == b"\x00" * 10
        with pytest.raises(tg.ForeignRefError):
            await b.get_output_by_ref(ref)
        with pytest.raises(tg.ForeignRefError):
            async with b.open_output_stream_by_ref(ref):
                pass  # pragma: no cover
        with pytest.raises(tg.ForeignRefError):
            await b.delete_output_by_ref(ref)
        await a.save_output("t", {}, {"secret": 1})
        assert await b.get_output("t", {}) is None
        assert await a.get_output_by_ref(ref) == b"\x00" * 10, "B's attempts changed nothing"
        # A view below B is B's own; a view of A from B is refused before any request.
        below = b.with_namespace("tenant-b.sub")
        assert await below.get_output("t", {}) is None
        with pytest.raises(ValueError, match="outside"):
            b.with_namespace("tenant-a")


async def test_a_raw_request_outside_the_namespace_is_refused(server: ServerProcess) -> None:
    """S5-11: the server, not just the client, confines requests to the connection's tenant."""
    async with RawClient.connect(server.socket_path, namespace="tenant-b") as raw:
        await raw.send(GetOutput(id=1, ns="tenant-a", task_type="t", digest=DIGEST))
        reply = await raw.receive()
        assert isinstance(reply, Failed), reply
        assert reply.id == 1
        assert "outside" in reply.message
        await raw.send(Stats(id=2, ns="tenant-b.x"))
        assert isinstance(await raw.receive(), Ok), "the connection stays usable"


# --- errors map back -------------------------------------------------------------------------


async def test_server_errors_map_to_their_classes(server: ServerProcess) -> None:
    """S5-14: dangling, foreign, type and value errors come back as the same classes."""
    async with tg.connect_cache_server(server.socket_path, namespace="errors") as repo:
        ref = await repo.save_output_stream("t", {}, "p", _chunks(1, 5))
        await repo.delete_output_by_ref(ref)
        with pytest.raises(tg.DanglingRefError):
            await repo.get_output_by_ref(ref)
        with pytest.raises(tg.ForeignRefError):
            await repo.get_output_by_ref(tg.CacheRef("cache://nope"))
        with pytest.raises(tg.ForeignRefError):
            await repo.get_output_by_ref("not a ref")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await repo.save_output("t", {}, {"bad": {1, 2}})
        with pytest.raises(TypeError):
            await repo.save_output("t", {}, {1: "int key"})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="non-empty"):
            await repo.save_output("", {}, {"v": 1})
        with pytest.raises(TypeError):
            await repo.get_output("t", {"unkeyable": object()})
        with pytest.raises(ValueError, match="NaN"):
            await repo.clear_older_than(math.nan)
        assert await repo.get_output("t", {}) is None, "the connection survived every error"


async def test_server_error_classes_on_the_wire(server: ServerProcess) -> None:
    """S5-14: a repository failure on the server is a CacheServerError (a RepositoryError)."""
    async with RawClient.connect(server.socket_path, namespace="wire") as raw:
        await raw.send(GetOutput(id=7, ns="wire", task_type="t", digest="not hex"))
        reply = await raw.receive()
        assert isinstance(reply, Failed), reply
        assert reply.kind == "value"


# --- bad input never takes the server down ------------------------------------------------


_BAD_INPUTS: dict[str, bytes] = {
    "not msgpack": b"\x00\x00\x00\x03\xc1\xc1\xc1",
    "over-limit frame": b"\x7f\xff\xff\xff",
    "zero-length frame": b"\x00\x00\x00\x00",
    "not a map": encode_frame([1, 2, 3]),
    "unknown op": encode_frame({"op": "launch", "id": 1}),
    "server message": encode_frame({"op": "ok", "id": 1, "value": None}),
    "hello twice": encode_frame({"op": "hello", "version": PROTOCOL_VERSION, "namespace": "x"}),
    "wrong field type": encode_frame({"op": "get", "id": "1", "ns": "x", "task_type": "t"}),
    "unknown ext": encode_frame({"op": "stats", "id": 1, "ns": "x"})[:4]
    + packb({"op": "stats", "id": 1, "ns": "x"})[:-1]
    + b"\xd4\x07\x00",
    "chunk of no upload": encode_frame({"op": "chunk", "id": 99, "data": b"x"}),
    "end of no upload": encode_frame({"op": "end", "id": 99}),
    "negative id": encode_frame({"op": "stats", "id": -5, "ns": "x"}),
    "truncated frame then EOF": b"\x00\x00\x01\x00" + b"\x80" * 10,
}


@pytest.mark.parametrize("name", list(_BAD_INPUTS))
async def test_bad_input_closes_only_that_connection(server: ServerProcess, name: str) -> None:
    """S5-10: bad input ends in an error reply and/or a closed connection; others go on."""
    async with tg.connect_cache_server(server.socket_path, namespace="x") as healthy:
        await healthy.save_output("t", {}, {"ok": name})
        async with RawClient.connect(server.socket_path, namespace="x") as raw:
            await raw.send_raw(_BAD_INPUTS[name])
            if name == "truncated frame then EOF":
                await raw.stream.send_eof()
            with trio.fail_after(10):
                replies = await raw.receive_until_closed()
            assert all(isinstance(r, Failed) for r in replies), replies
            if name not in ("truncated frame then EOF",):
                assert replies, "a connection-level error reply"
                assert replies[-1].id == -1, replies  # type: ignore[union-attr]
        assert await healthy.get_output("t", {}) == {"ok": name}


async def test_a_bad_handshake_is_refused(server: ServerProcess) -> None:
    """S5-6: a wrong version or namespace gets a connection-level error reply, then EOF."""
    for hello in (
        Hello(version=PROTOCOL_VERSION + 1, namespace="x"),
        Hello(version=PROTOCOL_VERSION, namespace="../etc"),
    ):
        async with RawClient.connect(server.socket_path, namespace=None) as raw:
            await raw.send(hello)
            with trio.fail_after(10):
                replies = await raw.receive_until_closed()
            assert len(replies) == 1, replies
            assert isinstance(replies[0], Failed)
            assert replies[0].id == -1
    async with RawClient.connect(server.socket_path, namespace=None) as raw:
        await raw.send(Stats(id=1, ns="x"))
        with trio.fail_after(10):
            replies = await raw.receive_until_closed()
        assert "hello" in replies[0].message  # type: ignore[union-attr]


async def test_connect_reports_a_refused_handshake(short_dir: Path) -> None:
    """S5-14: nothing listening, or a refusal, is a CacheServerError naming the socket."""
    with pytest.raises(tg.CacheServerError, match="cannot connect"):
        async with tg.connect_cache_server(str(short_dir / "none")):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="namespace"):
        async with tg.connect_cache_server(str(short_dir / "none"), namespace="a/b"):
            pass  # pragma: no cover


async def test_sending_past_the_credit_is_a_protocol_violation(server: ServerProcess) -> None:
    """S5-9: a client that ignores its credit is cut off; the server is not flooded."""
    async with RawClient.connect(server.socket_path, namespace="flood") as raw:
        await raw.send(SaveStream(id=1, ns="flood", task_type="t"))
        stats = await _stats_via(server)
        too_much = b"x" * (stats.window + 1)
        with contextlib.suppress(trio.BrokenResourceError):  # it may hang up while we send
            await raw.send_raw(encode_frame({"op": "chunk", "id": 1, "data": too_much}))
        with trio.fail_after(10):
            replies = await raw.receive_until_closed()
        assert replies
        last = replies[-1]
        assert isinstance(last, Failed)
        assert last.id == -1
        assert "credit" in last.message
    assert _temp_files(server.root) == []


async def _stats_via(server: ServerProcess) -> tg.CacheServerStatistics:
    async with tg.connect_cache_server(server.socket_path, namespace="probe") as repo:
        return await repo.server_stats()


async def test_late_credit_and_abort_are_harmless(server: ServerProcess) -> None:
    """S5-9: credit or abort for a finished request is ignored, not a violation."""
    async with RawClient.connect(server.socket_path, namespace="late") as raw:
        await raw.send(Credit(id=41, n=10))
        await raw.send(Abort(id=42))
        await raw.send(Stats(id=43, ns="late"))
        reply = await raw.receive()
        assert isinstance(reply, Ok)
        assert reply.id == 43


# --- uploads: cancellation and temp files ------------------------------------------------


async def test_cancelled_upload_leaves_no_temp_file(tmp_path: Path) -> None:
    """S5-10, S4-3: an upload cancelled at each checkpoint leaves no temp file, no blob."""
    root = tmp_path / "root"
    async with (
        in_process_server(root, window=256 * 1024, chunk_bytes=64 * 1024) as (server, sock),
        tg.connect_cache_server(sock) as repo,
    ):
        refs: list[tg.CacheRef] = []

        async def scenario() -> None:
            refs.append(await repo.save_output_stream("t", {}, "p", _chunks(12, 50_000)))

        async def check() -> None:
            await _wait_quiet(server)
            assert _temp_files(root) == []
            assert server.statistics().buffered_bytes == 0
            assert repo.statistics().requests == 0

        await repo.save_output("warm", {}, {})  # open the folder before counting steps
        before = await repo.stats()
        await cancel_at_each_checkpoint(
            scenario,
            check=check,
            max_points=torture_max_points(12),
            cancel_timeout=math.inf,
        )
        stats = await repo.stats()
        # Exactly the uploads that returned a ref published a blob: the baseline run, and any
        # run whose cancel landed after the save completed. Every other run published none.
        assert refs, "the baseline run returns a ref"
        assert stats.blobs == before.blobs + len(refs)
        for ref in refs:
            assert len(await repo.get_output_by_ref(ref)) == 12 * 50_000
        assert _temp_files(root) == []


async def _wait_quiet(server: CacheServer) -> None:
    """Wait until the server has no open request (its uploads have cleaned up)."""
    await wait_until(lambda: not server.statistics().requests, "the server to finish every request")


async def test_upload_whose_connection_drops_leaves_no_temp_file(tmp_path: Path) -> None:
    """S5-10: a client that vanishes mid-upload leaves nothing on the server."""
    root = tmp_path / "root"
    async with in_process_server(root) as (server, sock):
        async with RawClient.connect(sock) as raw:
            await raw.send(SaveStream(id=1, ns="default", task_type="t"))
            await raw.send(ChunkMessage(id=1, data=b"x" * 100_000))
            await trio.testing.wait_all_tasks_blocked()
        await _wait_quiet(server)
        assert _temp_files(root) == []
        assert server.statistics().connections == 0


async def test_cancelled_download_is_aborted_on_the_server(tmp_path: Path) -> None:
    """S5-9: leaving a download early (or cancelling it) releases it on the server."""
    root = tmp_path / "root"
    async with (
        in_process_server(root, window=256 * 1024, chunk_bytes=64 * 1024) as (server, sock),
        tg.connect_cache_server(sock) as repo,
    ):
        ref = await repo.save_output_stream("t", {}, "p", _chunks(40, 64 * 1024))

        async def scenario() -> None:
            async with repo.open_output_stream_by_ref(ref) as chunks:
                async for _ in chunks:
                    pass

        async def check() -> None:
            await _wait_quiet(server)
            assert server.statistics().buffered_bytes == 0
            await wait_client_settled(repo)
            assert repo.statistics().buffered_bytes == 0

        await cancel_at_each_checkpoint(
            scenario, check=check, max_points=torture_max_points(12), cancel_timeout=math.inf
        )
        assert len(await repo.get_output_by_ref(ref)) == 40 * 64 * 1024


# --- flow control ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_fast_client_cannot_flood_a_slow_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S5-9: 64 MiB up while each disk write is slowed: the server holds a bounded number of bytes."""
    real_write = _filesystem._writev_all

    def slow_write(fd: int, batch: list[tg.Blob | bytes]) -> None:
        import time

        time.sleep(0.002)  # the injected disk delay, in the worker thread
        real_write(fd, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(_filesystem, "_writev_all", slow_write)
    window, chunk = 1 * MiB, 256 * 1024
    produced = 0
    async with (
        in_process_server(tmp_path / "root", window=window, chunk_bytes=chunk) as (server, sock),
        tg.connect_cache_server(sock) as repo,
    ):

        async def fast() -> AsyncIterator[bytes]:
            nonlocal produced
            block = b"z" * chunk
            for _ in range(64 * MiB // chunk):
                produced += chunk
                yield block

        ref = await repo.save_output_stream("t", {}, "p", fast())
        assert ref.size == 64 * MiB
        peak = server.statistics().peak_buffered_bytes
        # The window, plus one frame being decoded and one socket read.
        assert peak <= window + chunk + 8192 + 256 * 1024, peak
        assert repo.statistics().peak_buffered_bytes <= 256 * 1024 + chunk
        assert produced == 64 * MiB


@pytest.mark.slow
async def test_slow_reader_does_not_make_the_server_buffer_the_blob(tmp_path: Path) -> None:
    """S5-9: a reader that takes one chunk and dawdles: both sides hold at most the window."""
    window, chunk = 512 * 1024, 128 * 1024
    async with (
        in_process_server(tmp_path / "root", window=window, chunk_bytes=chunk) as (server, sock),
        tg.connect_cache_server(sock) as repo,
    ):
        ref = await repo.save_output_stream("t", {}, "p", _chunks(32, MiB))
        base = server.statistics().peak_buffered_bytes
        got = 0
        async with repo.open_output_stream_by_ref(ref) as chunks:
            async for piece in chunks:
                got += len(piece)
                if got == chunk:
                    # The server may now fill the whole window, and no more: wait until it
                    # has, and every task has settled (a server that overran the window
                    # would show it), then check that the server holds nothing: over a
                    # socket it sends the blob file with os.sendfile, so no chunk passes
                    # through its memory (S5-16).
                    await wait_until(
                        lambda: repo.statistics().buffered_bytes >= window,
                        "the client to buffer a whole window",
                    )
                    await trio.testing.wait_all_tasks_blocked()
                    assert repo.statistics().buffered_bytes == window
                    assert server.statistics().buffered_bytes == 0
        assert got == 32 * MiB
        assert server.statistics().peak_buffered_bytes <= max(base, 2 * chunk + 8192)
        assert repo.statistics().peak_buffered_bytes <= window + chunk + 256 * 1024


# --- a server that dies, restarts ----------------------------------------------------------


async def test_sigkill_mid_upload_and_mid_download(short_dir: Path) -> None:
    """S5-14: SIGKILL mid-upload and mid-download: CacheServerError promptly; restart is clean."""
    root = short_dir / "root"
    async with tg.open_cache_server(root) as repo:
        kept = await repo.save_output_stream("t", {}, "p", _chunks(8, MiB, fill=7))
        await repo.save_output("t", {}, {"blob": kept})
        assert repo.process is not None
        killed = trio.Event()
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            while True:
                yield b"u" * 65536
                sent += 65536
                if sent == 3 * MiB:
                    repo.process.kill()  # type: ignore[union-attr]
                    killed.set()

        failed: list[str] = []

        async def download() -> None:
            try:
                async with repo.open_output_stream_by_ref(kept) as chunks:
                    async for _ in chunks:
                        await killed.wait()
            except tg.CacheServerError:
                failed.append("download")

        async def upload() -> None:
            try:
                await repo.save_output_stream("t", {}, "p", endless())
            except tg.CacheServerError:
                failed.append("upload")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(download)
                nursery.start_soon(upload)
        assert sorted(failed) == ["download", "upload"]
        with trio.fail_after(5), pytest.raises(tg.CacheServerError):
            await repo.get_output("t", {})
        with trio.fail_after(5), pytest.raises(tg.CacheServerError):
            await repo.save_output_stream("t", {}, "p", _chunks(1, 1))
        await repo.process.wait()
    async with tg.open_cache_server(root) as again:
        row = await again.get_output("t", {})
        assert row == {"blob": kept}
        assert await again.get_output_by_ref(kept) == b"".join(
            bytes([(7 + i) % 256]) * MiB for i in range(8)
        )
        stats = await again.stats()
        assert (stats.blobs, stats.bytes) == (1, 8 * MiB), "no torn blob was published"
        await again.gc(min_age=0)
        assert _temp_files(root) == [], "the dead server's temp file was swept"


async def test_sigterm_finishes_in_flight_requests(short_dir: Path) -> None:
    """S5-12: SIGTERM lets an open upload finish, refuses new work, removes the socket."""
    root = short_dir / "root"
    async with tg.open_cache_server(root) as repo:
        process = repo.process
        assert process is not None
        socket_path = repo.socket_path
        halfway = trio.Event()
        go_on = trio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b"a" * MiB
            halfway.set()
            await go_on.wait()
            yield b"b" * MiB

        async with trio.open_nursery() as nursery:
            refs: list[tg.CacheRef] = []

            async def upload() -> None:
                refs.append(await repo.save_output_stream("t", {}, "p", slow()))

            nursery.start_soon(upload)
            await halfway.wait()
            await repo.get_output("t", {})  # the first chunk has reached the server
            process.send_signal(signal.SIGTERM)
            refused: list[str] = []

            async def refused_yet() -> bool:
                try:
                    await repo.get_output("t", {})
                except tg.CacheServerError as exc:
                    refused.append(str(exc))
                    return True
                return False

            # New requests are refused once the server (another process) handled the signal.
            await wait_until(refused_yet, "new requests to be refused", interval=0.01)
            assert "shutting down" in refused[0]
            go_on.set()
        assert refs
        assert refs[0].size == 2 * MiB
        with trio.fail_after(10):
            assert await process.wait() == 0
        assert not await trio.Path(socket_path).exists()
    async with tg.open_cache_server(root) as again:
        assert await again.get_output_by_ref(refs[0]) == b"a" * MiB + b"b" * MiB


async def test_open_cache_server_cleans_up_everything(short_dir: Path) -> None:
    """S5-13: socket 0600 in a 0700 folder while running; afterwards no child, no socket."""
    async with tg.open_cache_server(short_dir / "root") as repo:
        process = repo.process
        assert process is not None
        sock = trio.Path(repo.socket_path)
        assert stat.S_IMODE((await sock.stat()).st_mode) == 0o600
        assert stat.S_IMODE((await sock.parent.stat()).st_mode) == 0o700
        await repo.save_output("t", {}, {"v": 1})
    assert process.returncode == 0, "stopped by SIGTERM, cleanly"
    assert not await sock.exists()
    assert not await sock.parent.exists()


async def test_open_cache_server_stops_the_child_on_error_and_cancel(short_dir: Path) -> None:
    """S5-12: an error or a cancellation in the block still stops and reaps the child."""
    processes = []

    async def fail() -> None:
        async with tg.open_cache_server(short_dir / "root") as repo:
            processes.append(repo.process)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await fail()
    with trio.CancelScope() as scope:
        async with tg.open_cache_server(short_dir / "root") as repo:
            processes.append(repo.process)
            scope.cancel()
            await trio.sleep_forever()
    assert all(p is not None and p.returncode is not None for p in processes)


async def test_open_cache_server_reports_a_failed_start(short_dir: Path) -> None:
    """S5-13: a server that cannot start is a CacheServerError carrying its stderr."""
    open_folder = short_dir / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(tg.CacheServerError, match="mode 0700"):
        async with tg.open_cache_server(short_dir / "root", socket_path=open_folder / "s"):
            pass  # pragma: no cover


async def test_restart_on_a_stale_socket(short_dir: Path) -> None:
    """S5-13: a socket left by a killed server is replaced; a live server's is refused."""
    sock = short_dir / "s"
    async with tg.open_cache_server(short_dir / "root", socket_path=sock) as repo:
        with pytest.raises(tg.CacheServerError, match="already listens"):
            prepare_socket_path(sock)
        assert repo.process is not None
        repo.process.kill()
        await repo.process.wait()
        assert sock.exists(), "SIGKILL leaves the socket file"
        with pytest.raises(tg.CacheServerError):
            await repo.get_output("t", {})
    assert not sock.exists(), "open_cache_server removes it"
    sock.touch()
    with pytest.raises(tg.CacheServerError, match="not a socket"):
        prepare_socket_path(sock)


def test_socket_folder_must_be_private(short_dir: Path) -> None:
    """S5-13: a socket folder others can enter is refused; a missing one is made 0700."""
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(tg.CacheServerError, match="0700"):
        prepare_socket_path(shared / "s")
    made = prepare_socket_path(short_dir / "new" / "s")
    assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700
    with pytest.raises(tg.CacheServerError, match="107"):
        prepare_socket_path(short_dir / ("x" * 120))


# --- misc --------------------------------------------------------------------------------


async def test_checkpoints_and_closed_views(server: ServerProcess) -> None:
    """S4-8, S5-6: views share the connection; a closed view refuses, the owner goes on."""
    async with tg.connect_cache_server(server.socket_path, namespace="views") as repo:
        view = repo.with_namespace("views.run1")
        assert view.namespace == "views.run1"
        assert view.socket_path == repo.socket_path
        with trio.testing.assert_checkpoints():
            await view.save_output("t", {}, {"v": 1})
        await view.aclose()
        with pytest.raises(tg.RepositoryError):
            await view.get_output("t", {})
        assert await repo.get_output("t", {}) is None, "the view's namespace is its own"
        stats = await repo.server_stats()
        assert stats.connections >= 1
        assert stats.protocol_errors >= 0
    with pytest.raises(TypeError):
        tg.CacheServerRepository()


async def test_welcome_announces_the_limits(server: ServerProcess) -> None:
    """S5-6: the handshake answers with the window, chunk size and in-flight limit."""
    async with RawClient.connect(server.socket_path, namespace=None) as raw:
        await raw.send(Hello(version=PROTOCOL_VERSION, namespace="w"))
        welcome = await raw.receive()
        assert isinstance(welcome, Welcome)
        assert welcome.window >= welcome.chunk_bytes >= 1
        assert welcome.max_in_flight >= 1
        # A download over the raw protocol: Ok (open), Data under credit, end.
        await raw.send(SaveStream(id=1, ns="w", task_type="t"))
        await raw.send(ChunkMessage(id=1, data=b"hello"))
        await raw.send(EndStream(id=1))
        ok = await raw.receive()
        while isinstance(ok, Credit):
            ok = await raw.receive()
        assert isinstance(ok, Ok)
        assert isinstance(ok.value, tg.CacheRef)
        await raw.send(ReadStream(id=2, ns="w", ref=ok.value))
        assert isinstance(await raw.receive(), Ok)
        data = await raw.receive()
        assert isinstance(data, Data)
        assert data.data == b"hello"
        end = await raw.receive()
        assert isinstance(end, Data)
        assert end.end


async def test_row_cache_never_serves_a_stale_row(server: ServerProcess) -> None:
    """S5-15: writes and prunes through the server invalidate cached rows, on every connection."""
    async with (
        tg.connect_cache_server(server.socket_path, namespace="rows") as a,
        tg.connect_cache_server(server.socket_path, namespace="rows") as b,
    ):
        assert await a.get_output("t", {"k": 1}) is None  # a cached miss
        await b.save_output("t", {"k": 1}, {"v": 1})
        assert await a.get_output("t", {"k": 1}) == {"v": 1}
        assert await a.get_output("t", {"k": 1}) == {"v": 1}  # now from the cache
        await b.save_output("t", {"k": 1}, {"v": 2})
        assert await a.get_output("t", {"k": 1}) == {"v": 2}
        assert await b.delete_by_task_type_prefix("t") == 1
        assert await a.get_output("t", {"k": 1}) is None
        await b.save_output("t", {"k": 1}, {"v": 3})
        assert await a.get_output("t", {"k": 1}) == {"v": 3}
        assert await b.clear_older_than(0.0) == 1
        assert await a.get_output("t", {"k": 1}) is None

        async def writer(i: int) -> None:
            await b.save_output("race", {}, {"v": i})

        for i in range(20):  # a read racing a write never caches the old row afterwards
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, i)
                nursery.start_soon(a.get_output, "race", {})
            assert await a.get_output("race", {}) == {"v": i}


async def test_a_cached_row_is_still_confined_to_its_tenant(server: ServerProcess) -> None:
    """S5-11, S5-15: a row cached for one tenant is refused to a connection of another."""
    async with tg.connect_cache_server(server.socket_path, namespace="owner") as owner:
        await owner.save_output("t", {}, {"secret": 1})
        assert await owner.get_output("t", {}) == {"secret": 1}  # cached now
    digest = tg_input_digest({})
    async with RawClient.connect(server.socket_path, namespace="thief") as raw:
        await raw.send(GetOutput(id=1, ns="owner", task_type="t", digest=digest))
        reply = await raw.receive()
        assert isinstance(reply, Failed), reply
        assert "outside" in reply.message


# --- the seed's review findings, in this area --------------------------------------------


async def test_upload_refused_before_reading_does_not_park_the_producer(tmp_path: Path) -> None:
    """Seed late HIGH 2: a sink that fails before reading must not leave the producer parked."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"")
    async with (
        in_process_server(not_a_folder) as (_server, sock),
        tg.connect_cache_server(sock) as repo,
    ):
        pulled = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal pulled
            while True:
                pulled += 1
                yield b"p" * 65536

        with trio.fail_after(10), pytest.raises(tg.CacheServerError):
            await repo.save_output_stream("t", {}, "p", endless())
        # The window bounds what the producer could run ahead of the refusal.
        assert pulled * 65536 <= repo.statistics().window + 2 * MiB
        assert repo.statistics().requests == 0


async def test_downloads_are_chunked_under_credit_whatever_was_uploaded(
    server: ServerProcess,
) -> None:
    """Seed M-6: a blob saved as one huge chunk is read back in bounded chunks, with backpressure."""
    async with tg.connect_cache_server(server.socket_path, namespace="m6") as repo:
        data = bytes(range(256)) * (5 * 4096)  # 5 MiB in one chunk
        ref = await repo.save_output_stream("t", {}, "p", _one(data))
        # Seed L-1: the server's refs carry their size.
        assert ref.size == len(data)
        stats = await repo.server_stats()
        sizes = []
        async with repo.open_output_stream_by_ref(ref) as chunks:
            async for piece in chunks:
                sizes.append(len(piece))
                assert repo.statistics().buffered_bytes <= stats.window
        assert sum(sizes) == len(data)
        assert max(sizes) <= stats.chunk_bytes


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_rows_keep_inline_binary_values_across_the_wire(server: ServerProcess) -> None:
    """Seed H-1: a Blob or bytes inside a row crosses the process boundary intact, never as {}."""
    async with tg.connect_cache_server(server.socket_path, namespace="h1") as repo:
        row = {"image": tg.Blob(b"\x89PNG\r\n", "image/png"), "raw": b"\x00\x01"}
        await repo.save_output("t", {}, row)
        got = await repo.get_output("t", {})
        assert got == row
        assert isinstance(got["image"], tg.Blob)
        assert got["image"].mime == "image/png"


async def test_a_cancelled_reader_gets_cancelled_even_with_chunks_waiting(
    server: ServerProcess,
) -> None:
    """S4-8, S5-9: __anext__ is a cancellation point even when a chunk is already buffered."""
    async with tg.connect_cache_server(server.socket_path, namespace="cancel-read") as repo:
        ref = await repo.save_output_stream("t", {}, "p", _chunks(4, 100_000))
        async with repo.open_output_stream_by_ref(ref) as chunks:
            await wait_until(
                lambda: repo.statistics().buffered_bytes > 0, "the client to buffer a chunk"
            )
            with trio.CancelScope() as scope:
                scope.cancel()
                await chunks.__anext__()
            assert scope.cancelled_caught
            assert len(await chunks.__anext__()) == 400_000, "the chunk is still there"


class _Recording(trio.abc.Stream):
    """A server-side stream that notes, at each send, which requests still count against
    the server's limit (S5-8)."""

    def __init__(self, inner: trio.abc.Stream, server: CacheServer) -> None:
        self.inner = inner
        self.server = server
        self.sends: list[tuple[bytes, frozenset[int]]] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        (conn,) = self.server._connections
        self.sends.append((bytes(data), frozenset(conn.unfinished)))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_request_stops_counting_before_its_last_message_is_sent(tmp_path: Path) -> None:
    """S5-8 (regression): a client gives a request's slot back when its last message
    arrives (a reply; a download's end; `failed`, also kind aborted), and may send the
    next request at once, so the server must not count the request by then: each last
    message leaves only once its request no longer counts against ``max_in_flight``.
    (The server once closed requests after their reply, and a busy client that used every
    slot had its connection closed for "more than N requests in flight".)"""
    async with in_process_server(tmp_path / "root", window=1 << 16, chunk_bytes=1 << 14) as (
        server,
        sock,
    ):
        async with tg.connect_cache_server(sock) as repo:
            ref = await repo.save_output_stream("t", {}, "p", _one_chunk(b"z" * 40_000))
        client, server_side = trio.testing.memory_stream_pair()
        recording = _Recording(server_side, server)
        frames = FrameDecoder()
        messages: list[object] = []

        async def next_message() -> object:
            while True:
                frame = frames.next_frame()
                assert frame is not CLOSED
                if frame is not NEED_DATA:
                    message = decode_server(frame)
                    messages.append(message)
                    return message
                frames.receive_data(await client.receive_some())

        async def send(*sent: object) -> None:
            await client.send_all(b"".join(encode_message(m) for m in sent))  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._serve_connection, recording)
            await send(Hello(version=PROTOCOL_VERSION, namespace="default"))
            assert isinstance(await next_message(), Welcome)
            digest = tg_input_digest({"k": 1})
            # A unary request that runs as a task (not a cached row), then stats.
            await send(GetOutput(id=1, ns="default", task_type="t", digest=digest))
            assert await next_message() == Ok(id=1, value=None)
            await send(Stats(id=2, ns="default"))
            assert isinstance(await next_message(), Ok)
            # An upload: its verdict is its last message.
            await send(
                SaveStream(id=3, ns="default", task_type="t"),
                ChunkMessage(id=3, data=b"u" * 100),
                EndStream(id=3),
            )
            while not isinstance(await next_message(), Ok):
                pass
            # A whole download: its end is its last message.
            await send(ReadStream(id=4, ns="default", ref=ref))
            reply = await next_message()
            while not (isinstance(reply, Data) and reply.end):
                if isinstance(reply, Data):
                    await send(Credit(id=4, n=len(reply.data)))
                reply = await next_message()
            # An aborted download: `failed`, kind aborted, is its last message.
            await send(ReadStream(id=5, ns="default", ref=ref))
            assert await next_message() == Ok(id=5, value=None)
            await send(Abort(id=5))
            reply = await next_message()
            while isinstance(reply, Data):
                reply = await next_message()
            assert reply == Failed(id=5, kind="aborted", message="the download was aborted")
            nursery.cancel_scope.cancel()
        # Each frame (4-byte length, then its body) against what counted at the send that
        # carried its first byte; sends may cut frames anywhere.
        stream = b"".join(data for data, _ in recording.sends)
        starts = list(itertools.accumulate(len(data) for data, _ in recording.sends))
        last: dict[int, frozenset[int]] = {}
        offset = 0
        while offset < len(stream):
            size = 4 + int.from_bytes(stream[offset : offset + 4], "big")
            decoder = FrameDecoder()
            decoder.receive_data(stream[offset : offset + size])
            message = decode_server(decoder.next_frame())
            counted = recording.sends[bisect.bisect_right(starts, offset)][1]
            offset += size
            final = isinstance(message, Failed) or (
                isinstance(message, Ok) and message.id not in (4, 5)
            )
            final |= isinstance(message, Data) and message.end
            if final:
                last[message.id] = counted  # type: ignore[union-attr]
        assert sorted(last) == [1, 2, 3, 4, 5]
        for request_id, counted in last.items():
            assert request_id not in counted, f"request {request_id} still counted at its end"


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data
