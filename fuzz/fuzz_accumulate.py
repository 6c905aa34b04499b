# Invariant tested: S6-1, S6-2, S6-3, S6-4, S6-5, S6-6, S6-7, S6-8, S1-6
"""
Differential fuzzing of the output accumulator against a small independent model.

Each input decodes (byte by byte) into a route per binary port and a sequence of stream
events, valid and invalid mixed. The accumulator must, for every event, either apply it or
raise `StreamProtocolError` leaving its state unchanged (any other exception is a finding),
and its final output must equal the model's: text joined, object upserts, binary bytes
concatenated (or replaced by an explicit Finish value), sink-only ports absent.

Run: ``python fuzz/fuzz_accumulate.py --seconds 60`` (atheris when importable, else random
bytes). Seed corpus: ``fuzz/corpus/accumulate/``.
"""

from __future__ import annotations

import sys

import _harness

import trio_taskgraph as tg
from trio_taskgraph._core._accumulate import BinaryRoute, OutputAccumulator, upsert_by_id

SCHEMA: dict[str, object] = {
    "properties": {
        "text": {"x-stream": "append"},
        "obj": {"x-stream": "object"},
        "snap": {"x-stream": "replace"},
        "blob": {"x-stream": "binary", "contentMediaType": "a/b"},
        "raw": {"x-stream": "binary", "format": "binary"},
        "plain": {},
    }
}
PORTS = tg.parse_ports(SCHEMA)
NAMES = [*PORTS, "ghost"]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def left(self) -> bool:
        return self._pos < len(self._data)

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        self._pos += 1
        return self._data[self._pos - 1]

    def take(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


def _value(r: _Reader) -> object:
    kind = r.byte() % 6
    if kind == 0:
        return r.take(r.byte() % 8)
    if kind == 1:
        return r.take(r.byte() % 8).decode("latin-1")
    if kind == 2:
        return [{"id": r.byte() % 3, "v": r.byte()} for _ in range(r.byte() % 3)] + (
            [{"v": 0}] if r.byte() % 2 else []
        )
    if kind == 3:
        return tg.Blob(r.take(r.byte() % 8), None if r.byte() % 2 else "x/y")
    if kind == 4:
        return tg.make_cache_ref(f"r{r.byte()}", size=r.byte())
    return r.byte()


def _event(r: _Reader) -> object:
    kind = r.byte() % 8
    port = NAMES[r.byte() % len(NAMES)]
    if kind == 0:
        return tg.TextDelta(port, r.take(r.byte() % 6).decode("latin-1"))
    if kind == 1:
        return tg.ObjectDelta(port, _value(r))
    if kind in (2, 3):
        chunk = r.take(r.byte() % 16)
        return tg.BinaryDelta(port, bytearray(chunk) if r.byte() % 2 else chunk)
    if kind == 4:
        return tg.Snapshot({NAMES[r.byte() % len(NAMES)]: _value(r) for _ in range(r.byte() % 3)})
    if kind == 5:
        return tg.Finish({NAMES[r.byte() % len(NAMES)]: _value(r) for _ in range(r.byte() % 3)})
    if kind == 6:
        return tg.Phase("p")
    return tg.StreamError(ValueError("x")) if r.byte() % 4 == 0 else tg.Phase("q")


class _Model:
    """An independent statement of the module table, in the simplest terms."""

    def __init__(self, routes: dict[str, BinaryRoute]) -> None:
        self.routes = routes
        self.values: dict[str, object] = {}
        self.text: dict[str, str] = {}
        self.bytes: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}
        self.explicit: set[str] = set()
        self.done = False
        self.failed = False

    def accepts(self, event: object) -> bool:
        if self.done or self.failed:
            return False
        if isinstance(event, tg.TextDelta):
            return event.port in PORTS and PORTS[event.port].stream_mode == "append"
        if isinstance(event, tg.ObjectDelta):
            return event.port in PORTS and PORTS[event.port].stream_mode == "object"
        if isinstance(event, tg.BinaryDelta):
            return event.port in PORTS and PORTS[event.port].is_binary
        if isinstance(event, tg.Snapshot):
            return all(
                p in PORTS
                and not PORTS[p].is_binary
                and (PORTS[p].stream_mode != "append" or isinstance(v, str))
                for p, v in event.data.items()
            )
        if isinstance(event, tg.Finish):
            return all(
                p in PORTS
                and (
                    not PORTS[p].is_binary
                    or isinstance(v, tg.Blob | tg.CacheRef | bytes | bytearray)
                )
                and (PORTS[p].stream_mode != "append" or isinstance(v, str))
                for p, v in event.data.items()
            )
        return True

    def apply(self, event: object) -> None:
        if isinstance(event, tg.TextDelta):
            self.text[event.port] = self.text.get(event.port, "") + event.text
        elif isinstance(event, tg.ObjectDelta):
            self.values[event.port] = upsert_by_id(self.values.get(event.port), event.delta)
        elif isinstance(event, tg.BinaryDelta):
            data = bytes(event.chunk)
            self.sizes[event.port] = self.sizes.get(event.port, 0) + len(data)
            if self.routes.get(event.port, BinaryRoute()).accumulate:
                self.bytes[event.port] = self.bytes.get(event.port, b"") + data
        elif isinstance(event, tg.Snapshot | tg.Finish):
            for port, value in event.data.items():
                spec = PORTS[port]
                if spec.is_binary:
                    self.explicit.add(port)
                    self.bytes.pop(port, None)
                    self.values[port] = _normalised(spec, value)
                elif spec.stream_mode == "append":
                    assert isinstance(value, str)
                    self.text[port] = value
                else:
                    self.values[port] = value
            self.done = isinstance(event, tg.Finish)
        elif isinstance(event, tg.StreamError):
            self.failed = True

    def output(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for port, spec in PORTS.items():
            if port in self.text:
                out[port] = self.text[port]
            elif port in self.values:
                out[port] = self.values[port]
            elif port in self.bytes:
                out[port] = (
                    tg.Blob(self.bytes[port], spec.mime)
                    if spec.binary_format == "blob"
                    else self.bytes[port]
                )
        return out


def _normalised(spec: tg.PortSpec, value: object) -> object:
    if isinstance(value, tg.CacheRef):
        return value
    data = value.data if isinstance(value, tg.Blob) else bytes(value)  # type: ignore[call-overload]
    if spec.binary_format == "binary":
        return data
    return value if isinstance(value, tg.Blob) else tg.Blob(data, spec.mime)


def TestOneInput(data: bytes) -> None:
    r = _Reader(data)
    routes: dict[str, BinaryRoute] = {}
    for port in ("blob", "raw"):
        choice = r.byte() % 3
        if choice:
            routes[port] = BinaryRoute(sink=True, accumulate=choice == 2)
    acc = OutputAccumulator(PORTS, routes)
    model = _Model(routes)
    while r.left():
        event = _event(r)
        expected = model.accepts(event)
        try:
            acc.feed(event)
        except tg.StreamProtocolError:
            if expected:
                raise AssertionError(f"refused a valid event {event!r}") from None
            continue
        if not expected:
            raise AssertionError(f"accepted an invalid event {event!r}")
        model.apply(event)
    if model.failed:
        try:
            acc.result()
        except tg.StreamProtocolError:
            return
        raise AssertionError("result() after a StreamError did not raise")
    out = acc.result()
    assert out.output == model.output(), (out.output, model.output())
    assert dict(out.binary_sizes) == model.sizes
    sunk = {p for p, route in routes.items() if route.sink and p in model.sizes}
    assert out.ref_ports == sunk - model.explicit
    assert out.discarded_sink_ports == sunk & model.explicit


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz for about ``seconds`` (corpus first); return the number of inputs run."""
    return _harness.run_inputs(
        TestOneInput, name="accumulate", seconds=seconds, seed=seed, max_len=256
    )


if __name__ == "__main__":
    sys.exit(_harness.main(name="accumulate", description=__doc__, check=TestOneInput, run=run))
