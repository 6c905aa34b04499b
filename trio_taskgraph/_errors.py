"""
The exception hierarchy: one root, one family per kind of failure.

Every error the library raises on purpose derives from `TaskGraphError`. Families mix in the
builtin that already says what kind of mistake it is (`ValueError` for bad schemas and bad
frames), so code written against the builtins keeps working. Where a trio resource exception
already says it (`trio.BrokenResourceError`, `trio.ClosedResourceError`, `trio.WouldBlock`,
`trio.EndOfChannel`), the byte channels raise those instead, exactly like trio's own channels.
"""

from __future__ import annotations

__all__ = [
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
    # tasks and graphs
    "StreamProtocolError",
    "TaskDefinitionError",
    # jobs (issue 8)
    "JobError",
    "JobCancelledError",
    "JobOutputError",
    "JobStateError",
    "PermanentJobError",
    "SubscriberOverflowError",
    # shared job store (issue 11)
    "UnknownJobError",
    "RemoteJobError",
    "JobStoreUnavailableError",
]


class TaskGraphError(Exception):
    """
    Root of every error trio_taskgraph raises on purpose.

    Catch this to catch any of the library's own failures; anything else that escapes the
    library (other than trio's resource exceptions and ``Cancelled``) is a bug.
    """


class TaskGraphInternalError(TaskGraphError):
    """
    An internal invariant was broken: this is a bug in trio_taskgraph, please report it.
    """


class PortSchemaError(TaskGraphError, ValueError):
    """
    A task's port schema breaks a rule.

    Raised when a task registers (an unknown ``x-stream`` value, a port that is not an object
    schema) and when a graph is wired (a missing port, a cycle, a stream-mode mismatch). The
    message names the port.
    """


class BinaryFormatError(PortSchemaError):
    """
    A binary port (``"x-stream": "binary"``) declares a ``format`` other than ``"blob"`` or
    ``"binary"``.

    Never a silent coercion: ``"Blob"`` (a casing typo) is as wrong as ``"base64"``. The
    message names the port and lists the allowed values.
    """


class RefError(TaskGraphError):
    """
    A `CacheRef` could not be used: see `DanglingRefError` and `ForeignRefError`.
    """


class DanglingRefError(RefError):
    """
    A well-formed ref, issued by this repository, whose blob is gone (pruned or deleted).
    """


class ForeignRefError(RefError):
    """
    A ref this repository did not issue or may not serve: another repository or namespace,
    a bad tag, a path separator, ``..``, NUL or any shape it never hands out.

    Raised before any file is touched.
    """


class WireFormatError(TaskGraphError, ValueError):
    """
    A msgpack frame breaks a wire rule: too large, too deep, too long a container or string,
    an unknown ext type, a malformed ref or blob payload, a truncated frame.

    The message names the rule. A decoder that raised it refuses further input.
    """


class RepositoryError(TaskGraphError):
    """
    An output repository failed to store or read (I/O error, corrupt row, closed repository).
    """


class CacheServerError(RepositoryError):
    """
    The cache server died, refused the connection, broke the protocol, or answered an error.
    """


class TaskFailedError(TaskGraphError):
    """
    A task raised while running in a graph or a job.

    ``task_type`` and ``node_id`` name the task; the task's own exception is chained as
    ``__cause__``.
    """

    task_type: str
    node_id: str

    def __init__(self, task_type: str, node_id: str, message: str | None = None) -> None:
        self.task_type = task_type
        self.node_id = node_id
        text = f"task {task_type!r} (node {node_id!r}) failed"
        if message:
            text = f"{text}: {message}"
        super().__init__(text)
        self._message = message

    def __reduce__(self) -> tuple[type[TaskFailedError], tuple[str, str, str | None]]:
        return (type(self), (self.task_type, self.node_id, self._message))


# --- tasks and graphs (issue 7) ---------------------------------------------------------------


class StreamProtocolError(PortSchemaError):
    """
    A task's output broke its own output schema: an event or a result value for an undeclared
    port, a delta whose kind does not match the port's ``x-stream`` mode (a `BinaryDelta` for a
    text port, a `TextDelta` for a non-``append`` port...), a value of the wrong type at a
    binary port, or any event after the stream finished.

    The message names the port. The runner reports it as the cause of a `TaskFailedError`.
    """


class TaskDefinitionError(TaskGraphError, TypeError):
    """
    A `Task` subclass is malformed: no ``type``, a ``type`` already registered by another
    class, neither or both of ``execute``/``execute_stream``, or one that is not ``async``.

    Raised at class creation, so a malformed task never registers. (Schema problems raise
    `PortSchemaError` instead.)
    """


# --- jobs (issue 8) ---------------------------------------------------------------------------


class JobError(TaskGraphError):
    """
    A job could not give what was asked of it: see the subclasses.
    """


class JobCancelledError(JobError):
    """
    The job was cancelled (by `JobHandle.cancel` or when its queue closed) before it completed;
    raised by ``result()`` and ``open_output_stream()``. The message names the job.
    """


class JobOutputError(JobError, LookupError):
    """
    ``open_output_stream`` cannot pick or stream the port asked for: no port given and the
    output does not have exactly one declared binary port (the seed's M-1), a port that is not
    a declared binary port, or a value there that is neither a ref nor bytes. The message
    names the job and the port(s).
    """


class JobStateError(TaskGraphInternalError):
    """
    A job transition outside the state table (spec S8-1): a bug in the queue or a job store.
    """


class PermanentJobError(TaskGraphError):
    """
    Raise it (or chain it as the cause) from a task to fail its job at once: a permanent
    error is never retried, whatever ``max_retries`` says.
    """


class SubscriberOverflowError(JobError):
    """
    A lossy ``on_stream`` subscriber fell more than its byte budget behind the job and was
    dropped: the last event it receives is a `StreamError` carrying this error, which names
    the job and the budget.
    """


# --- shared job store (issue 11: PostgresJobStore) -----------------------------------------


class UnknownJobError(JobError, KeyError):
    """
    ``queue.handle(job_id)`` named a job the shared store does not hold: the handle's
    ``result()`` and ``wait()`` raise this as soon as the store has looked (spec S8-21). A
    `KeyError`, as the in-memory queue's ``handle`` raises. ``job_id`` names the job.
    """

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"no job {job_id!r} in the job store (submitted elsewhere and not written yet? "
            "a submitting process writes its jobs when it flushes)"
        )
        self.job_id = job_id

    def __str__(self) -> str:
        # KeyError would show repr(message); this is a sentence.
        return str(self.args[0])


class RemoteJobError(JobError):
    """
    A job run by another process failed: what that process recorded of its last error
    (spec S8-24). ``str(error)`` is ``"job <id> failed: <type name>: <message>"``.

    Attributes:
        job_id: the job.
        type_name: the class name of the remote exception (``"OSError"``).
        remote_message: its message (``str(exception)``).
        remote_traceback: its formatted traceback, cause chain included, or None when the
            process that wrote the outcome did not record one.
    """

    def __init__(
        self,
        job_id: str,
        type_name: str,
        remote_message: str,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(f"job {job_id} failed: {type_name}: {remote_message}")
        self.job_id = job_id
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class JobStoreUnavailableError(RepositoryError):
    """
    A shared job store gave up waiting for its database (spec S8-25): closing a queue whose
    final flush could not write within ``close_timeout`` seconds. The message says how many
    buffered operations were not written; the last database error, if any, is chained.
    """
