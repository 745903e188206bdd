"""HTTP routes for data-subject requests: visitor intake and the site owner's workflow."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import audit, dsr, metrics
from gateway.admin import (
    Admin,
    ApiError,
    admin_route,
    decode_cursor,
    encode_cursor,
    json_response,
    parse_uuid,
    read_json,
)
from gateway.appkeys import SERVICES
from gateway.crypto import CryptoError
from gateway.db import Pool, tenant_tx
from gateway.directory import tenant_ids
from gateway.erasure import Erased, SubjectNotFound, announce, erase_rows
from gateway.privacy_auth import error, json_body, require_visitor
from gateway.services import Services


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
        cipher = None
        if details is not None:
            try:
                cipher = await svc.vault.cipher(conn, who.tenant_id, who.subject_id)
            except CryptoError:
                error(401, "session_invalid", "the session is not valid")
        row = await dsr.create(conn, who.tenant_id, who.subject_id, regime, kind, details, cipher)
    # open sockets of this subject, on every process: a restriction stops processing,
    # an objection or opt-out revokes the tracking purposes, before their next message.
    # The request is committed: a handler cancelled now (its client gone, the shutdown
    # grace over) must not cancel telling them
    await asyncio.shield(dsr.publish_effects(svc.bus, who.tenant_id, who.subject_id, kind))
    return _json(dsr.public(dsr.opened(row, cipher, who.tenant_id)), status=201)


async def gdpr_request(request: web.Request) -> web.Response:
    """File a GDPR request: acknowledged within 48 hours, due in one month (30 days at most)."""
    return await _intake(request, "gdpr", dsr.GDPR_KINDS)


async def ccpa_request(request: web.Request) -> web.Response:
    """File a CCPA request: due in 45 days."""
    return await _intake(request, "ccpa", dsr.CCPA_KINDS)


def _uuid(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        error(404, "not_found", "no such request")


async def _opened(
    svc: Services, conn: asyncpg.Connection, tenant_id: UUID, rows: Sequence[asyncpg.Record]
) -> list[dict[str, Any]]:
    """Request rows with their sealed details opened under each subject's data key."""
    ciphers: dict[UUID, AESGCM | None] = {}
    for row in rows:
        subject_id = row["subject_id"]
        if subject_id is None or subject_id in ciphers or row["details"] is None:
            continue
        try:
            ciphers[subject_id] = await svc.vault.cipher(conn, tenant_id, subject_id)
        except CryptoError:
            ciphers[subject_id] = None
    return [dsr.opened(r, ciphers.get(r["subject_id"]), tenant_id) for r in rows]


async def _audit_details_read(
    conn: asyncpg.Connection, admin: Admin, docs: Sequence[dict[str, Any]]
) -> None:
    """Audit each request whose details (the visitor's own words) an admin response carries.

    Like `conversation.read`: one entry per request, in the response's transaction,
    before it is returned; no text in the entry. Details that are gone or do not open
    (the subject was erased) are not read, so they are not audited.
    """
    for doc in docs:
        if doc["details"] is not None:
            await audit.append(
                conn,
                admin.tenant_id,
                admin.actor,
                "request.details_read",
                f"request:{doc['request_id']}",
            )


async def request_status(request: web.Request) -> web.Response:
    """One of the visitor's own requests; anybody else's is a 404."""
    who = await require_visitor(request)
    request_id = _uuid(request.match_info["id"])
    svc = request.app[SERVICES]
    async with tenant_tx(svc.pool, who.tenant_id) as conn:
        row = await dsr.get(conn, who.tenant_id, request_id, who.subject_id)
        if row is None:
            error(404, "not_found", "no such request")
        (doc,) = await _opened(svc, conn, who.tenant_id, [row])
    return _json(dsr.public(doc))


@admin_route
async def admin_list(request: web.Request, admin: Admin) -> web.Response:
    """The tenant's requests, soonest due first; ?status=received|...|open|overdue|ack_overdue.

    Keyset-paginated like the conversation list: `cursor` is the previous page's
    `next_cursor` (null on the last page). Reading the visitors' details is audited
    (`request.details_read`, one per request returned).
    """
    status = request.query.get("status") or None
    if status is not None and status not in (*dsr.STATUSES, *dsr.FILTERS):
        raise ApiError(422, "bad_status", "unknown status filter")
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        raise ApiError(422, "bad_limit", "limit must be an integer") from None
    cursor = request.query.get("cursor")
    after = decode_cursor(cursor) if cursor else None
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        rows = await dsr.list_requests(conn, admin.tenant_id, status, limit + 1, after)
        page = rows[:limit]
        docs = await _opened(admin.svc, conn, admin.tenant_id, page)
        await _audit_details_read(conn, admin, docs)
    nxt = None
    if len(rows) > limit:
        nxt = encode_cursor(page[-1]["due_at"], page[-1]["request_id"])
    return json_response(
        {"requests": [dsr.public(d, admin=True) for d in docs], "next_cursor": nxt}
    )


@admin_route
async def admin_transition(request: web.Request, admin: Admin) -> web.Response:
    """POST .../{id}/acknowledge | extend {days, reason} | complete | reject {reason}.

    After the commit: a completed erasure is announced, and a rejected restriction
    request's subject has its open sockets read their state again (the rejection may
    have lifted the restriction).
    """
    request_id = parse_uuid(request.match_info["id"], "request")
    action = request.match_info["action"]
    body = await read_json(request)
    # validated before anything happens: completing an erasure request erases first
    for field in ("reason", "resolution"):
        value = body.get(field)
        if value is not None and not isinstance(value, str):
            raise ApiError(422, f"bad_{field}", f"{field} must be a string")
    svc, tenant_id = admin.svc, admin.tenant_id
    erased: Erased | None = None
    try:
        async with tenant_tx(svc.pool, tenant_id) as conn:
            if action == "complete":
                erased = await _fulfil_erasure(conn, tenant_id, request_id, admin.actor)
            row = await dsr.transition(
                conn,
                tenant_id,
                request_id,
                action,
                admin.actor,
                days=body.get("days"),
                reason=body.get("reason"),
                resolution=body.get("resolution"),
            )
            (doc,) = await _opened(svc, conn, tenant_id, [row])
            await _audit_details_read(conn, admin, [doc])
    except dsr.RequestError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    # committed: a handler cancelled now must not cancel telling every process
    await asyncio.shield(_announce_transition(svc, tenant_id, admin.actor, erased, row))
    return json_response(dsr.public(doc, admin=True))


async def _announce_transition(
    svc: Services, tenant_id: UUID, actor: str, erased: Erased | None, row: asyncpg.Record
) -> None:
    """After a transition committed: its erasure, then what it changed for open sockets."""
    if erased is not None:
        await announce(svc, tenant_id, actor, erased)
    await dsr.publish_outcome(svc.bus, tenant_id, row)


async def _fulfil_erasure(
    conn: asyncpg.Connection, tenant_id: UUID, request_id: UUID, actor: str
) -> Erased | None:
    """Completing an erasure/delete request erases its subject in the same transaction.

    So a completion that is refused (the request was rejected or completed meanwhile)
    rolls the erasure back with it. The erasure detaches the request, so the completion
    that follows stores no resolution.
    """
    row = await dsr.get(conn, tenant_id, request_id)
    if row is None or row["status"] not in dsr.OPEN:
        return None  # the transition reports it
    if row["kind"] not in ("erasure", "delete") or row["subject_id"] is None:
        return None
    try:
        return await erase_rows(conn, tenant_id, row["subject_id"], actor)
    except SubjectNotFound:
        return None


async def refresh_overdue(pool: Pool) -> int:
    """Publish the overdue and ack-overdue gauges (all tenants); returns the overdue count."""
    total = ack_total = 0
    for tenant_id in await tenant_ids(pool):
        async with tenant_tx(pool, tenant_id) as conn:
            overdue, ack_overdue = await dsr.overdue_counts(conn, tenant_id)
        total += overdue
        ack_total += ack_overdue
    metrics.PRIVACY_REQUESTS_OVERDUE.set(total)
    metrics.PRIVACY_REQUESTS_ACK_OVERDUE.set(ack_total)
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
