"""
The suite's one bounded poll, for state no trio primitive can observe.

STYLE: a test never sleeps to wait for another *trio task*; it uses
`trio.testing.wait_all_tasks_blocked`, a `trio.testing.Sequencer` or an event. What is left
is state changed by a worker thread (the cache server's file work) or by another process (a
server, a worker, PostgreSQL): a `trio.Event` cannot be set from there, so `wait_until`
checks it on the real clock, with a deadline, and fails naming what it waited for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    timeout: float = 10,
    interval: float = 0.002,
) -> None:
    """
    Return once ``condition()`` (a plain or an async callable) is true; check it every
    ``interval`` seconds and fail with `AssertionError` naming ``what`` after ``timeout``.
    """
    with trio.move_on_after(timeout):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
