"""`cancel_and_wait` stops a task whose first cancellation was lost."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from throttlex.ingest.tasks import cancel_and_wait


async def _waits_for_commands(current: list[asyncio.Future[None]]) -> None:
    """A loop like the worker's Redis publisher: one `asyncio.wait_for` per command, as redis-py sends them."""
    loop = asyncio.get_running_loop()
    while True:
        command: asyncio.Future[None] = loop.create_future()
        current.append(command)
        await asyncio.wait_for(command, 60)


async def test_a_task_whose_cancellation_arrived_as_its_command_completed_is_stopped() -> None:
    current: list[asyncio.Future[None]] = []
    task = asyncio.create_task(_waits_for_commands(current))
    await asyncio.sleep(0)
    current[-1].set_result(None)  # the command completes and the stop comes in the same turn of the loop
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    if sys.version_info < (3, 12):  # the race itself: 3.11's wait_for returned the result, the loop runs on
        assert not done and task.cancelling() == 1 and len(current) == 2
    async with asyncio.timeout(5):
        await cancel_and_wait(task, retry_s=0.05)
    assert task.cancelled()


async def test_a_task_that_failed_is_left_as_it_is_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails(), name="fails")
    await asyncio.wait([task])
    with caplog.at_level(logging.ERROR, logger="throttlex.ingest.tasks"):
        await cancel_and_wait(task)
    assert isinstance(task.exception(), ValueError)
    assert [record.exc_info[1] for record in caplog.records if record.exc_info] == [task.exception()]
