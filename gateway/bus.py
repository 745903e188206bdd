"""Events every process must see: policy changes, erasures, restrictions, consent changes,
data-key evictions.

In single-process mode (no Redis) `LocalBus` delivers immediately in-process.
A Redis-backed bus (pub/sub) delivers the same events to every process and
instance, including the one that published.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from uuid import UUID

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from gateway import metrics
from gateway.redisconn import HEALTH_CHECK_INTERVAL, REDIS_ERRORS

log = logging.getLogger("omnigate.bus")

Handler = Callable[[dict[str, Any]], Awaitable[None]]

# The closed set of event kinds.
POLICY_CHANGED = "policy"
SUBJECT_ERASED = "erase"
SUBJECT_RESTRICTED = "restrict"
# {tenant_id, subject_id, revoke: [purpose]}: the subject's consent changed outside its
# sockets; tenant_id None: every subject (this process may have missed changes)
CONSENT_CHANGED = "consent"
KEYS_ROTATED = "keys"


class LocalBus:
    """Delivers published events to this process's handlers only."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}

    def subscribe(self, kind: str, handler: Handler) -> None:
        """Call `handler(payload)` for every event of `kind`."""
        self._handlers.setdefault(kind, []).append(handler)

    async def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Deliver an event; a failing handler is logged, never raised to the publisher."""
        await self.deliver(kind, payload)

    async def deliver(self, kind: str, payload: dict[str, Any]) -> None:
        """Run this process's handlers for an event."""
        for handler in self._handlers.get(kind, ()):
            try:
                await handler(payload)
            except Exception:
                log.exception("bus handler failed", extra={"kind": kind})

    def hears_all(self) -> bool:
        """Whether every change published anywhere reaches this process's handlers now: in
        one process, always. While not, a connection must read what it acts on from the
        record (`Connection._answer_in_order`)."""
        return True

    async def start(self) -> None:
        """Nothing to connect in-process."""

    async def close(self) -> None:
        """Nothing to release in-process."""


BUS_CHANNEL = "og:bus"
# Events published while Redis was away, re-sent once it answers again.
PENDING_MAX = 1000
# How long closing waits to send what is still queued.
CLOSE_FLUSH_TIMEOUT = 2.0
# The subscriber's longest wait for a message: queued events are re-sent this often.
POLL_INTERVAL = 1.0
# What the subscriber's own PINGs carry (their PONGs come back on the subscription).
PING_TAG = "omnigate-bus"


def _invalidate_everything() -> list[tuple[str, dict[str, Any]]]:
    # While disconnected we may have missed any event: forget every cached
    # policy (tenant_id None means all tenants) and every cached data key, and
    # make every open socket read its visitor's consent again before its next message.
    return [
        (POLICY_CHANGED, {"tenant_id": None}),
        (KEYS_ROTATED, {}),
        (CONSENT_CHANGED, {"tenant_id": None}),
    ]


async def publish_consent(
    bus: LocalBus, tenant_id: UUID, subject_id: UUID, revoke: Iterable[str]
) -> None:
    """Tell every process that a subject's consent changed (after it is committed).

    Only revocations travel: each process applies them to the subject's open sockets at
    once, and reads grants from the database, the record, before the next message.
    """
    payload = {"tenant_id": str(tenant_id), "subject_id": str(subject_id), "revoke": list(revoke)}
    # the decision is committed: a client going away must not cancel telling the sockets
    await asyncio.shield(bus.publish(CONSENT_CHANGED, payload))


class RedisBus(LocalBus):
    """Delivers events to the handlers of every process subscribed to `og:bus`.

    The publisher's own handlers run immediately on publish; receipt of its
    own message is skipped by origin, so nothing is handled twice and a single
    instance sees no added latency. The subscriber reconnects on its own and,
    after any gap, delivers `on_reconnect()`'s events locally (by default:
    invalidate all policies and data keys, re-read every open socket's consent)
    since events may have been missed. It runs on `subscriber`, a client that must
    not retry (`gateway.redisconn.connect_subscriber`): a retrying client reconnects
    and re-subscribes inside the read, hiding the gap. The bus closes it in `close()`;
    a bus without one can only publish. Events published while Redis is away (or too
    slow to answer in time) are kept (up to `pending_max`) and sent once it answers,
    within a second (the subscriber's poll); if any had to be dropped,
    `on_reconnect()`'s events go to the other processes first, so a dropped
    revocation is never simply lost.

    A Redis that goes silent without closing the connection (a stopped or dead host, an
    old primary dropped by a failover) would leave the subscription waiting forever: the
    subscriber PINGs on it after `health_check_interval` seconds without a message and,
    if nothing (PONG included) has come back `health_check_interval` seconds after that,
    drops it as a gap. redis-py's own pub/sub health check only sends its PING and never
    checks the answer, so the subscriber client has it off (`connect_subscriber`).
    """

    def __init__(
        self,
        redis: Redis,
        channel: str = BUS_CHANNEL,
        reconnect_delay: float = 1.0,
        on_reconnect: Callable[[], list[tuple[str, dict[str, Any]]]] = _invalidate_everything,
        pending_max: int = PENDING_MAX,
        subscriber: Redis | None = None,
        health_check_interval: float = HEALTH_CHECK_INTERVAL,
    ) -> None:
        super().__init__()
        self.redis = redis
        self.subscriber = subscriber
        self.channel = channel
        self.reconnect_delay = reconnect_delay
        self.on_reconnect = on_reconnect
        self.health_check_interval = health_check_interval
        self.origin = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.connected = asyncio.Event()
        self._pending: collections.deque[bytes] = collections.deque(maxlen=pending_max)
        # an event was pushed out of a full `_pending`: the others must invalidate everything
        self._dropped = False
        # one flush of `_pending` at a time (a publish and the subscriber's poll may both try)
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # publishes under way: closing waits for them (a shielded one outlives its caller)
        self._publishing: set[asyncio.Task[Any]] = set()

    def hears_all(self) -> bool:
        """Only while subscribed: with Redis away, other processes' events are missed."""
        return self.connected.is_set()

    async def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Deliver here now, then to every other process through Redis."""
        task = asyncio.current_task()
        if task is None:  # not in a task (no event loop runs one): nothing to wait for
            await self._publish(kind, payload)
            return
        self._publishing.add(task)
        try:
            await self._publish(kind, payload)
        finally:
            self._publishing.discard(task)

    async def _publish(self, kind: str, payload: dict[str, Any]) -> None:
        await self.deliver(kind, payload)
        message = orjson.dumps({"kind": kind, "payload": payload, "origin": self.origin})
        try:
            await self._flush_pending()  # earlier events first, in order
            await self.redis.publish(self.channel, message)
        except REDIS_ERRORS as exc:
            # kept and re-sent with the next publish or on reconnect (others
            # invalidate their caches after a gap anyway)
            if len(self._pending) == self._pending.maxlen:
                self._dropped = True
            self._pending.append(message)
            log.warning(
                "redis unavailable, bus event queued for other processes",
                extra={"kind": kind, "error": type(exc).__name__},
            )

    async def start(self, wait: float = 1.0) -> None:
        """Start the subscriber; waits up to `wait` seconds for the first subscription."""
        if self.subscriber is None:
            raise RuntimeError("RedisBus needs a subscriber client to subscribe")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="omnigate-bus")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), wait)

    async def close(self) -> None:
        """Stop the subscriber, send what is still queued (briefly), close the client.

        A queued event may be an erasure or a revocation: the others would not see a
        gap to recover from, since their own subscriptions held.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected.clear()
        others = self._publishing - {asyncio.current_task()}
        if others:
            # an erasure committed just before shutdown is being published (shielded from
            # its cancelled handler): one that fails now queues its event, sent below
            await asyncio.wait(others, timeout=CLOSE_FLUSH_TIMEOUT)
        if self._pending or self._dropped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    while self._pending or self._dropped:
                        try:
                            await self._flush_pending()
                        except REDIS_ERRORS:
                            await asyncio.sleep(0.1)
            if self._pending or self._dropped:
                log.warning("bus events not sent at shutdown", extra={"count": len(self._pending)})
        if self.subscriber is not None:
            await self.subscriber.aclose()

    async def _run(self) -> None:
        assert self.subscriber is not None
        loop = asyncio.get_running_loop()
        interval = self.health_check_interval  # 0 or less: no PINGs, no silence detection
        poll = min(POLL_INTERVAL, interval / 2) if interval > 0 else POLL_INTERVAL
        first = True
        while True:
            # every drop of this subscription must end in the except branches below, never
            # in a silent re-subscription: the subscriber client does not retry, and a
            # connection found closed between reads counts as dropped too
            pubsub = self.subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.connected.set()
                metrics.REDIS_UP.set(1)
                if not first:
                    log.warning("redis bus reconnected; local caches invalidated")
                    for kind, payload in self.on_reconnect():
                        await self.deliver(kind, payload)
                    await self._flush_pending()
                first = False
                # the last time anything came on the subscription, and the PING sent since
                heard, pinged = loop.time(), None
                while True:
                    if pubsub.connection is None or not pubsub.connection.is_connected:
                        raise ConnectionError("bus subscription dropped")
                    message = await pubsub.get_message(timeout=poll)
                    now = loop.time()
                    if message is not None:  # an event or our PING's PONG
                        heard, pinged = now, None
                        if message.get("type") == "message":
                            await self._receive(message["data"])
                    elif pinged is not None and now - pinged >= interval:
                        # silent for twice the interval, our PING unanswered: a Redis that
                        # stopped answering without closing the connection
                        raise ConnectionError("bus subscription silent")
                    if interval > 0 and pinged is None and now - heard >= interval:
                        await pubsub.ping(PING_TAG)
                        pinged = now
                    if self._pending or self._dropped:
                        # a publish timed out while the subscription held: nothing else
                        # would send it before the next event, which may never come.
                        # Still too slow: kept, tried at the next poll (the subscription
                        # is fine, so no reconnect and no invalidation for this)
                        with contextlib.suppress(*REDIS_ERRORS):
                            await self._flush_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # a Redis error, or a fault of our own: either way events may have been
                # missed, so it is a gap (re-subscribe, invalidate), never a dead task
                if not isinstance(exc, REDIS_ERRORS):
                    log.error(
                        "redis bus subscriber failed; subscribing again",
                        extra={"error": type(exc).__name__, "stage": _stage(exc)},
                    )
                elif self.connected.is_set() or first:
                    log.warning(
                        "redis bus disconnected; retrying",
                        extra={"error": type(exc).__name__},
                    )
                if self.connected.is_set() or first:
                    metrics.REDIS_UP.set(0)
                self.connected.clear()
                first = False
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(self.reconnect_delay)

    async def _receive(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            kind, payload, origin = event["kind"], event["payload"], event["origin"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("malformed bus message ignored")
            return
        if origin == self.origin or not isinstance(payload, dict):
            return
        await self.deliver(kind, payload)

    async def _flush_pending(self) -> None:
        async with self._flushing:
            if self._dropped:
                # what was dropped is unknown: the others forget and re-read everything first
                for kind, payload in self.on_reconnect():
                    event = {"kind": kind, "payload": payload, "origin": self.origin}
                    await self.redis.publish(self.channel, orjson.dumps(event))
                self._dropped = False
            while self._pending:
                # taken off before sending: a publish queueing meanwhile appends behind it
                message = self._pending.popleft()
                try:
                    await self.redis.publish(self.channel, message)
                except BaseException:
                    # not sent (or not known to be): first again, ahead of anything newer
                    if len(self._pending) == self._pending.maxlen:
                        self._dropped = True  # appendleft pushes the newest out
                    self._pending.appendleft(message)
                    raise


def _stage(exc: BaseException) -> str:
    """Where `exc` was raised, as `module.function`: a fixed code, never its message."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown"
    frame = tb.tb_frame
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}"
