"""Token-bucket rate limits: in-process, shared through Redis, and Redis with a local fallback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis

from gateway import metrics
from gateway.redisconn import REDIS_ERRORS

log = logging.getLogger("omnigate.ratelimit")


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
        # popped and re-inserted: the dict stays ordered from least to most recently used
        tokens, last = self._buckets.pop(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            # the least recently used bucket goes first; one idle for a minute is full
            # again anyway, so forgetting it changes nothing
            del self._buckets[next(iter(self._buckets))]
        return None if allowed else round((1.0 - tokens) / rate, 3)


# Token bucket, atomically, in Redis: hash {t: tokens, ts: last refill in ms}.
# Time comes from the Redis server (one clock for every process and instance);
# ARGV[2] may pin it, for tests. Returns 0 when allowed, else the wait in ms.
_BUCKET_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = capacity / 60000.0
local now = tonumber(ARGV[2])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.max(1, math.ceil((1 - tokens) / rate))
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return wait
"""

RATE_KEY_PREFIX = "og:rl:"
# An untouched bucket is full again after a minute: keeping it longer changes nothing.
RATE_KEY_TTL_MS = 61_000


class RedisRateLimiter:
    """Token buckets shared by every process and instance through one Lua script.

    Raises the Redis errors (see `gateway.redisconn.REDIS_ERRORS`); wrap it in
    `FallbackRateLimiter` to keep answering when Redis is away. Keys arrive
    anonymized from the caller and are never logged.
    """

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_BUCKET_SCRIPT)

    async def hit(self, key: str, per_minute: int) -> float | None:
        """Take a token, or answer how long until one is available."""
        return await self.take(key, per_minute)

    async def take(self, key: str, per_minute: int, now_ms: int | None = None) -> float | None:
        """`hit` with the clock optionally pinned (milliseconds), for tests."""
        wait_ms = await self._script(
            keys=[RATE_KEY_PREFIX + key],
            args=[per_minute, "" if now_ms is None else now_ms, RATE_KEY_TTL_MS],
        )
        return None if int(wait_ms) == 0 else int(wait_ms) / 1000.0


class FallbackRateLimiter:
    """Redis when it answers; this process's own buckets while it does not.

    During an outage the limits hold per process (N workers allow up to N times
    the rate). Redis is retried after `retry_after` seconds by one caller at a
    time, so a dead Redis costs one socket timeout per window, not per message.
    """

    def __init__(
        self,
        primary: RateLimiter,
        local: LocalRateLimiter,
        retry_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary = primary
        self.local = local
        self.retry_after = retry_after
        self._clock = clock
        self._down_since: float | None = None
        self._next_try = 0.0
        self._probing = False
        metrics.REDIS_UP.set(1)

    @property
    def degraded(self) -> bool:
        """True while decisions are per-process."""
        return self._down_since is not None

    async def hit(self, key: str, per_minute: int) -> float | None:
        """Take a token from the shared bucket, or the local one while Redis is away."""
        if self._down_since is None or (not self._probing and self._clock() >= self._next_try):
            probing = self._down_since is not None
            self._probing = probing
            try:
                wait = await self.primary.hit(key, per_minute)
            except REDIS_ERRORS as exc:
                self._went_down(exc)
            else:
                if probing:
                    self._came_back()
                return wait
            finally:
                if probing:
                    self._probing = False
        metrics.RATELIMIT_FALLBACK.inc()
        return await self.local.hit(key, per_minute)

    def _went_down(self, exc: BaseException) -> None:
        self._next_try = self._clock() + self.retry_after
        if self._down_since is None:
            self._down_since = self._clock()
            metrics.REDIS_UP.set(0)
            # once per outage; the error type only (messages can carry the address)
            log.warning(
                "redis unavailable, rate limits are per-process",
                extra={"error": type(exc).__name__},
            )

    def _came_back(self) -> None:
        assert self._down_since is not None
        outage = self._clock() - self._down_since
        self._down_since = None
        metrics.REDIS_UP.set(1)
        log.warning(
            "redis reachable again, rate limits are shared",
            extra={"outage_seconds": round(outage, 1)},
        )
