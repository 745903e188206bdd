"""Claims on replies: at most one reply is generated at a time for a stored message.

A message re-sent while its reply still streams (the widget reconnected before the
server saw its old socket drop, a second tab, two overlapping fallback POSTs) must
not get a second reply. Whoever generates a reply holds its claim from before the
message is stored until the reply is stored, fails or is cancelled; a claim also
ends by itself after its lease, so a process that dies holding one blocks nothing
for longer than that.

Claims are shared through Redis when it is configured (several processes may serve
one session): one `SET NX PX` to take, one compare-and-delete to release. Without
Redis, and while it does not answer, this process's own table decides, as the rate
limits degrade (docs/scaling.md). Keys arrive anonymized from the caller (internal
ids and keyed hashes) and are never logged.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from redis.asyncio import Redis

from gateway.redisconn import REDIS_ERRORS

CLAIM_KEY_PREFIX = "og:reply:"
# A claim in Redis lives this long unless its holder renews it, which it does every
# third of it while the reply streams: a process that dies holding one (SIGKILL, a lost
# host) blocks the message's re-send for at most this long, however long replies run.
REDIS_LEASE = 10.0
# after a Redis failure, claims stay local this long before Redis is tried again
REDIS_RETRY_AFTER = 1.0

# deletes the claim only if it is still the caller's (its lease may have ended and
# another caller taken it since)
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# extends the claim only if it is still the caller's
_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class ReplyClaims:
    """Take and release claims, in Redis when it answers, else in this process."""

    def __init__(self, redis: Redis | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._clock = clock
        self._local: dict[str, tuple[str, float]] = {}  # key -> (token, expiry)
        self._redis_retry_at = 0.0
        self._releasing: set[asyncio.Task[None]] = set()
        self._renewing: dict[str, asyncio.Task[None]] = {}

    def take_soon(self, key: str, lease: float) -> asyncio.Future[str | None]:
        """`take`, started now: with Redis its round trip overlaps the caller's next one
        (the message's insert); without, the answer is ready at once."""
        if self._redis is None:
            done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            done.set_result(self._take_local(key, secrets.token_hex(8), lease))
            return done
        return asyncio.ensure_future(self.take(key, lease))

    def release_soon(self, key: str, taking: asyncio.Future[str | None]) -> None:
        """Give up what `take_soon` took, once it is taken, without waiting for Redis:
        the caller's next message need not wait for this one's release."""
        if not taking.done():
            taking.add_done_callback(lambda f: self.release_soon(key, f))
            return
        if taking.cancelled() or taking.exception() is not None:
            return
        token = taking.result()
        if token is None:
            return
        if self._local.get(key, ("",))[0] == token or self._redis is None:
            self._release_local(key, token)
            return
        renewing = self._renewing.pop(key, None)
        if renewing is not None:
            renewing.cancel()
        task = asyncio.ensure_future(self.release(key, token))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def take(self, key: str, lease: float) -> str | None:
        """A token when the caller now holds the claim; None when another holds it."""
        token = secrets.token_hex(8)
        if self._redis is not None and self._clock() >= self._redis_retry_at:
            try:
                taken = await self._redis.set(
                    CLAIM_KEY_PREFIX + key, token, nx=True, px=int(min(lease, REDIS_LEASE) * 1000)
                )
            except REDIS_ERRORS:
                self._redis_retry_at = self._clock() + REDIS_RETRY_AFTER
            else:
                if not taken:
                    return None
                if lease > REDIS_LEASE:
                    renewing = asyncio.ensure_future(self._renew(key, token, lease))
                    self._renewing[key] = renewing
                return token
        return self._take_local(key, token, lease)

    async def release(self, key: str, token: str) -> None:
        """Give the claim up, if it is still the caller's."""
        if key in self._local:
            self._release_local(key, token)
            return
        if self._redis is None:
            return
        try:
            await self._redis.eval(_RELEASE_SCRIPT, 1, CLAIM_KEY_PREFIX + key, token)
        except REDIS_ERRORS:
            pass  # its lease ends it

    async def _renew(self, key: str, token: str, lease: float) -> None:
        """Extend a claim held in Redis while its holder lives, up to `lease` in all."""
        assert self._redis is not None
        until = self._clock() + lease
        try:
            while self._clock() + REDIS_LEASE / 3 < until:
                await asyncio.sleep(REDIS_LEASE / 3)
                try:
                    held = await self._redis.eval(
                        _RENEW_SCRIPT, 1, CLAIM_KEY_PREFIX + key, token, int(REDIS_LEASE * 1000)
                    )
                except REDIS_ERRORS:
                    continue  # tried again at the next third; the lease runs meanwhile
                if not held:
                    return  # lost (it ran out while Redis was away): nothing to keep
        finally:
            if self._renewing.get(key) is asyncio.current_task():
                del self._renewing[key]

    def _release_local(self, key: str, token: str) -> None:
        held = self._local.get(key)
        if held is not None and held[0] == token:
            del self._local[key]

    def _take_local(self, key: str, token: str, lease: float) -> str | None:
        now = self._clock()
        held = self._local.get(key)
        if held is not None and held[1] > now:
            return None
        if len(self._local) > 10_000:
            # released claims are deleted; only those of cancelled releases linger
            self._local = {k: c for k, c in self._local.items() if c[1] > now}
        self._local[key] = (token, now + lease)
        return token
