"""Stopping a background task for certain.

`asyncio.Task.cancel` asks once, and on Python 3.11 the request can be lost. `asyncio.wait_for`, which
redis-py uses for every command it sends when a socket timeout is set, returns the result instead of
raising when the cancellation arrives in the same turn of the loop as the command's completion. The task
then runs on (marked as cancelling), and a loop such as the worker's Redis publisher never ends. (Python
3.12 reimplemented `wait_for` without this race.) `cancel_and_wait` asks again until the task is done.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

RETRY_CANCEL_S = 2.0
"""How long a cancelled task may take to end (its clean-up included) before it is cancelled again."""


async def cancel_and_wait(task: asyncio.Task[object] | asyncio.Future[object], *, retry_s: float = RETRY_CANCEL_S) -> None:
    """Cancel ``task`` and wait until it is done, cancelling it again every ``retry_s`` it runs on.

    A task that had failed with an exception (other than being cancelled) is logged with it."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=retry_s)
    if not task.cancelled() and (error := task.exception()) is not None:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.error("a background task had failed", extra={"task": name}, exc_info=error)
