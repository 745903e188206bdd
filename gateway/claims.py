"""Claims on replies: at most one reply is generated at a time for a stored message.

A message re-sent while its reply still streams (the widget reconnected before the
server saw its old socket drop, a second tab, two overlapping fallback POSTs) must
not get a second reply. Whoever generates a reply holds its claim from before the
message is stored until the reply is stored, fails or is cancelled.

With Redis the claim is taken in the message's rate-limit call (gateway/ratelimit.py:
one script, one round trip, as before claims existed): `SET NX` with a lease of
`REDIS_LEASE`, renewed while the reply streams, so a process that dies holding one
(SIGKILL, a lost host) blocks the re-send for at most that long. A reply that was
stored needs no release: a re-send finds it in storage, whoever holds the claim, and
the claim runs out by itself; only a reply that failed gives its claim back (one
compare-and-delete). Without Redis, and while it does not answer (the rate limits are
then per process too), this process's own table decides. Keys arrive anonymized from
the caller (internal ids and keyed hashes) and are never logged.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from gateway.redisconn import REDIS_ERRORS

CLAIM_KEY_PREFIX = "og:reply:"
# A claim in Redis lives this long unless its holder renews it, which it does every
# third of it while the reply streams.
REDIS_LEASE = 10.0

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


@dataclass(slots=True)
class Claim:
    """One message's claim on its reply. `key` carries its tenant as the Redis hash tag
    (`{tenant}:...`), so it shares a Cluster slot with the message's buckets."""

    key: str
    token: str
    client_ref: bytes = b""  # the message's keyed id hash, as stored
    # set by a rate limiter that takes it in Redis (True: taken, False: held by another);
    # None until then, and while Redis is away: then this process's table decides
    taken: bool | None = None
    shared: bool = False  # taken in Redis (else in this process's table)
    taken_at: float = 0.0  # when the limiter took it in Redis (time.monotonic)
    answered: bool = False  # its reply is in storage: nothing to give back
    renewal: asyncio.TimerHandle | asyncio.Task[None] | None = None

    @property
    def redis_key(self) -> str:
        return CLAIM_KEY_PREFIX + self.key

    @property
    def lease_ms(self) -> int:
        return int(REDIS_LEASE * 1000)


class ReplyClaims:
    """This process's side of the claims: its own table, renewals and releases."""

    def __init__(self, redis: Redis | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._clock = clock
        self._local: dict[str, tuple[str, float]] = {}  # key -> (token, expiry)
        self._background: set[asyncio.Task[None]] = set()

    @staticmethod
    def new(key: str) -> Claim:
        """A claim to take with the message's rate-limit call."""
        return Claim(key, secrets.token_hex(8))

    async def settle(self, claim: Claim, limit: float) -> bool:
        """Whether the caller holds `claim`, taking it here if no limiter took it in
        Redis; a claim taken in Redis is renewed while held, for at most `limit` s."""
        if claim.taken is not None:
            if claim.taken and self._redis is not None:
                held_for = self._clock() - claim.taken_at
                if held_for >= REDIS_LEASE / 2:
                    # the message took long to get here (a redaction in the helper):
                    # its lease may have run out, and another may hold the claim now
                    claim.taken = await self._renew_once(claim)
                if claim.taken:
                    claim.renewal = asyncio.get_running_loop().call_later(
                        max(0.0, REDIS_LEASE / 3 - held_for),
                        self._start_renewal,
                        claim,
                        self._clock() + limit,
                    )
            return claim.taken
        now = self._clock()
        held = self._local.get(claim.key)
        if held is not None and held[1] > now:
            claim.taken = False
            return False
        if len(self._local) > 10_000:
            self._local = {k: c for k, c in self._local.items() if c[1] > now}
        self._local[claim.key] = (claim.token, now + limit)
        claim.taken = True
        return True

    def release(self, claim: Claim) -> None:
        """Done with `claim`: given back unless its reply is stored (see the module);
        never waits (a Redis release goes out in the background)."""
        if not claim.taken:
            return
        if claim.renewal is not None:
            claim.renewal.cancel()
            claim.renewal = None
        if not claim.shared:
            held = self._local.get(claim.key)
            if held is not None and held[0] == claim.token:
                del self._local[claim.key]
        elif not claim.answered and self._redis is not None:
            self._spawn(self._release(claim))

    async def _release(self, claim: Claim) -> None:
        assert self._redis is not None
        try:
            await self._redis.eval(_RELEASE_SCRIPT, 1, claim.redis_key, claim.token)
        except REDIS_ERRORS:
            pass  # its lease ends it

    def _start_renewal(self, claim: Claim, until: float) -> None:
        task = self._spawn(self._renew(claim, until))
        claim.renewal = task

    async def _renew_once(self, claim: Claim) -> bool:
        """Extend the claim's lease if it is still the caller's; whether it is (a Redis
        that does not answer is taken to leave it held: its lease runs meanwhile)."""
        assert self._redis is not None
        try:
            return bool(
                await self._redis.eval(
                    _RENEW_SCRIPT, 1, claim.redis_key, claim.token, claim.lease_ms
                )
            )
        except REDIS_ERRORS:
            return True

    async def _renew(self, claim: Claim, until: float) -> None:
        """Extend the claim every third of its lease while held, up to `until`."""
        while True:
            if not await self._renew_once(claim) or self._clock() + REDIS_LEASE / 3 >= until:
                return  # lost (it ran out while Redis was away), or held long enough
            await asyncio.sleep(REDIS_LEASE / 3)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
