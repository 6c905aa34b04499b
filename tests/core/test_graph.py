"""
The graph model (S6-10 ... S6-17): connect-time checks naming both ends, stream-mode rules,
cycles, fan-out/fan-in, topological order and readiness.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

import trio_taskgraph as tg
from tests.typed_hypothesis import given
from trio_taskgraph._core._graph import (
    Edge,
    GraphModel,
    check_input_values,
    edge_mode_for,
    json_types,
)

BIN_OUT: dict[str, object] = {
    "properties": {
        "data": {"x-stream": "binary"},
        "log": {"type": "string", "x-stream": "append"},
        "n": {"type": "integer"},
    }
}
BIN_IN: dict[str, object] = {
    "properties": {
        "stream": {"x-stream": "binary"},
        "whole": {},
        "text": {"type": "string"},
        "num": {"type": ["number", "null"]},
    },
    "required": ["whole"],
}
PASS_OUT: dict[str, object] = {
    "properties": {"out": {"x-stream": "binary"}, "n": {"type": "integer"}}
}


def _model(*names: str) -> GraphModel:
    model = GraphModel()
    for name in names:
        model.add_node(name, task_type=f"T{name}", input_schema=BIN_IN, output_schema=PASS_OUT)
    return model


def test_binary_to_binary_streams_and_to_plain_materialises() -> None:
    """S6-12"""
    model = GraphModel()
    model.add_node("a", task_type="Src", input_schema={}, output_schema=BIN_OUT)
    model.add_node("b", task_type="Dst", input_schema=BIN_IN, output_schema={})
    assert model.connect("a", "data", "b", "stream").mode == "stream"
    assert model.connect("a", "data", "b", "whole").mode == "materialize"
    assert model.connect("a", "log", "b", "text").mode == "materialize"
    assert model.connect("a", "n", "b", "num").mode == "materialize"  # integer feeds number
    assert model.consumer_modes("a", "data") == frozenset({"stream", "materialize"})
    assert model.consumer_modes("a", "log") == frozenset({"materialize"})
    assert model.consumer_modes("a", "n") == frozenset({"materialize"})
    assert str(model.edges[0]) == "a.data -> b.stream (stream)"


def test_edge_mode_table() -> None:
    """S6-12"""
    ports = tg.parse_ports(BIN_OUT) | tg.parse_ports(BIN_IN)
    assert edge_mode_for(ports["data"], ports["stream"]) == "stream"
    assert edge_mode_for(ports["data"], ports["whole"]) == "materialize"
    assert edge_mode_for(ports["log"], ports["whole"]) == "materialize"
    assert edge_mode_for(ports["log"], ports["stream"]) is None
    assert edge_mode_for(ports["n"], ports["stream"]) is None


@pytest.mark.parametrize(
    ("src_port", "dst_port", "why"),
    [
        ("log", "stream", "stream mode mismatch"),
        ("n", "stream", "stream mode mismatch"),
        ("log", "num", "type mismatch"),
        ("nope", "whole", "not an output port"),
        ("data", "nope", "not an input port"),
    ],
)
def test_connect_refusals_name_both_ends(src_port: str, dst_port: str, why: str) -> None:
    """S6-11, S6-12, S6-13: the message names both ends; the graph is unchanged."""
    model = GraphModel()
    model.add_node("a", task_type="Src", input_schema={}, output_schema=BIN_OUT)
    model.add_node("b", task_type="Dst", input_schema=BIN_IN, output_schema={})
    with pytest.raises(tg.PortSchemaError, match=why) as info:
        model.connect("a", src_port, "b", dst_port)
    assert f"a (Src).{src_port} -> b (Dst).{dst_port}" in str(info.value)
    assert model.edges == ()
    assert model.outgoing("a") == ()
    assert model.incoming("b") == ()


def test_missing_nodes() -> None:
    """S6-11"""
    model = _model("a")
    with pytest.raises(tg.PortSchemaError, match=r"ghost\.out -> a \(Ta\)\.whole.*no node 'ghost'"):
        model.connect("ghost", "out", "a", "whole")
    with pytest.raises(tg.PortSchemaError, match=r"a \(Ta\)\.out -> ghost\.x.*no node 'ghost'"):
        model.connect("a", "out", "ghost", "x")


def test_one_edge_per_input_port_and_no_fixed_overlap() -> None:
    """S6-11"""
    model = _model("a", "b")
    model.add_node(
        "c", task_type="Tc", input_schema=BIN_IN, output_schema=PASS_OUT, fixed_inputs={"whole"}
    )
    model.connect("a", "out", "b", "whole")
    with pytest.raises(tg.PortSchemaError, match=r"already fed by a \(Ta\)\.out"):
        model.connect("a", "n", "b", "whole")
    with pytest.raises(tg.PortSchemaError, match="fixed value"):
        model.connect("a", "out", "c", "whole")
    assert len(model.edges) == 1


@pytest.mark.parametrize(
    "edges",
    [
        [("a", "a")],
        [("a", "b"), ("b", "a")],
        [("a", "b"), ("b", "c"), ("c", "a")],
    ],
)
def test_cycles_are_refused(edges: list[tuple[str, str]]) -> None:
    """S6-14: self-loops included; the message names both ends and the cycle."""
    model = _model("a", "b", "c")
    ports = iter(["whole", "stream", "text"])
    *ok, (last_src, last_dst) = edges
    for src, dst in ok:
        model.connect(src, "out", dst, next(ports))
    before = model.edges
    with pytest.raises(tg.PortSchemaError, match="cycle") as info:
        model.connect(last_src, "n", last_dst, "num")
    assert f"{last_src} (T{last_src}).n -> {last_dst} (T{last_dst}).num" in str(info.value)
    assert model.edges == before


def test_fan_out_and_fan_in() -> None:
    """S6-16: one output feeds many; one node takes many sources."""
    model = _model("src", "x", "y", "sink")
    model.connect("src", "out", "x", "stream")
    model.connect("src", "out", "y", "whole")
    model.connect("x", "out", "sink", "stream")
    model.connect("y", "n", "sink", "num")
    model.connect("src", "n", "sink", "whole")
    assert [e.dst for e in model.consumers("src", "out")] == ["x", "y"]
    assert model.consumer_modes("src", "out") == frozenset({"stream", "materialize"})
    assert model.consumer_modes("sink", "out") == frozenset()
    assert {e.src for e in model.incoming("sink")} == {"x", "y", "src"}
    order = model.topological_order()
    assert order[0] == "src"
    assert order[-1] == "sink"


def test_readiness() -> None:
    """S6-15: stream sources need only to have started; materialised ones to have finished."""
    model = _model("p", "q", "c")
    model.connect("p", "out", "c", "stream")
    model.connect("q", "n", "c", "whole")
    assert model.ready_nodes(finished=set()) == ["p", "q"]
    assert not model.is_ready("c", finished=set(), started={"p", "q"})
    assert not model.is_ready("c", finished={"p"}, started={"q"})
    assert model.is_ready("c", finished={"q"}, started={"p"})
    assert model.is_ready("c", finished={"p", "q"})
    assert model.ready_nodes(finished={"q"}, started={"p"}) == ["c"]
    # a materialised edge is not satisfied by a started source
    assert not model.is_ready("c", finished=set(), started={"p", "q"})


def test_missing_required_inputs() -> None:
    """S6-17"""
    model = _model("a", "b")
    model.add_node(
        "c", task_type="Tc", input_schema=BIN_IN, output_schema={}, fixed_inputs=["whole"]
    )
    model.connect("a", "out", "b", "whole")
    assert model.missing_inputs("a") == ["whole"]
    assert model.missing_inputs("b") == []
    assert model.missing_inputs("c") == []
    with pytest.raises(tg.PortSchemaError, match=r"node 'a' \(Ta\).*'whole'"):
        model.check_complete()
    model.add_node("d", task_type="Td", input_schema={"required": "whole"}, output_schema={})
    with pytest.raises(tg.PortSchemaError, match="'required'"):
        model.missing_inputs("d")
    complete = _model()
    complete.add_node("e", task_type="Te", input_schema={}, output_schema={})
    complete.check_complete()


def test_add_node_checks() -> None:
    """S6-10, S6-11"""
    model = _model("a")
    with pytest.raises(ValueError, match="already"):
        model.add_node("a", task_type="T", input_schema={}, output_schema={})
    with pytest.raises(ValueError, match="non-empty"):
        model.add_node("", task_type="T", input_schema={}, output_schema={})
    with pytest.raises(tg.PortSchemaError, match="fixed input 'x'"):
        model.add_node("z", task_type="T", input_schema={}, output_schema={}, fixed_inputs=["x"])
    bad_input = {"properties": {"t": {"x-stream": "append"}}}
    with pytest.raises(tg.PortSchemaError, match="input port 't'"):
        model.add_node("z", task_type="T", input_schema=bad_input, output_schema={})
    assert list(model.nodes) == ["a"]


def test_json_types() -> None:
    """S6-13"""
    schema = {"properties": {"a": {"type": "string"}, "b": {"type": ["a", "b"]}, "c": {}}}
    assert json_types(schema, "a") == frozenset({"string"})
    assert json_types(schema, "b") == frozenset({"a", "b"})
    assert json_types(schema, "c") is None
    assert json_types(schema, "ghost") is None
    assert json_types("not a schema", "a") is None
    with pytest.raises(tg.PortSchemaError, match="'d'"):
        json_types({"properties": {"d": {"type": 3}}}, "d")


@st.composite
def _dags(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], list[int]]:
    """A random DAG: n nodes, edges i -> j with i < j in a hidden order, inserted shuffled."""
    n = draw(st.integers(1, 9))
    hidden = draw(st.permutations(range(n)))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=12)) if pairs else []
    insertion = draw(st.permutations(range(n)))
    return n, [(hidden[i], hidden[j]) for i, j in chosen], list(insertion)


def _fan_in_model(n: int, insertion: list[int]) -> GraphModel:
    schema: dict[str, object] = {"properties": {f"in{k}": {} for k in range(n)}}
    model = GraphModel()
    for node in insertion:
        model.add_node(f"v{node}", task_type="T", input_schema=schema, output_schema=PASS_OUT)
    return model


@given(_dags())
def test_property_topological_order(dag: tuple[int, list[tuple[int, int]], list[int]]) -> None:
    """S6-14 (property): over random DAGs, every node appears once, after all its sources, and
    the order is deterministic for the same construction; an edge closing a cycle is refused."""
    n, edges, insertion = dag
    model = _fan_in_model(n, insertion)
    for src, dst in edges:
        model.connect(f"v{src}", "n", f"v{dst}", f"in{src}")
    order = model.topological_order()
    assert sorted(order) == sorted(f"v{k}" for k in range(n))
    position = {node: i for i, node in enumerate(order)}
    for edge in model.edges:
        assert position[edge.src] < position[edge.dst]
    again = _fan_in_model(n, insertion)
    for src, dst in edges:
        again.connect(f"v{src}", "n", f"v{dst}", f"in{src}")
    assert again.topological_order() == order
    # readiness agrees with the order: walking it finishes every node
    finished: set[str] = set()
    for node in order:
        assert model.is_ready(node, finished=finished)
        finished.add(node)
    for src, dst in edges:
        with pytest.raises(tg.PortSchemaError, match="cycle"):
            model.connect(f"v{dst}", "out", f"v{src}", f"in{dst}")
    assert len(model.edges) == len(edges)


def test_edge_is_a_value() -> None:
    """S6-11"""
    a = Edge(src="a", src_port="o", dst="b", dst_port="i", mode="stream")
    assert a == Edge(src="a", src_port="o", dst="b", dst_port="i", mode="stream")
    assert hash(a) == hash(Edge(src="a", src_port="o", dst="b", dst_port="i", mode="stream"))


VALUE_SCHEMA: dict[str, object] = {
    "properties": {
        "s": {"type": "string"},
        "i": {"type": "integer"},
        "n": {"type": "number"},
        "b": {"type": "boolean"},
        "o": {"type": "object"},
        "a": {"type": "array"},
        "maybe": {"type": ["string", "null"]},
        "odd": {"type": "custom-type"},
        "any": {},
        "stream": {"x-stream": "binary", "type": "string"},
    },
    "required": ["s"],
}


def test_input_values_accepted() -> None:
    """S6-33"""
    check_input_values(
        "n1",
        "T",
        VALUE_SCHEMA,
        {
            "s": "x",
            "i": 3,
            "n": 2.5,
            "b": False,
            "o": {"k": 1},
            "a": (1, 2),
            "maybe": None,
            "odd": object(),
            "any": tg.Blob(b"x"),
            "stream": object(),
        },
    )
    check_input_values("n1", "T", VALUE_SCHEMA, {"s": "x", "n": 1, "a": [], "maybe": "y"})


@pytest.mark.parametrize(
    ("inputs", "port"),
    [
        ({"s": 1}, "s"),
        ({"s": "x", "i": True}, "i"),
        ({"s": "x", "i": 1.0}, "i"),
        ({"s": "x", "n": False}, "n"),
        ({"s": "x", "b": 0}, "b"),
        ({"s": "x", "o": []}, "o"),
        ({"s": "x", "a": {}}, "a"),
        ({"s": "x", "maybe": 3}, "maybe"),
        ({"s": "x", "ghost": 1}, "ghost"),
        ({"i": 1}, "s"),
    ],
)
def test_input_values_refused_naming_the_port(inputs: dict[str, object], port: str) -> None:
    """S6-33"""
    with pytest.raises(tg.PortSchemaError, match=rf"node 'n1' \(T\).*{port!r}"):
        check_input_values("n1", "T", VALUE_SCHEMA, inputs)


def test_input_values_with_odd_required() -> None:
    """S6-33: a malformed `required` constrains nothing here (S6-17 reports it at wiring)."""
    check_input_values("n1", "T", {"properties": {"a": {}}, "required": "a"}, {})
    with pytest.raises(tg.PortSchemaError, match="1"):
        check_input_values("n1", "T", {"properties": {}}, {1: 2})  # type: ignore[dict-item]
