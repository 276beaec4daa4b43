"""A clock the test moves on: time passes as it does, plus every step the test takes (kopf's
looptime is the model), so a backoff or a settling time is passed without sleeping through
it."""

from __future__ import annotations

import time

from entrypoint.clock import Clock


class SteppedClock(Clock):
    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    def block(self, seconds: float) -> None:
        self.step(seconds)

    def step(self, seconds: float) -> None:
        self.offset += seconds
