"""
The graph model: nodes with ports, edges between ports, and the checks made at connect time.

Rules (spec/S6-runner.md, S6-10 ... S6-17):

- A node's input ports stream in mode ``none`` (materialised) or ``binary`` (chunks as they
  are produced); any other ``x-stream`` on an input port is a `PortSchemaError` (S6-10).
- ``connect(src, src_port, dst, dst_port)`` checks, in this order, and raises
  `PortSchemaError` naming both ends (``src.src_port -> dst.dst_port``) on the first failure
  (S6-11): both nodes exist; ``src_port`` is an output of ``src``; ``dst_port`` is an input of
  ``dst``; ``dst_port`` has no fixed value and no other edge (one writer per input port); the
  stream modes are compatible; the JSON types are compatible; the edge closes no cycle. A
  refused connect leaves the graph unchanged.
- Stream-mode compatibility (S6-12):

  =====================  ======================  ============================================
  source output mode     destination input mode  edge
  =====================  ======================  ============================================
  ``binary``             ``binary``              ``stream``: chunks flow as produced
  ``binary``             ``none``                ``materialize``: the consumer gets the value
  any other              ``none``                ``materialize``
  any other              ``binary``              refused: only a binary output can feed a
                                                 streamed binary input
  =====================  ======================  ============================================

- JSON types (S6-13): when both port schemas declare ``"type"`` (a string or a list), the
  sets must intersect. A port without ``"type"`` accepts and produces anything.
- No cycles (S6-14), self-loops included. `topological_order` is deterministic: Kahn's order,
  ties broken by insertion order.
- Readiness (S6-15): a node is ready when every ``materialize`` edge into it comes from a
  finished node and every ``stream`` edge into it comes from a started (or finished) node.
  Fixed inputs are always ready.
- Fan-out: an output port may feed any number of edges; `consumer_modes` says which kinds of
  consumers a port has, which is what the cache policy needs to decide sinks and tees (S6-16).
- `missing_inputs` lists the input ports declared ``required`` that have neither a fixed value
  nor an edge (S6-17); the runner refuses such a graph before starting anything.
- `check_input_values` checks a node's assembled input values just before it runs (S6-33):
  only declared ports, every ``required`` port present, and each value of the JSON ``type``
  its port declares (streamed binary ports excepted).

Everything here is pure: it takes schemas and ids and returns values or raises.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal, TypeAlias, final

import attrs

from .._errors import PortSchemaError
from ._ports import PortSpec, parse_ports

__all__ = [
    "Edge",
    "EdgeMode",
    "GraphModel",
    "NodeSpec",
    "check_input_ports",
    "check_input_values",
    "edge_mode_for",
    "json_types",
]

EdgeMode: TypeAlias = Literal["stream", "materialize"]

_INPUT_MODES: frozenset[str] = frozenset({"none", "binary"})


def json_types(schema: object, port: str) -> frozenset[str] | None:
    """
    Return the JSON types declared by ``port``'s schema, or ``None`` when it declares none.

    Raises:
        PortSchemaError: ``"type"`` is neither a str nor a list of str.
    """
    if not isinstance(schema, Mapping):
        return None
    props = schema.get("properties")
    sub = props.get(port) if isinstance(props, Mapping) else None
    if not isinstance(sub, Mapping):
        return None
    raw = sub.get("type")
    if raw is None:
        return None
    if isinstance(raw, str):
        return frozenset({raw})
    if isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        return frozenset(raw)
    raise PortSchemaError(f"port {port!r}: 'type' must be a str or a list of str, got {raw!r}")


def _types_compatible(out_types: frozenset[str] | None, in_types: frozenset[str] | None) -> bool:
    if out_types is None or in_types is None:
        return True
    # JSON Schema: every integer is a number.
    widened = set(out_types)
    if "integer" in widened:
        widened.add("number")
    return bool(widened & in_types)


def check_input_ports(ports: Mapping[str, PortSpec]) -> None:
    """
    Check the input-port rule (S6-10): input ports stream in mode ``none`` or ``binary``.

    Raises:
        PortSchemaError: an input port declares another ``x-stream`` (names the port).
    """
    for port, spec in ports.items():
        if spec.stream_mode not in _INPUT_MODES:
            raise PortSchemaError(
                f"input port {port!r} declares x-stream {spec.stream_mode!r}; input ports take "
                "'binary' (streamed chunks) or no x-stream (a materialised value)"
            )


def edge_mode_for(src: PortSpec, dst: PortSpec) -> EdgeMode | None:
    """Return the edge mode from output ``src`` to input ``dst`` (S6-12), ``None`` if refused."""
    if dst.stream_mode == "binary":
        return "stream" if src.stream_mode == "binary" else None
    return "materialize"


@final
@attrs.frozen(kw_only=True)
class Edge:
    """
    A connection from an output port to an input port.

    Attributes:
        src, src_port: the producing node and its output port.
        dst, dst_port: the consuming node and its input port.
        mode: ``"stream"`` (chunks flow as produced) or ``"materialize"`` (the consumer gets
            the finished value).
    """

    src: str
    src_port: str
    dst: str
    dst_port: str
    mode: EdgeMode

    def __str__(self) -> str:
        return f"{self.src}.{self.src_port} -> {self.dst}.{self.dst_port} ({self.mode})"


@final
@attrs.frozen(kw_only=True)
class NodeSpec:
    """
    What the graph knows about one node.

    Attributes:
        node_id: the node's id in its graph.
        task_type: the node's task type (for messages).
        inputs, outputs: the parsed input and output ports.
        input_schema, output_schema: the raw schemas (for JSON types and ``required``).
        fixed_inputs: input ports given a fixed value at `GraphModel.add_node`.
    """

    node_id: str
    task_type: str
    inputs: Mapping[str, PortSpec]
    outputs: Mapping[str, PortSpec]
    input_schema: Mapping[str, object]
    output_schema: Mapping[str, object]
    fixed_inputs: frozenset[str]


@final
@attrs.define(eq=False)
class GraphModel:
    """
    Nodes and edges, validated as they are added (see the module docstring).
    """

    _nodes: dict[str, NodeSpec] = attrs.field(factory=dict, init=False)
    _edges: list[Edge] = attrs.field(factory=list, init=False)
    _out: dict[str, list[Edge]] = attrs.field(factory=dict, init=False)
    _in: dict[str, list[Edge]] = attrs.field(factory=dict, init=False)

    @property
    def nodes(self) -> Mapping[str, NodeSpec]:
        """Every node by id, in insertion order."""
        return self._nodes

    @property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, in connection order."""
        return tuple(self._edges)

    def add_node(
        self,
        node_id: str,
        *,
        task_type: str,
        input_schema: Mapping[str, object],
        output_schema: Mapping[str, object],
        fixed_inputs: Collection[str] = (),
    ) -> NodeSpec:
        """
        Add a node.

        Raises:
            ValueError: ``node_id`` is empty or already used.
            PortSchemaError: a schema is malformed, an input port breaks S6-10, or a fixed
                input names an undeclared input port.
        """
        if not node_id:
            raise ValueError("a node id must be a non-empty str")
        if node_id in self._nodes:
            raise ValueError(f"node id {node_id!r} is already in the graph")
        inputs = parse_ports(input_schema)
        outputs = parse_ports(output_schema)
        check_input_ports(inputs)
        for port in fixed_inputs:
            if port not in inputs:
                known = ", ".join(sorted(inputs)) or "none"
                raise PortSchemaError(
                    f"node {node_id!r} ({task_type}): fixed input {port!r} is not an input port "
                    f"(input ports: {known})"
                )
        spec = NodeSpec(
            node_id=node_id,
            task_type=task_type,
            inputs=inputs,
            outputs=outputs,
            input_schema=input_schema,
            output_schema=output_schema,
            fixed_inputs=frozenset(fixed_inputs),
        )
        self._nodes[node_id] = spec
        self._out[node_id] = []
        self._in[node_id] = []
        return spec

    def _end(self, node: str, port: str) -> str:
        spec = self._nodes.get(node)
        kind = f" ({spec.task_type})" if spec is not None else ""
        return f"{node}{kind}.{port}"

    def connect(self, src: str, src_port: str, dst: str, dst_port: str) -> Edge:
        """
        Connect output ``src.src_port`` to input ``dst.dst_port`` (checks: S6-11).

        Returns:
            The new edge, with its mode (S6-12).

        Raises:
            PortSchemaError: any check fails; the message names both ends. The graph is
                unchanged.
        """
        where = f"cannot connect {self._end(src, src_port)} -> {self._end(dst, dst_port)}"
        src_node = self._nodes.get(src)
        dst_node = self._nodes.get(dst)
        if src_node is None:
            raise PortSchemaError(f"{where}: no node {src!r} in the graph")
        if dst_node is None:
            raise PortSchemaError(f"{where}: no node {dst!r} in the graph")
        out_spec = src_node.outputs.get(src_port)
        if out_spec is None:
            known = ", ".join(sorted(src_node.outputs)) or "none"
            raise PortSchemaError(
                f"{where}: {src_port!r} is not an output port of {src!r} (outputs: {known})"
            )
        in_spec = dst_node.inputs.get(dst_port)
        if in_spec is None:
            known = ", ".join(sorted(dst_node.inputs)) or "none"
            raise PortSchemaError(
                f"{where}: {dst_port!r} is not an input port of {dst!r} (inputs: {known})"
            )
        if dst_port in dst_node.fixed_inputs:
            raise PortSchemaError(f"{where}: input {dst_port!r} already has a fixed value")
        for edge in self._in[dst]:
            if edge.dst_port == dst_port:
                raise PortSchemaError(
                    f"{where}: input {dst_port!r} is already fed by "
                    f"{self._end(edge.src, edge.src_port)} (one edge per input port)"
                )
        mode = edge_mode_for(out_spec, in_spec)
        if mode is None:
            # Invariant (S6-12): only a binary output feeds a streamed binary input.
            raise PortSchemaError(
                f"{where}: stream mode mismatch: output mode {out_spec.stream_mode!r} cannot "
                f"feed a streamed binary input (x-stream 'binary' needs a binary output)"
            )
        out_types = json_types(src_node.output_schema, src_port)
        in_types = json_types(dst_node.input_schema, dst_port)
        if not _types_compatible(out_types, in_types):
            assert out_types is not None
            assert in_types is not None
            raise PortSchemaError(
                f"{where}: type mismatch: output type {sorted(out_types)} vs input type "
                f"{sorted(in_types)}"
            )
        path = self._path(dst, src)
        if path is not None:
            # Invariant (S6-14): no cycle, self-loops included.
            cycle = " -> ".join([*path, dst])
            raise PortSchemaError(f"{where}: the edge would close a cycle ({cycle})")
        edge = Edge(src=src, src_port=src_port, dst=dst, dst_port=dst_port, mode=mode)
        self._edges.append(edge)
        self._out[src].append(edge)
        self._in[dst].append(edge)
        return edge

    def _path(self, start: str, goal: str) -> list[str] | None:
        """A path of node ids from ``start`` to ``goal`` along edges, or None."""
        parents: dict[str, str | None] = {start: None}
        stack = [start]
        while stack:
            node = stack.pop()
            if node == goal:
                path = [node]
                parent = parents[node]
                while parent is not None:
                    path.append(parent)
                    parent = parents[parent]
                return path[::-1]
            for edge in self._out[node]:
                if edge.dst not in parents:
                    parents[edge.dst] = node
                    stack.append(edge.dst)
        return None

    def incoming(self, node: str) -> tuple[Edge, ...]:
        """The edges into ``node``, in connection order."""
        return tuple(self._in[node])

    def outgoing(self, node: str) -> tuple[Edge, ...]:
        """The edges out of ``node``, in connection order."""
        return tuple(self._out[node])

    def consumers(self, node: str, port: str) -> tuple[Edge, ...]:
        """The edges out of output ``node.port`` (fan-out), in connection order."""
        return tuple(e for e in self._out[node] if e.src_port == port)

    def consumer_modes(self, node: str, port: str) -> frozenset[EdgeMode]:
        """Which kinds of consumers output ``node.port`` has (S6-16); empty when none."""
        return frozenset(e.mode for e in self._out[node] if e.src_port == port)

    def topological_order(self) -> list[str]:
        """
        Every node id, each after all its sources (S6-14): Kahn's algorithm, ties broken by
        insertion order, so the order is deterministic.
        """
        indegree = {node: len({e.src for e in self._in[node]}) for node in self._nodes}
        order: list[str] = []
        ready = [node for node in self._nodes if indegree[node] == 0]
        position = {node: i for i, node in enumerate(self._nodes)}
        while ready:
            ready.sort(key=position.__getitem__, reverse=True)
            node = ready.pop()
            order.append(node)
            for dst in dict.fromkeys(e.dst for e in self._out[node]):
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
        if len(order) != len(self._nodes):  # pragma: no cover - connect refuses cycles
            raise AssertionError("cycle in a graph model; connect should have refused it")
        return order

    def is_ready(
        self, node: str, *, finished: Collection[str], started: Collection[str] = ()
    ) -> bool:
        """
        Whether ``node`` may start (S6-15): every ``materialize`` source finished, every
        ``stream`` source started or finished.
        """
        for edge in self._in[node]:
            if edge.src in finished:
                continue
            if edge.mode == "stream" and edge.src in started:
                continue
            return False
        return True

    def ready_nodes(self, *, finished: Collection[str], started: Collection[str] = ()) -> list[str]:
        """The nodes neither started nor finished that are ready, in topological order."""
        return [
            node
            for node in self.topological_order()
            if node not in finished
            and node not in started
            and self.is_ready(node, finished=finished, started=started)
        ]

    def missing_inputs(self, node: str) -> list[str]:
        """The ``required`` input ports of ``node`` with no fixed value and no edge (S6-17)."""
        spec = self._nodes[node]
        required = spec.input_schema.get("required", ())
        if not isinstance(required, list | tuple):
            raise PortSchemaError(
                f"node {node!r} ({spec.task_type}): 'required' must be a list of port names"
            )
        fed = {e.dst_port for e in self._in[node]} | spec.fixed_inputs
        return [p for p in required if isinstance(p, str) and p not in fed]

    def check_complete(self) -> None:
        """
        Raise `PortSchemaError` naming the first node and port with a missing required input.
        """
        for node in self._nodes:
            missing = self.missing_inputs(node)
            if missing:
                spec = self._nodes[node]
                raise PortSchemaError(
                    f"node {node!r} ({spec.task_type}): required input {missing[0]!r} has no "
                    "fixed value and no edge"
                )


_JSON_CHECKS: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (Mapping,),
    "array": (list, tuple),
    "null": (type(None),),
}


def _matches(json_type: str, value: object) -> bool:
    kinds = _JSON_CHECKS.get(json_type)
    if kinds is None:
        return True  # an unknown type name constrains nothing here
    if isinstance(value, bool) and json_type in ("integer", "number"):
        return False  # JSON booleans are not numbers
    return isinstance(value, kinds)


def check_input_values(
    node_id: str, task_type: str, input_schema: Mapping[str, object], inputs: Mapping[str, object]
) -> None:
    """
    Check a node's input values just before it runs (S6-33), after refs were resolved.

    Rules: every key is a declared input port; every port in ``required`` is present; a value
    at a port declaring ``"type"`` (a str or list of str) has one of those JSON types
    (``integer`` excludes bool and float, ``number`` accepts int and float, ``object`` is any
    mapping, ``array`` a list or tuple). Streamed binary input ports are not type-checked
    (their value is a stream the runner supplies).

    Raises:
        PortSchemaError: naming the node, its task type and the port.
    """
    where = f"node {node_id!r} ({task_type})"
    ports = parse_ports(input_schema)
    keys: list[object] = list(inputs)  # keys are not trusted to be str
    for port in keys:
        if not isinstance(port, str) or port not in ports:
            known = ", ".join(sorted(ports)) or "none"
            raise PortSchemaError(
                f"{where}: input {port!r} is not an input port (input ports: {known})"
            )
    required = input_schema.get("required", ())
    if isinstance(required, list | tuple):
        for port in required:
            if isinstance(port, str) and port not in inputs:
                raise PortSchemaError(f"{where}: required input {port!r} is missing")
    for port, value in inputs.items():
        if ports[port].is_binary:
            continue
        types = json_types(input_schema, port)
        if types is not None and not any(_matches(t, value) for t in types):
            raise PortSchemaError(
                f"{where}: input {port!r} is {type(value).__name__}, "
                f"not of type {' or '.join(sorted(types))}"
            )
