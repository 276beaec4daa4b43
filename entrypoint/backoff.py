"""One retry rule for every retry: exponential backoff from a base, capped.

Backend calls, store listings, downloads and restarts of the service's loops each use a
`Backoff`; none computes its own formula. Plain data: it never sleeps or schedules anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait after failures in a row: base, 2 x base, 4 x base, ... up to `cap`."""

    base: float
    cap: float

    def delay(self, failures: int) -> float:
        """The wait after `failures` failed tries in a row (1 for the first failure)."""
        return min(self.cap, self.base * 2 ** max(0, failures - 1))


BACKEND_CALLS = Backoff(0.5, 30.0)  # a load or unload the backend did not answer
STORE_CALLS = Backoff(1.0, 60.0)  # an object store's listing or download
LOOP_RESTARTS = Backoff(1.0, 30.0)  # a long-lived task of the service that died
