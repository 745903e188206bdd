"""Tenant registry: site keys resolved and policies compiled once per version, cached."""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID

from gateway import store
from gateway.crypto import token_hash
from gateway.db import Pool, lookup_tx, tenant_tx
from policies import CompiledPolicy, Policy, compile_policy, parse_policy

SITE_KEY_TTL = 30.0
SITE_CACHE = 10_000
# A policy change reaches other processes over the bus at once. Should that notice be
# lost (the writer died between its commit and the publish), a cached policy older than
# this is read again in the background while it keeps answering: the backstop.
POLICY_RECHECK = 30.0

log = logging.getLogger(__name__)


class TenantRegistry:
    """Per-process cache; `invalidate` is called locally and from Redis pub/sub.

    A read that was already waiting on the database when `invalidate` ran may hold the
    record the change replaced: it answers its own caller but is not cached. Every
    invalidation bumps `_generation`; a read caches only if it did not move meanwhile.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._sites: dict[bytes, tuple[UUID | None, float]] = {}
        self._policies: dict[UUID, CompiledPolicy] = {}
        self._read_at: dict[UUID, float] = {}
        self._rechecks: dict[UUID, asyncio.Task[CompiledPolicy]] = {}
        # one counter for all tenants: invalidations are rare, and a read that races
        # another tenant's merely goes uncached (read again next time), never wrong
        self._generation = 0

    async def resolve_site(self, site_key: str) -> UUID | None:
        """The tenant of a widget site key, cached briefly (also negative answers)."""
        h = token_hash(site_key)
        hit = self._sites.get(h)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        generation = self._generation
        async with lookup_tx(self.pool, h) as conn:
            tenant_id = await store.tenant_for_site_key(conn, h)
        if generation != self._generation:
            return tenant_id  # a key revoked meanwhile must not be cached as valid
        self._sites.pop(h, None)
        self._sites[h] = (tenant_id, now + SITE_KEY_TTL)
        while len(self._sites) > SITE_CACHE:
            # oldest first: random unknown keys cannot wipe the cache of the real ones
            del self._sites[next(iter(self._sites))]
        return tenant_id

    async def policy(self, tenant_id: UUID) -> CompiledPolicy:
        """The tenant's current compiled policy; compiled once per version."""
        cp = self._policies.get(tenant_id)
        if cp is not None:
            if time.monotonic() - self._read_at[tenant_id] > POLICY_RECHECK:
                self._recheck(tenant_id)
            return cp
        return await self._load(tenant_id)

    def _recheck(self, tenant_id: UUID) -> None:
        if tenant_id in self._rechecks:
            return
        task = asyncio.create_task(self._load(tenant_id))
        self._rechecks[tenant_id] = task
        task.add_done_callback(lambda t: self._rechecked(tenant_id, t))

    def _rechecked(self, tenant_id: UUID, task: asyncio.Task[CompiledPolicy]) -> None:
        del self._rechecks[tenant_id]
        # A read that was installed already restarted the interval (`install`). One thrown
        # away because a policy changed meanwhile (maybe another tenant's) leaves the
        # cached policy as stale as before: the next message rechecks again.
        failed = task.cancelled() or task.exception() is not None
        if failed and tenant_id in self._read_at:
            # the next recheck in POLICY_RECHECK: a database that is down is not tried
            # again by every message
            self._read_at[tenant_id] = time.monotonic()
        if not task.cancelled() and task.exception() is not None:
            # the cached policy keeps answering; the next recheck tries again
            log.warning("policy recheck failed", extra={"kind": type(task.exception()).__name__})

    async def _load(self, tenant_id: UUID) -> CompiledPolicy:
        generation = self._generation
        async with tenant_tx(self.pool, tenant_id) as conn:
            row = await store.latest_policy(conn, tenant_id)
        if row is None:
            version, policy = 0, Policy()
        else:
            version, policy = row[0], parse_policy(row[1])
        cp = compile_policy(policy, version)
        if generation == self._generation:
            self.install(tenant_id, cp)
        # else the policy changed while we read: `cp` may be the replaced one, fine for
        # this call (it began before the change) but not to keep; a later read caches
        return self._policies.get(tenant_id, cp)

    def install(self, tenant_id: UUID, cp: CompiledPolicy) -> None:
        """Install a newer compiled policy (never replaces a newer one with an older one;
        the same version read again keeps the compiled one and counts as fresh)."""
        current = self._policies.get(tenant_id)
        if current is not None and current.version > cp.version:
            return
        if current is None or current.version < cp.version:
            self._policies[tenant_id] = cp
        self._read_at[tenant_id] = time.monotonic()

    def invalidate(self, tenant_id: UUID | None = None) -> None:
        """Forget cached policy and site keys (one tenant, or all), and reads in flight."""
        self._generation += 1
        if tenant_id is None:
            self._policies.clear()
            self._read_at.clear()
        else:
            self._policies.pop(tenant_id, None)
            self._read_at.pop(tenant_id, None)
        self._sites.clear()
