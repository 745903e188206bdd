"""Events every process must see: policy changes, erasures, data-key evictions.

In single-process mode (no Redis) `LocalBus` delivers immediately in-process.
A Redis-backed bus (pub/sub) delivers the same events to every process and
instance, including the one that published.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("omnigate.bus")

Handler = Callable[[dict[str, Any]], Awaitable[None]]

# The closed set of event kinds.
POLICY_CHANGED = "policy"
SUBJECT_ERASED = "erase"
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
