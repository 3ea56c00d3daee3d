"""Stopping a background task for certain.

`asyncio.Task.cancel` asks once; on Python 3.11 the request can be lost. `asyncio.wait_for`, which
redis-py uses for every command it sends, returns the result instead of raising when the cancellation
arrives in the same loop iteration as the command's completion. The task then runs on, still marked
as cancelling, and `asyncio.timeout` blocks inside it take every later expiry for that old request
(a loop that waits with a timeout never ends). `cancel_and_wait` asks again until the task is done.
"""

from __future__ import annotations

import asyncio

RETRY_CANCEL_S = 0.5


async def cancel_and_wait(task: asyncio.Task[object] | asyncio.Future[object], *, retry_s: float = RETRY_CANCEL_S) -> None:
    """Cancel ``task`` and wait until it is done, cancelling it again every ``retry_s`` it runs on.

    Its result or exception is left on the task (retrieved, so asyncio does not log it)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=retry_s)
    if not task.cancelled():
        task.exception()
