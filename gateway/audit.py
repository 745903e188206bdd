"""The audit log: append-only for the app role, hash-chained per tenant.

Each entry's hash is SHA-256 over the previous hash and the entry's canonical
JSON, so editing, deleting or reordering a row breaks verification from that
row on. Appends take a per-tenant transaction-level advisory lock, so two
writers never fork the chain.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

GENESIS = b"\x00" * 32


def entry_hash(
    prev: bytes,
    tenant_id: UUID,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any],
) -> bytes:
    """The chained hash of one entry."""
    body = orjson.dumps(
        [str(tenant_id), seq, at.isoformat(), actor, action, target, details],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(prev + body).digest()


async def append(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    actor: str,
    action: str,
    target: str = "",
    details: dict[str, Any] | None = None,
) -> int:
    """Append one entry inside the caller's tenant transaction; returns its seq."""
    details = details or {}
    await conn.execute("SELECT pg_advisory_xact_lock(7243002, hashtext($1::text))", str(tenant_id))
    last = await conn.fetchrow(
        "SELECT seq, hash FROM audit_log WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1", tenant_id
    )
    seq = (last["seq"] + 1) if last else 1
    prev = last["hash"] if last else GENESIS
    at: datetime = await conn.fetchval("SELECT date_trunc('milliseconds', now())")
    digest = entry_hash(prev, tenant_id, seq, at, actor, action, target, details)
    await conn.execute(
        "INSERT INTO audit_log"
        " (tenant_id, seq, at, actor, action, target, details, prev_hash, hash)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        tenant_id,
        seq,
        at,
        actor,
        action,
        target,
        orjson.dumps(details).decode(),
        prev,
        digest,
    )
    return int(seq)


async def verify(conn: asyncpg.Connection, tenant_id: UUID) -> tuple[bool, int | None, int]:
    """Walk the chain; returns (ok, first broken seq or None, entries checked)."""
    prev = GENESIS
    expected_seq = 1
    n = 0
    async for row in conn.cursor(
        "SELECT seq, at, actor, action, target, details, prev_hash, hash FROM audit_log"
        " WHERE tenant_id = $1 ORDER BY seq",
        tenant_id,
    ):
        n += 1
        details = orjson.loads(row["details"])
        digest = entry_hash(
            prev,
            tenant_id,
            row["seq"],
            row["at"],
            row["actor"],
            row["action"],
            row["target"],
            details,
        )
        if row["seq"] != expected_seq or row["prev_hash"] != prev or row["hash"] != digest:
            return False, row["seq"], n
        prev = digest
        expected_seq += 1
    return True, None, n
