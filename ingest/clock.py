"""Wall-clock time in the unit ThrottleX uses everywhere: integer milliseconds since the Unix epoch."""

import time
from typing import Callable

Clock = Callable[[], int]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000
