"""HTTP routes for data-subject requests: visitor intake and the site owner's workflow."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
from aiohttp import web

from gateway import bus, dsr, metrics
from gateway.appkeys import SERVICES
from gateway.db import Pool, tenant_tx
from gateway.directory import tenant_ids
from gateway.erasure import SubjectNotFound, erase_subject
from gateway.privacy_auth import error, json_body, require_admin, require_visitor


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(
        value, status=status, dumps=lambda v: orjson.dumps(v, default=str).decode()
    )


async def _intake(request: web.Request, regime: str, kinds: frozenset[str]) -> web.Response:
    who = await require_visitor(request)
    body = await json_body(request)
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        error(422, "unknown_kind", "unknown request kind", allowed=sorted(kinds))
    details = body.get("details")
    if details is not None and not isinstance(details, str):
        details = orjson.dumps(details).decode()
    if details is not None and len(details) > dsr.MAX_DETAILS:
        error(422, "too_large", f"details are limited to {dsr.MAX_DETAILS} characters")
    svc = request.app[SERVICES]
    async with tenant_tx(svc.pool, who.tenant_id) as conn:
        row = await dsr.create(conn, who.tenant_id, who.subject_id, regime, kind, details)
    if kind == "restriction":
        # open sockets of this subject, on every process, stop processing now
        await svc.bus.publish(
            bus.SUBJECT_RESTRICTED,
            {"tenant_id": str(who.tenant_id), "subject_id": str(who.subject_id)},
        )
    return _json(dsr.public(row), status=201)


async def gdpr_request(request: web.Request) -> web.Response:
    """File a GDPR request: acknowledged within 48 hours, due in 30 days."""
    return await _intake(request, "gdpr", dsr.GDPR_KINDS)


async def ccpa_request(request: web.Request) -> web.Response:
    """File a CCPA request: due in 45 days."""
    return await _intake(request, "ccpa", dsr.CCPA_KINDS)


def _uuid(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        error(404, "not_found", "no such request")


async def request_status(request: web.Request) -> web.Response:
    """One of the visitor's own requests; anybody else's is a 404."""
    who = await require_visitor(request)
    request_id = _uuid(request.match_info["id"])
    async with tenant_tx(request.app[SERVICES].pool, who.tenant_id) as conn:
        row = await dsr.get(conn, who.tenant_id, request_id, who.subject_id)
    if row is None:
        error(404, "not_found", "no such request")
    return _json(dsr.public(row))


async def admin_list(request: web.Request) -> web.Response:
    """The tenant's requests, soonest due first; ?status=received|acknowledged|...|open|overdue."""
    tenant_id, _ = await require_admin(request)
    status = request.query.get("status") or None
    if status is not None and status not in (*dsr.STATUSES, "open", "overdue"):
        error(422, "bad_status", "unknown status filter")
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        error(422, "bad_limit", "limit must be an integer")
    async with tenant_tx(request.app[SERVICES].pool, tenant_id) as conn:
        rows = await dsr.list_requests(conn, tenant_id, status, limit)
    return _json({"requests": [dsr.public(r, admin=True) for r in rows]})


async def admin_transition(request: web.Request) -> web.Response:
    """POST .../{id}/acknowledge | extend {days, reason} | complete | reject {reason}."""
    tenant_id, key_id = await require_admin(request)
    request_id = _uuid(request.match_info["id"])
    action = request.match_info["action"]
    body = await json_body(request)
    # validated before anything happens: completing an erasure request erases first
    for field in ("reason", "resolution"):
        value = body.get(field)
        if value is not None and not isinstance(value, str):
            error(422, f"bad_{field}", f"{field} must be a string")
    actor = f"admin:{key_id}"
    svc = request.app[SERVICES]
    try:
        if action == "complete":
            await _fulfil_erasure(request, tenant_id, request_id, actor)
        async with tenant_tx(svc.pool, tenant_id) as conn:
            row = await dsr.transition(
                conn,
                tenant_id,
                request_id,
                action,
                actor,
                days=body.get("days"),
                reason=body.get("reason"),
                resolution=body.get("resolution"),
            )
    except dsr.RequestError as exc:
        error(exc.status, exc.code, exc.message)
    return _json(dsr.public(row, admin=True))


async def _fulfil_erasure(
    request: web.Request, tenant_id: UUID, request_id: UUID, actor: str
) -> None:
    """Completing an erasure/delete request erases the subject first (certificate in the log)."""
    svc = request.app[SERVICES]
    async with tenant_tx(svc.pool, tenant_id) as conn:
        row = await dsr.get(conn, tenant_id, request_id)
    if row is None or row["status"] not in dsr.OPEN:
        return  # the transition reports it
    if row["kind"] in ("erasure", "delete") and row["subject_id"] is not None:
        try:
            await erase_subject(svc, tenant_id, row["subject_id"], actor)
        except SubjectNotFound:
            pass


async def refresh_overdue(pool: Pool) -> int:
    """Count open requests past due across tenants and publish it as the overdue gauge."""
    total = 0
    for tenant_id in await tenant_ids(pool):
        async with tenant_tx(pool, tenant_id) as conn:
            total += await dsr.overdue_count(conn, tenant_id)
    metrics.PRIVACY_REQUESTS_OVERDUE.set(total)
    return total


def setup_routes(app: web.Application) -> None:
    """Bind the request routes."""
    app.router.add_post("/api/gdpr/request", gdpr_request)
    app.router.add_get("/api/gdpr/request/{id}", request_status)
    app.router.add_post("/api/privacy/ccpa/request", ccpa_request)
    app.router.add_get("/api/admin/requests", admin_list)
    app.router.add_post(
        "/api/admin/requests/{id}/{action:acknowledge|extend|complete|reject}", admin_transition
    )
