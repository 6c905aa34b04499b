"""
The cache policy: which binary ports get a sink, what stays a ref, what a usable cache hit
looks like, and how cached refs replay.

Rules (spec/S6-runner.md, S6-18 ... S6-26):

- Sinks (S6-18): a binary output port gets a cache sink exactly when the task is cacheable and
  the run's cache supports streaming. Every such port gets its own sink (several binary ports
  work; the seed fell back to accumulation). The port is also accumulated (a tee) when at
  least one consumer materialises it, or when no sink exists.
- Inline vs ref (S6-19): with ``reference_threshold_bytes == 0`` every binary output stays a
  ref. Otherwise a ref whose ``size`` is known and below the threshold hydrates back inline;
  at or above it, or with an unknown size, it stays a ref (an unknown size is never read
  blindly: seed L-1). Inline values at or above the threshold are stored as refs when a
  streaming cache exists (`inline_ports_to_ref`), so an ``execute`` task and a streaming one
  store the same row.
- Only declared binary ports are hydrated (S6-20): a `CacheRef` elsewhere is left as it is, and
  a dict that merely has a ``$ref`` key is data at every port.
- The saved row and the returned output agree (S6-21): the runner saves the row with refs
  (never hydrated, so it stays small), then applies `plan_hydration` to produce the returned
  output; a cache hit applies the same `plan_hydration` to the row it read, so both paths
  return the same value for the same bytes.
- A cached row is usable (S6-22) when it is a mapping whose keys are all declared output ports
  (str), and whose binary-port values are a `CacheRef`, a `Blob` or bytes-like. Anything else
  is a miss (the task runs again and rewrites the row).
- Dangling refs (S6-23): if any ref of a usable row cannot be resolved, the hit is a miss.
- Replay (S6-24): on a hit, a ref at a binary port replays as `BinaryDelta` chunks of at most
  `replay_chunk_size(high_water_bytes)` bytes to streaming consumers (through the consumer's
  byte budget: seed M-6) and hydrates for materialising ones; `split_chunk` cuts an oversized
  chunk from a repository down to that size.
- Input refs (S6-25): a `CacheRef` at the top level of an input port is resolved and inlined
  per the port's ``format`` (``"binary"`` gives ``bytes``, anything else a `Blob`) before
  validation and keying; a ref that can't be resolved is a `DanglingRefError` naming the port.
- Orphan blobs (S6-26): blobs streamed for a run whose row is then not saved are deleted by
  the runner; `refs_to_delete` lists them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Final, Literal, TypeAlias, final

import attrs

from .._errors import DanglingRefError
from ._accumulate import BinaryRoute, normalize_binary_value
from ._events import Blob, BytesLike, chunk_size
from ._refs import CacheRef

if TYPE_CHECKING:
    from ._graph import EdgeMode
    from ._ports import BinaryFormat, PortSpec

__all__ = [
    "CachedRow",
    "HitDecision",
    "MAX_REPLAY_CHUNK_BYTES",
    "binary_routes",
    "check_cached_row",
    "decide_hit",
    "hydrate_value",
    "input_format",
    "input_ref_error",
    "input_refs",
    "inline_ports_to_ref",
    "keep_as_ref",
    "plan_hydration",
    "refs_to_delete",
    "replay_chunk_size",
    "replay_plan",
    "ReplayAction",
    "sink_ports",
    "split_chunk",
]

#: Replayed chunks are at most this big (and never bigger than the consumer's budget).
MAX_REPLAY_CHUNK_BYTES: Final = 64 * 1024

HitDecision: TypeAlias = Literal["hit", "miss"]


def sink_ports(
    ports: Mapping[str, PortSpec], *, cacheable: bool, cache_streams: bool
) -> frozenset[str]:
    """The binary output ports that get a cache sink (S6-18)."""
    if not (cacheable and cache_streams):
        return frozenset()
    return frozenset(port for port, spec in ports.items() if spec.is_binary)


def binary_routes(
    ports: Mapping[str, PortSpec],
    *,
    cacheable: bool,
    cache_streams: bool,
    consumer_modes: Mapping[str, Collection[EdgeMode]],
) -> dict[str, BinaryRoute]:
    """
    The `BinaryRoute` of every binary output port (S6-18): sunk when `sink_ports` says so,
    accumulated too when a consumer materialises it (a tee), accumulated only without a sink.

    Args:
        consumer_modes: per output port, the modes of the edges it feeds (absent: none).
    """
    sinks = sink_ports(ports, cacheable=cacheable, cache_streams=cache_streams)
    routes: dict[str, BinaryRoute] = {}
    for port, spec in ports.items():
        if not spec.is_binary:
            continue
        if port in sinks:
            tee = "materialize" in consumer_modes.get(port, ())
            routes[port] = BinaryRoute(sink=True, accumulate=tee)
        else:
            routes[port] = BinaryRoute(sink=False, accumulate=True)
    return routes


def keep_as_ref(ref: CacheRef, threshold: int) -> bool:
    """
    Whether ``ref`` stays a ref in the returned output (S6-19): always with threshold 0, with
    an unknown size, or with a size at or above the threshold.
    """
    if threshold < 0:
        raise ValueError(f"reference_threshold_bytes must be >= 0, got {threshold}")
    if threshold == 0 or ref.size is None:
        return True
    return ref.size >= threshold


def plan_hydration(
    output: Mapping[str, object], ports: Mapping[str, PortSpec], threshold: int
) -> dict[str, CacheRef]:
    """
    The refs to hydrate back inline (S6-19, S6-20): refs at declared binary ports that
    `keep_as_ref` lets go. Values at other ports are never touched.
    """
    plan: dict[str, CacheRef] = {}
    for port, value in output.items():
        spec = ports.get(port)
        # Invariant (S6-20): only declared binary ports, and only real CacheRef instances.
        if spec is None or not spec.is_binary or not isinstance(value, CacheRef):
            continue
        if not keep_as_ref(value, threshold):
            plan[port] = value
    return plan


def hydrate_value(spec: PortSpec, ref: CacheRef, data: bytes) -> Blob | bytes:
    """
    The inline value of binary port ``spec`` for ``ref``'s bytes: a `Blob` (MIME from the ref,
    else the port) for ``"blob"``, ``bytes`` for ``"binary"``.
    """
    if spec.binary_format == "binary":
        return bytes(data)
    return Blob(data, ref.mime if ref.mime is not None else spec.mime)


def inline_ports_to_ref(
    output: Mapping[str, object],
    ports: Mapping[str, PortSpec],
    threshold: int,
    *,
    cacheable: bool,
    cache_streams: bool,
) -> list[str]:
    """
    The binary ports whose *inline* value (`Blob` or bytes) should be stored as a ref (S6-19):
    those at or above the threshold (any size with threshold 0), when a sink would exist.
    """
    sinks = sink_ports(ports, cacheable=cacheable, cache_streams=cache_streams)
    chosen: list[str] = []
    for port in sinks:
        value = output.get(port)
        if isinstance(value, Blob):
            size = len(value)
        elif isinstance(value, bytes | bytearray | memoryview):
            size = chunk_size(value)
        else:
            continue
        if threshold == 0 or size >= threshold:
            chosen.append(port)
    return sorted(chosen)


@final
@attrs.frozen(kw_only=True)
class CachedRow:
    """
    A cached row judged usable by `check_cached_row`.

    Attributes:
        output: the row, with binary values normalised to their port's format.
        refs: the `CacheRef` at each binary port that holds one (to check for dangling refs,
            replay, or hydrate).
    """

    output: dict[str, object]
    refs: Mapping[str, CacheRef]


def check_cached_row(row: object, ports: Mapping[str, PortSpec]) -> CachedRow | None:
    """
    Judge a row read from the cache (S6-22): return it as a `CachedRow`, or ``None`` (a miss)
    when it is not a mapping, has a key that is not a declared output port, or holds at a
    binary port something other than a `CacheRef`, a `Blob` or bytes-like.
    """
    if not isinstance(row, Mapping):
        return None
    output: dict[str, object] = {}
    refs: dict[str, CacheRef] = {}
    for port, value in row.items():
        if not isinstance(port, str):
            return None
        spec = ports.get(port)
        if spec is None:
            return None
        if spec.is_binary:
            if not isinstance(value, CacheRef | Blob | bytes | bytearray | memoryview):
                return None
            value = normalize_binary_value(spec, value)
            if isinstance(value, CacheRef):
                refs[port] = value
        output[port] = value
    return CachedRow(output=output, refs=refs)


def decide_hit(row: CachedRow | None, dangling: Collection[CacheRef] = ()) -> HitDecision:
    """
    ``"hit"`` for a usable row none of whose refs dangle, else ``"miss"`` (S6-22, S6-23).
    """
    if row is None:
        return "miss"
    # Invariant (S6-23): one dangling ref turns the whole hit into a miss.
    if any(ref in dangling for ref in row.refs.values()):
        return "miss"
    return "hit"


ReplayAction: TypeAlias = Literal["stream", "hydrate"]


def replay_plan(
    cached: CachedRow,
    ports: Mapping[str, PortSpec],
    consumer_modes: Mapping[str, Collection[EdgeMode]],
) -> dict[str, frozenset[ReplayAction]]:
    """
    What a cache hit must do for each binary port's consumers (S6-24).

    ``"stream"``: send the port's bytes as `BinaryDelta` chunks to its streaming consumers
    (from ``open_output_stream_by_ref`` for a ref, `split_chunk` of the inline value
    otherwise). ``"hydrate"``: read a ref's bytes for the materialising consumers, which
    always get the value, never the ref, whatever the threshold (the returned output follows
    `plan_hydration`). Only declared binary ports are considered (S6-20, S6-12). Ports with
    no consumer, or no action, are absent.
    """
    plan: dict[str, frozenset[ReplayAction]] = {}
    for port in cached.output:
        spec = ports.get(port)
        if spec is None or not spec.is_binary:
            continue
        modes = consumer_modes.get(port, ())
        actions: set[ReplayAction] = set()
        if "stream" in modes:
            actions.add("stream")
        if "materialize" in modes and port in cached.refs:
            actions.add("hydrate")
        if actions:
            plan[port] = frozenset(actions)
    return plan


def replay_chunk_size(high_water_bytes: int) -> int:
    """The largest chunk a replay sends a streaming consumer (S6-24): within its budget."""
    if high_water_bytes < 1:
        raise ValueError(f"high_water_bytes must be >= 1, got {high_water_bytes}")
    return min(MAX_REPLAY_CHUNK_BYTES, high_water_bytes)


def split_chunk(chunk: BytesLike, max_size: int) -> Iterator[memoryview]:
    """
    Cut ``chunk`` into consecutive views of at most ``max_size`` bytes (no copy). An empty
    chunk gives nothing.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    view = memoryview(chunk).cast("B")
    for start in range(0, view.nbytes, max_size):
        yield view[start : start + max_size]


def input_format(input_schema: Mapping[str, object], port: str) -> BinaryFormat:
    """
    The format a ref reaching input ``port`` is inlined as (S6-25): ``"binary"`` when the
    port's schema says ``"format": "binary"``, otherwise ``"blob"``.
    """
    props = input_schema.get("properties")
    sub = props.get(port) if isinstance(props, Mapping) else None
    if isinstance(sub, Mapping) and sub.get("format") == "binary":
        return "binary"
    return "blob"


def input_refs(inputs: Mapping[str, object]) -> dict[str, CacheRef]:
    """The `CacheRef` values at the top level of ``inputs``, by port (S6-25)."""
    return {port: value for port, value in inputs.items() if isinstance(value, CacheRef)}


def input_ref_error(task_type: str, node_id: str, port: str, ref: CacheRef) -> DanglingRefError:
    """The error for a ref at input ``port`` that no repository of the run resolves (S6-25)."""
    return DanglingRefError(
        f"task {task_type!r} (node {node_id!r}): input port {port!r} holds ref {ref.ref!r}, "
        "which no repository of this run can resolve"
    )


def refs_to_delete(streamed: Collection[CacheRef]) -> list[CacheRef]:
    """
    The blobs to delete when the row holding a run's streamed blobs is not saved (S6-26):
    every streamed ref once, sorted by name (explicit-Finish overrides included).
    """
    return sorted(set(streamed), key=lambda r: r.ref)
