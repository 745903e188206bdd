"""The Redis event bus: delivery to every process, once, and recovery after outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from gateway import bus
from gateway.app import create_app
from gateway.appkeys import SERVICES
from gateway.bus import RedisBus
from gateway.config import Settings
from gateway.provision import NewTenant
from gateway.redisconn import connect, connect_subscriber
from tests.conftest import hello
from tests.support import ORIGIN, PrivateRedis, until

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


# --- concurrent flushes of the queue ---------------------------------------------------


class SlowRedis:
    """Stands in for the publishing client: every PUBLISH takes a while, some fail."""

    def __init__(self, fail: int = 0) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail = fail  # how many of the next PUBLISHes time out

    async def publish(self, channel: str, message: bytes) -> int:
        await asyncio.sleep(0.01)
        if self.fail:
            self.fail -= 1
            raise TimeoutError("Timeout reading from redis")
        self.sent.append(orjson.loads(message)["payload"])
        return 1


def queue(b: RedisBus, *ns: int) -> None:
    """Queue erasures numbered `ns`, as publishes that timed out earlier would have."""
    for n in ns:
        event = {"kind": bus.SUBJECT_ERASED, "payload": {"n": n}, "origin": b.origin}
        b._pending.append(orjson.dumps(event))


async def test_a_publish_during_the_polls_flush_sends_everything_once_in_order() -> None:
    """The subscriber's poll and a publish both flush the queue: each event goes out once,
    in order, and neither raises (the poll's flush dying would kill the subscriber; the
    publish's raising would fail a request whose change is committed)."""
    r = SlowRedis()
    b = RedisBus(r)  # type: ignore[arg-type]
    queue(b, 1, 2)
    poll = asyncio.create_task(b._flush_pending())  # as `_run` does after a message
    await asyncio.sleep(0)
    publish = asyncio.create_task(b.publish(bus.SUBJECT_ERASED, {"n": 3}))
    results = await asyncio.gather(poll, publish, return_exceptions=True)
    assert list(results) == [None, None]
    assert r.sent == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert not b._pending


async def test_an_event_whose_resend_fails_stays_first_in_the_queue() -> None:
    r = SlowRedis(fail=1)
    b = RedisBus(r)  # type: ignore[arg-type]
    queue(b, 1, 2)
    with pytest.raises(TimeoutError):
        await b._flush_pending()
    assert [orjson.loads(m)["payload"] for m in b._pending] == [{"n": 1}, {"n": 2}]
    await b.publish(bus.SUBJECT_ERASED, {"n": 3})
    assert r.sent == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert not b._pending and not b._dropped


async def test_an_event_put_back_into_a_full_queue_makes_the_others_invalidate() -> None:
    """The queue filled up while a queued event was being re-sent; it goes back first and
    pushes out the newest: the others must then invalidate everything."""
    r = SlowRedis()
    b = RedisBus(r, on_reconnect=lambda: [(bus.KEYS_ROTATED, {})], pending_max=2)  # type: ignore[arg-type]
    queue(b, 1)
    r.fail = 1
    flush = asyncio.create_task(b._flush_pending())
    await asyncio.sleep(0)  # 1 is being sent...
    queue(b, 2, 3)  # ...while two more are queued (a full queue)
    with pytest.raises(TimeoutError):
        await flush
    assert [orjson.loads(m)["payload"] for m in b._pending] == [{"n": 1}, {"n": 2}]
    assert b._dropped
    await b._flush_pending()
    assert r.sent == [{}, {"n": 1}, {"n": 2}]  # KEYS_ROTATED's payload first


async def test_a_publish_racing_the_polls_flush_leaves_the_subscriber_alive(
    redis_url: str, channel: str
) -> None:
    """With real Redis, answering slowly but in time: a publish while the subscriber's poll
    re-sends queued events must neither raise nor stop the subscriber."""
    clients = [connect(redis_url), connect(redis_url)]
    a, b = (RedisBus(c, channel, subscriber=connect_subscriber(redis_url)) for c in clients)
    seen_a: Seen = []
    seen_b: Seen = []
    recorder(a, seen_a)
    recorder(b, seen_b)
    real = clients[0].publish

    async def slow_publish(ch: Any, message: Any, **kwargs: Any) -> int:
        await asyncio.sleep(0.05)
        return await real(ch, message, **kwargs)

    try:
        await a.start()
        await b.start()
        clients[0].publish = slow_publish  # type: ignore[method-assign, assignment]
        queue(a, 1, 2)
        await b.publish(bus.POLICY_CHANGED, {"tenant_id": None})  # wakes a's poll: it flushes
        await until(lambda: seen_a)
        await asyncio.sleep(0.01)  # a's poll is re-sending 1
        await a.publish(bus.SUBJECT_ERASED, {"n": 3})  # a request's erasure meanwhile
        await until(lambda: len(seen_b) == 4)
        erasures = [(bus.SUBJECT_ERASED, {"n": n}) for n in (1, 2, 3)]
        assert seen_b == [(bus.POLICY_CHANGED, {"tenant_id": None}), *erasures]
        assert a._task is not None and not a._task.done()
        await b.publish(bus.SUBJECT_ERASED, {"after": True})
        await until(lambda: (bus.SUBJECT_ERASED, {"after": True}) in seen_a)
    finally:
        clients[0].publish = real  # type: ignore[method-assign]
        for x in (a, b):
            await x.close()
        for c in clients:
            await c.aclose()


async def test_closing_waits_for_a_publish_still_under_way() -> None:
    """Shutdown cancels a handler whose erasure committed; its publish, shielded, goes
    on. One that fails after closing began queues its event: closing waits for it, then
    sends what is queued, rather than leave it behind unsent."""
    slow = SlowRedis(fail=1)
    b = RedisBus(slow)  # type: ignore[arg-type]

    async def handler() -> None:  # as erasure.announce publishes, after its commit
        await asyncio.shield(b.publish(bus.SUBJECT_ERASED, {"n": 1}))

    caller = asyncio.create_task(handler())
    await asyncio.sleep(0.001)  # the publish is sending
    caller.cancel()
    await b.close()
    assert slow.sent == [{"n": 1}]
    assert not b._pending


async def test_a_fault_in_the_subscriber_is_a_gap_not_its_end(
    redis_url: str, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything unexpected while receiving may have lost events, like a Redis error: the
    subscriber says so (without the event's text), subscribes again and catches up."""
    clients = [connect(redis_url), connect(redis_url)]
    a = RedisBus(clients[0], channel, reconnect_delay=0.1, subscriber=connect_subscriber(redis_url))
    b = RedisBus(clients[1], channel, subscriber=connect_subscriber(redis_url))
    seen: Seen = []
    recorder(a, seen)
    receive = a._receive

    async def faulty(data: bytes) -> None:
        a._receive = receive  # type: ignore[method-assign]
        raise ValueError(f"cannot handle {data!r}")

    try:
        await a.start()
        await b.start()
        a._receive = faulty  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="omnigate.bus"):
            await b.publish(bus.SUBJECT_ERASED, {"subject_id": "payload-text"})
            await until(lambda: (bus.CONSENT_CHANGED, {"tenant_id": None}) in seen, timeout=3)
        assert seen == [
            (bus.POLICY_CHANGED, {"tenant_id": None}),
            (bus.KEYS_ROTATED, {}),
            (bus.CONSENT_CHANGED, {"tenant_id": None}),
        ]
        assert a._task is not None and not a._task.done() and a.connected.is_set()
        failed = [r for r in caplog.records if r.getMessage().startswith("redis bus subscriber")]
        assert len(failed) == 1
        assert failed[0].__dict__["error"] == "ValueError" and failed[0].exc_info is None
        assert "payload-text" not in caplog.text
        await b.publish(bus.SUBJECT_ERASED, {"after": True})
        await until(lambda: (bus.SUBJECT_ERASED, {"after": True}) in seen)
    finally:
        for x in (a, b):
            await x.close()
        for c in clients:
            await c.aclose()


# --- a Redis that goes silent ------------------------------------------------------------


@contextlib.contextmanager
def stopped(r: PrivateRedis) -> Any:
    """Redis stops answering without closing a connection (a dead host, an old primary
    a failover dropped): SIGSTOP, always followed by SIGCONT."""
    assert r.proc is not None
    pid = r.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_silent_redis_is_a_gap(private_redis: PrivateRedis) -> None:
    client = connect(private_redis.url)
    b = RedisBus(
        client, reconnect_delay=0.1, subscriber=subscriber(private_redis), health_check_interval=0.5
    )
    seen: Seen = []
    recorder(b, seen)
    try:
        await b.start()
        assert b.connected.is_set()
        loop = asyncio.get_running_loop()
        with stopped(private_redis):
            began = loop.time()
            await until(lambda: not b.connected.is_set(), timeout=3)
            # nothing heard for twice the interval (a PING sent after the first one)
            assert 0.9 <= loop.time() - began <= 2.5
            assert not seen
        await until(lambda: b.connected.is_set(), timeout=3)
        await until(lambda: (bus.CONSENT_CHANGED, {"tenant_id": None}) in seen)
        assert (bus.POLICY_CHANGED, {"tenant_id": None}) in seen
        assert (bus.KEYS_ROTATED, {}) in seen
    finally:
        await b.close()
        await client.aclose()


async def test_a_quiet_but_healthy_redis_is_no_gap(redis_url: str, channel: str) -> None:
    """Answered PINGs keep an idle subscription: no reconnect, no invalidation."""
    clients = [connect(redis_url), connect(redis_url)]
    a = RedisBus(
        clients[0], channel, subscriber=connect_subscriber(redis_url), health_check_interval=0.2
    )
    b = RedisBus(clients[1], channel, subscriber=connect_subscriber(redis_url))
    seen: Seen = []
    recorder(a, seen)
    gaps = 0

    def on_reconnect() -> list[tuple[str, dict[str, Any]]]:
        nonlocal gaps
        gaps += 1
        return []

    a.on_reconnect = on_reconnect
    try:
        await a.start()
        await b.start()
        for _ in range(15):  # 1.5 s: seven intervals without an event
            await asyncio.sleep(0.1)
            assert a.connected.is_set()
        assert gaps == 0
        await b.publish(bus.KEYS_ROTATED, {"after": True})
        await until(lambda: seen == [(bus.KEYS_ROTATED, {"after": True})])
    finally:
        for x in (a, b):
            await x.close()
        for c in clients:
            await c.aclose()


# --- committed changes are announced even when their handler is cancelled ----------------


async def _visitor(server: TestServer, session: ClientSession, site_key: str) -> str:
    ws = await session.ws_connect(
        server.make_url(f"/v1/widget/ws?site={site_key}"), headers={"Origin": ORIGIN}
    )
    welcome = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
    await ws.close()
    return str(welcome["session_token"])


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/api/gdpr/request", bus.SUBJECT_RESTRICTED),  # a restriction, filed
        ("/api/privacy/delete", bus.SUBJECT_ERASED),  # an erasure, at once
        ("complete", bus.SUBJECT_ERASED),  # an erasure request, completed by the owner
    ],
    ids=["restriction", "erasure", "completed-erasure-request"],
)
async def test_a_committed_change_is_announced_when_its_handler_is_cancelled(
    settings: Settings,
    tenant: NewTenant,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    kind: str,
) -> None:
    """The change is in the database once committed: a handler cancelled while it tells
    the other processes (its client gone, or at shutdown the grace over) must still
    tell them, or their sockets of the subject keep going."""
    # aiohttp's test server cancels a handler whose client goes away (`serve` does at
    # shutdown): the cancellation this is about
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    session = ClientSession()
    try:
        token = await _visitor(server, session, tenant.site_key)
        visitor = {"Authorization": f"Session {token}"}
        body: dict[str, Any] = {"kind": "restriction"} if kind == bus.SUBJECT_RESTRICTED else {}
        headers = visitor
        if path == "complete":
            async with session.post(
                server.make_url("/api/gdpr/request"), json={"kind": "erasure"}, headers=visitor
            ) as r:
                assert r.status == 201
                request_id = (await r.json())["id"]
            path = f"/api/admin/requests/{request_id}/complete"
            headers = {"Authorization": f"Bearer {tenant.admin_key}"}
        svc = server.app[SERVICES]
        seen: list[dict[str, Any]] = []

        async def record(payload: dict[str, Any]) -> None:
            seen.append(payload)

        svc.bus.subscribe(kind, record)
        held, release = asyncio.Event(), asyncio.Event()
        publish = svc.bus.publish

        async def slow_publish(k: str, payload: dict[str, Any]) -> None:
            if k == kind:
                held.set()
                await release.wait()  # Redis slow to take it
            await publish(k, payload)

        monkeypatch.setattr(svc.bus, "publish", slow_publish)

        async def call() -> None:
            async with session.post(server.make_url(path), json=body, headers=headers) as r:
                await r.read()

        request = asyncio.create_task(call())
        await asyncio.wait_for(held.wait(), 5)  # committed; announcing it
        request.cancel()  # the client goes away: the server cancels the handler
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.2)  # the cancellation reaches the handler
        release.set()
        await until(lambda: seen)
        assert len(seen) == 1 and seen[0]["tenant_id"] == str(tenant.tenant_id)
    finally:
        await session.close()
        await server.close()
