# Invariant tested: S6-10, S6-11, S6-12, S6-13, S6-14, S6-15, S6-16
"""
Fuzzing the graph model with random node and connect sequences.

Each input decodes into nodes (with a random mix of input/output port modes and JSON types)
and connect attempts. Every connect must either succeed with the mode of the S6-12 table or
raise `PortSchemaError` naming both ends and leave the edges unchanged (any other exception is
a finding). After every step: no cycle (the topological order is a valid order over all
nodes), one edge per input port, and walking the order with `is_ready` finishes every node.

Run: ``python fuzz/fuzz_graph.py --seconds 60`` (atheris when importable, else random bytes).
Seed corpus: ``fuzz/corpus/graph/``.
"""

from __future__ import annotations

import sys

import _harness

import trio_taskgraph as tg
from trio_taskgraph._core._graph import GraphModel

_OUT_KINDS: list[dict[str, object]] = [
    {"x-stream": "binary"},
    {"x-stream": "append", "type": "string"},
    {"type": "integer"},
    {"type": "string"},
    {},
]
_IN_KINDS: list[dict[str, object]] = [
    {"x-stream": "binary"},
    {"type": "number"},
    {"type": "string"},
    {},
]


_Schemas = dict[str, tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]]]


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


def _expected_mode(out: dict[str, object], inp: dict[str, object]) -> str | None:
    if inp.get("x-stream") == "binary":
        return "stream" if out.get("x-stream") == "binary" else None
    out_t, in_t = out.get("type"), inp.get("type")
    if out_t is not None and in_t is not None:
        widened = {out_t, "number"} if out_t == "integer" else {out_t}
        if in_t not in widened:
            return None
    return "materialize"


def _reaches(model: GraphModel, start: str, goal: str) -> bool:
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        for edge in model.outgoing(node):
            if edge.dst not in seen:
                seen.add(edge.dst)
                stack.append(edge.dst)
    return False


def _should_connect(
    model: GraphModel, schemas: _Schemas, src: str, sp: str, dst: str, dp: str
) -> bool:
    outs, ins = schemas[src][1], schemas[dst][0]
    if sp not in outs or dp not in ins:
        return False
    if any(e.dst_port == dp for e in model.incoming(dst)):
        return False
    if _expected_mode(outs[sp], ins[dp]) is None:
        return False
    return not _reaches(model, dst, src)


def _check(model: GraphModel) -> None:
    order = model.topological_order()
    assert sorted(order) == sorted(model.nodes)
    position = {node: i for i, node in enumerate(order)}
    fed: set[tuple[str, str]] = set()
    for edge in model.edges:
        assert position[edge.src] < position[edge.dst], edge
        assert (edge.dst, edge.dst_port) not in fed, edge
        fed.add((edge.dst, edge.dst_port))
    finished: set[str] = set()
    for node in order:
        assert model.is_ready(node, finished=finished), node
        finished.add(node)


def TestOneInput(data: bytes) -> None:
    r = _Reader(data)
    model = GraphModel()
    schemas: _Schemas = {}
    while r.left():
        if r.byte() % 4 == 0 or not schemas:
            name = f"v{len(schemas)}"
            outs = {f"o{k}": _OUT_KINDS[r.byte() % len(_OUT_KINDS)] for k in range(r.byte() % 3)}
            ins = {f"i{k}": _IN_KINDS[r.byte() % len(_IN_KINDS)] for k in range(r.byte() % 4)}
            model.add_node(
                name,
                task_type="T",
                input_schema={"properties": ins},
                output_schema={"properties": outs},
            )
            schemas[name] = (ins, outs)
            continue
        names = list(schemas)
        src = names[r.byte() % len(names)]
        dst = names[r.byte() % len(names)]
        src_port = f"o{r.byte() % 3}"
        dst_port = f"i{r.byte() % 4}"
        before = model.edges
        should = _should_connect(model, schemas, src, src_port, dst, dst_port)
        refused: str | None
        try:
            edge = model.connect(src, src_port, dst, dst_port)
        except tg.PortSchemaError as exc:
            refused = str(exc)
        else:
            refused = None
            assert should, edge
            ins, outs = schemas[dst][0], schemas[src][1]
            assert edge.mode == _expected_mode(outs[src_port], ins[dst_port]), edge
            assert src != dst
        if refused is not None:
            assert f"{src} (T).{src_port} -> {dst} (T).{dst_port}" in refused, refused
            assert model.edges == before
            assert not should, f"refused a valid edge: {refused}"
        _check(model)


def run(seconds: float, *, seed: int = 0) -> int:
    """Fuzz for about ``seconds`` (corpus first); return the number of inputs run."""
    return _harness.run_inputs(TestOneInput, name="graph", seconds=seconds, seed=seed, max_len=200)


if __name__ == "__main__":
    sys.exit(_harness.main(name="graph", description=__doc__, check=TestOneInput, run=run))
