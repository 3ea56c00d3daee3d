"""How a role's long-running task reports a crash to the process running it (`api.runner`)."""

from __future__ import annotations

import asyncio


async def crash_of(task: asyncio.Task[None]) -> BaseException:
    """Wait until ``task`` fails and return why; a task stopped on request (it returned, or was
    cancelled) never counts as a crash, so this then waits for ever (the runner cancels it)."""
    await asyncio.wait([task])
    error = None if task.cancelled() else task.exception()
    if error is None:
        await asyncio.Event().wait()
    assert error is not None
    return error
