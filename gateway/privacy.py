"""Visitor privacy API: consent, export, immediate erasure, certificate key, GPC."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from gateway import audit, bus, certs, export, metrics, openapi, requests_api, store
from gateway.appkeys import SERVICES
from gateway.crypto import CryptoError
from gateway.db import tenant_tx
from gateway.erasure import SubjectNotFound, erase_subject, subject_ref
from gateway.httpctx import clear_session_cookie, privacy_preflight
from gateway.privacy_auth import error, json_body, require_visitor
from gateway.visitor import consent_state
from policies import PURPOSES, UnknownPurpose, apply_consent_change

log = logging.getLogger("omnigate.privacy")

# Date of the last change to the GPC support statement below (RFC draft: lastUpdate).
GPC_LAST_UPDATE = "2025-01-01"


async def consent_get(request: web.Request) -> web.Response:
    """The visitor's consent per purpose (with consent_version) and the full history."""
    who = await require_visitor(request)
    svc = request.app[SERVICES]
    cp = await svc.tenants.policy(who.tenant_id)
    async with tenant_tx(svc.pool, who.tenant_id) as conn:
        return web.json_response(
            await _consent_doc(conn, who.tenant_id, who.subject_id, cp), dumps=_dumps
        )


async def _consent_doc(conn: Any, tenant_id: Any, subject_id: Any, cp: Any) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT purpose, granted, consent_version, policy_version, source, created_at "
        "FROM consents WHERE tenant_id = $1 AND subject_id = $2 ORDER BY consent_id",
        tenant_id,
        subject_id,
    )
    latest = {r["purpose"]: r for r in rows}
    state = consent_state(list(latest.values()), cp)
    purposes = {}
    for p in PURPOSES:
        r = latest.get(p)
        purposes[p] = {
            "granted": p in state.granted,
            "consent_version": r["consent_version"] if r else None,
            "at": r["created_at"] if r else None,
            "required": p in cp.policy.required_consents,
        }
    opt_out = await conn.fetchval(
        "SELECT tracking_opt_out FROM subjects WHERE tenant_id = $1 AND subject_id = $2",
        tenant_id,
        subject_id,
    )
    return {
        "consent_version": cp.policy.consent_version,
        "purposes": purposes,
        "tracking_opt_out": bool(opt_out),
        "history": [dict(r) for r in rows],
    }


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _purposes(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        error(422, "unknown_purpose", f"{field} must be a list of purposes")
    unknown = sorted(set(value) - set(PURPOSES) - {"necessary"})
    if unknown:
        error(422, "unknown_purpose", f"unknown purpose in {field}", allowed=list(PURPOSES))
    return [p for p in value if p != "necessary"]


async def consent_post(request: web.Request) -> web.Response:
    """Record grants and revocations (source 'api'); unknown purposes are a 422."""
    who = await require_visitor(request)
    body = await json_body(request)
    grant, revoke = _purposes(body.get("grant"), "grant"), _purposes(body.get("revoke"), "revoke")
    svc = request.app[SERVICES]
    cp = await svc.tenants.policy(who.tenant_id)
    async with tenant_tx(svc.pool, who.tenant_id) as conn:
        rows = await store.consent_rows(conn, who.tenant_id, who.subject_id)
        try:
            _, events = apply_consent_change(
                consent_state(rows, cp), grant, revoke, cp.policy.consent_version
            )
        except UnknownPurpose:
            error(422, "unknown_purpose", "unknown purpose")
        changes = [(e.purpose, e.granted) for e in events]
        if changes:
            await store.record_consents(
                conn,
                who.tenant_id,
                who.subject_id,
                who.session_id,
                changes,
                cp.version,
                cp.policy.consent_version,
                "api",
            )
        for purpose, granted in changes:
            metrics.count_consent(purpose, "granted" if granted else "revoked")
        doc = await _consent_doc(conn, who.tenant_id, who.subject_id, cp)
    if grant or revoke:
        # committed: the visitor's open sockets, on every process, apply it before their
        # next message (sent even when nothing changed here: a socket may have missed one)
        await bus.publish_consent(svc.bus, who.tenant_id, who.subject_id, revoke)
    return web.json_response(doc, dumps=_dumps)


async def export_get(request: web.Request) -> web.StreamResponse:
    """Everything held about the visitor, as one streamed JSON document (audited)."""
    who = await require_visitor(request)
    svc = request.app[SERVICES]
    cp = await svc.tenants.policy(who.tenant_id)
    async with tenant_tx(svc.pool, who.tenant_id) as conn:
        # the subject's hashed reference: a session id would tie the entry to the person
        await audit.append(
            conn,
            who.tenant_id,
            "visitor",
            "export",
            f"subject_ref:{subject_ref(who.tenant_id, who.subject_id)}",
        )
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/json",
            "Content-Disposition": 'attachment; filename="omnigate-export.json"',
            "Cache-Control": "no-store",
        }
    )
    # before the snapshot takes its connection (export.write_export says why); the
    # tenant's own upstream when it has one, even on an offline gateway
    upstream = await svc.upstream_for(who.tenant_id, cp)
    async with export.snapshot(svc.pool, who.tenant_id) as conn:
        try:
            # opening the key before the first byte: an erased subject is a clean 401
            await svc.vault.cipher(conn, who.tenant_id, who.subject_id)
        except CryptoError:
            error(401, "session_invalid", "the session is not valid")
        await response.prepare(request)
        try:
            await export.write_export(
                svc, conn, cp, upstream, who.tenant_id, who.subject_id, response.write
            )
        except Exception as exc:
            # The 200 is already sent: only cutting the connection before the body's end
            # tells the client the document is incomplete (it would wait otherwise).
            metrics.count_privacy_request("export", "failed")
            log.warning("export failed mid-stream", extra={"kind": type(exc).__name__})
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    metrics.count_privacy_request("export", "completed")
    return response


async def delete_post(request: web.Request) -> web.Response:
    """Erase the visitor at once; answers the signed deletion certificate."""
    who = await require_visitor(request)
    svc = request.app[SERVICES]
    try:
        cert = await erase_subject(svc, who.tenant_id, who.subject_id, "visitor")
    except SubjectNotFound:
        error(401, "session_invalid", "the session is not valid")
    response = web.json_response(cert)
    # the cookie names a session that no longer exists
    clear_session_cookie(response, svc)
    return response


async def certificate_key(request: web.Request) -> web.Response:
    """The public keys that verify deletion certificates (primary first)."""
    keys = certs.signing_keys(request.app[SERVICES].settings)
    primary = keys[0].public_json(True)
    return web.json_response(
        {**primary, "keys": [k.public_json(i == 0) for i, k in enumerate(keys)]}
    )


async def gpc_json(request: web.Request) -> web.Response:
    """The Global Privacy Control support resource."""
    return web.json_response({"gpc": True, "lastUpdate": GPC_LAST_UPDATE})


def setup_routes(app: web.Application) -> None:
    """Bind the privacy routes (and the request intake routes)."""
    app.router.add_get("/api/privacy/consent", consent_get)
    app.router.add_post("/api/privacy/consent", consent_post)
    app.router.add_get("/api/privacy/export", export_get)
    app.router.add_post("/api/privacy/delete", delete_post)
    app.router.add_get("/api/privacy/certificate-key", certificate_key)
    app.router.add_get("/.well-known/gpc.json", gpc_json)
    for path in (
        "/api/privacy/consent",
        "/api/privacy/export",
        "/api/privacy/delete",
        "/api/gdpr/request",
        "/api/gdpr/request/{id}",
        "/api/privacy/ccpa/request",
    ):
        app.router.add_route("OPTIONS", path, privacy_preflight)
        openapi.describe(
            "OPTIONS",
            path,
            {
                "summary": "CORS preflight; the real request checks the tenant's origins",
                "responses": {
                    "204": {"description": "preflight answered"},
                    "403": {"description": "no or malformed Origin"},
                },
            },
        )
    requests_api.setup_routes(app)
