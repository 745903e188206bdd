"""Analytics events: coarse, only with analytics consent, never under DNT or GPC."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.db import tenant_tx
from gateway.services import Services
from gateway.visitor import Visitor
from policies import effective_purposes, page_path, referrer_origin


def analytics_allowed(v: Visitor) -> bool:
    """Analytics consent granted now, no DNT/GPC switching it off, and processing not
    restricted at the visitor's request (GDPR Art. 18)."""
    return not v.restricted and "analytics" in effective_purposes(v.consent, v.signals)


async def record_page_view(
    svc: Services, v: Visitor, context: Mapping[str, Any] | None, client: Mapping[str, Any]
) -> bool:
    """Store one page view (path, referrer origin, coarse browser); False when not allowed."""
    if not context or not analytics_allowed(v):
        return False
    page = context.get("page")
    ref = context.get("referrer")
    path = page_path(page) if isinstance(page, str) else None
    origin = referrer_origin(ref) if isinstance(ref, str) else None
    async with tenant_tx(svc.pool, v.tenant_id) as conn:
        opted_out = await conn.fetchval(
            "SELECT tracking_opt_out FROM subjects WHERE tenant_id = $1 AND subject_id = $2",
            v.tenant_id,
            v.subject_id,
        )
        if opted_out:
            return False
        await conn.execute(
            "INSERT INTO analytics_events (tenant_id, subject_id, page_path, referrer_origin,"
            " browser_family, browser_major, device_class) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            v.tenant_id,
            v.subject_id,
            path,
            origin,
            client.get("browser_family"),
            client.get("browser_major"),
            client.get("device_class"),
        )
    return True
