"""
Tasks, the task registry, the context a task runs with, task graphs and the run configuration.

Rules (spec/S6-runner.md, S6-27 ... S6-32):

- A `Task` subclass that defines ``type`` in its own body is *concrete*: it is validated when
  the class is created and, only if every check passes, registered under its ``type``
  (S6-27). A class without its own ``type`` is an abstract helper base: not validated, not
  registered, and refused by `TaskGraph.add`.
- Checks at class creation (S6-28): ``type`` is a non-empty str; both schemas parse with
  `parse_ports` (so every binary output port passes `assert_binary_format`); input ports obey
  S6-10; ``cacheable`` is a bool; exactly one of ``execute`` (a coroutine function) and
  ``execute_stream`` (an async generator function) is defined. Schema problems raise
  `PortSchemaError`; the rest raise `TaskDefinitionError`.
- The registry maps ``type`` to one class (S6-29). Registering a different class under a
  taken ``type`` is a `TaskDefinitionError`; re-creating *the same class* (same module and
  qualified name, as a module reload does) replaces the entry.
- `TaskGraph` delegates every wiring check to `GraphModel` (S6-30) and only adds the task
  objects and their fixed inputs.
- `RunConfig` is a frozen value validated at construction (S6-31).
- `TaskContext` is what a task receives as ``ctx`` (S6-32): who it is (``node_id``,
  ``run_id``, ``task_type``) and two synchronous, non-blocking ways to report (`phase`,
  `progress`). The runner constructs it.

This module imports no trio: a `Task` subclass costs nothing at import time beyond attrs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, Final, final

import attrs

from ._core._constants import DEFAULT_HIGH_WATER_BYTES, DEFAULT_REFERENCE_THRESHOLD_BYTES
from ._core._events import Phase
from ._core._graph import GraphModel, check_input_ports
from ._core._ports import parse_ports
from ._errors import PortSchemaError, TaskDefinitionError

if TYPE_CHECKING:
    from ._core._events import StreamEvent
    from ._core._graph import Edge
    from ._core._ports import PortSpec

__all__ = [
    "RunConfig",
    "Task",
    "TaskContext",
    "TaskGraph",
    "TaskProgress",
    "get_task_class",
    "registered_task_types",
]

_REGISTRY: dict[str, type[Task]] = {}

_EMPTY_SCHEMA: Final[Mapping[str, object]] = {"type": "object", "properties": {}}


def _same_class(a: type, b: type) -> bool:
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def get_task_class(task_type: str) -> type[Task]:
    """
    Return the class registered under ``task_type``.

    Raises:
        KeyError: no task class has that type.
    """
    return _REGISTRY[task_type]


def registered_task_types() -> list[str]:
    """Every registered task type, in registration order."""
    return list(_REGISTRY)


@final
@attrs.frozen(kw_only=True)
class TaskProgress:
    """
    A progress report from a running task (see `TaskContext.progress`).

    Attributes:
        fraction: how far the task is, in ``[0, 1]``, or ``None`` when unknown.
        message: a short human-readable note, or ``None``.
    """

    fraction: float | None = attrs.field(default=None)
    message: str | None = attrs.field(default=None)

    @fraction.validator
    def _check_fraction(self, _attribute: attrs.Attribute[float | None], value: object) -> None:
        if value is None:
            return
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"fraction must be a float or None, not {type(value).__name__}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"fraction must be within [0, 1], got {value}")

    @message.validator
    def _check_message(self, _attribute: attrs.Attribute[str | None], value: object) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"message must be a str or None, not {type(value).__name__}")


def _no_report(_report: Phase | TaskProgress) -> None:
    return None


@final
@attrs.frozen(kw_only=True)
class TaskContext:
    """
    What a running task receives as ``ctx`` (S6-32). The runner builds one per task run.

    Attributes:
        node_id: the task's node id in its graph (``run_task`` uses a single node).
        run_id: the id of the run.
        task_type: the task's ``type``.
        report: where `phase` and `progress` reports go; the runner forwards them to its
            listeners. It must not block (use ``send_nowait`` or a plain callback).
    """

    node_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    run_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    task_type: str = attrs.field(validator=attrs.validators.instance_of(str))
    report: Callable[[Phase | TaskProgress], None] = attrs.field(
        default=_no_report, repr=False, validator=attrs.validators.is_callable()
    )

    def phase(self, name: str) -> None:
        """Report that the task entered phase ``name``. Synchronous, never blocks."""
        self.report(Phase(name))

    def progress(self, fraction: float | None = None, *, message: str | None = None) -> None:
        """Report progress (``fraction`` in ``[0, 1]``). Synchronous, never blocks."""
        self.report(TaskProgress(fraction=fraction, message=message))


class Task:
    """
    Base class of every task.

    Subclass it with class attributes ``type`` (a unique str), ``input_schema`` and
    ``output_schema`` (JSON-Schema dicts whose ``properties`` are the ports), optionally
    ``cacheable = True``, and exactly one of:

    - ``async def execute(self, inputs, ctx) -> dict``: returns the output at once;
    - ``async def execute_stream(self, inputs, ctx)``: an async generator yielding stream
      events (`TextDelta`, `ObjectDelta`, `Snapshot`, `BinaryDelta`, `Finish`, `StreamError`,
      `Phase`); a trailing `Finish` is optional.

    The class is checked when it is created (S6-28) and registered by ``type`` (S6-29); a
    malformed task raises there and never registers.

    Attributes:
        input_ports, output_ports: the parsed ports (set at class creation).
    """

    type: ClassVar[str]
    input_schema: ClassVar[Mapping[str, object]] = _EMPTY_SCHEMA
    output_schema: ClassVar[Mapping[str, object]] = _EMPTY_SCHEMA
    cacheable: ClassVar[bool] = False
    input_ports: ClassVar[Mapping[str, PortSpec]] = {}
    output_ports: ClassVar[Mapping[str, PortSpec]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "type" not in cls.__dict__:
            return  # an abstract helper base: not validated, not registered
        task_type = cls.__dict__["type"]
        if not isinstance(task_type, str) or not task_type:
            raise TaskDefinitionError(
                f"{cls.__qualname__}.type must be a non-empty str, got {task_type!r}"
            )
        where = f"task {task_type!r} ({cls.__qualname__})"
        try:
            inputs = parse_ports(cls.input_schema)
            check_input_ports(inputs)
            outputs = parse_ports(cls.output_schema)
        except PortSchemaError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        if not isinstance(cls.cacheable, bool):
            raise TaskDefinitionError(f"{where}: cacheable must be a bool")
        has_execute = cls.execute is not Task.execute
        has_stream = cls.execute_stream is not Task.execute_stream
        if has_execute == has_stream:
            which = "both" if has_execute else "neither"
            raise TaskDefinitionError(
                f"{where} defines {which} of execute and execute_stream; define exactly one"
            )
        if has_execute and not inspect.iscoroutinefunction(cls.execute):
            raise TaskDefinitionError(f"{where}: execute must be an 'async def'")
        if has_stream and not inspect.isasyncgenfunction(cls.execute_stream):
            raise TaskDefinitionError(
                f"{where}: execute_stream must be an async generator ('async def' with 'yield')"
            )
        existing = _REGISTRY.get(task_type)
        if existing is not None and not _same_class(existing, cls):
            raise TaskDefinitionError(
                f"{where}: type {task_type!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        # Invariant (S6-27): registration comes last, after every check passed.
        cls.input_ports = inputs
        cls.output_ports = outputs
        _REGISTRY[task_type] = cls

    @classmethod
    def is_streaming(cls) -> bool:
        """True when the task defines ``execute_stream`` (else ``execute``)."""
        return cls.execute_stream is not Task.execute_stream

    async def execute(self, inputs: Mapping[str, object], ctx: TaskContext) -> Mapping[str, object]:
        """
        Run the task and return its output (override this or `execute_stream`).

        Cancellation: whatever the task does; the runner cancels it with the run.
        """
        raise NotImplementedError

    def execute_stream(
        self, inputs: Mapping[str, object], ctx: TaskContext
    ) -> AsyncIterator[StreamEvent]:
        """
        Run the task as a stream of events (override this or `execute`): override it with an
        async generator, ``async def execute_stream(self, inputs, ctx): yield ...``.

        Cancellation: the runner cancels the generator with the run and closes it
        (``aclose``), so ``finally`` blocks in it run.
        """
        raise NotImplementedError


def _is_concrete_task(task: object) -> bool:
    if not isinstance(task, Task):
        return False
    cls = type(task)
    registered = _REGISTRY.get(cls.type) if "type" in cls.__dict__ else None
    return registered is not None and _same_class(registered, cls)


@final
@attrs.define(eq=False)
class TaskGraph:
    """
    A graph of task nodes connected output port to input port.

    Every check is made as the graph is built (S6-30): see `add` and `connect`.
    """

    _model: GraphModel = attrs.field(factory=GraphModel, init=False)
    _tasks: dict[str, Task] = attrs.field(factory=dict, init=False)
    _fixed: dict[str, dict[str, object]] = attrs.field(factory=dict, init=False)
    _counter: int = attrs.field(default=0, init=False)

    def add(self, task: Task, *, inputs: Mapping[str, object] | None = None) -> str:
        """
        Add a node running ``task``; edges fill the inputs not given in ``inputs``.

        Returns:
            The new node's id (``"n1"``, ``"n2"``... in insertion order).

        Raises:
            TypeError: ``task`` is not an instance of a registered `Task` subclass, or
                ``inputs`` is not a mapping with str keys.
            PortSchemaError: ``inputs`` names a port that is not an input port.
        """
        if not _is_concrete_task(task):
            raise TypeError(
                f"TaskGraph.add needs an instance of a registered Task subclass, "
                f"not {type(task).__qualname__}"
            )
        fixed: dict[str, object] = {}
        if inputs is not None:
            if not isinstance(inputs, Mapping):
                raise TypeError(f"inputs must be a mapping, not {type(inputs).__name__}")
            for port, value in inputs.items():
                if not isinstance(port, str):
                    raise TypeError(f"input port names must be str, got {port!r}")
                fixed[port] = value
        node_id = f"n{self._counter + 1}"
        cls = type(task)
        self._model.add_node(
            node_id,
            task_type=cls.type,
            input_schema=cls.input_schema,
            output_schema=cls.output_schema,
            fixed_inputs=fixed.keys(),
        )
        self._counter += 1
        self._tasks[node_id] = task
        self._fixed[node_id] = fixed
        return node_id

    def connect(self, src: str, src_port: str, dst: str, dst_port: str) -> None:
        """
        Connect output ``src.src_port`` to input ``dst.dst_port``.

        Raises:
            PortSchemaError: a node or port does not exist, the input is already fed, the
                stream modes or JSON types mismatch, or the edge would close a cycle. The
                message names both ends; the graph is unchanged.
        """
        self._model.connect(src, src_port, dst, dst_port)

    @property
    def model(self) -> GraphModel:
        """The validated graph model (nodes, edges, order, readiness) the runner walks."""
        return self._model

    @property
    def nodes(self) -> list[str]:
        """Every node id, in insertion order."""
        return list(self._tasks)

    @property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, in connection order."""
        return self._model.edges

    def task(self, node_id: str) -> Task:
        """The task object of ``node_id``."""
        return self._tasks[node_id]

    def fixed_inputs(self, node_id: str) -> dict[str, object]:
        """A copy of the fixed inputs of ``node_id``."""
        return dict(self._fixed[node_id])


def _check_cache(_instance: object, _attribute: attrs.Attribute[object], value: object) -> None:
    if value is None:
        return
    missing = [
        name
        for name in ("save_output", "get_output", "supports_streaming")
        if not callable(getattr(value, name, None))
    ]
    if missing:
        raise TypeError(
            f"cache must be an OutputRepository (missing {', '.join(missing)}), "
            f"not {type(value).__name__}"
        )


def _check_threshold(_instance: object, _attribute: attrs.Attribute[int], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"reference_threshold_bytes must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"reference_threshold_bytes must be >= 0, got {value}")


def _check_high_water(_instance: object, _attribute: attrs.Attribute[int], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"binary_high_water_bytes must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"binary_high_water_bytes must be >= 1, got {value}")


def _check_run_id(
    _instance: object, _attribute: attrs.Attribute[str | None], value: object
) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"run_id must be a str or None, not {type(value).__name__}")
    if not value:
        raise ValueError("run_id must be a non-empty str or None")


@final
@attrs.frozen
class RunConfig:
    """
    How a run is configured (S6-31). Frozen; change it with ``attrs.evolve``.

    Attributes:
        cache: the shared `OutputRepository`, or ``None`` (no caching, no refs).
        reference_threshold_bytes: binary results at or above this size stay refs; smaller
            ones are hydrated back inline; ``0`` keeps every binary result a ref.
        binary_high_water_bytes: the byte budget of every streaming edge and cache sink.
        run_id: the run's id (the runner makes one when ``None``).
    """

    cache: object | None = attrs.field(default=None, validator=_check_cache)
    reference_threshold_bytes: int = attrs.field(
        default=DEFAULT_REFERENCE_THRESHOLD_BYTES, validator=_check_threshold
    )
    binary_high_water_bytes: int = attrs.field(
        default=DEFAULT_HIGH_WATER_BYTES, validator=_check_high_water
    )
    run_id: str | None = attrs.field(default=None, validator=_check_run_id)
