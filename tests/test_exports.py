"""
The public surface: everything in shared/API.md that has landed is importable from the top
level, ``__all__`` is exact, nothing private leaks, and public objects show public module names.
"""

from __future__ import annotations

import pickle
import types

import trio_taskgraph as tg

# Grows as issues land; every name here is part of the API contract.
EXPECTED_PUBLIC = {
    "TaskGraphError",
    "TaskGraphInternalError",
    "PortSchemaError",
    "BinaryFormatError",
    "RefError",
    "DanglingRefError",
    "ForeignRefError",
    "WireFormatError",
    "RepositoryError",
    "CacheServerError",
    "TaskFailedError",
    "TextDelta",
    "ObjectDelta",
    "Snapshot",
    "BinaryDelta",
    "Finish",
    "StreamError",
    "Phase",
    "StreamEvent",
    "Blob",
    "PortSpec",
    "assert_binary_format",
    "get_binary_port_id",
    "get_output_stream_mode",
    "get_port_stream_mode",
    "get_streaming_ports",
    "materialize_binary",
    "parse_ports",
    "DEFAULT_HIGH_WATER_BYTES",
    "DEFAULT_REFERENCE_THRESHOLD_BYTES",
    "CacheRef",
    "make_cache_ref",
    "is_cache_ref",
    # byte-budget channels
    "open_byte_channel",
    "ByteSendChannel",
    "ByteReceiveChannel",
    "ByteChannelStatistics",
    # tasks and graphs (issue 7, graph core)
    "Task",
    "TaskGraph",
    "TaskContext",
    "TaskProgress",
    "RunConfig",
    "StreamProtocolError",
    "TaskDefinitionError",
    # output repositories (issue 5)
    "OutputRepository",
    "NamespacedRepository",
    "MemoryOutputRepository",
    "FsOutputRepository",
    "RunPrivateRepository",
    "RepositoryStats",
    "GcReport",
    # refs and the ref walker (issue 4)
    "collect_cache_refs",
    "resolve_output",
    "resolve_job_output",
    "RefResolver",
    "RefFilter",
    "RefSource",
    # the runner (issue 7, runner)
    "run_graph",
    "run_task",
    "RunEvent",
    "RunListener",
    "TaskStatus",
    "TaskState",
    "BinaryInputStream",
    # cache server and its client (issue 6)
    "CacheServerRepository",
    "CacheServerStatistics",
    "ClientStatistics",
    "connect_cache_server",
    "open_cache_server",
    # jobs (issue 8)
    "open_job_queue",
    "JobQueue",
    "JobHandle",
    "JobQueueStatistics",
    "JobRecord",
    "JobState",
    "JobStore",
    "MemoryJobStore",
    "StreamCallback",
    "JobError",
    "JobCancelledError",
    "JobOutputError",
    "JobStateError",
    "PermanentJobError",
    "SubscriberOverflowError",
    # scale-out on PostgreSQL (issue 11)
    "PostgresOutputRepository",
    # demo, CLI and docs (issue 9)
    "RowInfo",
    # scale-out job store on PostgreSQL (issue 11, second part)
    "PostgresJobStore",
    # the chunk type public signatures use (typed tests)
    "BytesLike",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(tg.__all__) >= EXPECTED_PUBLIC
    assert len(tg.__all__) == len(set(tg.__all__)), "duplicate names in __all__"
    for name in tg.__all__:
        assert hasattr(tg, name), name


def test_nothing_private_leaks() -> None:
    public = {n for n in vars(tg) if not n.startswith("_")}
    # Submodules appear as attributes once imported; only the public ones may.
    modules = {n for n in public if isinstance(getattr(tg, n), types.ModuleType)}
    assert modules <= {"wire", "testing", "cache_server"}, modules
    assert public - modules == set(tg.__all__)
    for name in tg.__all__:
        assert not name.startswith("_")


def test_public_objects_show_public_module() -> None:
    for name in tg.__all__:
        obj = getattr(tg, name)
        if isinstance(obj, type | types.FunctionType):
            assert obj.__module__ == "trio_taskgraph", (name, obj.__module__)


def test_values_pickle_under_public_names() -> None:
    for value in (tg.Blob(b"x", "a/b"), tg.TextDelta("p", "t"), tg.make_cache_ref("r", size=1)):
        assert pickle.loads(pickle.dumps(value)) == value
    err = tg.TaskFailedError("t", "n1", "boom")
    again = pickle.loads(pickle.dumps(err))
    assert (again.task_type, again.node_id, str(again)) == ("t", "n1", str(err))


def test_wire_module_is_public() -> None:
    from trio_taskgraph import wire

    assert callable(wire.packb)
    assert callable(wire.unpackb)
