"""
The per-task output accumulator: a pure state machine fed the events of one task's stream.

Rules (spec/S6-runner.md, S6-1 ... S6-9):

- Every event names a declared output port, and its kind matches the port's ``x-stream``
  mode (S6-2). The table below is the whole strictness policy; anything outside it raises
  `StreamProtocolError` naming the port, and the accumulator is left unchanged.

  ==============  ==========================  ===========================================
  event           allowed ports               effect
  ==============  ==========================  ===========================================
  `TextDelta`     ``append``                  concatenated to the port's text (S6-3)
  `ObjectDelta`   ``object``                  replaces the value; list + list upserts by
                                              ``"id"``, items without one appended (S6-4)
  `Snapshot`      any declared, not binary    replaces the value of each port it names
  `BinaryDelta`   ``binary``                  accumulated, sent to a sink, or both (S6-5)
  `Finish`        any declared port           explicit values; at a binary port the value
                                              wins over the chunks, which are dropped (S6-6)
  `StreamError`   (none)                      the stream failed (S6-7)
  `Phase`         (none)                      observed only; the output is unchanged
  ==============  ==========================  ===========================================

- Ports routed to a sink are not accumulated (S6-5): their bytes are counted and the runner
  forwards each chunk to the sink; the final output leaves the port for the runner to fill
  with the sink's `CacheRef`. A *tee* port is both sunk and accumulated (a downstream edge
  needs the materialised value while the stored row gets the ref).
- After `Finish` or `StreamError`, any further event is a `StreamProtocolError` (S6-8).
- A plain ``execute`` result is the same thing as a stream holding one `Finish` (S6-9).

Theory of operation: the runner builds one `OutputAccumulator` per task run, calls `feed` for
every event the task yields and acts on the returned route (``"sink"``/``"tee"``: forward the
chunk to the port's sink; ``"error"``: fail the task with `error`), then calls `result` when the
stream ends (a trailing `Finish` is optional). Nothing here awaits, so every rule above is
testable and fuzzable without trio.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal, TypeAlias, final

import attrs

from .._errors import StreamProtocolError
from ._events import (
    BinaryDelta,
    Blob,
    BytesLike,
    Finish,
    ObjectDelta,
    Phase,
    Snapshot,
    StreamError,
    TextDelta,
    chunk_size,
)
from ._ports import PortSpec, materialize_binary
from ._refs import CacheRef

__all__ = [
    "AccumulatedOutput",
    "AccumulatorState",
    "BinaryRoute",
    "EventRoute",
    "OutputAccumulator",
    "accumulate_result",
    "normalize_binary_value",
    "upsert_by_id",
]

#: What the runner must do with an event after `OutputAccumulator.feed` accepted it.
#: ``"accumulated"``: nothing more. ``"sink"``: forward the chunk to the port's sink (not kept).
#: ``"tee"``: forward the chunk to the sink (also kept). ``"observe"``: tell listeners only.
#: ``"finish"``: the task finished. ``"error"``: the task failed with `OutputAccumulator.error`.
EventRoute: TypeAlias = Literal["accumulated", "sink", "tee", "observe", "finish", "error"]

AccumulatorState: TypeAlias = Literal["streaming", "finished", "failed"]


@final
@attrs.frozen(kw_only=True)
class BinaryRoute:
    """
    Where the chunks of one binary port go.

    Attributes:
        sink: the chunks go to a cache sink (``save_output_stream``) as they arrive.
        accumulate: the chunks are kept and materialised at the end. A port with neither is
            refused (its bytes would go nowhere); both is a tee.
    """

    sink: bool = False
    accumulate: bool = True

    def __attrs_post_init__(self) -> None:
        if not (self.sink or self.accumulate):
            raise ValueError("a binary route must sink or accumulate (or both)")


_ACCUMULATE_ONLY = BinaryRoute()


@final
@attrs.frozen(kw_only=True)
class AccumulatedOutput:
    """
    The outcome of one task's stream.

    Attributes:
        output: the task's output as edges see it: text joined, objects as last set, binary
            ports materialised per their format (tee ports included), explicit `Finish`
            values as given (normalised at binary ports, S6-6). Ports that only went to a sink
            are absent; ports that received nothing are absent.
        binary_sizes: bytes received as chunks per binary port (sunk ports included).
        ref_ports: sink ports whose value the runner must fill with the sink's `CacheRef`
            (every sink port that was opened and not overridden by an explicit `Finish`).
        discarded_sink_ports: sink ports whose streamed blob must be deleted because an
            explicit `Finish` value won over the chunks (S6-6).
    """

    output: dict[str, object]
    binary_sizes: Mapping[str, int]
    ref_ports: frozenset[str]
    discarded_sink_ports: frozenset[str]

    def with_refs(self, refs: Mapping[str, CacheRef]) -> dict[str, object]:
        """
        Return the output as it is stored: `output` with each of `ref_ports` set to its ref.

        Raises:
            ValueError: ``refs`` misses a ref port, names another port, or holds a non-ref.
        """
        if set(refs) != self.ref_ports:
            missing = sorted(self.ref_ports - set(refs))
            extra = sorted(set(refs) - self.ref_ports)
            raise ValueError(
                f"refs must cover the ref ports exactly (missing {missing}, extra {extra})"
            )
        stored = dict(self.output)
        for port, ref in refs.items():
            if not isinstance(ref, CacheRef):
                raise ValueError(f"port {port!r}: expected a CacheRef, got {type(ref).__name__}")
            stored[port] = ref
        return stored


def upsert_by_id(previous: object, delta: object) -> object:
    """
    Merge an object delta into the previous value (S6-4).

    When both are lists, each item of ``delta`` that is a mapping with an ``"id"`` replaces the
    item of ``previous`` with an equal ``"id"`` (in place, keeping its position) or is
    appended; items without an ``"id"`` are appended. Otherwise ``delta`` replaces
    ``previous``. Neither argument is mutated.
    """
    if not (isinstance(previous, list) and isinstance(delta, list)):
        return delta
    merged = list(previous)
    for item in delta:
        if isinstance(item, Mapping) and "id" in item:
            key = item["id"]
            for index, old in enumerate(merged):
                if isinstance(old, Mapping) and "id" in old and old["id"] == key:
                    merged[index] = item
                    break
            else:
                merged.append(item)
        else:
            merged.append(item)
    return merged


def normalize_binary_value(spec: PortSpec, value: object) -> Blob | bytes | CacheRef:
    """
    Bring an explicit value for binary port ``spec`` to the port's format (S6-6).

    A `CacheRef` stays a ref. For ``"blob"``: a `Blob` stays as it is, bytes-like becomes
    ``Blob(data, spec.mime)``. For ``"binary"``: a `Blob` gives its ``data``, bytes-like
    becomes ``bytes``.

    Raises:
        StreamProtocolError: ``value`` is none of `Blob`, bytes-like, `CacheRef` (names the port).
    """
    if isinstance(value, CacheRef):
        return value
    if isinstance(value, Blob):
        return value if spec.binary_format == "blob" else value.data
    if isinstance(value, bytes | bytearray | memoryview):
        if spec.binary_format == "blob":
            return Blob(value, spec.mime)
        return bytes(value)
    raise StreamProtocolError(
        f"binary port {spec.name!r}: expected Blob, bytes or CacheRef, got {type(value).__name__}"
    )


def _undeclared(port: str, ports: Mapping[str, PortSpec], what: str) -> StreamProtocolError:
    known = ", ".join(sorted(ports)) or "none"
    return StreamProtocolError(f"{what} for undeclared port {port!r} (declared ports: {known})")


@final
@attrs.define(eq=False)
class OutputAccumulator:
    """
    Accumulates one task's stream events into its output (see the module docstring).

    Args:
        ports: the task's output ports (`parse_ports` of its output schema).
        routes: for binary ports, where their chunks go; a binary port without a route is
            accumulated only. A route for a port that is not binary is a `ValueError`.
    """

    _ports: Mapping[str, PortSpec]
    _routes: Mapping[str, BinaryRoute] = attrs.field(factory=dict)
    _state: AccumulatorState = attrs.field(default="streaming", init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _values: dict[str, object] = attrs.field(factory=dict, init=False)
    _text: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    _chunks: dict[str, list[BytesLike]] = attrs.field(factory=dict, init=False)
    _sizes: dict[str, int] = attrs.field(factory=dict, init=False)
    _explicit_binary: set[str] = attrs.field(factory=set, init=False)
    _result: AccumulatedOutput | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        for port, route in self._routes.items():
            spec = self._ports.get(port)
            if spec is None or not spec.is_binary:
                raise ValueError(
                    f"a binary route was given for {port!r}, which is not a binary port"
                )
            if not isinstance(route, BinaryRoute):
                raise TypeError(f"route for {port!r} must be a BinaryRoute")

    @classmethod
    def with_sinks(
        cls,
        ports: Mapping[str, PortSpec],
        sinks: Collection[str] = (),
        *,
        tee: Collection[str] = (),
    ) -> OutputAccumulator:
        """
        Build an accumulator from port sets: ``sinks`` go to a sink and are not accumulated,
        ``tee`` ports go to a sink *and* are accumulated; other binary ports accumulate.

        Raises:
            ValueError: a port in ``sinks`` or ``tee`` is not a binary port.
        """
        routes = {port: BinaryRoute(sink=True, accumulate=False) for port in sinks}
        routes.update({port: BinaryRoute(sink=True, accumulate=True) for port in tee})
        return cls(ports, routes)

    @property
    def state(self) -> AccumulatorState:
        """``"streaming"``, ``"finished"`` (a `Finish` arrived or `result` was called) or
        ``"failed"`` (a `StreamError` arrived)."""
        return self._state

    @property
    def error(self) -> BaseException | None:
        """The error of the `StreamError` that failed the stream, if any."""
        return self._error

    def route_of(self, port: str) -> BinaryRoute:
        """The route of binary ``port`` (accumulate-only when none was given)."""
        return self._routes.get(port, _ACCUMULATE_ONLY)

    def _spec(self, port: str, what: str) -> PortSpec:
        # Invariant (S6-2): every event names a declared port.
        spec = self._ports.get(port)
        if spec is None:
            raise _undeclared(port, self._ports, what)
        return spec

    def feed(self, event: object) -> EventRoute:
        """
        Apply one event and say what the runner must do with it.

        Raises:
            StreamProtocolError: the event breaks a rule of the module table, names an
                undeclared port, arrives after the stream ended, or is not a stream event. The
                accumulator is unchanged.
        """
        if self._state != "streaming":
            # Invariant (S6-8): nothing after Finish or StreamError.
            raise StreamProtocolError(
                f"{type(event).__name__} after the stream {self._state}; a stream ends at its "
                "first Finish or StreamError"
            )
        if isinstance(event, BinaryDelta):
            return self._feed_binary(event)
        if isinstance(event, TextDelta):
            spec = self._spec(event.port, "TextDelta")
            if spec.stream_mode != "append":
                raise StreamProtocolError(
                    f"TextDelta for port {event.port!r}, whose x-stream is {spec.stream_mode!r} "
                    "(text deltas need 'append')"
                )
            # Invariant (S6-3): text deltas concatenate per port, in order.
            self._text.setdefault(event.port, []).append(event.text)
            return "accumulated"
        if isinstance(event, ObjectDelta):
            spec = self._spec(event.port, "ObjectDelta")
            if spec.stream_mode != "object":
                raise StreamProtocolError(
                    f"ObjectDelta for port {event.port!r}, whose x-stream is "
                    f"{spec.stream_mode!r} (object deltas need 'object')"
                )
            self._values[event.port] = upsert_by_id(self._values.get(event.port), event.delta)
            return "accumulated"
        if isinstance(event, Snapshot):
            self._apply_snapshot(event.data)
            return "accumulated"
        if isinstance(event, Finish):
            self._apply_finish(event.data)
            self._state = "finished"
            return "finish"
        if isinstance(event, StreamError):
            # Invariant (S6-7): the stream failed; result() refuses from now on.
            self._state = "failed"
            self._error = event.error
            return "error"
        if isinstance(event, Phase):
            return "observe"
        raise StreamProtocolError(f"a task yielded {type(event).__name__}, not a stream event")

    def _feed_binary(self, event: BinaryDelta) -> EventRoute:
        spec = self._spec(event.port, "BinaryDelta")
        if not spec.is_binary:
            raise StreamProtocolError(
                f"BinaryDelta for port {event.port!r}, whose x-stream is {spec.stream_mode!r} "
                "(binary deltas need 'binary')"
            )
        size = chunk_size(event.chunk)
        self._sizes[event.port] = self._sizes.get(event.port, 0) + size
        route = self.route_of(event.port)
        # Invariant (S6-5): a port routed only to a sink keeps no bytes here.
        if route.accumulate:
            self._chunks.setdefault(event.port, []).append(event.chunk)
        if route.sink:
            return "tee" if route.accumulate else "sink"
        return "accumulated"

    def _check_mapping(self, data: Mapping[str, object], what: str) -> None:
        for port in data:
            if not isinstance(port, str):
                raise StreamProtocolError(f"{what} has a non-str port name {port!r}")
            self._spec(port, what)

    def _apply_snapshot(self, data: Mapping[str, object]) -> None:
        self._check_mapping(data, "Snapshot")
        for port, value in data.items():
            spec = self._ports[port]
            if spec.is_binary:
                raise StreamProtocolError(
                    f"Snapshot sets binary port {port!r}; binary ports take BinaryDelta chunks "
                    "or an explicit Finish value"
                )
            if spec.stream_mode == "append" and not isinstance(value, str):
                raise StreamProtocolError(
                    f"Snapshot sets text port {port!r} to {type(value).__name__}, not str"
                )
        for port, value in data.items():
            if self._ports[port].stream_mode == "append":
                assert isinstance(value, str)
                self._text[port] = [value]
            else:
                self._values[port] = value

    def _apply_finish(self, data: Mapping[str, object]) -> None:
        self._check_mapping(data, "Finish")
        staged: dict[str, object] = {}
        for port, value in data.items():
            spec = self._ports[port]
            if spec.is_binary:
                staged[port] = normalize_binary_value(spec, value)
            elif spec.stream_mode == "append" and not isinstance(value, str):
                raise StreamProtocolError(
                    f"Finish sets text port {port!r} to {type(value).__name__}, not str"
                )
            else:
                staged[port] = value
        for port, value in staged.items():
            spec = self._ports[port]
            if spec.is_binary:
                # Invariant (S6-6): an explicit binary value wins; the chunks are dropped.
                self._explicit_binary.add(port)
                self._chunks.pop(port, None)
                self._values[port] = value
            elif spec.stream_mode == "append":
                assert isinstance(value, str)
                self._text[port] = [value]
            else:
                self._values[port] = value

    def result(self) -> AccumulatedOutput:
        """
        End the stream (if no `Finish` came) and return the output. Idempotent.

        Raises:
            StreamProtocolError: the stream failed (a `StreamError` arrived); its error is
                chained as the cause.
        """
        if self._state == "failed":
            raise StreamProtocolError("the stream failed; it has no output") from self._error
        if self._result is not None:
            return self._result
        self._state = "finished"
        output: dict[str, object] = {}
        for port in self._ports:
            if port in self._text:
                output[port] = "".join(self._text[port])
            elif port in self._values:
                output[port] = self._values[port]
            elif port in self._chunks:
                spec = self._ports[port]
                assert spec.binary_format is not None
                output[port] = materialize_binary(
                    self._chunks[port], spec.binary_format, mime=spec.mime
                )
        self._chunks.clear()
        sinks = {port for port, route in self._routes.items() if route.sink}
        opened = {port for port in sinks if port in self._sizes}
        explicit = frozenset(self._explicit_binary)
        for port in opened - explicit:
            # A pure-sink port's materialised value never exists; a tee port's does.
            if not self.route_of(port).accumulate:
                output.pop(port, None)
        self._result = AccumulatedOutput(
            output=output,
            binary_sizes=dict(self._sizes),
            ref_ports=frozenset(opened - explicit),
            discarded_sink_ports=frozenset(opened & explicit),
        )
        return self._result


def accumulate_result(ports: Mapping[str, PortSpec], result: object) -> AccumulatedOutput:
    """
    Read a plain ``execute`` result in the same terms as a stream (S6-9): it is exactly a
    stream holding one ``Finish(result)``.

    Raises:
        StreamProtocolError: ``result`` is not a mapping with str keys, names an undeclared
            port, or holds a wrong value at a binary or text port.
    """
    if not isinstance(result, Mapping):
        raise StreamProtocolError(f"execute() must return a mapping, not {type(result).__name__}")
    accumulator = OutputAccumulator(ports)
    accumulator.feed(Finish(result))
    return accumulator.result()
