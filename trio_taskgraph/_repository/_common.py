"""
Helpers every repository shares: row encoding, the refs a row points to, chunk checks.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING

import trio

from .._core._codec import packb, unpackb
from .._core._events import chunk_size
from .._core._refs import CacheRef
from .._errors import ForeignRefError, RepositoryError, WireFormatError

if TYPE_CHECKING:
    from .._core._events import BytesLike
    from .._core._keys import RefSigner

__all__ = [
    "check_mime",
    "check_task_type",
    "collect_refs",
    "decode_row",
    "encode_row",
    "iterate_closing",
    "row_blob_names",
    "size_of_chunk",
    "write_behind",
]


def check_task_type(task_type: object) -> str:
    """Return ``task_type`` if it is a non-empty str, else raise."""
    if not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str, not {type(task_type).__name__}")
    if not task_type:
        raise ValueError("task_type must be a non-empty str")
    return task_type


def check_mime(mime: object) -> str | None:
    """Return ``mime`` if it is None or a str, else raise `TypeError`."""
    if mime is not None and not isinstance(mime, str):
        raise TypeError(f"mime must be a str or None, not {type(mime).__name__}")
    return mime


def size_of_chunk(chunk: object) -> int:
    """The byte size of a streamed chunk (`TypeError` if it is not bytes-like)."""
    return chunk_size(chunk)


async def write_behind(
    chunks: AsyncIterator[BytesLike],
    write: Callable[[list[BytesLike]], Awaitable[None]],
    *,
    batch_bytes: int,
    max_items: int,
) -> int:
    """
    Gather ``chunks`` into batches of up to ``batch_bytes`` (or ``max_items`` chunks) and hand
    each to ``write`` while the next one is gathered: one thread hop per batch instead of per
    chunk, and at most two batches held at once (the one being written, the one gathering).
    Empty chunks are dropped.

    Returns:
        The number of bytes written.

    Raises:
        Whatever ``chunks`` or ``write`` raised, as itself (not wrapped in a group).

    Cancellation: stops at once; the caller discards what was written (S4-3).
    """
    total = 0
    send, receive = trio.open_memory_channel[list["BytesLike"]](0)

    async def writer() -> None:
        async with receive:
            async for batch in receive:
                await write(batch)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            async with send:
                batch: list[BytesLike] = []
                gathered = 0
                async for chunk in chunks:
                    size = size_of_chunk(chunk)
                    if not size:
                        continue
                    batch.append(chunk)
                    gathered += size
                    total += size
                    if gathered >= batch_bytes or len(batch) >= max_items:
                        await send.send(batch)
                        batch, gathered = [], 0
                if batch:
                    await send.send(batch)
    except BaseExceptionGroup as group:
        # Give the caller the one real error, not a group made by our private nursery.
        real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(real) == 1 and not isinstance(real[0], BaseExceptionGroup):
            raise real[0] from None
        raise
    return total


def encode_row(output: Mapping[str, object]) -> bytes:
    """
    Encode an output dict as msgpack (S4-2): `Blob`, `bytes` and `CacheRef` stay themselves.

    Raises:
        TypeError: ``output`` is not a mapping with str keys, or holds a value msgpack and
            the wire ext types cannot carry.
    """
    if not isinstance(output, Mapping):
        raise TypeError(f"an output must be a mapping, not {type(output).__name__}")
    for key in output:
        if not isinstance(key, str):
            raise TypeError(f"output keys must be str, not {type(key).__name__}")
    try:
        return packb(dict(output))
    except WireFormatError as exc:
        # The caller handed us a value no row can hold: a type error on their side.
        raise TypeError(f"output cannot be stored: {exc}") from None


def decode_row(data: bytes) -> dict[str, object]:
    """Decode a stored row; a row that does not decode to a dict is a `RepositoryError`."""
    # Rows are our own writing, not input from a peer: size the wire limits to the row, so
    # any row `encode_row` accepted reads back (a 100 MiB inline blob, a 2M-item list).
    size = max(len(data), 1)
    try:
        value = unpackb(data, max_bytes=size, max_container_len=size)
    except ValueError as exc:
        raise RepositoryError(f"corrupt row: {exc}") from None
    if not isinstance(value, dict):
        raise RepositoryError(f"corrupt row: a {type(value).__name__}, not a dict")
    return value


def collect_refs(value: object) -> list[CacheRef]:
    """Every `CacheRef` in ``value`` (dicts, lists, tuples, sets; cycles safe)."""
    found: list[CacheRef] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, CacheRef):
            found.append(item)
        elif isinstance(item, Mapping | list | tuple | set | frozenset):
            if id(item) in seen:
                continue
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, Mapping) else item)
    return found


def row_blob_names(output: object, signer: RefSigner, namespace: str) -> frozenset[str]:
    """The names of the blobs of ``namespace`` that ``output`` points to (S4-4)."""
    names = set()
    for ref in collect_refs(output):
        try:
            names.add(signer.parse(ref, namespace=namespace))
        except ForeignRefError:
            continue  # another repository's or namespace's ref: not ours to keep alive
    return frozenset(names)


@asynccontextmanager
async def iterate_closing(
    chunks: AsyncIterable[BytesLike],
) -> AsyncIterator[AsyncIterator[BytesLike]]:
    """
    Iterate ``chunks``; if the block raises, ``aclose()`` the iterator (when it has one).

    A save that fails or is cancelled half-way closes its source at once: an async
    generator is finalised in this task (not by the garbage collector), and the receive
    side of a channel is closed, so its producer fails promptly instead of parking forever
    (the seed's late HIGH 2).
    """
    iterator = aiter(chunks)
    try:
        yield iterator
    except BaseException:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True):
                with suppress(Exception):
                    await aclose()
        raise
