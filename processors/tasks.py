"""What the process running the roles (`api.runner`) needs from them: crash reports, a loop thread per
stream role, and a garbage collector and interpreter lock tuned for streams beside an API."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Role(Protocol):
    async def start(self) -> None: ...


R = TypeVar("R", bound=Role)

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Call once start-up is done. The objects start-up made (modules, clients, policies) are frozen out of
    every later collection, and the young generation is collected every 10,000 allocations instead of
    700: the worker and the sink allocate short-lived objects by the hundred thousand a second, which
    the defaults turn into thousands of collections a second, each one scanning what a batch still holds.
    Measured on the sink: 20-30 % more rows a second for the same work (`make bench-sink`). The one place
    the thresholds are set, for every role (the worker set its own once, which this call overrode)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


SWITCH_INTERVAL_S = 0.001


def share_interpreter_often() -> None:
    """Hand the interpreter lock between threads every millisecond instead of every five. With the stream
    roles on loop threads of their own (`LoopThread`) and the usage follower on a thread of its own, a request to the API
    waits for the lock, not for their batches: at most this long each time, and a request takes it a
    few times. Measured with the sink storing 50,000 rows/s beside the API (`tests/perf/bench_quota.py`):
    a plan-quota read's p99 from about 18 to 10 ms, the sink as fast."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


async def crash_of(task: asyncio.Future[None]) -> BaseException:
    """Wait until ``task`` (or any future a role resolves when it ends) fails and return why; a task stopped on
    request (it returned, or was cancelled) never counts as a crash, so this then waits for ever (the runner cancels it)."""
    await asyncio.wait([task])
    error = None if task.cancelled() else task.exception()
    if error is None:
        await asyncio.Event().wait()
    assert error is not None
    return error


class LoopThread:
    """An event loop on a thread of its own, for a stream role sharing a process with the API.

    On one loop, every HTTP request waits behind whatever the worker or the sink is doing at that moment
    (a thousand records decoded, a batch built): under load that is tens of milliseconds. On its own
    loop a role only shares the interpreter lock (see `share_interpreter_often`). Each role's Kafka
    clients must be made and used on the loop that runs it: make and start it with `start`.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        _loop_threads.add(self)

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on this thread's loop and wait for it here (cancelling this cancels it)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def start(self, make: Callable[[], R]) -> R:
        """A role made by ``make`` and started, on this thread's loop (its Kafka clients belong to the loop
        that makes them)."""

        async def started() -> R:
            role = make()
            await role.start()
            return role

        return await self.run(started())

    def close(self) -> None:
        """Stop the loop once what runs on it has finished (call after awaiting the roles' stops)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


_loop_threads: weakref.WeakSet[LoopThread] = weakref.WeakSet()

SLOW_STOP_REPORT_AFTER_S = 20.0


class SlowStopReport:
    """Says what a stop is waiting for when it takes long. `arm` it when the stop begins (on the main
    loop): if the stop still runs ``after_s`` later, the stack of every unfinished task on this loop and
    on every `LoopThread`'s is logged once (a Kafka or ClickHouse call that does not return, say), before
    an orchestrator's grace period ends in SIGKILL and leaves nothing to go on. Leaving the context
    disarms it."""

    def __init__(self, after_s: float = SLOW_STOP_REPORT_AFTER_S) -> None:
        self._after_s = after_s
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> SlowStopReport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def arm(self) -> None:
        main = asyncio.get_running_loop()
        self._timer = main.call_later(self._after_s, self._report, main)

    def _report(self, main: asyncio.AbstractEventLoop) -> None:
        for loop in [main, *(thread._loop for thread in list(_loop_threads))]:
            for task in asyncio.all_tasks(loop):
                stack = io.StringIO()
                task.print_stack(file=stack)
                log.error(f"stopping takes over {self._after_s:.0f} s; still waiting for",
                          extra={"task": task.get_name(), "stack": stack.getvalue()})  # fmt: skip
