"""Admin API: conversation metadata and audited transcripts, the audit log, erasure by user id."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web

from gateway import audit, identity, store
from gateway.admin import (
    MAX_PAGE,
    Admin,
    ApiError,
    admin_route,
    aware,
    bad_param,
    decode_cursor,
    encode_cursor,
    int_param,
    json_response,
    not_found,
    parse_uuid,
    read_json,
)
from gateway.crypto import CryptoError
from gateway.db import tenant_tx

MAX_TRANSCRIPT = 1000


def _time_param(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise bad_param(name, "must be an ISO 8601 timestamp with a time zone") from None
    if not aware(value):
        raise bad_param(
            name, "must be an ISO 8601 timestamp with a time zone, in years 1-9999 in UTC"
        )
    return value


_LIST = """
SELECT conversation_id, started_at, last_message_at, message_count,
       (anonymized_at IS NOT NULL OR subject_id IS NULL) AS anonymized
FROM conversations
WHERE tenant_id = $1
  AND ($2::timestamptz IS NULL OR last_message_at >= $2)
  AND ($3::timestamptz IS NULL OR last_message_at < $3)
  AND ($4::timestamptz IS NULL OR (last_message_at, conversation_id) < ($4, $5::uuid))
  AND ($6::uuid IS NULL OR subject_id = $6)
ORDER BY last_message_at DESC, conversation_id DESC
LIMIT $7
"""


@admin_route
async def list_conversations(request: web.Request, admin: Admin) -> web.Response:
    """Conversation metadata, newest activity first, keyset-paginated; never any text."""
    limit = int_param(request, "limit", 50, MAX_PAGE)
    since, until = _time_param(request, "since"), _time_param(request, "until")
    cursor = request.query.get("cursor")
    after_at, after_id = decode_cursor(cursor) if cursor else (None, None)
    subject = request.query.get("subject")
    subject_id = None
    if subject:
        try:
            subject_id = UUID(subject)
        except ValueError:
            raise bad_param("subject", "must be a subject id") from None
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        rows = await conn.fetch(
            _LIST, admin.tenant_id, since, until, after_at, after_id, subject_id, limit + 1
        )
    page = rows[:limit]
    items = [
        {
            "id": str(r["conversation_id"]),
            "started_at": r["started_at"].isoformat(),
            "last_message_at": r["last_message_at"].isoformat(),
            "message_count": r["message_count"],
            "anonymized": r["anonymized"],
        }
        for r in page
    ]
    nxt = None
    if len(rows) > limit:
        last = page[-1]
        nxt = encode_cursor(last["last_message_at"], last["conversation_id"])
    return json_response({"conversations": items, "next_cursor": nxt})


@admin_route
async def read_transcript(request: web.Request, admin: Admin) -> web.Response:
    """A decrypted transcript; the read is written to the audit log before anything returns."""
    cid = parse_uuid(request.match_info["conversation_id"], "conversation")
    svc = admin.svc
    async with tenant_tx(svc.pool, admin.tenant_id) as conn:
        conv = await conn.fetchrow(
            "SELECT subject_id, started_at, last_message_at, message_count, anonymized_at "
            "FROM conversations WHERE tenant_id = $1 AND conversation_id = $2",
            admin.tenant_id,
            cid,
        )
        if conv is None:
            raise not_found("conversation")
        await audit.append(
            conn, admin.tenant_id, admin.actor, "conversation.read", f"conversation:{cid}"
        )
        messages: list[dict[str, Any]] = []
        subject_id = conv["subject_id"]
        if subject_id is not None:
            try:
                cipher = await svc.vault.cipher(conn, admin.tenant_id, subject_id)
            except CryptoError:
                return _transcript(cid, conv, [])  # erased: nothing can be read, by design
            rows = await store.history(conn, admin.tenant_id, cid, None, MAX_TRANSCRIPT)
            for m in rows:
                item: dict[str, Any] = {
                    "seq": m.seq,
                    "role": m.role,
                    "text": None,
                    "at": m.created_at.isoformat(),
                    "status": m.status,
                    "reply_to": m.reply_to,
                }
                try:
                    item["text"] = svc.vault.open_text(
                        cipher, admin.tenant_id, cid, m.message_id, m.role, m.ciphertext
                    )
                except CryptoError:
                    # one damaged row must not hide the rest (nor roll back the audit entry)
                    item["unreadable"] = True
                messages.append(item)
    return _transcript(cid, conv, messages)


def _transcript(cid: UUID, conv: asyncpg.Record, messages: list[dict[str, Any]]) -> web.Response:
    return json_response(
        {
            "id": str(cid),
            "started_at": conv["started_at"].isoformat(),
            "last_message_at": conv["last_message_at"].isoformat(),
            "message_count": conv["message_count"],
            "anonymized": conv["anonymized_at"] is not None or conv["subject_id"] is None,
            "messages": messages,
        },
        headers={"Cache-Control": "no-store"},
    )


@admin_route
async def list_audit(request: web.Request, admin: Admin) -> web.Response:
    """Audit entries, newest first; `before` (a seq) pages back."""
    limit = int_param(request, "limit", 100, MAX_PAGE)
    before = int_param(request, "before", 2**62, 2**62) if "before" in request.query else None
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        rows = await conn.fetch(
            "SELECT seq, at, actor, action, target, details FROM audit_log WHERE tenant_id = $1 "
            "AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3",
            admin.tenant_id,
            before,
            limit + 1,
        )
    page = rows[:limit]
    entries = [
        {
            "seq": r["seq"],
            "at": r["at"].isoformat(),
            "actor": r["actor"],
            "action": r["action"],
            "target": r["target"],
            "details": orjson.loads(r["details"]),
        }
        for r in page
    ]
    nxt = page[-1]["seq"] if len(rows) > limit else None
    return json_response({"entries": entries, "next_before": nxt})


@admin_route
async def verify_audit(request: web.Request, admin: Admin) -> web.Response:
    """Walk the tenant's hash chain: ok, the first broken seq, and how many entries were read."""
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        ok, broken, n = await audit.verify(conn, admin.tenant_id)
    return json_response({"ok": ok, "broken_at": broken, "checked": n})


@admin_route
async def erase_by_user(request: web.Request, admin: Admin) -> web.Response:
    """Erase the subject linked to a verified site user id (the id is hashed, never stored)."""
    body = await read_json(request)
    user_id = body.get("user_id")
    if not isinstance(user_id, str) or not 0 < len(user_id) <= identity.MAX_USER_ID:
        raise ApiError(
            422,
            "invalid_request",
            "user_id must be a non-empty string",
            fields=[{"field": "user_id", "message": "must be a non-empty string"}],
        )
    hash_key = await admin.svc.hash_keys.key(admin.tenant_id)
    ref = identity.external_ref(hash_key, admin.tenant_id, user_id)
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        subject_id = await store.subject_by_ref(conn, admin.tenant_id, ref)
    return await _erase(admin, subject_id)


@admin_route
async def erase_by_conversation(request: web.Request, admin: Admin) -> web.Response:
    """Erase the subject behind a conversation: every visitor can be reached, verified or
    not, from the conversation the owner sees in the list (an erasure request by e-mail)."""
    body = await read_json(request)
    try:
        conversation_id = UUID(str(body.get("conversation_id")))
    except ValueError:
        raise ApiError(
            422,
            "invalid_request",
            "conversation_id must be a conversation id",
            fields=[{"field": "conversation_id", "message": "must be a UUID"}],
        ) from None
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        # NULL once retention anonymized the conversation: nobody left to erase
        subject_id = await conn.fetchval(
            "SELECT subject_id FROM conversations WHERE tenant_id = $1 AND conversation_id = $2",
            admin.tenant_id,
            conversation_id,
        )
    return await _erase(admin, subject_id)


async def _erase(admin: Admin, subject_id: UUID | None) -> web.Response:
    if subject_id is None:
        raise not_found("subject")
    # the privacy module owns erasure (key destruction, cascade, certificate, live sockets)
    from gateway.erasure import SubjectNotFound, erase_subject

    try:
        certificate = await erase_subject(admin.svc, admin.tenant_id, subject_id, admin.actor)
    except SubjectNotFound:
        raise not_found("subject") from None
    except asyncpg.PostgresError:
        raise ApiError(503, "storage_unavailable", "erasure did not complete; retry") from None
    return json_response(
        {"erased": True, "subject_id": str(subject_id), "certificate": certificate}
    )


def setup_routes(app: web.Application) -> None:
    """Bind the data routes."""
    r = app.router
    r.add_get("/api/admin/conversations", list_conversations)
    r.add_get("/api/admin/conversations/{conversation_id}", read_transcript)
    r.add_get("/api/admin/audit", list_audit)
    r.add_get("/api/admin/audit/verify", verify_audit)
    r.add_post("/api/admin/subjects/erase-by-user", erase_by_user)
    r.add_post("/api/admin/subjects/erase-by-conversation", erase_by_conversation)
