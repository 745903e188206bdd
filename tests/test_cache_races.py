"""A cache fill racing an invalidation must not install what the change replaced.

Each test holds a real database read of a cache in the middle (after its transaction,
before the result is cached), changes the record and invalidates the cache while it
waits, then lets the read finish: the cache must serve the new record afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest

from gateway import services as services_module
from gateway import tenants as tenants_module
from gateway.app import build_services
from gateway.config import Settings
from gateway.db import lookup_tx, tenant_tx
from gateway.provision import NewTenant
from gateway.services import Services
from gateway.tenants import TenantRegistry
from gateway.upstream import OfflineModel
from policies import Policy, compile_policy
from tests.conftest import Database
from tests.support import ORIGIN, set_policy, until

NEW_ORIGIN = "https://new.example"

TxFactory = Callable[..., AbstractAsyncContextManager[asyncpg.Connection]]


class Gate:
    """Wraps a transaction factory; holds its first use after the transaction, until opened."""

    def __init__(self, tx: TxFactory) -> None:
        self.tx = tx
        self.read = asyncio.Event()  # the held read has its (now old) answer
        self.release = asyncio.Event()
        self.used = False

    @asynccontextmanager
    async def __call__(self, *args: Any) -> AsyncIterator[asyncpg.Connection]:
        held, self.used = not self.used, True
        async with self.tx(*args) as conn:
            yield conn
        if held:
            self.read.set()
            await self.release.wait()

    async def race(self, load: asyncio.Task[Any], change: Callable[[], Any]) -> None:
        """Run `change` (a coroutine function) while `load` waits with its answer."""
        await asyncio.wait_for(self.read.wait(), 5)
        await change()
        self.release.set()
        await asyncio.wait_for(load, 5)


@pytest.fixture
def gated_tenant_tx(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate(tenant_tx)
    monkeypatch.setattr(tenants_module, "tenant_tx", gate)
    monkeypatch.setattr(services_module, "tenant_tx", gate)
    return gate


# --- policy ------------------------------------------------------------------------


@pytest.mark.parametrize("everything", [False, True], ids=["tenant", "all"])
async def test_policy_changed_during_a_load_is_not_cached_old(
    app_pool: asyncpg.Pool, tenant: NewTenant, gated_tenant_tx: Gate, everything: bool
) -> None:
    registry = TenantRegistry(app_pool)
    load = asyncio.create_task(registry.policy(tenant.tenant_id))

    async def change() -> None:
        # the old origin is removed and a consent rule added, as an admin's PUT would
        await set_policy(
            app_pool, tenant, 2, allowed_origins=[NEW_ORIGIN], required_consents=["ai_processing"]
        )
        registry.invalidate(None if everything else tenant.tenant_id)

    await gated_tenant_tx.race(load, change)
    assert load.result().version == 1  # read before the change: fine for that one call

    cp = await registry.policy(tenant.tenant_id)
    assert cp.version == 2
    assert not cp.origin_allowed(ORIGIN) and cp.origin_allowed(NEW_ORIGIN)
    assert "ai_processing" in cp.required
    assert await registry.policy(tenant.tenant_id) is cp  # and that one is cached


async def test_a_change_to_another_tenant_costs_at_most_one_more_read(
    app_pool: asyncpg.Pool, tenant: NewTenant, gated_tenant_tx: Gate
) -> None:
    registry = TenantRegistry(app_pool)
    load = asyncio.create_task(registry.policy(tenant.tenant_id))

    async def change() -> None:
        registry.invalidate(UUID(int=0))  # another tenant's change

    await gated_tenant_tx.race(load, change)
    # a change elsewhere may cost one more read, never a wrong answer; a quiet load caches
    again = await registry.policy(tenant.tenant_id)
    assert again.version == 1
    assert await registry.policy(tenant.tenant_id) is again


async def test_newer_installed_policy_is_not_replaced_by_an_older_load(
    app_pool: asyncpg.Pool, tenant: NewTenant, gated_tenant_tx: Gate
) -> None:
    registry = TenantRegistry(app_pool)
    load = asyncio.create_task(registry.policy(tenant.tenant_id))
    newer = compile_policy(Policy(allowed_origins=(NEW_ORIGIN,)), 2)

    async def change() -> None:
        await set_policy(app_pool, tenant, 2, allowed_origins=[NEW_ORIGIN])
        registry.install(tenant.tenant_id, newer)  # what PUT /api/admin/policy does first

    await gated_tenant_tx.race(load, change)
    assert await registry.policy(tenant.tenant_id) is newer


# --- the tenant's own upstream -----------------------------------------------------------


async def _set_upstream(svc: Services, tenant_id: UUID, cfg: dict[str, Any] | None) -> None:
    sealed = None
    if cfg is not None:
        sealed = svc.keyring.seal_secret(tenant_id, "upstream", orjson.dumps(cfg))
    async with tenant_tx(svc.pool, tenant_id) as conn:
        await conn.execute(
            "UPDATE tenants SET upstream_sealed = $2 WHERE tenant_id = $1", tenant_id, sealed
        )


OLD = {"api_key": "sk-old-0000", "base_url": "https://old.example/v1", "model": "m-old"}
NEW = {"api_key": "sk-new-1111", "base_url": "https://new.example/v1", "model": "m-new"}


@pytest.fixture
async def svc(settings: Settings, app_pool: asyncpg.Pool) -> AsyncIterator[Services]:
    s = build_services(settings, app_pool, OfflineModel(), None)
    yield s
    await s.aclose()


@pytest.mark.parametrize("everything", [False, True], ids=["tenant", "all"])
@pytest.mark.parametrize("after", [None, NEW], ids=["deleted", "rotated"])
async def test_upstream_changed_during_a_load_is_not_cached_old(
    svc: Services,
    tenant: NewTenant,
    gated_tenant_tx: Gate,
    after: dict[str, Any] | None,
    everything: bool,
) -> None:
    tid = tenant.tenant_id
    cp = compile_policy(Policy(), 1)
    await _set_upstream(svc, tid, OLD)
    load = asyncio.create_task(svc.upstream_for(tid, cp))

    async def change() -> None:
        await _set_upstream(svc, tid, after)
        svc.forget_upstream(None if everything else tid)

    await gated_tenant_tx.race(load, change)
    old = load.result()
    assert old is not None and old.api_key == OLD["api_key"]  # read before the change

    own = await svc.upstream_for(tid, cp)
    if after is None:
        assert own is None  # the gateway's (none configured here), not the deleted one
    else:
        assert own is not None
        assert (own.api_key, own.base_url) == (NEW["api_key"], NEW["base_url"])
    assert tid in svc.byo and svc.byo[tid] == own  # the fresh one is cached


async def test_upstream_load_without_a_change_is_cached(
    svc: Services, tenant: NewTenant, gated_tenant_tx: Gate
) -> None:
    tid = tenant.tenant_id
    await _set_upstream(svc, tid, OLD)
    load = asyncio.create_task(svc.upstream_for(tid, compile_policy(Policy(), 1)))

    async def change() -> None:
        pass

    await gated_tenant_tx.race(load, change)
    cached = svc.byo[tid]
    assert cached is not None and cached.api_key == OLD["api_key"]


# --- site keys ---------------------------------------------------------------------


async def test_site_key_revoked_during_a_lookup_is_not_cached(
    app_pool: asyncpg.Pool, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(lookup_tx)
    monkeypatch.setattr(tenants_module, "lookup_tx", gate)
    registry = TenantRegistry(app_pool)
    load = asyncio.create_task(registry.resolve_site(tenant.site_key))

    async def change() -> None:
        async with tenant_tx(app_pool, tenant.tenant_id) as conn:
            await conn.execute(
                "UPDATE site_keys SET revoked_at = now() WHERE tenant_id = $1", tenant.tenant_id
            )
        registry.invalidate(tenant.tenant_id)

    await gate.race(load, change)
    assert load.result() == tenant.tenant_id
    assert await registry.resolve_site(tenant.site_key) is None


async def test_a_lost_change_notice_is_caught_by_the_recheck(
    app_pool: asyncpg.Pool, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = TenantRegistry(app_pool)
    first = await registry.policy(tenant.tenant_id)
    # another process stored version 2 and died before announcing it: no invalidate here
    await set_policy(app_pool, tenant, 2, allowed_origins=[NEW_ORIGIN])
    assert await registry.policy(tenant.tenant_id) is first  # fresh: no read
    monkeypatch.setattr(tenants_module, "POLICY_RECHECK", 0.0)
    assert await registry.policy(tenant.tenant_id) is first  # stale: answers, reads behind
    for _ in range(100):
        cp = await registry.policy(tenant.tenant_id)
        if cp.version == 2:
            break
        await asyncio.sleep(0.01)
    assert cp.version == 2 and cp.origin_allowed(NEW_ORIGIN)
    monkeypatch.setattr(tenants_module, "POLICY_RECHECK", 30.0)
    assert await registry.policy(tenant.tenant_id) is cp  # the same version stays cached


async def test_a_failed_recheck_waits_its_interval_before_the_next(
    app_pool: asyncpg.Pool,
    database: Database,
    tenant: NewTenant,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = TenantRegistry(app_pool)
    first = await registry.policy(tenant.tenant_id)
    down = await asyncpg.create_pool(database.app_url, min_size=0)
    await down.close()  # PostgreSQL unreachable, as far as this registry can tell
    registry.pool = down
    monkeypatch.setattr(tenants_module, "POLICY_RECHECK", 0.2)
    await asyncio.sleep(0.25)
    with caplog.at_level("WARNING", logger="gateway.tenants"):
        assert await registry.policy(tenant.tenant_id) is first  # answers; rechecks behind
        await until(lambda: not registry._rechecks)
        for _ in range(20):  # every message meanwhile: no second attempt
            assert await registry.policy(tenant.tenant_id) is first
        assert not registry._rechecks
    failed = [r for r in caplog.records if r.getMessage() == "policy recheck failed"]
    assert len(failed) == 1


async def test_a_recheck_thrown_away_by_another_change_is_tried_again_at_once(
    app_pool: asyncpg.Pool, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recheck whose answer is not cached (another tenant's policy changed while it read)
    found nothing out: the policy it checked is as stale as before, so the next message
    rechecks again instead of serving it for another interval."""
    tid = tenant.tenant_id
    registry = TenantRegistry(app_pool)
    first = await registry.policy(tid)
    # another process stored version 2 and its notice was lost (Redis down)
    await set_policy(app_pool, tenant, 2, allowed_origins=[NEW_ORIGIN])
    registry._read_at[tid] -= tenants_module.POLICY_RECHECK + 1  # due for its recheck
    gate = Gate(tenant_tx)
    monkeypatch.setattr(tenants_module, "tenant_tx", gate)
    assert await registry.policy(tid) is first  # answers; rechecks behind, held by the gate
    recheck = registry._rechecks[tid]

    async def change() -> None:
        registry.invalidate(UUID(int=0))  # another tenant's change

    await gate.race(recheck, change)
    await until(lambda: tid not in registry._rechecks)
    assert registry._policies[tid] is first  # the recheck's answer was not cached
    assert await registry.policy(tid) is first  # still stale: answers, and...
    assert tid in registry._rechecks  # ...reads again now, not an interval later
    await until(lambda: tid not in registry._rechecks)
    cp = await registry.policy(tid)
    assert cp.version == 2 and cp.origin_allowed(NEW_ORIGIN)
    assert tid not in registry._rechecks  # fresh again: no further read
