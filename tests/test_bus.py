"""The Redis event bus: delivery to every process, once, and recovery after outages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from gateway import bus
from gateway.bus import RedisBus
from gateway.redisconn import connect, connect_subscriber
from tests.support import PrivateRedis, until

Seen = list[tuple[str, dict[str, Any]]]


def recorder(b: RedisBus, seen: Seen) -> None:
    """Record every event kind delivered to `b`."""
    for kind in (bus.POLICY_CHANGED, bus.SUBJECT_ERASED, bus.KEYS_ROTATED, bus.CONSENT_CHANGED):

        async def handler(payload: dict[str, Any], kind: str = kind) -> None:
            seen.append((kind, payload))

        b.subscribe(kind, handler)


def subscriber(r: PrivateRedis) -> Redis:
    """The bus's own subscription client, as the gateway makes it."""
    return connect_subscriber(r.url)


@pytest.fixture
def channel() -> str:
    """A channel of the test's own, so concurrent runs never cross."""
    return f"og:bus:test:{uuid.uuid4().hex}"


@pytest.fixture
async def pair(redis_url: str, channel: str) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    """Two started buses, as two processes would hold them."""
    clients = [connect(redis_url), connect(redis_url)]
    buses = tuple(RedisBus(c, channel, subscriber=connect_subscriber(redis_url)) for c in clients)
    for b in buses:
        await b.start()
    yield buses
    for b in buses:
        await b.close()
    for c in clients:
        await c.aclose()


async def test_delivers_everywhere_once(pair: tuple[RedisBus, RedisBus]) -> None:
    a, b = pair
    seen_a: Seen = []
    seen_b: Seen = []
    recorder(a, seen_a)
    recorder(b, seen_b)
    tenant = str(uuid.uuid4())
    await a.publish(bus.POLICY_CHANGED, {"tenant_id": tenant})
    assert seen_a == [(bus.POLICY_CHANGED, {"tenant_id": tenant})]  # before publish returned
    await until(lambda: seen_b)
    assert seen_b == [(bus.POLICY_CHANGED, {"tenant_id": tenant})]
    await b.publish(bus.KEYS_ROTATED, {})
    await until(lambda: len(seen_a) == 2)
    await asyncio.sleep(0.2)  # nothing comes twice
    assert seen_a == [(bus.POLICY_CHANGED, {"tenant_id": tenant}), (bus.KEYS_ROTATED, {})]
    assert seen_b == [(bus.POLICY_CHANGED, {"tenant_id": tenant}), (bus.KEYS_ROTATED, {})]


async def test_malformed_messages_are_ignored(
    pair: tuple[RedisBus, RedisBus], redis_url: str, channel: str
) -> None:
    a, _ = pair
    seen: Seen = []
    recorder(a, seen)
    raw = Redis.from_url(redis_url)
    try:
        await raw.publish(channel, b"not json")
        await raw.publish(channel, orjson.dumps({"kind": "policy"}))
        await raw.publish(
            channel, orjson.dumps({"kind": "erase", "payload": {"x": 1}, "origin": "elsewhere"})
        )
    finally:
        await raw.aclose()
    await until(lambda: seen)
    assert seen == [(bus.SUBJECT_ERASED, {"x": 1})]


async def test_reconnects_invalidates_and_resends(
    private_redis: PrivateRedis,
) -> None:
    clients = [connect(private_redis.url), connect(private_redis.url)]
    a = RedisBus(clients[0], reconnect_delay=0.1, subscriber=subscriber(private_redis))
    b = RedisBus(clients[1], reconnect_delay=0.1, subscriber=subscriber(private_redis))
    seen_a: Seen = []
    seen_b: Seen = []
    recorder(a, seen_a)
    recorder(b, seen_b)
    try:
        await a.start()
        await b.start()
        assert a.connected.is_set() and b.connected.is_set()
        private_redis.stop()
        await until(lambda: not b.connected.is_set())
        # published while Redis is away: local at once, queued for the others
        await a.publish(bus.SUBJECT_ERASED, {"tenant_id": "t", "subject_id": "s"})
        assert seen_a == [(bus.SUBJECT_ERASED, {"tenant_id": "t", "subject_id": "s"})]
        private_redis.start()
        await until(lambda: a.connected.is_set() and b.connected.is_set(), timeout=3)
        # everything cached may be stale: all policies and data keys forgotten
        await until(lambda: (bus.SUBJECT_ERASED, {"tenant_id": "t", "subject_id": "s"}) in seen_b)
        assert (bus.POLICY_CHANGED, {"tenant_id": None}) in seen_b
        assert (bus.KEYS_ROTATED, {}) in seen_b
        # and every open socket reads its visitor's consent again before its next message
        assert (bus.CONSENT_CHANGED, {"tenant_id": None}) in seen_b
        assert (bus.POLICY_CHANGED, {"tenant_id": None}) in seen_a
        await b.publish(bus.KEYS_ROTATED, {"after": True})
        await until(lambda: (bus.KEYS_ROTATED, {"after": True}) in seen_a)
    finally:
        await a.close()
        await b.close()
        for c in clients:
            await c.aclose()


async def test_a_dropped_subscription_catches_up_while_redis_stays_up(
    private_redis: PrivateRedis,
) -> None:
    """Redis stays up but closes the subscribers' connections (`CLIENT KILL`, its pub/sub
    output-buffer limit, a proxy or failover reset): events published in the gap are lost,
    so each bus must notice and invalidate everything, not silently re-subscribe."""
    clients = [connect(private_redis.url), connect(private_redis.url)]
    a = RedisBus(clients[0], reconnect_delay=0.1, subscriber=subscriber(private_redis))
    b = RedisBus(clients[1], reconnect_delay=0.1, subscriber=subscriber(private_redis))
    seen_a: Seen = []
    seen_b: Seen = []
    recorder(a, seen_a)
    recorder(b, seen_b)
    raw = Redis.from_url(private_redis.url)
    try:
        await a.start()
        await b.start()
        assert a.connected.is_set() and b.connected.is_set()
        assert await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 2
        # both noticed the drop: everything cached is forgotten, consent read again
        await until(lambda: len(seen_a) >= 3 and len(seen_b) >= 3, timeout=3)
        catch_up = [
            (bus.POLICY_CHANGED, {"tenant_id": None}),
            (bus.KEYS_ROTATED, {}),
            (bus.CONSENT_CHANGED, {"tenant_id": None}),
        ]
        assert seen_a == catch_up and seen_b == catch_up
        await until(lambda: a.connected.is_set() and b.connected.is_set())
        # subscribed again: events flow both ways
        await a.publish(bus.KEYS_ROTATED, {"after": "a"})
        await until(lambda: (bus.KEYS_ROTATED, {"after": "a"}) in seen_b)
        await b.publish(bus.KEYS_ROTATED, {"after": "b"})
        await until(lambda: (bus.KEYS_ROTATED, {"after": "b"}) in seen_a)
        assert len(seen_a) == len(seen_b) == 5  # nothing twice, no further catch-up
    finally:
        await raw.aclose()
        for x in (a, b):
            await x.close()
        for c in clients:
            await c.aclose()


async def test_a_bus_without_a_subscriber_client_only_publishes(redis_url: str) -> None:
    client = connect(redis_url)
    b = RedisBus(client)  # as `omnigate rotate-keys` uses it
    try:
        await b.publish(bus.KEYS_ROTATED, {})
        assert not b._pending
        with pytest.raises(RuntimeError):
            await b.start()
    finally:
        await b.close()
        await client.aclose()


async def test_an_event_whose_publish_timed_out_is_resent_without_another_publish(
    private_redis: PrivateRedis,
) -> None:
    """A publish that times out (Redis slow for a moment, the subscription intact) is
    queued; it must reach the others once Redis answers, not wait for the next event:
    a queued consent revocation may be the last event for a long while."""
    clients = [connect(private_redis.url), connect(private_redis.url)]
    a, b = (RedisBus(c, subscriber=subscriber(private_redis)) for c in clients)
    seen_b: Seen = []
    recorder(b, seen_b)
    raw = Redis.from_url(private_redis.url)
    try:
        await a.start()
        await b.start()
        await raw.execute_command("CLIENT", "PAUSE", "300", "WRITE")  # PUBLISH waits
        await a.publish(bus.CONSENT_CHANGED, {"tenant_id": "t", "subject_id": "s", "revoke": []})
        assert a._pending, "the publish did not time out: the test proves nothing"
        assert a.connected.is_set()  # no reconnect will come to flush it
        await until(lambda: seen_b, timeout=4)
        assert seen_b == [
            (bus.CONSENT_CHANGED, {"tenant_id": "t", "subject_id": "s", "revoke": []})
        ]
        assert not a._pending
    finally:
        await raw.aclose()
        for x in (a, b):
            await x.close()
        for c in clients:
            await c.aclose()


async def test_events_dropped_while_away_make_the_others_invalidate_everything(
    private_redis: PrivateRedis,
) -> None:
    clients = [connect(private_redis.url), connect(private_redis.url)]
    a = RedisBus(
        clients[0], reconnect_delay=0.1, pending_max=2, subscriber=subscriber(private_redis)
    )
    # b's own gap invalidation is switched off: what it sees comes from a
    b = RedisBus(
        clients[1], reconnect_delay=0.1, on_reconnect=list, subscriber=subscriber(private_redis)
    )
    seen_b: Seen = []
    recorder(b, seen_b)
    try:
        await a.start()
        await b.start()
        private_redis.stop()
        await until(lambda: not a.connected.is_set() and not b.connected.is_set())
        for n in range(3):  # one more than a keeps: the first revocation is dropped
            await bus.publish_consent(a, uuid.UUID(int=1), uuid.UUID(int=n), ["ai_processing"])
        private_redis.start()
        await until(lambda: len(seen_b) == 5, timeout=3)
        subject = [p.get("subject_id") for k, p in seen_b if k == bus.CONSENT_CHANGED]
        # first: every socket reads consent again; then the two revocations a still held
        assert subject == [None, str(uuid.UUID(int=1)), str(uuid.UUID(int=2))]
        assert (bus.POLICY_CHANGED, {"tenant_id": None}) in seen_b
        assert (bus.KEYS_ROTATED, {}) in seen_b
        # dropped once: the next flush sends only the events themselves
        await a.publish(bus.KEYS_ROTATED, {"after": True})
        await until(lambda: len(seen_b) == 6)
        assert seen_b[-1] == (bus.KEYS_ROTATED, {"after": True})
    finally:
        await a.close()
        await b.close()
        for c in clients:
            await c.aclose()


async def test_starts_without_redis_and_catches_up(
    private_redis: PrivateRedis,
) -> None:
    private_redis.stop()
    client = connect(private_redis.url)
    b = RedisBus(client, reconnect_delay=0.1, subscriber=subscriber(private_redis))
    seen: Seen = []
    recorder(b, seen)
    try:
        await b.start(wait=0.2)  # does not fail start-up
        assert not b.connected.is_set()
        private_redis.start()
        await until(lambda: b.connected.is_set(), timeout=3)
        await until(lambda: (bus.POLICY_CHANGED, {"tenant_id": None}) in seen)
    finally:
        await b.close()
        await client.aclose()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gateway import bus
    from gateway.bus import RedisBus
    from gateway.redisconn import connect, connect_subscriber

    async def main(url, channel):
        b = RedisBus(connect(url), channel, subscriber=connect_subscriber(url))
        done = asyncio.Event()

        async def on_policy(payload):
            await b.publish(bus.KEYS_ROTATED, {"echo": payload["tenant_id"]})
            done.set()

        b.subscribe(bus.POLICY_CHANGED, on_policy)
        await b.start()
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), 10)
        await b.close()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_two_real_processes(redis_url: str, channel: str) -> None:
    client = connect(redis_url)
    b = RedisBus(client, channel, subscriber=connect_subscriber(redis_url))
    seen: Seen = []
    recorder(b, seen)
    await b.start()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, redis_url, channel, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.strip() == b"ready"
        tenant = str(uuid.uuid4())
        await b.publish(bus.POLICY_CHANGED, {"tenant_id": tenant})
        await until(lambda: (bus.KEYS_ROTATED, {"echo": tenant}) in seen, timeout=1.0)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await b.close()
        await client.aclose()


async def test_closing_sends_what_is_still_queued(private_redis: PrivateRedis) -> None:
    """A process shutting down with a queued event (an erasure, say) sends it first: the
    others' subscriptions held, so they would see no gap to recover from."""
    clients = [connect(private_redis.url), connect(private_redis.url)]
    a, b = (RedisBus(c, subscriber=subscriber(private_redis)) for c in clients)
    seen_b: Seen = []
    recorder(b, seen_b)
    raw = Redis.from_url(private_redis.url)
    try:
        await a.start()
        await b.start()
        await raw.execute_command("CLIENT", "PAUSE", "300", "WRITE")  # PUBLISH waits
        await a.publish(bus.SUBJECT_ERASED, {"tenant_id": "t", "subject_id": "s"})
        assert a._pending, "the publish did not time out: the test proves nothing"
        await a.close()  # before the subscriber's next poll would have sent it
        assert not a._pending
        await until(lambda: seen_b, timeout=4)
        assert seen_b == [(bus.SUBJECT_ERASED, {"tenant_id": "t", "subject_id": "s"})]
    finally:
        await raw.aclose()
        await b.close()
        for c in clients:
            await c.aclose()
