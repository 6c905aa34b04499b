"""
`check_output_repository`: the contract every `OutputRepository` passes (spec/S4).

In the style of trio's ``check_one_way_stream``: give it a factory and it runs every check
against fresh repositories, raising `AssertionError` (or the unexpected exception) on the
first violation. It needs only trio, so it works under any test runner.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeAlias

import trio
import trio.testing

from .._core._events import Blob
from .._core._refs import CacheRef
from .._errors import DanglingRefError, ForeignRefError, RepositoryError
from .._repository._protocol import OutputRepository

__all__ = ["CONTRACT_CHECKS", "RepositoryFactory", "check_output_repository"]

#: What `check_output_repository` accepts: a callable returning a repository, an awaitable
#: of one, or an async context manager yielding one (for set-up and tear-down, such as a
#: cache server). Repositories that are not from a context manager are closed with `aclose`.
RepositoryFactory: TypeAlias = Callable[
    [],
    OutputRepository | Awaitable[OutputRepository] | AbstractAsyncContextManager[OutputRepository],
]

Check: TypeAlias = Callable[[RepositoryFactory], Awaitable[None]]


@asynccontextmanager
async def _open(factory: RepositoryFactory) -> AsyncIterator[OutputRepository]:
    made = factory()
    if isinstance(made, AbstractAsyncContextManager):
        async with made as repo:
            yield repo
        return
    repo = await made if isinstance(made, Awaitable) else made
    try:
        yield repo
    finally:
        with trio.CancelScope(shield=True):
            await repo.aclose()


class _Raises:
    """``with _Raises(Kind, "what"):`` asserts the block raises ``Kind``."""

    def __init__(self, kind: type[BaseException], what: str) -> None:
        self.kind = kind
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> bool:
        if exc_type is None:
            raise AssertionError(f"{self.what}: expected {self.kind.__name__}, nothing raised")
        return issubclass(exc_type, self.kind)


async def _chunks(parts: list[bytes | bytearray | memoryview]) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part  # type: ignore[misc]


def _stream(*parts: bytes | bytearray | memoryview) -> AsyncIterator[bytes]:
    return _chunks(list(parts))


async def _read_stream(repo: OutputRepository, ref: CacheRef) -> bytes:
    out = bytearray()
    async with repo.open_output_stream_by_ref(ref) as chunks:
        async for chunk in chunks:
            assert isinstance(chunk, bytes), f"streamed chunks must be bytes, got {type(chunk)}"
            out += chunk
    return bytes(out)


def _pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(f"{seed}".encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def _streams(repo: OutputRepository) -> bool:
    return repo.supports_streaming()


# --- the checks ---------------------------------------------------------------------------


async def check_rows_round_trip(factory: RepositoryFactory) -> None:
    """S4-2: rows come back equal; a missing row is None; a save replaces the row."""
    async with _open(factory) as repo:
        assert await repo.get_output("t", {"a": 1}) is None
        await repo.save_output("t", {"a": 1}, {"out": "one", "n": [1, 2.5, None, True]})
        assert await repo.get_output("t", {"a": 1}) == {"out": "one", "n": [1, 2.5, None, True]}
        assert await repo.get_output("other", {"a": 1}) is None
        await repo.save_output("t", {"a": 1}, {"out": "two"})
        assert await repo.get_output("t", {"a": 1}) == {"out": "two"}
        got = await repo.get_output("t", {"a": 1})
        assert got is not None
        got["out"] = "mutated"
        assert await repo.get_output("t", {"a": 1}) == {"out": "two"}, "rows must be copies"


async def check_row_keys_are_canonical(factory: RepositoryFactory) -> None:
    """S4-1: keys hash the whole inputs, nested keys sorted, types preserved."""
    async with _open(factory) as repo:
        await repo.save_output("t", {"v": 1}, {"k": "int"})
        await repo.save_output("t", {"v": "1"}, {"k": "str"})
        await repo.save_output("t", {"v": b"x"}, {"k": "bytes"})
        await repo.save_output("t", {"v": "x"}, {"k": "text"})
        await repo.save_output("t", {"v": True}, {"k": "bool"})
        assert await repo.get_output("t", {"v": 1}) == {"k": "int"}
        assert await repo.get_output("t", {"v": "1"}) == {"k": "str"}
        assert await repo.get_output("t", {"v": b"x"}) == {"k": "bytes"}
        assert await repo.get_output("t", {"v": "x"}) == {"k": "text"}
        assert await repo.get_output("t", {"v": True}) == {"k": "bool"}
        nested_a = {"outer": {"b": 2, "a": {"y": 1, "x": [1, {"q": 1, "p": 2}]}}, "z": 0}
        nested_b = {"z": 0, "outer": {"a": {"x": [1, {"p": 2, "q": 1}], "y": 1}, "b": 2}}
        await repo.save_output("t", nested_a, {"k": "nested"})
        assert await repo.get_output("t", nested_b) == {"k": "nested"}
        assert (
            await repo.get_output(
                "t", {"z": 0, "outer": {"a": {"x": [{"p": 2, "q": 1}, 1], "y": 1}, "b": 2}}
            )
            is None
        )
        assert await repo.get_output("t", {"outer": {"b": 2}, "z": 0}) is None


async def check_binary_values_in_rows(factory: RepositoryFactory) -> None:
    """S4-2 (seed H-1): an inline Blob, bytes and a CacheRef round-trip exactly."""
    async with _open(factory) as repo:
        output: dict[str, object] = {
            "blob": Blob(b"\x00\xffbinary", "image/png"),
            "plain": Blob(b"", None),
            "raw": b"\x00\x01\x02",
            "nested": [Blob(b"n", "text/plain"), {"deep": b"\xfe"}],
            "ref": CacheRef("cache://elsewhere/x", size=3, mime="a/b"),
        }
        await repo.save_output("t", {"i": 1}, output)
        got = await repo.get_output("t", {"i": 1})
        assert got == output, got
        assert got is not None
        assert isinstance(got["blob"], Blob)
        assert got["blob"].mime == "image/png"
        assert type(got["raw"]) is bytes


async def check_stream_round_trip(factory: RepositoryFactory) -> None:
    """S4-3: a streamed blob reads back exactly, whole and streamed; the ref has its size."""
    async with _open(factory) as repo:
        if not _streams(repo):
            return
        big = _pattern(3 * 1024 * 1024 + 17)
        cases: list[tuple[list[bytes | bytearray | memoryview], str | None]] = [
            ([], None),
            ([b""], None),
            ([b"a", bytearray(b"bc"), memoryview(b"def")], "text/plain"),
            ([big[i : i + 65536 + 3] for i in range(0, len(big), 65536 + 3)], None),
            ([big], "application/octet-stream"),
        ]
        for parts, mime in cases:
            expected = b"".join(bytes(p) for p in parts)
            ref = await repo.save_output_stream("t", {"n": 1}, "out", _chunks(parts), mime=mime)
            assert isinstance(ref, CacheRef)
            assert ref.size == len(expected), (ref.size, len(expected))
            assert ref.mime == mime
            assert await repo.get_output_by_ref(ref) == expected
            if repo.supports_streaming_reads():
                assert await _read_stream(repo, ref) == expected


async def check_refs_are_unique_per_write(factory: RepositoryFactory) -> None:
    """S4-3 (seed late CRITICAL race): identical inputs, distinct refs; deleting one keeps the other."""
    async with _open(factory) as repo:
        if not _streams(repo):
            return
        refs: list[CacheRef] = []

        async def write(i: int) -> None:
            refs.append(await repo.save_output_stream("t", {"same": 1}, "out", _stream(b"v%d" % i)))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(write, i)
        assert len({r.ref for r in refs}) == 4
        contents = {await repo.get_output_by_ref(r) for r in refs}
        assert contents == {b"v0", b"v1", b"v2", b"v3"}
        await repo.delete_output_by_ref(refs[0])
        with _Raises(DanglingRefError, "read of a deleted blob"):
            await repo.get_output_by_ref(refs[0])
        for ref in refs[1:]:
            assert len(await repo.get_output_by_ref(ref)) == 2


async def check_delete_output_by_ref(factory: RepositoryFactory) -> None:
    """S4-4: a deleted blob is dangling for every reader; deleting twice is fine."""
    async with _open(factory) as repo:
        if not _streams(repo):
            return
        ref = await repo.save_output_stream("t", {}, "out", _stream(b"gone soon"))
        await repo.delete_output_by_ref(ref)
        await repo.delete_output_by_ref(ref)
        with _Raises(DanglingRefError, "get_output_by_ref after delete"):
            await repo.get_output_by_ref(ref)
        if repo.supports_streaming_reads():
            with _Raises(DanglingRefError, "open_output_stream_by_ref after delete"):
                async with repo.open_output_stream_by_ref(ref):
                    raise AssertionError("opened a deleted blob")


def _forgeries(real: CacheRef) -> list[object]:
    text = real.ref
    flipped = text[:-1] + ("0" if text[-1] != "0" else "1")
    return [
        {"$ref": text, "kind": "task-graph/CacheRef"},
        text,
        CacheRef("cache://0000/default/../../etc/passwd"),
        CacheRef("/etc/passwd"),
        CacheRef("../" + text),
        CacheRef(text + "/../x"),
        CacheRef(flipped),
        CacheRef(text.replace("/default", "/default/..", 1)),
        CacheRef(text.upper()),
        CacheRef(text + "x"),
        CacheRef("x" * 1024),
        CacheRef("cache://" + "f" * 32 + "/default/" + "0" * 32 + "#" + "0" * 32),
    ]


async def check_foreign_refs_are_refused(factory: RepositoryFactory) -> None:
    """S4-6: forged, tampered and other repositories' refs raise ForeignRefError."""
    async with _open(factory) as repo, _open(factory) as other:
        if not _streams(repo) or not _streams(other):
            return
        mine = await repo.save_output_stream("t", {}, "out", _stream(b"mine"))
        theirs = await other.save_output_stream("t", {}, "out", _stream(b"theirs"))
        for bad in [*_forgeries(mine), theirs]:
            with _Raises(ForeignRefError, f"get_output_by_ref({bad!r})"):
                await repo.get_output_by_ref(bad)  # type: ignore[arg-type]
            with _Raises(ForeignRefError, f"delete_output_by_ref({bad!r})"):
                await repo.delete_output_by_ref(bad)  # type: ignore[arg-type]
            if repo.supports_streaming_reads():
                with _Raises(ForeignRefError, f"open_output_stream_by_ref({bad!r})"):
                    async with repo.open_output_stream_by_ref(bad):  # type: ignore[arg-type]
                        raise AssertionError("opened a forged ref")
        assert await repo.get_output_by_ref(mine) == b"mine"
        assert await other.get_output_by_ref(theirs) == b"theirs"


class _StreamFailed(Exception):
    pass


async def check_failed_stream_leaves_nothing(factory: RepositoryFactory) -> None:
    """S4-3: a stream that raises leaves no blob; the error comes out unchanged."""
    async with _open(factory) as repo:
        if not _streams(repo):
            return
        before = await repo.stats()

        async def failing() -> AsyncIterator[bytes]:
            yield b"x" * 100_000
            raise _StreamFailed("producer died")

        with _Raises(_StreamFailed, "a failing stream"):
            await repo.save_output_stream("t", {}, "out", failing())

        async def bad_chunk() -> AsyncIterator[bytes]:
            yield b"ok"
            yield "not bytes"  # type: ignore[misc]

        with _Raises(TypeError, "a str chunk"):
            await repo.save_output_stream("t", {}, "out", bad_chunk())
        assert await repo.stats() == before
        ref = await repo.save_output_stream("t", {}, "out", _stream(b"still works"))
        assert await repo.get_output_by_ref(ref) == b"still works"


async def check_cancelled_stream_leaves_nothing(factory: RepositoryFactory) -> None:
    """S4-3: a save cancelled mid-stream leaves no blob; the repository keeps working."""
    async with _open(factory) as repo:
        if not _streams(repo):
            return
        before = await repo.stats()
        for at in (0, 1, 3):
            with trio.CancelScope() as scope:

                async def cancelling(
                    at: int = at, scope: trio.CancelScope = scope
                ) -> AsyncIterator[bytes]:
                    for i in range(5):
                        if i == at:
                            scope.cancel()
                        yield b"y" * 70_000
                        await trio.lowlevel.checkpoint()

                await repo.save_output_stream("t", {}, "out", cancelling())
            assert scope.cancelled_caught, "the save should have been cancelled"
            assert await repo.stats() == before
        ref = await repo.save_output_stream("t", {}, "out", _stream(b"after"))
        assert await repo.get_output_by_ref(ref) == b"after"


async def check_prefix_delete_cascades(factory: RepositoryFactory) -> None:
    """S4-4: prefix deletes take their rows' blobs, but not blobs a surviving row uses."""
    async with _open(factory) as repo:
        if not _streams(repo):
            return
        ref_a = await repo.save_output_stream("a.x", {}, "out", _stream(b"A"))
        ref_shared = await repo.save_output_stream("a.y", {}, "out", _stream(b"S"))
        ref_b = await repo.save_output_stream("b", {}, "out", _stream(b"B"))
        await repo.save_output("a.x", {}, {"out": ref_a})
        await repo.save_output("a.y", {}, {"out": ref_shared})
        await repo.save_output("b", {}, {"out": ref_b, "also": [ref_shared]})
        assert await repo.delete_by_task_type_prefix("a.") == 2
        assert await repo.get_output("a.x", {}) is None
        assert await repo.get_output("a.y", {}) is None
        with _Raises(DanglingRefError, "a blob of a deleted row"):
            await repo.get_output_by_ref(ref_a)
        assert await repo.get_output_by_ref(ref_shared) == b"S"
        assert await repo.get_output_by_ref(ref_b) == b"B"
        assert await repo.get_output("b", {}) == {"out": ref_b, "also": [ref_shared]}
        assert await repo.delete_by_task_type_prefix("zzz") == 0
        await repo.save_output("p%_x", {}, {"v": 1})
        await repo.save_output("pq_x", {}, {"v": 2})
        await repo.save_output("p%zx", {}, {"v": 3})
        assert await repo.delete_by_task_type_prefix("p%_") == 1, "prefixes are literal"
        assert await repo.get_output("pq_x", {}) == {"v": 2}
        assert await repo.get_output("p%zx", {}) == {"v": 3}


async def check_clear_older_than(factory: RepositoryFactory) -> None:
    """S4-4: fresh rows survive a long horizon; ``clear_older_than(0)`` clears all."""
    async with _open(factory) as repo:
        await repo.save_output("t", {"i": 1}, {"v": 1})
        ref = None
        if _streams(repo):
            ref = await repo.save_output_stream("t", {"i": 2}, "out", _stream(b"old"))
            await repo.save_output("t", {"i": 2}, {"out": ref})
        assert await repo.clear_older_than(3600.0) == 0
        assert await repo.get_output("t", {"i": 1}) == {"v": 1}
        if ref is not None:
            assert await repo.get_output_by_ref(ref) == b"old"
        assert await repo.clear_older_than(0.0) == (2 if ref is not None else 1)
        assert await repo.get_output("t", {"i": 1}) is None
        if ref is not None:
            with _Raises(DanglingRefError, "a blob of a cleared row"):
                await repo.get_output_by_ref(ref)


async def check_stats_and_gc(factory: RepositoryFactory) -> None:
    """S4-4: stats count rows and blobs; gc removes exactly the unreferenced blobs."""
    async with _open(factory) as repo:
        empty = await repo.stats()
        assert (empty.rows, empty.blobs, empty.bytes) == (0, 0, 0)
        await repo.save_output("t", {}, {"v": 1})
        if not _streams(repo):
            assert (await repo.stats()).rows == 1
            return
        kept = await repo.save_output_stream("t", {"k": 1}, "out", _stream(b"12345"))
        loose = await repo.save_output_stream("t", {"k": 2}, "out", _stream(b"123"))
        await repo.save_output("t", {"k": 1}, {"out": kept})
        stats = await repo.stats()
        assert (stats.rows, stats.blobs, stats.bytes) == (2, 2, 8), stats
        assert (await repo.gc()).blobs == 0, "gc must spare young unreferenced blobs"
        report = await repo.gc(min_age=0.0)
        assert (report.blobs, report.bytes) == (1, 3), report
        with _Raises(DanglingRefError, "a collected blob"):
            await repo.get_output_by_ref(loose)
        assert await repo.get_output_by_ref(kept) == b"12345"


async def check_stream_reader_early_exit(factory: RepositoryFactory) -> None:
    """S4-3: leaving a streamed read early releases it; the blob stays readable."""
    async with _open(factory) as repo:
        if not _streams(repo) or not repo.supports_streaming_reads():
            return
        data = _pattern(5 * 1024 * 1024, seed=3)
        ref = await repo.save_output_stream("t", {}, "out", _stream(data))
        async with repo.open_output_stream_by_ref(ref) as chunks:
            async for first in chunks:
                assert data.startswith(first)
                break
        with trio.CancelScope() as scope:
            async with repo.open_output_stream_by_ref(ref) as chunks:
                scope.cancel()
                async for _ in chunks:
                    raise AssertionError("a cancelled reader got a chunk")
        assert await _read_stream(repo, ref) == data
        await repo.delete_output_by_ref(ref)


async def check_capabilities_and_checkpoints(factory: RepositoryFactory) -> None:
    """S4-8: probes are bools; every async method is a checkpoint."""
    async with _open(factory) as repo:
        assert isinstance(repo.supports_streaming(), bool)
        assert isinstance(repo.supports_streaming_reads(), bool)
        with trio.testing.assert_checkpoints():
            await repo.save_output("t", {}, {"v": 1})
        with trio.testing.assert_checkpoints():
            await repo.get_output("t", {})
        with trio.testing.assert_checkpoints():
            await repo.get_output("t", {"missing": 1})
        with trio.testing.assert_checkpoints():
            await repo.stats()
        with trio.testing.assert_checkpoints():
            await repo.delete_by_task_type_prefix("nothing")
        with trio.testing.assert_checkpoints():
            await repo.clear_older_than(3600.0)
        if _streams(repo):
            with trio.testing.assert_checkpoints():
                ref = await repo.save_output_stream("t", {}, "out", _stream())
            with trio.testing.assert_checkpoints():
                await repo.get_output_by_ref(ref)
            with trio.testing.assert_checkpoints():
                await repo.delete_output_by_ref(ref)
            with trio.testing.assert_checkpoints(), _Raises(ForeignRefError, "a bad ref"):
                await repo.get_output_by_ref(CacheRef("nope"))


async def check_aclose(factory: RepositoryFactory) -> None:
    """S4-8: after aclose, calls raise RepositoryError; aclose is idempotent."""
    async with _open(factory) as repo:
        await repo.save_output("t", {}, {"v": 1})
        await repo.aclose()
        await repo.aclose()
        with _Raises(RepositoryError, "get_output after aclose"):
            await repo.get_output("t", {})
        with _Raises(RepositoryError, "save_output after aclose"):
            await repo.save_output("t", {}, {"v": 2})


async def check_bad_arguments_are_refused(factory: RepositoryFactory) -> None:
    """
    S4-15: a caller's bad argument is a `TypeError`/`ValueError` naming it, raised before
    anything is stored; the repository keeps working.
    """
    async with _open(factory) as repo:
        before = await repo.stats()
        with _Raises(TypeError, "a task type that is not a str"):
            await repo.save_output(5, {}, {"v": 1})  # type: ignore[arg-type]
        with _Raises(ValueError, "an empty task type"):
            await repo.save_output("", {}, {"v": 1})
        with _Raises(TypeError, "a task type that is not a str, in get_output"):
            await repo.get_output(None, {})  # type: ignore[arg-type]
        with _Raises(TypeError, "an output that is not a mapping"):
            await repo.save_output("t", {}, [("v", 1)])  # type: ignore[arg-type]
        with _Raises(TypeError, "an output key that is not a str"):
            await repo.save_output("t", {}, {1: "v"})  # type: ignore[dict-item]
        with _Raises(TypeError, "an output value no row can hold"):
            await repo.save_output("t", {}, {"v": object()})
        with _Raises(TypeError, "inputs that have no key"):
            await repo.save_output("t", {"x": object()}, {"v": 1})
        if _streams(repo):
            with _Raises(TypeError, "a mime that is not a str"):
                await repo.save_output_stream("t", {}, "out", _stream(b"x"), mime=5)  # type: ignore[arg-type]
            with _Raises(TypeError, "a task type that is not a str, in a stream"):
                await repo.save_output_stream(b"t", {}, "out", _stream(b"x"))  # type: ignore[arg-type]
        assert await repo.stats() == before, "a refused call stored something"
        await repo.save_output("t", {}, {"v": 1})
        assert await repo.get_output("t", {}) == {"v": 1}


#: Every check, by name; `check_output_repository` runs them in this order.
CONTRACT_CHECKS: dict[str, Check] = {
    "rows_round_trip": check_rows_round_trip,
    "row_keys_are_canonical": check_row_keys_are_canonical,
    "binary_values_in_rows": check_binary_values_in_rows,
    "stream_round_trip": check_stream_round_trip,
    "refs_are_unique_per_write": check_refs_are_unique_per_write,
    "delete_output_by_ref": check_delete_output_by_ref,
    "foreign_refs_are_refused": check_foreign_refs_are_refused,
    "failed_stream_leaves_nothing": check_failed_stream_leaves_nothing,
    "cancelled_stream_leaves_nothing": check_cancelled_stream_leaves_nothing,
    "prefix_delete_cascades": check_prefix_delete_cascades,
    "clear_older_than": check_clear_older_than,
    "stats_and_gc": check_stats_and_gc,
    "stream_reader_early_exit": check_stream_reader_early_exit,
    "capabilities_and_checkpoints": check_capabilities_and_checkpoints,
    "bad_arguments_are_refused": check_bad_arguments_are_refused,
    "aclose": check_aclose,
}


async def check_output_repository(
    factory: RepositoryFactory, *, only: list[str] | None = None
) -> None:
    """
    Run the output-repository contract against fresh repositories from ``factory``.

    Args:
        factory: called once per check (twice for the foreign-ref check) to make an empty
            repository: it returns the repository, an awaitable of it, or an async context
            manager yielding it (so a cache-server client can start and stop its server).
        only: names from `CONTRACT_CHECKS` to run (default: all).

    Raises:
        AssertionError: the repository broke the contract (the message says where).

    Cancellation: a cancelled run closes the repository it was checking.
    """
    names = list(CONTRACT_CHECKS) if only is None else only
    for name in names:
        await CONTRACT_CHECKS[name](factory)
