"""A stop that takes long logs what it is still waiting for, on the main loop and on the roles' loop
threads; a stop that finishes in time logs nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from throttlex.processors.tasks import LoopThread, SlowStopReport


async def never_returns(event: asyncio.Event) -> None:
    await event.wait()


async def test_a_slow_stop_names_the_tasks_it_waits_for_on_every_loop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="throttlex.processors.tasks")
    thread = LoopThread("slow-role")
    release = asyncio.Event()
    hung_main = asyncio.create_task(never_returns(release), name="hung-on-main")
    release_elsewhere = asyncio.Event()  # bound to the thread's loop by its first wait there
    hung_elsewhere = asyncio.run_coroutine_threadsafe(never_returns(release_elsewhere), thread._loop)
    reported = asyncio.Event()
    try:
        with SlowStopReport(after_s=0.05) as report:
            report.arm()
            asyncio.get_running_loop().call_later(0.05, lambda: reported.set())  # runs after the report's timer
            await reported.wait()
            await asyncio.sleep(0)
        records = [(r.task, r.stack) for r in caplog.records if r.getMessage().startswith("stopping takes over")]  # type: ignore[attr-defined]
        tasks = {task for task, _ in records}
        assert "hung-on-main" in tasks
        assert len(tasks) >= 3, tasks  # this test's own task, the hung one, and the loop thread's
        assert all("never_returns" in stack for task, stack in records if task == "hung-on-main")
        assert sum("never_returns" in stack for _, stack in records) == 2, records
    finally:
        release.set()
        await hung_main
        thread._loop.call_soon_threadsafe(release_elsewhere.set)
        await asyncio.wrap_future(hung_elsewhere)
        thread.close()


async def test_a_stop_done_in_time_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="throttlex.processors.tasks")
    with SlowStopReport(after_s=0.05) as report:
        report.arm()
    passed = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, passed.set)  # past the time the report was armed for
    await passed.wait()
    assert not [r for r in caplog.records if r.getMessage().startswith("stopping takes over")]
