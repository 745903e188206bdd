"""A page view is stored only while analytics consent holds in the record, as of the insert:
a withdrawal that lands while the hello is being processed stops that hello's page view,
whatever the connection still holds in memory."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from gateway import connection
from gateway.analytics import record_page_view
from gateway.appkeys import SERVICES
from gateway.provision import NewTenant
from gateway.services import Services
from gateway.visitor import RequestContext, Visitor
from policies import CompiledPolicy
from tests.conftest import Gateway, hello
from tests.support import call

pytestmark = pytest.mark.timeout(60)

PAGE = {"page": "/pricing", "referrer": "https://search.example/?q=x"}


async def page_views(owner_pool: asyncpg.Pool, tenant_id: UUID) -> list[str]:
    rows = await owner_pool.fetch(
        "SELECT page_path FROM analytics_events WHERE tenant_id = $1 ORDER BY event_id", tenant_id
    )
    return [r["page_path"] for r in rows]


async def revoke_analytics(g: Gateway, token: str) -> None:
    """The visitor withdraws analytics through the privacy API (another tab, say)."""
    status, _ = await call(
        g,
        "POST",
        "/api/privacy/consent",
        None,
        json={"revoke": ["analytics"]},
        headers={"Authorization": f"Session {token}"},
    )
    assert status == 200


async def settled(ws: Any) -> None:
    """The hello's page view is written before its socket answers the next frame."""
    await ws.send_json({"type": "ping"})
    assert (await ws.receive_json(timeout=5))["type"] == "pong"


async def test_revocation_during_hello_stops_its_page_view(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = offline_gateway
    real = connection.open_session

    async def open_then_revoke(
        svc: Services,
        tenant_id: UUID,
        cp: CompiledPolicy,
        ctx: RequestContext,
        data: dict[str, Any],
    ) -> Visitor:
        v = await real(svc, tenant_id, cp, ctx, data)
        # the visitor withdraws analytics in the privacy panel of another tab meanwhile:
        # the connection is not yet live, so only the record knows
        await revoke_analytics(g, v.token)
        return v

    monkeypatch.setattr(connection, "open_session", open_then_revoke)
    ws = await g.ws(tenant.site_key)
    await hello(ws, consent={"analytics": True}, context=PAGE)
    await settled(ws)
    await ws.close()
    assert await page_views(owner_pool, tenant.tenant_id) == []


async def test_a_hello_with_analytics_records_its_page_view(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws, consent={"analytics": True}, context=PAGE)
    await settled(ws)
    await ws.close()
    assert await page_views(owner_pool, tenant.tenant_id) == ["/pricing"]


async def test_the_record_decides_as_of_the_insert(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    """The connection still holds an analytics grant; the record is what counts: a grant
    under another consent_version, a restriction or a refusal stores nothing."""
    g = offline_gateway
    svc = g.server.app[SERVICES]
    ws = await g.ws(tenant.site_key)
    await hello(ws, consent={"analytics": True})
    await settled(ws)
    [(_, subject_id)] = [k for k in svc.live if k[0] == tenant.tenant_id]
    live = svc.live[(tenant.tenant_id, subject_id)][0].visitor
    assert live is not None and "analytics" in live.consent.granted
    v = replace(live)  # what the connection held: no event below reaches this copy
    cp = await svc.tenants.policy(tenant.tenant_id)

    assert await record_page_view(svc, v, cp, {"page": "/a"}, {})
    # the owner raised consent_version: the recorded grant went stale
    newer = replace(cp, policy=replace(cp.policy, consent_version=cp.policy.consent_version + 1))
    assert not await record_page_view(svc, v, newer, {"page": "/b"}, {})
    # processing restricted at the visitor's request (GDPR Art. 18)
    sql = "UPDATE subjects SET restricted = $2 WHERE subject_id = $1"
    await owner_pool.execute(sql, subject_id, True)
    assert not await record_page_view(svc, v, cp, {"page": "/c"}, {})
    await owner_pool.execute(sql, subject_id, False)
    assert await record_page_view(svc, v, cp, {"page": "/d"}, {})
    # withdrawn elsewhere, the event not yet applied to what the connection holds
    await revoke_analytics(g, v.token)
    assert "analytics" in v.consent.granted
    assert not await record_page_view(svc, v, cp, {"page": "/e"}, {})
    await ws.close()
    assert await page_views(owner_pool, tenant.tenant_id) == ["/a", "/d"]
