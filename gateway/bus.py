"""Events every process must see: policy changes, erasures, data-key evictions.

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
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway import metrics
from gateway.redisconn import REDIS_ERRORS

log = logging.getLogger("omnigate.bus")

Handler = Callable[[dict[str, Any]], Awaitable[None]]

# The closed set of event kinds.
POLICY_CHANGED = "policy"
SUBJECT_ERASED = "erase"
SUBJECT_RESTRICTED = "restrict"
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

    async def start(self) -> None:
        """Nothing to connect in-process."""

    async def close(self) -> None:
        """Nothing to release in-process."""


BUS_CHANNEL = "og:bus"
# Events published while Redis was away, re-sent once it answers again.
PENDING_MAX = 1000


def _invalidate_everything() -> list[tuple[str, dict[str, Any]]]:
    # While disconnected we may have missed any event: forget every cached
    # policy (tenant_id None means all tenants) and every cached data key.
    return [(POLICY_CHANGED, {"tenant_id": None}), (KEYS_ROTATED, {})]


class RedisBus(LocalBus):
    """Delivers events to the handlers of every process subscribed to `og:bus`.

    The publisher's own handlers run immediately on publish; receipt of its
    own message is skipped by origin, so nothing is handled twice and a single
    instance sees no added latency. The subscriber reconnects on its own and,
    after any gap, delivers `on_reconnect()`'s events locally (by default:
    invalidate all policies and data keys) since events may have been missed.
    """

    def __init__(
        self,
        redis: Redis,
        channel: str = BUS_CHANNEL,
        reconnect_delay: float = 1.0,
        on_reconnect: Callable[[], list[tuple[str, dict[str, Any]]]] = _invalidate_everything,
    ) -> None:
        super().__init__()
        self.redis = redis
        self.channel = channel
        self.reconnect_delay = reconnect_delay
        self.on_reconnect = on_reconnect
        self.origin = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.connected = asyncio.Event()
        self._pending: collections.deque[bytes] = collections.deque(maxlen=PENDING_MAX)
        self._task: asyncio.Task[None] | None = None

    async def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Deliver here now, then to every other process through Redis."""
        await self.deliver(kind, payload)
        message = orjson.dumps({"kind": kind, "payload": payload, "origin": self.origin})
        try:
            await self._flush_pending()  # earlier events first, in order
            await self.redis.publish(self.channel, message)
        except REDIS_ERRORS as exc:
            # kept and re-sent with the next publish or on reconnect (others
            # invalidate their caches after a gap anyway)
            self._pending.append(message)
            log.warning(
                "redis unavailable, bus event queued for other processes",
                extra={"kind": kind, "error": type(exc).__name__},
            )

    async def start(self, wait: float = 1.0) -> None:
        """Start the subscriber; waits up to `wait` seconds for the first subscription."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="omnigate-bus")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), wait)

    async def close(self) -> None:
        """Stop the subscriber."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected.clear()

    async def _run(self) -> None:
        first = True
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
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
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._receive(message["data"])
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                if self.connected.is_set() or first:
                    log.warning(
                        "redis bus disconnected; retrying",
                        extra={"error": type(exc).__name__},
                    )
                    metrics.REDIS_UP.set(0)
                self.connected.clear()
                first = False
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
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
        while self._pending:
            await self.redis.publish(self.channel, self._pending[0])
            self._pending.popleft()
