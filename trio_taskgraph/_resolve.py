"""
`resolve_output` and `resolve_job_output`: hydrate the refs in an output (the trio shell).

The walking is pure (`_core/_walker.py`); this module only runs the resolver calls: distinct
refs, concurrently, at most ``max_concurrency`` at a time under a `trio.CapacityLimiter`, in
one nursery, where the first resolver error cancels the calls still running (S3-8, S3-9).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol, TypeAlias, runtime_checkable

import trio

from ._core._events import Blob
from ._core._refs import CacheRef
from ._core._walker import collect_cache_refs, rebuild, scan_refs

__all__ = [
    "RefFilter",
    "RefResolver",
    "RefSource",
    "collect_cache_refs",
    "resolve_job_output",
    "resolve_output",
]

#: ``async (ref) -> value``: what a ref becomes.
RefResolver: TypeAlias = Callable[[CacheRef], Awaitable[object]]
#: ``(ref) -> bool``: which refs to resolve (true) or leave in place (false).
RefFilter: TypeAlias = Callable[[CacheRef], bool]


@runtime_checkable
class RefSource(Protocol):
    """Anything that reads a blob by ref: every `OutputRepository` is one."""

    async def get_output_by_ref(self, ref: CacheRef, /) -> bytes: ...


async def resolve_output(
    value: object,
    resolver: RefResolver,
    *,
    filter: RefFilter | None = None,  # noqa: A002 -- the public API's name for it
    max_concurrency: int = 8,
    limiter: trio.CapacityLimiter | None = None,
) -> object:
    """
    Return ``value`` with every `CacheRef` in it replaced by ``await resolver(ref)``.

    Walks dicts (plain, ``OrderedDict``, ``defaultdict``), lists, tuples (namedtuples too),
    sets and frozensets, however deep, shared or cyclic; every other object is an opaque
    leaf, and a dict that merely has a ``$ref`` key is data (S3-1, S3-3). Each distinct ref
    is resolved once (S3-6); containers with no resolved ref below them come back as the same
    objects, and ``value`` itself comes back when nothing was resolved (S3-4). ``value`` is
    never mutated; it must not be mutated while the call runs.

    Args:
        value: the output to hydrate.
        resolver: ``async (ref) -> object``; its result is inserted as-is (never walked).
        filter: when given, only refs for which ``filter(ref)`` is true are resolved; the
            others stay refs. Called once per distinct ref, before any resolver call.
        max_concurrency: at most this many resolver calls run at once (>= 1).
        limiter: a `trio.CapacityLimiter` shared with other calls (a runner-wide bound);
            every resolver call also holds one of its tokens. Default: a private limiter
            of ``max_concurrency`` tokens.

    Returns:
        The hydrated value (``value`` itself when no ref was resolved).

    Raises:
        ValueError: ``max_concurrency`` is less than 1.
        TypeError: a resolved value meant for a set or frozenset is unhashable.
        Exception: the first exception a resolver (or ``filter``) raised, as itself; the
            resolver calls still running are cancelled first (S3-9).

    Cancellation:
        Always a checkpoint. If cancelled, every resolver call in flight is cancelled and
        waited for before ``Cancelled`` propagates; ``value`` is untouched and nothing is
        returned, so a cancelled call leaves no task and no partial result behind.
    """
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise TypeError(f"max_concurrency must be an int, not {type(max_concurrency).__name__}")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    await trio.lowlevel.checkpoint()
    scan = scan_refs(value)
    wanted = list(scan.refs) if filter is None else [r for r in scan.refs if filter(r)]
    if not wanted:
        return value
    resolved = await _resolve_all(wanted, resolver, max_concurrency, limiter)
    return rebuild(scan, resolved)


async def _resolve_all(
    refs: list[CacheRef],
    resolver: RefResolver,
    max_concurrency: int,
    shared: trio.CapacityLimiter | None,
) -> dict[CacheRef, object]:
    """
    Resolve every ref of ``refs`` (distinct), at most ``max_concurrency`` at once.

    A pool of ``min(max_concurrency, len(refs))`` workers pulls refs from one iterator, each
    call made under the shared `trio.CapacityLimiter` (S3-8). The first error is kept, the
    pool is cancelled, and the error is raised as itself once every worker has finished
    (S3-9): never an exception group for a single resolver failure.
    """
    results: dict[CacheRef, object] = {}
    limiter = trio.CapacityLimiter(max_concurrency) if shared is None else shared
    pending = iter(refs)
    failure: list[Exception] = []

    async def worker(cancel_scope: trio.CancelScope) -> None:
        for ref in pending:
            # No ref starts once the call is cancelled, even if resolvers never yield.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                # A private limiter has as many tokens as there are workers, so it never
                # blocks them: taking a token without a scheduling round trip saves ~5 us a
                # call. A shared limiter may be exhausted: then wait for a token.
                try:
                    limiter.acquire_nowait()
                except trio.WouldBlock:
                    await limiter.acquire()
                try:
                    results[ref] = await resolver(ref)
                finally:
                    limiter.release()
            except Exception as exc:
                # Invariant (S3-9): the first error cancels the others and propagates.
                if not failure:
                    failure.append(exc)
                cancel_scope.cancel()
                return

    # Invariant (S3-8): at most max_concurrency workers, each call under the shared limiter.
    async with trio.open_nursery() as nursery:
        for _ in range(min(max_concurrency, len(refs))):
            nursery.start_soon(worker, nursery.cancel_scope)
    if failure:
        raise failure[0]
    return results


async def resolve_job_output(
    output: object,
    source: RefSource | RefResolver,
    *,
    ports: Iterable[str] | None = None,
    filter: RefFilter | None = None,  # noqa: A002 -- same name as resolve_output's
    max_concurrency: int = 8,
    limiter: trio.CapacityLimiter | None = None,
) -> object:
    """
    Hydrate the refs in a job's ``output`` from a repository or a resolver.

    With a repository (any object with ``async get_output_by_ref(ref) -> bytes``), each ref
    becomes ``Blob(data, ref.mime)``; with a resolver callable, whatever it returns.

    Args:
        output: the job's output; with ``ports``, a mapping of port name to value.
        source: an object with ``get_output_by_ref``, or an ``async (ref) -> object``.
        ports: when given, only refs found under these top-level ports are resolved; refs in
            any other field stay untouched, even equal ones (the seed's M-1: an untrusted
            producer's output cannot make us read a ref it planted in another field).
        filter: as for `resolve_output`.
        max_concurrency: as for `resolve_output`.
        limiter: as for `resolve_output`.

    Returns:
        The hydrated output; ``output`` itself when nothing was resolved. With ``ports``,
        a changed output is a shallow copy of the mapping (same type for ``dict``,
        ``OrderedDict`` and ``defaultdict``, else a ``dict``) with the hydrated ports.

    Raises:
        TypeError: ``source`` is neither; ``ports`` is a bare ``str``; ``ports`` is given but
            ``output`` is not a mapping.
        RefError: from the repository (a dangling or foreign ref), as itself.

    Cancellation:
        As for `resolve_output`: nothing is left running and ``output`` is untouched.
    """
    resolver = _as_resolver(source)
    if ports is None:
        return await resolve_output(
            output, resolver, filter=filter, max_concurrency=max_concurrency, limiter=limiter
        )
    if isinstance(ports, str):
        raise TypeError("ports must be an iterable of port names, not a single str")
    if not isinstance(output, Mapping):
        raise TypeError(f"ports= needs a mapping output, not {type(output).__name__}")
    # Invariant (S3-10): only the allowed top-level ports are walked at all.
    allowed = {port: output[port] for port in dict.fromkeys(ports) if port in output}
    # One walk over the allowed ports together: a ref shared between them resolves once.
    hydrated = await resolve_output(
        allowed, resolver, filter=filter, max_concurrency=max_concurrency, limiter=limiter
    )
    if hydrated is allowed:
        return output
    assert isinstance(hydrated, dict)
    changed = {p: v for p, v in hydrated.items() if v is not allowed[p]}
    if not changed:  # pragma: no cover - a rebuilt dict always has a changed value
        return output
    # Same type back for the dict family; any other mapping becomes a plain dict.
    same_type = type(output) in (dict, OrderedDict, defaultdict)
    copy = output.copy() if same_type else dict(output)  # type: ignore[attr-defined]
    copy.update(changed)
    return copy


def _as_resolver(source: RefSource | RefResolver) -> RefResolver:
    get = getattr(source, "get_output_by_ref", None)
    if get is not None and callable(get):

        async def from_repository(ref: CacheRef) -> object:
            data = await get(ref)
            return Blob(data, ref.mime)

        return from_repository
    if callable(source):
        return source
    raise TypeError(
        "source must be an async resolver (ref -> value) or an object with "
        f"get_output_by_ref, not {type(source).__name__}"
    )
