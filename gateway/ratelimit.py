"""Token-bucket rate limits. In-process here; a Redis-backed limiter shares the interface."""

from __future__ import annotations

import time
from typing import Protocol


class RateLimiter(Protocol):
    """Takes one token from the bucket `key` refilled at `per_minute`."""

    async def hit(self, key: str, per_minute: int) -> float | None:
        """None when allowed, else the seconds to wait before retrying."""


class LocalRateLimiter:
    """Single-process token buckets (burst = one minute's allowance), bounded in memory."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self.max_keys = max_keys

    async def hit(self, key: str, per_minute: int) -> float | None:
        """Take a token, or answer how long until one is available."""
        return self.take(key, per_minute, time.monotonic())

    def take(self, key: str, per_minute: int, now: float) -> float | None:
        """Synchronous core of `hit`, with the clock passed in for tests."""
        rate = per_minute / 60.0
        tokens, last = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if tokens >= 1.0:
            if len(self._buckets) >= self.max_keys and key not in self._buckets:
                self._evict(now)
            self._buckets[key] = (tokens - 1.0, now)
            return None
        self._buckets[key] = (tokens, now)
        return round((1.0 - tokens) / rate, 3)

    def _evict(self, now: float) -> None:
        # a bucket idle for a minute is full again: forgetting it changes nothing
        stale = [k for k, (_, last) in self._buckets.items() if now - last > 60.0]
        for k in stale:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()
