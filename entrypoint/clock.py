"""Time, passed in: the service reads time and waits through a `Clock`, never `time` directly.

Tests hand in a clock they step (tests/clock.py), so backoffs, settling and grace periods are
checked without sleeping. Must not hold state about what it times.
"""

from __future__ import annotations

import time


class Clock:
    """Monotonic seconds (`now`), wall seconds (`wall`) and a blocking wait (`block`)."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def block(self, seconds: float) -> None:
        """Wait in this thread (the start-up listing, before the event loop runs)."""
        time.sleep(seconds)


REAL = Clock()
