"""Analytics events: coarse, only with analytics consent, never under DNT or GPC."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.db import tenant_tx
from gateway.services import Services
from gateway.visitor import Visitor
from policies import CompiledPolicy, effective_purposes, page_path, referrer_origin


def analytics_allowed(v: Visitor) -> bool:
    """Analytics consent granted now, no DNT/GPC switching it off, and processing not
    restricted at the visitor's request (GDPR Art. 18)."""
    return not v.restricted and "analytics" in effective_purposes(v.consent, v.signals)


# One statement, so the record it checks is the one it writes beside: a withdrawal, a
# restriction or an opt-out committed before it (one that landed while the hello was
# being processed, say) stops the page view, whatever this connection still holds in
# memory. The analytics decision is the subject's latest `analytics` row, as
# `visitor.consent_state` reads it: a grant counts only under the current
# consent_version; a refusal, a stale grant or no row at all is no consent.
_INSERT_IF_CONSENTED = """
INSERT INTO analytics_events (tenant_id, subject_id, page_path, referrer_origin,
                              browser_family, browser_major, device_class)
SELECT s.tenant_id, s.subject_id, $3::text, $4::text, $5::text, $6::integer, $7::text
FROM subjects s
WHERE s.tenant_id = $1::uuid AND s.subject_id = $2::uuid
  AND NOT s.tracking_opt_out AND NOT s.restricted
  AND (SELECT c.granted AND c.consent_version = $8::integer
       FROM consents c
       WHERE c.tenant_id = $1::uuid AND c.subject_id = $2::uuid AND c.purpose = 'analytics'
       ORDER BY c.consent_id DESC LIMIT 1)
"""


async def record_page_view(
    svc: Services,
    v: Visitor,
    cp: CompiledPolicy,
    context: Mapping[str, Any] | None,
    client: Mapping[str, Any],
) -> bool:
    """Store one page view (path, referrer origin, coarse browser); False when not allowed.

    The connection's state decides first (DNT and GPC live only there); the record
    decides last, in the insert itself (consent, restriction, opt-out as committed).
    """
    if not context or not analytics_allowed(v):
        return False
    page = context.get("page")
    ref = context.get("referrer")
    path = page_path(page) if isinstance(page, str) else None
    origin = referrer_origin(ref) if isinstance(ref, str) else None
    async with tenant_tx(svc.pool, v.tenant_id) as conn:
        status = await conn.execute(
            _INSERT_IF_CONSENTED,
            v.tenant_id,
            v.subject_id,
            path,
            origin,
            client.get("browser_family"),
            client.get("browser_major"),
            client.get("device_class"),
            cp.policy.consent_version,
        )
    return bool(status == "INSERT 0 1")
