"""
trio_taskgraph: structured-concurrency task graphs on Trio.

Tasks stream byte chunks through channels bounded by a byte budget; cancellation anywhere
releases every parked producer and unlinks every temp blob; large binary results live in a
cache and travel as small branded refs.

Everything public is re-exported here; the modules behind it are private.
"""

from ._byte_channel import (  # byte-budget channels (issue 3)
    ByteReceiveChannel as ByteReceiveChannel,
    ByteSendChannel as ByteSendChannel,
    open_byte_channel as open_byte_channel,
)
from ._core._budget import (  # byte-budget channels (issue 3)
    ByteChannelStatistics as ByteChannelStatistics,
)
from ._core._constants import (
    DEFAULT_HIGH_WATER_BYTES as DEFAULT_HIGH_WATER_BYTES,
    DEFAULT_REFERENCE_THRESHOLD_BYTES as DEFAULT_REFERENCE_THRESHOLD_BYTES,
)
from ._core._events import (
    BinaryDelta as BinaryDelta,
    Blob as Blob,
    BytesLike as BytesLike,  # the chunk type public signatures use (typed tests)
    Finish as Finish,
    ObjectDelta as ObjectDelta,
    Phase as Phase,
    Snapshot as Snapshot,
    StreamError as StreamError,
    StreamEvent as StreamEvent,
    TextDelta as TextDelta,
)
from ._core._ports import (
    PortSpec as PortSpec,
    assert_binary_format as assert_binary_format,
    get_binary_port_id as get_binary_port_id,
    get_output_stream_mode as get_output_stream_mode,
    get_port_stream_mode as get_port_stream_mode,
    get_streaming_ports as get_streaming_ports,
    materialize_binary as materialize_binary,
    parse_ports as parse_ports,
)
from ._core._refs import (
    CacheRef as CacheRef,
    is_cache_ref as is_cache_ref,
    make_cache_ref as make_cache_ref,
)
from ._errors import (
    BinaryFormatError as BinaryFormatError,
    CacheServerError as CacheServerError,
    DanglingRefError as DanglingRefError,
    ForeignRefError as ForeignRefError,
    PortSchemaError as PortSchemaError,
    RefError as RefError,
    RepositoryError as RepositoryError,
    StreamProtocolError as StreamProtocolError,
    TaskDefinitionError as TaskDefinitionError,
    TaskFailedError as TaskFailedError,
    TaskGraphError as TaskGraphError,
    TaskGraphInternalError as TaskGraphInternalError,
    WireFormatError as WireFormatError,
)
from ._jobs import (  # jobs (issue 8)
    JobCancelledError as JobCancelledError,
    JobError as JobError,
    JobHandle as JobHandle,
    JobOutputError as JobOutputError,
    JobQueue as JobQueue,
    JobQueueStatistics as JobQueueStatistics,
    JobRecord as JobRecord,
    JobState as JobState,
    JobStateError as JobStateError,
    JobStore as JobStore,
    MemoryJobStore as MemoryJobStore,
    PermanentJobError as PermanentJobError,
    StreamCallback as StreamCallback,
    SubscriberOverflowError as SubscriberOverflowError,
    open_job_queue as open_job_queue,
)

# scale-out job store on PostgreSQL (issue 11, second part; psycopg imported lazily)
from ._jobs_postgres import PostgresJobStore as PostgresJobStore

# output repositories (issue 5)
from ._repository import (
    FsOutputRepository as FsOutputRepository,
    GcReport as GcReport,
    MemoryOutputRepository as MemoryOutputRepository,
    NamespacedRepository as NamespacedRepository,
    OutputRepository as OutputRepository,
    RepositoryStats as RepositoryStats,
    RunPrivateRepository as RunPrivateRepository,
)

# cache server and its client (issue 6)
from ._repository._client import (
    CacheServerRepository as CacheServerRepository,
    CacheServerStatistics as CacheServerStatistics,
    ClientStatistics as ClientStatistics,
    connect_cache_server as connect_cache_server,
    open_cache_server as open_cache_server,
)

# scale-out on PostgreSQL (issue 11; psycopg is imported lazily, on first use)
from ._repository._postgres import PostgresOutputRepository as PostgresOutputRepository
from ._repository._protocol import (  # demo, CLI and docs (issue 9)
    RowInfo as RowInfo,
)

# refs and the ref walker (issue 4)
from ._resolve import (
    RefFilter as RefFilter,
    RefResolver as RefResolver,
    RefSource as RefSource,
    collect_cache_refs as collect_cache_refs,
    resolve_job_output as resolve_job_output,
    resolve_output as resolve_output,
)
from ._runner import (  # the runner (issue 7, runner)
    RunEvent as RunEvent,
    RunListener as RunListener,
    TaskState as TaskState,
    TaskStatus as TaskStatus,
    run_graph as run_graph,
    run_task as run_task,
)
from ._stream_processor import (  # the runner (issue 7, runner)
    BinaryInputStream as BinaryInputStream,
)
from ._task import (  # tasks and graphs (issue 7, graph core)
    RunConfig as RunConfig,
    Task as Task,
    TaskContext as TaskContext,
    TaskGraph as TaskGraph,
    TaskProgress as TaskProgress,
)
from ._version import __version__ as __version__

__all__ = [
    # errors
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
    # events and ports
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
    # refs
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
]


def _fixup_module_metadata() -> None:
    # As trio does: tracebacks, reprs and pickles show the public name, not `_core._events`.
    # Pickling still works because every name is importable from here.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_taskgraph._") and hasattr(
            obj, "__qualname__"
        ):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
