"""
Tasks, the registry, the task context, TaskGraph and RunConfig (S6-27 ... S6-32).
"""

from __future__ import annotations

import ast
import pickle
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import ClassVar

import attrs
import pytest

import trio_taskgraph as tg
from trio_taskgraph._core._accumulate import OutputAccumulator, accumulate_result
from trio_taskgraph._task import get_task_class, registered_task_types

IMAGE_OUT: dict[str, object] = {
    "type": "object",
    "properties": {
        "image": {"x-stream": "binary", "contentMediaType": "image/png"},
        "log": {"type": "string", "x-stream": "append"},
    },
}


class Render(tg.Task):
    type = "test_task.Render"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"size": {"type": "integer"}, "seed": {"type": "integer"}}
    }
    output_schema: ClassVar[Mapping[str, object]] = IMAGE_OUT
    cacheable = True

    async def execute_stream(
        self, inputs: Mapping[str, object], ctx: tg.TaskContext
    ) -> AsyncIterator[tg.StreamEvent]:
        ctx.phase("render")
        size = inputs["size"]
        assert isinstance(size, int)
        for i in range(size):
            yield tg.BinaryDelta("image", bytes([i]))
            ctx.progress((i + 1) / size)
        yield tg.TextDelta("log", "done")


class Resize(tg.Task):
    type = "test_task.Resize"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"image": {"x-stream": "binary"}, "scale": {"type": "number"}},
        "required": ["image"],
    }
    output_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"image": {"x-stream": "binary"}}
    }

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        return {"image": b"resized"}


class Describe(tg.Task):
    type = "test_task.Describe"
    input_schema: ClassVar[Mapping[str, object]] = {
        "properties": {"picture": {}, "note": {"type": "string"}}
    }
    output_schema: ClassVar[Mapping[str, object]] = {"properties": {"text": {"type": "string"}}}

    async def execute(self, inputs: Mapping[str, object], ctx: tg.TaskContext) -> dict[str, object]:
        return {"text": "a picture"}


def test_valid_tasks_register_with_parsed_ports() -> None:
    """S6-27, S6-28"""
    assert get_task_class("test_task.Render") is Render
    assert "test_task.Resize" in registered_task_types()
    assert Render.output_ports["image"].binary_format == "blob"
    assert Render.output_ports["log"].stream_mode == "append"
    assert Resize.input_ports["image"].is_binary
    assert Render.is_streaming()
    assert not Resize.is_streaming()
    assert Render.cacheable
    assert not Resize.cacheable


def test_bad_binary_format_never_registers() -> None:
    """S6-27, S6-28, S1-5 (seed: registration throws on format "Blob"; the task is not added)."""
    with pytest.raises(tg.BinaryFormatError, match="'image'") as info:

        class Typo(tg.Task):
            type = "test_task.Typo"
            output_schema: ClassVar[Mapping[str, object]] = {
                "properties": {"image": {"x-stream": "binary", "format": "Blob"}}
            }

            async def execute(
                self, inputs: Mapping[str, object], ctx: tg.TaskContext
            ) -> dict[str, object]:
                return {}

    assert "test_task.Typo" in str(info.value)
    assert "test_task.Typo" not in registered_task_types()
    with pytest.raises(KeyError):
        get_task_class("test_task.Typo")


@pytest.mark.parametrize(
    ("input_schema", "output_schema", "match"),
    [
        ({}, {"properties": {"p": {"x-stream": "bytes"}}}, "unknown x-stream"),
        ({"properties": {"t": {"x-stream": "append"}}}, {}, "input port 't'"),
        ({"properties": []}, {}, "properties"),
        ("not a schema", {}, "mapping"),
    ],
)
def test_bad_schemas_never_register(
    input_schema: object, output_schema: object, match: str
) -> None:
    """S6-28, S6-10: schema problems are PortSchemaError naming the task; nothing registers."""
    with pytest.raises(tg.PortSchemaError, match=match) as info:
        type(
            "Bad",
            (tg.Task,),
            {
                "type": "test_task.BadSchema",
                "input_schema": input_schema,
                "output_schema": output_schema,
                "execute": Describe.execute,
            },
        )
    assert "test_task.BadSchema" in str(info.value)
    assert "test_task.BadSchema" not in registered_task_types()


async def _exec(self: object, inputs: object, ctx: object) -> dict[str, object]:
    return {}


async def _stream(self: object, inputs: object, ctx: object) -> AsyncIterator[tg.StreamEvent]:
    yield tg.Finish({})


def _sync_exec(self: object, inputs: object, ctx: object) -> dict[str, object]:
    return {}


async def _not_a_generator(self: object, inputs: object, ctx: object) -> None:
    return None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"type": ""}, "non-empty str"),
        ({"type": 7}, "non-empty str"),
        ({"type": "test_task.Neither"}, "neither"),
        ({"type": "test_task.Both", "execute": _exec, "execute_stream": _stream}, "both"),
        ({"type": "test_task.Sync", "execute": _sync_exec}, "async def"),
        ({"type": "test_task.NotGen", "execute_stream": _not_a_generator}, "async generator"),
        ({"type": "test_task.Cache", "execute": _exec, "cacheable": 1}, "cacheable"),
    ],
)
def test_malformed_task_classes(body: dict[str, object], match: str) -> None:
    """S6-28: structural problems are TaskDefinitionError (a TypeError); nothing registers."""
    before = registered_task_types()
    with pytest.raises(tg.TaskDefinitionError, match=match) as info:
        type("Malformed", (tg.Task,), body)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, tg.TaskGraphError)
    assert registered_task_types() == before


def _make(task_type: str) -> type[tg.Task]:
    class Same(tg.Task):
        type = task_type

        async def execute(
            self, inputs: Mapping[str, object], ctx: tg.TaskContext
        ) -> dict[str, object]:
            return {}

    return Same


def test_duplicate_types() -> None:
    """S6-29: a different class under a taken type is refused; the same class re-created
    (a module reload) replaces its entry."""
    first = _make("test_task.Dup")
    second = _make("test_task.Dup")  # same module and qualified name
    assert first is not second
    assert get_task_class("test_task.Dup") is second
    with pytest.raises(tg.TaskDefinitionError, match=r"already registered by .*Same"):

        class Other(tg.Task):
            type = "test_task.Dup"

            async def execute(
                self, inputs: Mapping[str, object], ctx: tg.TaskContext
            ) -> dict[str, object]:
                return {}

    assert get_task_class("test_task.Dup") is second


def test_abstract_bases_are_not_registered() -> None:
    """S6-27: a subclass without its own `type` is an abstract helper base."""

    class Base(tg.Task):
        output_schema: ClassVar[Mapping[str, object]] = {"properties": {"x": {}}}

        async def helper(self) -> int:
            return 1

    class Concrete(Base):
        type = "test_task.Concrete"

        async def execute(
            self, inputs: Mapping[str, object], ctx: tg.TaskContext
        ) -> dict[str, object]:
            return {"x": await self.helper()}

    class Inherits(Concrete):  # inherits `type` without declaring it: abstract
        pass

    assert get_task_class("test_task.Concrete") is Concrete
    assert Concrete.output_ports["x"].stream_mode == "none"
    graph = tg.TaskGraph()
    assert graph.add(Concrete()) == "n1"
    for task in (Base(), Inherits(), tg.Task()):
        with pytest.raises(TypeError, match="registered Task subclass"):
            graph.add(task)


def test_task_module_imports_no_trio() -> None:
    """S6-27: defining a Task needs nothing beyond what _task.py imports, and that is no trio."""
    source = (Path(tg.__file__).parent / "_task.py").read_text()
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    assert "trio" not in roots
    assert roots <= {"__future__", "inspect", "collections", "typing", "attrs"}


def test_graph_add_and_connect() -> None:
    """S6-30: node ids in insertion order; connect delegates every check."""
    graph = tg.TaskGraph()
    render = graph.add(Render(), inputs={"size": 3})
    resize = graph.add(Resize(), inputs={"scale": 0.5})
    describe = graph.add(Describe())
    assert (render, resize, describe) == ("n1", "n2", "n3")
    # The value of a None-returning call, on purpose: connect returns nothing.
    assert graph.connect(render, "image", resize, "image") is None  # type: ignore[func-returns-value]
    graph.connect(resize, "image", describe, "picture")
    graph.connect(render, "log", describe, "note")
    assert [str(e) for e in graph.edges] == [
        "n1.image -> n2.image (stream)",
        "n2.image -> n3.picture (materialize)",
        "n1.log -> n3.note (materialize)",
    ]
    assert graph.nodes == ["n1", "n2", "n3"]
    assert isinstance(graph.task(render), Render)
    assert graph.fixed_inputs(render) == {"size": 3}
    graph.fixed_inputs(render)["size"] = 99
    assert graph.fixed_inputs(render) == {"size": 3}
    assert graph.model.topological_order() == ["n1", "n2", "n3"]
    assert graph.model.consumer_modes(render, "image") == {"stream"}
    graph.model.check_complete()


def test_graph_connect_errors_name_both_ends() -> None:
    """S6-30, S6-11, S6-12, S6-14"""
    graph = tg.TaskGraph()
    describe = graph.add(Describe())
    resize = graph.add(Resize())
    with pytest.raises(tg.PortSchemaError, match="stream mode mismatch") as info:
        graph.connect(describe, "text", resize, "image")
    message = str(info.value)
    assert "n1 (test_task.Describe).text" in message
    assert "n2 (test_task.Resize).image" in message
    graph.connect(resize, "image", describe, "picture")
    with pytest.raises(tg.PortSchemaError, match="type mismatch"):
        graph.connect(describe, "text", resize, "scale")
    assert len(graph.edges) == 1
    resize2 = graph.add(Resize())
    graph.connect(resize, "image", resize2, "image")
    with pytest.raises(tg.PortSchemaError, match="cycle"):
        graph.connect(resize2, "image", resize, "image")


def test_graph_add_refuses_bad_inputs() -> None:
    """S6-30"""
    graph = tg.TaskGraph()
    with pytest.raises(tg.PortSchemaError, match="'colour'"):
        graph.add(Render(), inputs={"colour": "red"})
    with pytest.raises(TypeError, match="mapping"):
        graph.add(Render(), inputs=[("size", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str"):
        graph.add(Render(), inputs={1: 2})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="registered Task subclass"):
        graph.add(object())  # type: ignore[arg-type]
    assert graph.nodes == []
    assert graph.add(Render()) == "n1"  # failed adds used no id


def test_run_config_defaults_and_order() -> None:
    """S6-31"""
    config = tg.RunConfig()
    assert config.cache is None
    assert config.reference_threshold_bytes == tg.DEFAULT_REFERENCE_THRESHOLD_BYTES == 64 * 1024
    assert config.binary_high_water_bytes == tg.DEFAULT_HIGH_WATER_BYTES
    assert config.run_id is None
    positional = tg.RunConfig(None, 0, 4 * 1024 * 1024, "run-1")
    assert positional == tg.RunConfig(
        cache=None,
        reference_threshold_bytes=0,
        binary_high_water_bytes=4 * 1024 * 1024,
        run_id="run-1",
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.run_id = "x"  # type: ignore[misc]
    assert attrs.evolve(config, run_id="r").run_id == "r"
    assert pickle.loads(pickle.dumps(positional)) == positional


class _FakeCache:
    async def save_output(self, task_type: str, inputs: object, output: object) -> None:
        return None

    async def get_output(self, task_type: str, inputs: object) -> None:
        return None

    def supports_streaming(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reference_threshold_bytes": -1}, ValueError, ">= 0"),
        ({"reference_threshold_bytes": True}, TypeError, "int"),
        ({"reference_threshold_bytes": 1.5}, TypeError, "int"),
        ({"binary_high_water_bytes": 0}, ValueError, ">= 1"),
        ({"binary_high_water_bytes": "8"}, TypeError, "int"),
        ({"run_id": ""}, ValueError, "non-empty"),
        ({"run_id": 3}, TypeError, "run_id"),
        ({"cache": object()}, TypeError, "save_output"),
        ({"cache": {"save_output": 1}}, TypeError, "OutputRepository"),
    ],
)
def test_run_config_validation(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    """S6-31"""
    with pytest.raises(error, match=match):
        tg.RunConfig(**kwargs)  # type: ignore[arg-type]


def test_run_config_accepts_a_repository() -> None:
    """S6-31"""
    cache = _FakeCache()
    assert tg.RunConfig(cache=cache).cache is cache


def test_task_context_reports() -> None:
    """S6-32"""
    seen: list[object] = []
    ctx = tg.TaskContext(node_id="n1", run_id="r1", task_type="T", report=seen.append)
    ctx.phase("download")
    ctx.progress(0.5, message="half")
    ctx.progress()
    assert seen == [
        tg.Phase("download"),
        tg.TaskProgress(fraction=0.5, message="half"),
        tg.TaskProgress(),
    ]
    quiet = tg.TaskContext(node_id="n1", run_id="r1", task_type="T")
    quiet.phase("x")  # the default report drops it
    with pytest.raises(TypeError):
        tg.TaskContext(node_id=1, run_id="r", task_type="T")  # type: ignore[arg-type]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.node_id = "n2"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fraction", "message", "error"),
    [
        (1.5, None, ValueError),
        (-0.1, None, ValueError),
        (True, None, TypeError),
        ("1", None, TypeError),
        (None, 3, TypeError),
    ],
)
def test_task_progress_validation(
    fraction: object, message: object, error: type[Exception]
) -> None:
    """S6-32"""
    with pytest.raises(error):
        tg.TaskProgress(fraction=fraction, message=message)  # type: ignore[arg-type]
    assert tg.TaskProgress(fraction=1, message="m").fraction == 1


async def test_a_thin_shell_runs_a_streaming_task_through_the_core() -> None:
    """S6-1, S6-5, S6-9, S6-32: what the runner will do, minus channels and caches: build a
    context, drive execute_stream into an accumulator, read the output."""
    seen: list[object] = []
    ctx = tg.TaskContext(node_id="n1", run_id="r", task_type=Render.type, report=seen.append)
    acc = OutputAccumulator(Render.output_ports)
    async for event in Render().execute_stream({"size": 3}, ctx):
        acc.feed(event)
    out = acc.result()
    assert out.output == {"image": tg.Blob(b"\x00\x01\x02", "image/png"), "log": "done"}
    assert seen[0] == tg.Phase("render")
    assert seen[-1] == tg.TaskProgress(fraction=1.0)
    plain = await Resize().execute({"image": b"x"}, ctx)
    assert accumulate_result(Resize.output_ports, plain).output == {"image": tg.Blob(b"resized")}


async def test_base_methods_are_not_implemented() -> None:
    """S6-28: the base class's execute/execute_stream are placeholders."""
    ctx = tg.TaskContext(node_id="n", run_id="r", task_type="T")
    with pytest.raises(NotImplementedError):
        await tg.Task().execute({}, ctx)
    with pytest.raises(NotImplementedError):
        tg.Task().execute_stream({}, ctx)
