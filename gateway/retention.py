"""Retention: delete what the policy no longer lets us keep, in short batched transactions.

Per tenant, with `retention_days` from its current policy:

* messages older than retention are deleted (batch by primary key);
* conversations whose messages are all gone, older than retention and no longer
  attached to a session are anonymized: subject link and sealed redaction map
  removed, `anonymized_at` set, counts kept and timestamps cut to the day (a
  start to the microsecond would name the subject's rows created with it);
* conversations whose messages are all gone and older than retention but still
  attached to a session (one renewed on every resume can outlive retention
  forever) lose their sealed redaction map (the visitor's original e-mails, phone
  numbers, cards...): nothing stored refers to its placeholders any more, and a
  resume starts with an empty map, as a new conversation does;
* sessions: the anonymized IP is cleared once last seen before retention, and
  expired sessions are deleted;
* analytics events older than two years are folded into `analytics_daily`
  (upsert) and deleted, in the same statement, so a crash never double-counts;
* conversations whose messages were deleted but which keep newer ones have their
  redaction maps pruned of the values no remaining message holds (`prune_maps`:
  the pass opens them with the master keys; without them, they wait for one that can);
* subjects left with nothing (created before retention, no session, no conversation
  linked, no open privacy request, no consent, signal or analytics event since the
  cutoff, and not a signed-in user's restriction or opt-out) are deleted: their
  data key, consent history, signal records and old analytics events (folded into
  `analytics_daily` first) go with them, and their
  closed privacy requests keep the record without the link or any free text, as
  after an erasure. Else an anonymous visitor's subject would outlive everything
  they did, beyond the reach of their own token and of the site owner's erasure.

Every step only touches rows still past their limit, so a second pass (or a
pass interrupted halfway and run again) finds nothing more to do. One leader at
a time: a lease row (migrations/0005), taken and renewed by autocommit statements,
so it works behind PgBouncer in transaction mode and a crashed leader's lease
simply runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import orjson

from gateway import metrics, store
from gateway.crypto import CryptoError, KeyDestroyed
from gateway.db import Pool, tenant_tx
from gateway.directory import tenant_ids
from gateway.vault import Vault
from policies import PlaceholderMap, parse_policy

log = logging.getLogger("omnigate.retention")

LEASE = "retention"
LEASE_SECONDS = 300

_TAKE_LEASE = """
INSERT INTO omnigate_leases (name, holder, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
WHERE omnigate_leases.expires_at < now() OR omnigate_leases.holder = EXCLUDED.holder
RETURNING holder
"""
ANALYTICS_DAYS = 730

# Messages are deleted in four statements of one transaction (find their conversations,
# lock them, mark their maps, delete), conversations locked before their messages as
# every other writer locks them (an erasure's cascade, the insert functions), never
# waiting (SKIP LOCKED: a conversation busy now is left to the next pass, and this one
# goes on with the others), so retention deadlocks with nothing. A conversation that has a
# map is marked for `prune_maps` (it holds the keys; SQL cannot open the map) in the
# transaction that deletes its messages, so a pass cut short loses no mark.
_OLD_CONVERSATIONS = """
SELECT DISTINCT conversation_id FROM (
    SELECT conversation_id FROM messages
    WHERE tenant_id = $1 AND created_at < $2 AND conversation_id <> ALL($4::uuid[])
    LIMIT $3) m
"""
_LOCK_OLD_CONVERSATIONS = """
SELECT c.conversation_id, c.redaction_sealed IS NOT NULL AND NOT c.map_prune_due
FROM conversations c
WHERE c.tenant_id = $1 AND c.conversation_id = ANY($2::uuid[])
FOR UPDATE OF c SKIP LOCKED
"""
_MARK_MAPS = """
UPDATE conversations SET map_prune_due = true
WHERE tenant_id = $1 AND conversation_id = ANY($2::uuid[])
"""
_DELETE_MESSAGES = """
WITH d AS (
    DELETE FROM messages WHERE (tenant_id, conversation_id, seq) IN (
        SELECT tenant_id, conversation_id, seq FROM messages
        WHERE tenant_id = $1 AND conversation_id = ANY($3::uuid[]) AND created_at < $2
        LIMIT $4)
    RETURNING 1)
SELECT count(*) FROM d
"""

_ANONYMIZE_CONVERSATIONS = """
WITH u AS (
    UPDATE conversations c
       SET subject_id = NULL, redaction_sealed = NULL, anonymized_at = $3,
           -- to the day: the subject's rows were created in the same transaction as the
           -- conversation, so an exact start would link them again
           started_at = date_trunc('day', c.started_at, 'UTC'),
           last_message_at = date_trunc('day', c.last_message_at, 'UTC')
     WHERE (c.tenant_id, c.conversation_id) IN (
        SELECT tenant_id, conversation_id FROM conversations x
        WHERE x.tenant_id = $1 AND x.anonymized_at IS NULL AND x.last_message_at < $2
          AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.tenant_id = x.tenant_id
                          AND m.conversation_id = x.conversation_id)
          AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.tenant_id = x.tenant_id
                          AND s.conversation_id = x.conversation_id)
        LIMIT $4)
       -- repeated on `c`: a message written meanwhile moves last_message_at, which
       -- READ COMMITTED re-checks on the locked row (the subquery it does not)
       AND c.anonymized_at IS NULL AND c.last_message_at < $2
    RETURNING 1)
SELECT count(*) FROM u
"""

# Whatever sessions say. The conditions are repeated on `c` itself: a message written
# concurrently (omnigate_insert_message inserts, then bumps the conversation) changes
# `last_message_at` under the row lock, and READ COMMITTED re-checks only those.
_CLEAR_REDACTION_MAPS = """
WITH u AS (
    UPDATE conversations c
       SET redaction_sealed = NULL
     WHERE (c.tenant_id, c.conversation_id) IN (
        SELECT tenant_id, conversation_id FROM conversations x
        WHERE x.tenant_id = $1 AND x.redaction_sealed IS NOT NULL AND x.last_message_at < $2
          AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.tenant_id = x.tenant_id
                          AND m.conversation_id = x.conversation_id)
        LIMIT $3)
       AND c.redaction_sealed IS NOT NULL AND c.last_message_at < $2
    RETURNING 1)
SELECT count(*) FROM u
"""

_DELETE_SESSIONS = """
WITH d AS (
    DELETE FROM sessions WHERE (tenant_id, session_id) IN (
        SELECT tenant_id, session_id FROM sessions
        WHERE tenant_id = $1 AND expires_at < $2 LIMIT $3)
    RETURNING 1)
SELECT count(*) FROM d
"""

_CLEAR_IPS = """
WITH u AS (
    UPDATE sessions SET ip_anon = NULL WHERE (tenant_id, session_id) IN (
        SELECT tenant_id, session_id FROM sessions
        WHERE tenant_id = $1 AND ip_anon IS NOT NULL AND last_seen_at < $2 LIMIT $3)
    RETURNING 1)
SELECT count(*) FROM u
"""

# Folds the deleted events of CTE `{events}` into the daily rollup (upsert), in the
# statement that deletes them, so a crash never double-counts.
_FOLD = """agg AS (
    SELECT tenant_id, (occurred_at AT TIME ZONE 'UTC')::date AS day,
           COALESCE(page_path, '') AS page_path, COALESCE(browser_family, '') AS browser_family,
           COALESCE(device_class, '') AS device_class, count(*) AS events
    FROM {events} GROUP BY 1, 2, 3, 4, 5
), ins AS (
    INSERT INTO analytics_daily AS a (tenant_id, day, page_path, browser_family, device_class,
                                      events)
    SELECT * FROM agg
    ON CONFLICT (tenant_id, day, page_path, browser_family, device_class)
    DO UPDATE SET events = a.events + EXCLUDED.events
)"""

_AGGREGATE_ANALYTICS = f"""
WITH d AS (
    DELETE FROM analytics_events WHERE (tenant_id, event_id) IN (
        SELECT tenant_id, event_id FROM analytics_events
        WHERE tenant_id = $1 AND occurred_at < $2 LIMIT $3)
    RETURNING tenant_id, occurred_at, page_path, browser_family, device_class
), {_FOLD.format(events="d")}
SELECT count(*) FROM d
"""  # noqa: S608

# A subject with nothing left ($2: the retention cutoff). Its events, consents and
# signals are checked too: a visitor who still browsed or chose lately is not gone.
_ABANDONED = """
x.tenant_id = $1 AND x.created_at < $2
AND NOT EXISTS (SELECT 1 FROM sessions s
                WHERE s.tenant_id = x.tenant_id AND s.subject_id = x.subject_id)
AND NOT EXISTS (SELECT 1 FROM conversations c
                WHERE c.tenant_id = x.tenant_id AND c.subject_id = x.subject_id)
AND NOT EXISTS (SELECT 1 FROM privacy_requests r WHERE r.tenant_id = x.tenant_id
                AND r.subject_id = x.subject_id AND r.closed_at IS NULL)
AND NOT EXISTS (SELECT 1 FROM consents k WHERE k.tenant_id = x.tenant_id
                AND k.subject_id = x.subject_id AND k.created_at >= $2)
AND NOT EXISTS (SELECT 1 FROM signal_records g WHERE g.tenant_id = x.tenant_id
                AND g.subject_id = x.subject_id AND g.created_at >= $2)
AND NOT EXISTS (SELECT 1 FROM analytics_events a WHERE a.tenant_id = x.tenant_id
                AND a.subject_id = x.subject_id AND a.occurred_at >= $2)
-- a signed-in user's restriction or opt-out must hold when they come back
AND NOT (x.external_ref IS NOT NULL AND (x.restricted OR x.tracking_opt_out))
"""

# Two statements of one transaction. The first locks the subjects (as an erasure
# locks its subject), skipping any locked now: one being erased, or being joined by a
# session still uncommitted (its foreign key holds a lock). The second, with a snapshot
# taken after those locks, checks them again: a session committed between the first
# statement's snapshot and its lock is seen there, and none can commit after it (its
# foreign key waits for the lock). Their page views are folded into the rollup, the
# closed requests lose the link and their text, and the cascade takes the rest (key,
# consents, signals). Returns (subjects deleted, events folded).
_LOCK_ABANDONED = f"""
SELECT x.subject_id FROM subjects x WHERE {_ABANDONED}
LIMIT $3 FOR UPDATE OF x SKIP LOCKED
"""  # noqa: S608
_DELETE_SUBJECTS = f"""
WITH v AS (
    SELECT x.tenant_id, x.subject_id FROM subjects x
    WHERE x.subject_id = ANY($3::uuid[]) AND {_ABANDONED}
), ev AS (
    DELETE FROM analytics_events e USING v
     WHERE e.tenant_id = v.tenant_id AND e.subject_id = v.subject_id
    RETURNING e.tenant_id, e.occurred_at, e.page_path, e.browser_family, e.device_class
), {_FOLD.format(events="ev")}, r AS (
    UPDATE privacy_requests p SET details = NULL, extension_reason = NULL, resolution = NULL
      FROM v WHERE p.tenant_id = v.tenant_id AND p.subject_id = v.subject_id
), d AS (
    DELETE FROM subjects s USING v
     WHERE s.tenant_id = v.tenant_id AND s.subject_id = v.subject_id
    RETURNING 1)
SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM ev)
"""  # noqa: S608

# One marked conversation at a time, locked while its map and messages are opened and
# the map written: a message written meanwhile waits for the lock (the insert functions
# take it before they insert when they check the map, as every text-bearing write
# does), then finds the map changed and redacts again (gateway/chat.py). $2: those
# whose keys did not open in this pass, left marked for a later one.
_MARKED_MAP = """
SELECT conversation_id, subject_id, redaction_sealed FROM conversations
WHERE tenant_id = $1 AND map_prune_due AND conversation_id <> ALL($2::uuid[])
LIMIT 1 FOR UPDATE SKIP LOCKED
"""

KINDS = (
    "messages_deleted",
    "conversations_anonymized",
    "redaction_maps_cleared",
    "sessions_deleted",
    "session_ips_cleared",
    "analytics_events_aggregated",
    "subjects_deleted",
    "redaction_entries_pruned",
)
# the metric's closed label set (gateway.metrics.RETENTION_KINDS)
_METRIC_KIND = {
    "messages_deleted": "messages",
    "conversations_anonymized": "conversations",
    "sessions_deleted": "sessions",
    "session_ips_cleared": "session_ips",
    "redaction_maps_cleared": "redaction_maps",
    "analytics_events_aggregated": "analytics_events",
    "subjects_deleted": "subjects",
    "redaction_entries_pruned": "redaction_entries",
}


async def _drain(pool: Pool, tenant_id: UUID, sql: str, *args: Any, batch: int) -> int:
    """Run a batched statement in short transactions until a batch comes back short."""
    total = 0
    while True:
        async with tenant_tx(pool, tenant_id) as conn:
            n = int(await conn.fetchval(sql, tenant_id, *args, batch))
        total += n
        if n < batch:
            return total


async def _retention_days(pool: Pool, tenant_id: UUID) -> int:
    async with tenant_tx(pool, tenant_id) as conn:
        row = await store.latest_policy(conn, tenant_id)
    return parse_policy(row[1]).retention_days if row else parse_policy({}).retention_days


async def prune_maps(pool: Pool, vault: Vault, tenant_id: UUID) -> int:
    """Drop from the marked conversations' maps the values no stored message holds.

    The messages that held them were deleted by retention; the map kept the originals
    (sealed) for as long as the conversation kept any newer message. An entry stays
    while any message left holds its value in either spelling, so a resume redacts
    those messages again as before (`PlaceholderMap.retain_seen_in`). Returns the
    number of entries dropped.
    """
    dropped = 0
    kept: list[UUID] = []
    while True:
        async with tenant_tx(pool, tenant_id) as conn:
            row = await conn.fetchrow(_MARKED_MAP, tenant_id, kept)
            if row is None:
                return dropped
            cid, subject_id, sealed = row
            new_sealed = sealed
            if sealed is not None and subject_id is not None:
                try:
                    new_sealed, n = await _pruned(conn, vault, tenant_id, cid, subject_id, sealed)
                    dropped += n
                except KeyDestroyed:
                    pass  # erased meanwhile: the conversation goes with the subject
                except ValueError as exc:  # a map that does not parse can never be pruned
                    log.warning("redaction map not pruned", extra={"error": type(exc).__name__})
                except CryptoError as exc:
                    # not this process's keys (a wrong or missing master key): the mark
                    # stays for a pass that can open it
                    log.warning("redaction map not opened", extra={"error": type(exc).__name__})
                    kept.append(cid)
                    continue
            await conn.execute(
                "UPDATE conversations SET redaction_sealed = $3, map_prune_due = false "
                "WHERE tenant_id = $1 AND conversation_id = $2",
                tenant_id,
                cid,
                new_sealed,
            )


async def _pruned(
    conn: Any, vault: Vault, tenant_id: UUID, cid: UUID, subject_id: UUID, sealed: bytes
) -> tuple[bytes, int]:
    cipher = await vault.cipher(conn, tenant_id, subject_id)
    texts = [
        vault.open_text(cipher, tenant_id, cid, m["message_id"], m["role"], m["ciphertext"])
        for m in await conn.fetch(
            "SELECT message_id, role, ciphertext FROM messages "
            "WHERE tenant_id = $1 AND conversation_id = $2",
            tenant_id,
            cid,
        )
    ]
    mapping = PlaceholderMap.from_dict(
        orjson.loads(vault.open_blob(cipher, tenant_id, cid, "redaction", sealed))
    )
    n = mapping.retain_seen_in(texts)
    if not n:
        return sealed, 0
    return vault.seal_blob(cipher, tenant_id, cid, "redaction", orjson.dumps(mapping.to_dict())), n


async def purge_tenant(
    pool: Pool, tenant_id: UUID, now: datetime, batch: int, vault: Vault | None = None
) -> dict[str, int]:
    """One tenant's pass; returns counts by kind. Maps are pruned only with a `vault`."""
    days = await _retention_days(pool, tenant_id)
    cutoff = now - timedelta(days=days)
    out = dict.fromkeys(KINDS, 0)
    out["messages_deleted"] = await _delete_messages(pool, tenant_id, cutoff, batch)
    # expired sessions first: a conversation is anonymized only once no session points at it
    out["sessions_deleted"] = await _drain(pool, tenant_id, _DELETE_SESSIONS, now, batch=batch)
    out["session_ips_cleared"] = await _drain(pool, tenant_id, _CLEAR_IPS, cutoff, batch=batch)
    out["conversations_anonymized"] = await _drain(
        pool, tenant_id, _ANONYMIZE_CONVERSATIONS, cutoff, now, batch=batch
    )
    # after anonymizing, which removes the maps it reaches: what is left here are the
    # conversations a live session still points at
    out["redaction_maps_cleared"] = await _drain(
        pool, tenant_id, _CLEAR_REDACTION_MAPS, cutoff, batch=batch
    )
    out["analytics_events_aggregated"] = await _drain(
        pool, tenant_id, _AGGREGATE_ANALYTICS, now - timedelta(days=ANALYTICS_DAYS), batch=batch
    )
    if vault is not None:  # after the steps that clear a map whose messages are all gone
        out["redaction_entries_pruned"] = await prune_maps(pool, vault, tenant_id)
    # last: the steps above are what leaves a subject with nothing
    while True:
        async with tenant_tx(pool, tenant_id) as conn:
            locked = [r[0] for r in await conn.fetch(_LOCK_ABANDONED, tenant_id, cutoff, batch)]
            if locked:
                subjects, events = await conn.fetchrow(_DELETE_SUBJECTS, tenant_id, cutoff, locked)
                out["subjects_deleted"] += subjects
                out["analytics_events_aggregated"] += events
        if len(locked) < batch:
            return out


async def _delete_messages(pool: Pool, tenant_id: UUID, cutoff: datetime, batch: int) -> int:
    """Delete messages older than `cutoff`, marking their conversations' maps for pruning.

    A conversation busy now (a message being written, an erasure) is skipped for the
    rest of the pass, not waited for, and the pass goes on with the others: the next
    pass takes it.
    """
    total = 0
    busy: list[UUID] = []
    while True:
        async with tenant_tx(pool, tenant_id) as conn:
            wanted = [
                r[0] for r in await conn.fetch(_OLD_CONVERSATIONS, tenant_id, cutoff, batch, busy)
            ]
            if not wanted:
                return total
            rows = await conn.fetch(_LOCK_OLD_CONVERSATIONS, tenant_id, wanted)
            marked = [cid for cid, mark in rows if mark]
            if marked:
                await conn.execute(_MARK_MAPS, tenant_id, marked)
            n = 0
            if rows:
                ids = [cid for cid, _ in rows]
                n = int(await conn.fetchval(_DELETE_MESSAGES, tenant_id, cutoff, ids, batch))
        total += n
        skipped = set(wanted).difference(cid for cid, _ in rows)
        busy += skipped
        if n < batch and not skipped:
            return total


async def run_retention(
    pool: Pool, vault: Vault | None = None, *, now: datetime | None = None, batch: int = 5000
) -> dict[str, Any]:
    """One pass over every tenant, if this process wins the leader lock; a JSON summary.

    Without a `vault` (the master keys) redaction maps are not pruned: the
    conversations stay marked for a pass that has them."""
    now = now or datetime.now(UTC)
    started = time.monotonic()
    holder = uuid4()
    if await pool.fetchval(_TAKE_LEASE, LEASE, holder, LEASE_SECONDS) != holder:
        return {"leader": False, "skipped": "another process is running retention"}
    try:
        totals = dict.fromkeys(KINDS, 0)
        failed = 0
        tenants = await tenant_ids(pool)
        for tenant_id in tenants:
            # renewed per tenant; a lease lost (a pause longer than its term) ends the pass
            if await pool.fetchval(_TAKE_LEASE, LEASE, holder, LEASE_SECONDS) != holder:
                log.warning("retention lease lost; the next pass continues")
                break
            try:
                counts = await purge_tenant(pool, tenant_id, now, batch, vault)
            except Exception as exc:  # one broken tenant must not stop the rest
                # batches already committed stay done; the next pass retries the rest
                failed += 1
                log.warning(
                    "retention failed for a tenant",
                    extra={"tenant_id": str(tenant_id), "error": type(exc).__name__},
                )
                continue
            for kind, n in counts.items():
                totals[kind] += n
    finally:
        await pool.execute(
            "DELETE FROM omnigate_leases WHERE name = $1 AND holder = $2", LEASE, holder
        )
    for kind, n in totals.items():
        metrics.count_retention_purged(_METRIC_KIND[kind], n)
    return {
        "leader": True,
        "tenants": len(tenants),
        "failed_tenants": failed,
        "now": now.isoformat(),
        **totals,
        "duration_ms": round((time.monotonic() - started) * 1000),
    }


async def retention_loop(svc: Any, interval: float) -> None:
    """Run retention and refresh the overdue-request gauge every `interval` seconds (for serve)."""
    from gateway.requests_api import refresh_overdue

    while True:
        try:
            summary = await run_retention(svc.pool, svc.vault)
            if summary["leader"]:
                log.info("retention pass", extra={k: summary[k] for k in KINDS})
            await refresh_overdue(svc.pool)
        except Exception as exc:  # the loop outlives any one pass
            # the next pass retries; nothing here is lost by waiting
            log.warning("retention pass failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(interval)
