"""`cancel_and_wait` stops a task whose first cancellation was lost."""

from __future__ import annotations

import asyncio
import contextlib

from throttlex.ingest.tasks import cancel_and_wait


async def _loses_first_cancellation(started: asyncio.Event) -> None:
    """A loop like the worker's Redis publisher, after a cancellation was swallowed on the way (as
    Python 3.11's `asyncio.wait_for` does when the call it waits for completes at the same moment)."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.Event().wait()


async def test_a_single_cancel_does_not_stop_a_loop_that_lost_it() -> None:
    """The hazard itself: once a cancellation is lost, every later timeout inside the task is taken for
    it and suppressed, so the loop runs on although the task says it is cancelling."""
    started = asyncio.Event()
    task = asyncio.create_task(_loses_first_cancellation(started))
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done and task.cancelling() >= 1
    await cancel_and_wait(task, retry_s=0.05)


async def test_cancel_and_wait_stops_it() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(_loses_first_cancellation(started))
    await started.wait()
    async with asyncio.timeout(5):
        await cancel_and_wait(task, retry_s=0.05)
    assert task.cancelled()


async def test_a_task_that_failed_is_left_as_it_is() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.wait([task])
    await cancel_and_wait(task)
    assert isinstance(task.exception(), ValueError)
