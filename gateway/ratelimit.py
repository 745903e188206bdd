"""Token-bucket rate limits: in-process, shared through Redis, and Redis with a local fallback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from gateway import metrics
from gateway.claims import Claim
from gateway.redisconn import REDIS_ERRORS

log = logging.getLogger("omnigate.ratelimit")


Bucket = tuple[str, int]  # (key, allowance per minute)


class RateLimiter(Protocol):
    """Takes one token from each of a message's buckets, or from none of them."""

    async def hit(self, buckets: Sequence[Bucket], claim: Claim | None = None) -> float | None:
        """None when every bucket allowed (a token is taken from each); else the seconds
        to wait for the slowest refusing bucket, and nothing is taken. A limiter that
        shares its buckets through Redis also tries to take `claim` there when allowed
        (setting `claim.taken`); one that does not leaves it to gateway/claims.py."""


class LocalRateLimiter:
    """Single-process token buckets (burst = one minute's allowance), bounded in memory."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self.max_keys = max_keys

    async def hit(self, buckets: Sequence[Bucket], claim: Claim | None = None) -> float | None:
        """Take a token from every bucket, or answer how long until all have one."""
        return self.take(buckets, time.monotonic())

    def take(self, buckets: Sequence[Bucket], now: float) -> float | None:
        """Synchronous core of `hit`, with the clock passed in for tests."""
        refilled: list[float] = []
        wait = 0.0
        for key, per_minute in buckets:
            rate = per_minute / 60.0
            # popped and re-inserted: the dict stays ordered from least to most recently used
            tokens, last = self._buckets.pop(key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            refilled.append(tokens)
            if tokens < 1.0:
                wait = max(wait, round((1.0 - tokens) / rate, 3))
        taken = 1.0 if wait == 0.0 else 0.0
        for (key, _), tokens in zip(buckets, refilled, strict=True):
            self._buckets[key] = (tokens - taken, now)
        while len(self._buckets) > self.max_keys:
            # the least recently used bucket goes first; one idle for a minute is full
            # again anyway, so forgetting it changes nothing
            del self._buckets[next(iter(self._buckets))]
        return None if wait == 0.0 else wait


# Token buckets, atomically, in Redis: one hash per key {t: tokens, ts: last refill in
# ms}; KEYS are the buckets, ARGV[5..] their allowances per minute. A token is taken
# from every bucket only when each has one. Time comes from the Redis server (one clock
# for every process and instance); ARGV[1] may pin it, for tests. With a claim token in
# ARGV[3], the last KEY is a reply's claim (gateway/claims.py), taken with SET NX for
# ARGV[4] ms when the tokens are. Returns the longest wait in ms when refused, else 0
# (-1: allowed, but another holds the claim).
_BUCKET_SCRIPT = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local buckets = #KEYS
if ARGV[3] ~= '' then
  buckets = buckets - 1
end
local tokens, stamps = {}, {}
local wait = 0
for i = 1, buckets do
  local key = KEYS[i]
  local capacity = tonumber(ARGV[i + 4])
  local rate = capacity / 60000.0
  local b = redis.call('HMGET', key, 't', 'ts')
  local t, ts = tonumber(b[1]), tonumber(b[2])
  if t == nil or ts == nil then
    t, ts = capacity, now
  end
  if now > ts then
    t, ts = math.min(capacity, t + (now - ts) * rate), now
  end
  if t < 1 then
    wait = math.max(wait, math.max(1, math.ceil((1 - t) / rate)))
  end
  tokens[i], stamps[i] = t, ts
end
for i = 1, buckets do
  local key = KEYS[i]
  local t = tokens[i]
  if wait == 0 then
    t = t - 1
  end
  redis.call('HSET', key, 't', tostring(t), 'ts', tostring(stamps[i]))
  redis.call('PEXPIRE', key, tonumber(ARGV[2]))
end
if wait == 0 and buckets < #KEYS then
  if not redis.call('SET', KEYS[#KEYS], ARGV[3], 'NX', 'PX', tonumber(ARGV[4])) then
    return -1
  end
end
return wait
"""

RATE_KEY_PREFIX = "og:rl:"
# An untouched bucket is full again after a minute: keeping it longer changes nothing.
RATE_KEY_TTL_MS = 61_000


class RedisRateLimiter:
    """Token buckets shared by every process and instance: one script call per message.

    Calls batch naturally, as message writes do (gateway/groupcommit.py): with no
    round trip in flight a call is sent at once; while one is, new calls queue and
    go out together as one pipeline when it returns (each script still runs
    atomically, in order). Raises the Redis errors (see `gateway.redisconn.REDIS_ERRORS`);
    wrap it in `FallbackRateLimiter` to keep answering when Redis is away. Keys
    arrive anonymized from the caller and are never logged. The buckets of one call
    must share a Redis Cluster slot: the caller puts the tenant in a `{hash tag}`.
    """

    def __init__(self, redis: Redis, *, max_batch: int = 64) -> None:
        self._redis = redis
        self._script = redis.register_script(_BUCKET_SCRIPT)
        self._max_batch = max_batch
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[int]]] = []
        self._busy = False  # a round trip is in flight (or the queue is being drained)
        self._task: asyncio.Task[None] | None = None
        self.round_trips = 0

    async def hit(self, buckets: Sequence[Bucket], claim: Claim | None = None) -> float | None:
        """Take a token from every bucket, or answer how long until all have one; take
        `claim` too when allowed."""
        return await self.take(buckets, claim=claim)

    async def take(
        self, buckets: Sequence[Bucket], now_ms: int | None = None, claim: Claim | None = None
    ) -> float | None:
        """`hit` with the clock optionally pinned (milliseconds), for tests."""
        keys = [RATE_KEY_PREFIX + key for key, _ in buckets]
        args: list[Any] = ["" if now_ms is None else now_ms, RATE_KEY_TTL_MS, "", 0]
        if claim is not None:
            keys.append(claim.redis_key)
            args[2:4] = [claim.token, claim.lease_ms]
        args += [per_minute for _, per_minute in buckets]
        if self._busy:
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._queue.append((keys, args, fut))
            wait_ms = await fut
        else:
            self._busy = True
            try:
                self.round_trips += 1
                wait_ms = await self._script(keys=keys, args=args)
            finally:
                if self._queue:
                    self._task = asyncio.create_task(self._drain())
                else:
                    self._busy = False
        if int(wait_ms) > 0:
            return int(wait_ms) / 1000.0
        if claim is not None:
            claim.taken, claim.shared = int(wait_ms) == 0, True
            claim.taken_at = time.monotonic()
        return None

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send(batch)
        except BaseException:
            for _, _, fut in self._queue:
                if not fut.done():
                    fut.set_exception(ConnectionError("rate limit call interrupted"))
            self._queue.clear()
            raise
        finally:
            self._busy = False
            self._task = None

    async def _send(self, batch: list[tuple[list[str], list[Any], asyncio.Future[int]]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
        self.round_trips += 1
        try:
            results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # every caller of the batch gets the error
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        except BaseException:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(ConnectionError("rate limit call interrupted"))
            raise
        for (keys, args, fut), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):
                # the server lost its script cache (a restart): the script call reloads it
                try:
                    result = await self._script(keys=keys, args=args)
                except Exception as exc:
                    result = exc
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)


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

    async def hit(self, buckets: Sequence[Bucket], claim: Claim | None = None) -> float | None:
        """Take tokens from the shared buckets, or the local ones while Redis is away."""
        if self._down_since is None or (not self._probing and self._clock() >= self._next_try):
            probing = self._down_since is not None
            self._probing = probing
            try:
                wait = await self.primary.hit(buckets, claim)
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
        return await self.local.hit(buckets)

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
