"""Immediate erasure of one subject: key destroyed, rows deleted, sockets closed, certificate."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from gateway import audit, bus, certs, metrics
from gateway.db import tenant_tx
from gateway.services import Services

# What is counted for the certificate, by the name it carries there.
_COUNTS = {
    "sessions": "SELECT count(*) FROM sessions WHERE tenant_id = $1 AND subject_id = $2",
    "conversations": "SELECT count(*) FROM conversations WHERE tenant_id = $1 AND subject_id = $2",
    "messages": "SELECT count(*) FROM messages m JOIN conversations c USING (tenant_id, "
    "conversation_id) WHERE c.tenant_id = $1 AND c.subject_id = $2",
    "consents": "SELECT count(*) FROM consents WHERE tenant_id = $1 AND subject_id = $2",
    "signal_records": "SELECT count(*) FROM signal_records WHERE tenant_id = $1 "
    "AND subject_id = $2",
    "analytics_events": "SELECT count(*) FROM analytics_events WHERE tenant_id = $1 "
    "AND subject_id = $2",
    "data_keys": "SELECT count(*) FROM subject_keys WHERE tenant_id = $1 AND subject_id = $2",
}


class SubjectNotFound(LookupError):
    """No such subject in this tenant (never existed or already erased)."""


def subject_ref(tenant_id: UUID, subject_id: UUID) -> str:
    """A stable reference to an erased subject that names no live row: SHA-256 of both ids."""
    return hashlib.sha256(b"subject|" + tenant_id.bytes + subject_id.bytes).hexdigest()


@dataclass(frozen=True, slots=True)
class Erased:
    """What one committed erasure removed, for its certificate."""

    subject_id: UUID
    certificate_id: UUID
    items: dict[str, int]
    erased_at: datetime


async def erase_subject(
    svc: Services, tenant_id: UUID, subject_id: UUID, actor: str
) -> dict[str, Any]:
    """Erase a subject at once and return its signed deletion certificate."""
    async with tenant_tx(svc.pool, tenant_id) as conn:
        erased = await erase_rows(conn, tenant_id, subject_id, actor)
    # counted here, not in `announce`: an erasure that completes a request is counted
    # once, by the request's own transition (kind `erasure` or `delete`)
    metrics.count_privacy_request("erasure", "completed")
    return await announce(svc, tenant_id, actor, erased)


async def erase_rows(
    conn: asyncpg.Connection, tenant_id: UUID, subject_id: UUID, actor: str
) -> Erased:
    """Erase a subject inside the caller's transaction; `announce` it once that commits.

    The transaction deletes the wrapped data key (every ciphertext of the subject,
    wherever a copy went, becomes unreadable) and the subject row, which cascades to
    sessions, conversations, messages, consents, signal records and analytics events.
    Privacy requests are kept as the record of compliance, with the subject link (FK
    SET NULL) and every free text about the person (details, extension reason,
    resolution) removed. The subject row is locked first, as every erasure does, so two
    never deadlock.
    """
    certificate_id = uuid4()
    locked = await conn.fetchval(
        "SELECT 1 FROM subjects WHERE tenant_id = $1 AND subject_id = $2 FOR UPDATE",
        tenant_id,
        subject_id,
    )
    if locked is None:
        raise SubjectNotFound("no such subject")  # the id stays out of logs and tracebacks
    items = {
        name: int(await conn.fetchval(q, tenant_id, subject_id)) for name, q in _COUNTS.items()
    }
    items["privacy_requests_detached"] = int(
        await conn.fetchval(
            "WITH u AS (UPDATE privacy_requests SET details = NULL, extension_reason = NULL, "
            "resolution = NULL WHERE tenant_id = $1 "
            "AND subject_id = $2 RETURNING 1) SELECT count(*) FROM u",
            tenant_id,
            subject_id,
        )
    )
    await conn.execute(
        "DELETE FROM subject_keys WHERE tenant_id = $1 AND subject_id = $2",
        tenant_id,
        subject_id,
    )
    await conn.execute(
        "DELETE FROM subjects WHERE tenant_id = $1 AND subject_id = $2", tenant_id, subject_id
    )
    erased_at: datetime = await conn.fetchval("SELECT date_trunc('milliseconds', now())")
    # the audit entry holds counts and a hash, never personal data
    await audit.append(
        conn,
        tenant_id,
        actor,
        "erasure",
        f"subject_ref:{subject_ref(tenant_id, subject_id)}",
        {"certificate_id": str(certificate_id), "items": items},
    )
    return Erased(subject_id, certificate_id, items, erased_at)


async def announce(svc: Services, tenant_id: UUID, actor: str, erased: Erased) -> dict[str, Any]:
    """After the erasure committed: forget the key everywhere, close sockets, sign."""
    subject_id = erased.subject_id
    svc.vault.cache.forget(tenant_id, subject_id)
    # every process (this one included) forgets the key and closes the subject's sockets;
    # the erasure is committed: a handler cancelled now (its client gone, the shutdown
    # grace over) must not cancel telling them
    payload = {"tenant_id": str(tenant_id), "subject_id": str(subject_id)}
    await asyncio.shield(svc.bus.publish(bus.SUBJECT_ERASED, payload))
    body = {
        "type": "omnigate.deletion-certificate/1",
        "certificate_id": str(erased.certificate_id),
        "tenant_id": str(tenant_id),
        "subject_ref": subject_ref(tenant_id, subject_id),
        "erased_at": erased.erased_at.astimezone(UTC).isoformat(),
        "issued_at": datetime.now(UTC).isoformat(),
        "actor": actor,
        "items": erased.items,
        "method": "data key destroyed; rows deleted",
    }
    return certs.sign(certs.signing_keys(svc.settings)[0], body)
