"""Rate limits: the local buckets, the shared Redis bucket, and the fallback between them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway.ratelimit import (
    RATE_KEY_PREFIX,
    FallbackRateLimiter,
    LocalRateLimiter,
    RedisRateLimiter,
)
from gateway.redisconn import connect, safe_url
from tests.support import PrivateRedis, free_port


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A fail-fast client on the test Redis."""
    r = connect(redis_url)
    yield r
    await r.aclose()


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_local_bucket_burst_then_refill() -> None:
    rl = LocalRateLimiter()
    assert [rl.take([("k", 3)], 100.0) for _ in range(3)] == [None, None, None]
    assert rl.take([("k", 3)], 100.0) == 20.0  # 3/min: one token every 20 s
    assert rl.take([("k", 3)], 120.0) is None


def test_local_buckets_all_or_none() -> None:
    rl = LocalRateLimiter()
    both = [("session", 2), ("tenant", 3)]
    assert rl.take(both, 0.0) is None and rl.take(both, 0.0) is None
    # the session bucket is empty: refused, and the tenant's last token is not spent
    assert rl.take(both, 0.0) == 30.0
    assert rl.take([("tenant", 3)], 0.0) is None
    assert rl.take([("tenant", 3)], 0.0) == 20.0
    # the longest wait of the refusing buckets is the answer
    assert rl.take(both, 10.0) == 30.0 - 10.0


async def test_redis_buckets_all_or_none_in_one_call(redis: Redis) -> None:
    rl = RedisRateLimiter(redis)
    s, t = f"{{test-{uuid.uuid4()}}}:s", f"{{test-{uuid.uuid4()}}}:t"
    both = [(s, 2), (t, 3)]
    now = 5_000_000
    assert await rl.take(both, now) is None and await rl.take(both, now) is None
    assert await rl.take(both, now) == 30.0
    assert await rl.take([(t, 3)], now) is None  # its third token was not spent
    assert await rl.take([(t, 3)], now) == 20.0
    assert await rl.take(both, now + 10_000) == 20.0
    for key in (s, t):
        assert 0 < await redis.pttl(RATE_KEY_PREFIX + key) <= 61_000


async def test_concurrent_redis_calls_share_round_trips(redis: Redis) -> None:
    rl = RedisRateLimiter(redis)
    key = f"{{test-{uuid.uuid4()}}}:s"
    results = await asyncio.gather(*(rl.hit([(key, 20)]) for _ in range(60)))
    assert results.count(None) == 20  # exact, as if one at a time
    assert all(0 < r <= 3.0 for r in results if r is not None)
    # the first call went alone, the other 59 queued behind it and went as pipelines
    assert 2 <= rl.round_trips <= 3, rl.round_trips
    assert await rl.hit([(key, 20)]) is not None and rl.round_trips <= 4


async def test_a_lost_script_cache_is_reloaded_inside_a_batch(redis: Redis) -> None:
    rl = RedisRateLimiter(redis)
    key = f"{{test-{uuid.uuid4()}}}:s"
    assert await rl.hit([(key, 5)]) is None
    await redis.script_flush()  # as after a Redis restart
    # as if a call were in flight: the next six queue, and go out as one pipeline
    rl._busy = True
    calls = asyncio.gather(*(rl.hit([(key, 5)]) for _ in range(6)))
    await asyncio.sleep(0)
    assert len(rl._queue) == 6
    await rl._drain()
    results = await calls
    assert results.count(None) == 4 and not rl._busy
    assert await redis.script_exists(rl._script.sha) == [True]


async def test_redis_bucket_exact(redis: Redis) -> None:
    rl = RedisRateLimiter(redis)
    key = f"test:{uuid.uuid4()}"
    now = 1_000_000
    assert [await rl.take([(key, 5)], now) for _ in range(5)] == [None] * 5
    assert await rl.take([(key, 5)], now) == 12.0  # 5/min: one token per 12 s
    assert await rl.take([(key, 5)], now + 6_000) == 6.0
    assert await rl.take([(key, 5)], now + 12_000) is None  # refilled one token
    assert await rl.take([(key, 5)], now + 12_000) is not None
    # a minute idle: full burst again, never more
    assert [await rl.take([(key, 5)], now + 200_000) for _ in range(6)].count(None) == 5
    ttl = await redis.pttl(RATE_KEY_PREFIX + key)
    assert 0 < ttl <= 61_000


async def test_redis_bucket_refills_in_real_time(redis: Redis) -> None:
    rl = RedisRateLimiter(redis)
    key = f"test:{uuid.uuid4()}"
    allowed = [await rl.hit([(key, 120)]) for _ in range(121)]
    assert allowed.count(None) == 120
    wait = allowed[-1]
    assert wait is not None and 0 < wait <= 0.5
    await asyncio.sleep(wait + 0.05)
    assert await rl.hit([(key, 120)]) is None


async def test_redis_bucket_is_shared_and_atomic(redis_url: str) -> None:
    # generous timeouts: this is about atomicity, not about a cold pool's connect burst
    clients = [connect(redis_url, socket_connect_timeout=2, socket_timeout=2) for _ in range(3)]
    try:
        limiters = [RedisRateLimiter(c) for c in clients]
        key = f"test:{uuid.uuid4()}"
        results = await asyncio.gather(*(limiters[i % 3].hit([(key, 20)]) for i in range(60)))
        assert results.count(None) == 20
    finally:
        for c in clients:
            await c.aclose()


async def test_fallback_when_redis_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    dead = connect(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    rl = FallbackRateLimiter(RedisRateLimiter(dead), LocalRateLimiter(), retry_after=60)
    before = sample("omnigate_ratelimit_fallback_total")
    caplog.set_level(logging.WARNING, "omnigate.ratelimit")
    try:
        t0 = time.monotonic()
        results = [await rl.hit([("k", 3)]) for _ in range(50)]
        elapsed = time.monotonic() - t0
    finally:
        await dead.aclose()
    assert results[:3] == [None] * 3 and all(r is not None for r in results[3:])
    assert elapsed < 0.5  # one failed attempt, then local decisions only
    assert rl.degraded
    assert sample("omnigate_ratelimit_fallback_total") - before == 50
    assert sample("omnigate_redis_up") == 0
    warnings = [r for r in caplog.records if r.name == "omnigate.ratelimit"]
    assert [r.getMessage() for r in warnings] == ["redis unavailable, rate limits are per-process"]
    assert "hunter2" not in caplog.text and "127.0.0.1" not in caplog.text


async def test_concurrent_calls_to_a_dead_redis_are_all_answered_locally() -> None:
    # the first call goes alone and fails; the others queued behind it fail as one batch
    dead = connect(f"redis://127.0.0.1:{free_port()}/0")
    primary = RedisRateLimiter(dead)
    rl = FallbackRateLimiter(primary, LocalRateLimiter(), retry_after=60)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(rl.hit([("k", 5)]) for _ in range(20))), 5
        )
    finally:
        await dead.aclose()
    assert results.count(None) == 5  # the local bucket decided every one of them
    assert rl.degraded and not primary._busy and primary._queue == []


async def test_fallback_recovers_when_redis_returns(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "omnigate.ratelimit")
    client = connect(private_redis.url)
    rl = FallbackRateLimiter(RedisRateLimiter(client), LocalRateLimiter(), retry_after=0.3)
    try:
        assert await rl.hit([("a", 10)]) is None
        assert await client.exists(RATE_KEY_PREFIX + "a") == 1
        private_redis.stop()
        assert await rl.hit([("b", 10)]) is None  # answered locally
        assert rl.degraded and sample("omnigate_redis_up") == 0
        for _ in range(5):
            await rl.hit([("b", 10)])  # within the back-off: no further attempts, no more logs
        private_redis.start()
        await asyncio.sleep(0.35)
        assert await rl.hit([("c", 10)]) is None
        assert not rl.degraded and sample("omnigate_redis_up") == 1
        assert await client.exists(RATE_KEY_PREFIX + "c") == 1
    finally:
        await client.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "omnigate.ratelimit"]
    assert messages == [
        "redis unavailable, rate limits are per-process",
        "redis reachable again, rate limits are shared",
    ]


async def test_hanging_redis_costs_one_short_timeout(private_redis: PrivateRedis) -> None:
    client = connect(private_redis.url)
    rl = FallbackRateLimiter(RedisRateLimiter(client), LocalRateLimiter(), retry_after=5)
    assert private_redis.proc is not None
    try:
        await client.ping()  # connected before Redis stalls
        private_redis.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        for _ in range(20):
            assert await rl.hit([(f"test:{uuid.uuid4()}", 10)]) is None
        elapsed = time.monotonic() - t0
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
        await client.aclose()
    assert rl.degraded
    assert elapsed < 0.25, elapsed


def test_safe_url_hides_password() -> None:
    assert safe_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert safe_url("rediss://u:s3cret@h/1") == "rediss://u:***@h/1"
    assert safe_url("redis://h:6379/0") == "redis://h:6379/0"
    assert "s3cret" not in safe_url(os.environ.get("X", "redis://a:s3cret@b"))


def test_local_limiter_evicts_least_recently_used_not_everything() -> None:
    from gateway.ratelimit import LocalRateLimiter

    lim = LocalRateLimiter(max_keys=3)
    assert lim.take([("hot", 1)], 0.0) is None  # its one token spent
    for i in range(10):  # a stream of new keys, "hot" touched between them
        lim.take([(f"new{i}", 1)], 1.0 + i)
        assert lim.take([("hot", 1)], 1.0 + i) is not None  # still limited: never forgotten
    assert len(lim._buckets) == 3
