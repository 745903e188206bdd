"""Repository for tenants, sessions, conversations and messages: SQL lives here.

Every function takes a connection already inside `tenant_tx` (or `lookup_tx`),
so the caller decides the transaction and RLS does the isolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID, uuid4

import asyncpg
import orjson

from gateway import audit
from gateway.crypto import KeyRing, new_data_key
from gateway.db import Pool
from policies import Policy, policy_diff, policy_to_doc


@dataclass(frozen=True)
class SessionRow:
    """A resumed or created session, as the gateway needs it in memory."""

    session_id: UUID
    subject_id: UUID
    conversation_id: UUID
    resumed: bool
    restricted: bool = False


@dataclass(frozen=True)
class StoredMessage:
    """A message row as read back (ciphertext still sealed)."""

    seq: int
    message_id: UUID
    role: str
    ciphertext: bytes
    created_at: datetime
    status: str
    finish_reason: str | None
    reply_to: int | None


async def tenant_for_site_key(conn: asyncpg.Connection, key_hash: bytes) -> UUID | None:
    """Resolve a widget site key (inside lookup_tx)."""
    row = await conn.fetchrow(
        "SELECT tenant_id FROM site_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
    )
    return row["tenant_id"] if row else None


async def tenant_for_admin_key(
    conn: asyncpg.Connection, key_hash: bytes
) -> tuple[UUID, UUID] | None:
    """Resolve an admin key to (tenant_id, admin_key_id) (inside lookup_tx)."""
    row = await conn.fetchrow(
        "SELECT tenant_id, admin_key_id FROM admin_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        key_hash,
    )
    return (row["tenant_id"], row["admin_key_id"]) if row else None


async def tenant_for_session(conn: asyncpg.Connection, token_hash: bytes) -> UUID | None:
    """Resolve a session token to its tenant (inside lookup_tx); expired sessions resolve too."""
    row = await conn.fetchrow("SELECT tenant_id FROM sessions WHERE token_hash = $1", token_hash)
    return row["tenant_id"] if row else None


async def latest_policy(
    conn: asyncpg.Connection, tenant_id: UUID
) -> tuple[int, dict[str, object]] | None:
    """The newest policy version and document of a tenant."""
    row = await conn.fetchrow(
        "SELECT version, doc FROM policies WHERE tenant_id = $1 ORDER BY version DESC LIMIT 1",
        tenant_id,
    )
    if row is None:
        return None
    return row["version"], orjson.loads(row["doc"])


async def insert_policy(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    version: int,
    doc: dict[str, object],
    diff: dict[str, object],
    actor: str,
) -> None:
    """Append a policy version (the primary key makes concurrent writers collide, not overwrite)."""
    await conn.execute(
        "INSERT INTO policies (tenant_id, version, doc, diff, created_by)"
        " VALUES ($1, $2, $3, $4, $5)",
        tenant_id,
        version,
        orjson.dumps(doc).decode(),
        orjson.dumps(diff).decode(),
        actor,
    )


async def append_policy_version(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    version: int,
    current: Policy,
    new: Policy,
    actor: str,
) -> tuple[dict[str, object], dict[str, object]]:
    """Store `new` as version `version + 1`, with its diff from `current`, and audit it;
    (its document, the diff). A concurrent writer of the same version fails on the key."""
    doc = policy_to_doc(new)
    diff: dict[str, object] = dict(policy_diff(current, new))
    await insert_policy(conn, tenant_id, version + 1, doc, diff, actor)
    await audit.append(
        conn,
        tenant_id,
        actor,
        "policy.update",
        f"policy:{version + 1}",
        {"version": version + 1, "fields": sorted(diff)},
    )
    return doc, diff


def _resumed(row: asyncpg.Record) -> SessionRow:
    return SessionRow(
        row["session_id"], row["subject_id"], row["conversation_id"], True, row["restricted"]
    )


async def find_session(
    conn: asyncpg.Connection, tenant_id: UUID, token_hash: bytes
) -> tuple[SessionRow, bool] | None:
    """A live (unexpired) session by token hash, and whether its subject is a verified user."""
    row = await conn.fetchrow(
        """
        SELECT s.session_id, s.subject_id, s.conversation_id, sub.restricted,
               sub.external_ref IS NOT NULL AS verified
        FROM sessions s JOIN subjects sub USING (tenant_id, subject_id)
        WHERE s.tenant_id = $1 AND s.token_hash = $2 AND s.expires_at > now()
        """,
        tenant_id,
        token_hash,
    )
    return None if row is None else (_resumed(row), row["verified"])


@dataclass(frozen=True)
class ResumedSession:
    """A live session found by its token, with what a resume needs to rebuild its state."""

    session: SessionRow
    redaction_sealed: bytes | None
    # the latest decision per purpose: records with purpose, granted, consent_version
    consents: list[asyncpg.Record]
    # user messages with no assistant row at all, oldest first
    unanswered: list[int]
    # the complete messages among the last few, oldest first: message_id, role, ciphertext
    recent: list[asyncpg.Record]
    # the subject's kek id and wrapped data key, None once destroyed
    wrapped_key: tuple[str, bytes] | None


# migrations/0020 (0015 matching the hello's verified user): sets the tenant itself, one
# autocommit round trip
_RESUME = "SELECT * FROM omnigate_resume($1, $2, $3, $4, $5, $6, $7, $8)"


async def resume(
    pool: Pool,
    tenant_id: UUID,
    token_hash: bytes,
    ip_anon: str | None,
    dnt: bool,
    gpc: bool,
    session_days: int,
    recent: int,
    external_ref: bytes | None,
) -> ResumedSession | None:
    """A live session by token hash, touched, with its consent, redaction map and history;
    only one whose subject's external_ref is `external_ref` (a verified site user's
    session for that user alone, an anonymous one for a hello that verifies as no one):
    any other is neither returned nor touched (migrations/0020).

    One round trip instead of seven (the SSE fallback resumes on every message), with the
    subject's wrapped data key for a process that has not cached it. The
    touch (latest anonymized IP and signals, expiry slid) is written only when something
    changed or the last one is over a minute old, so a resume within a minute writes
    nothing and commits without a WAL flush.
    """
    row = await pool.fetchrow(
        _RESUME, tenant_id, token_hash, ip_anon, dnt, gpc, session_days, recent, external_ref
    )
    if row is None:
        return None
    return ResumedSession(
        _resumed(row),
        row["redaction_sealed"],
        row["consents"],
        row["unanswered"],
        row["recent"],
        None if row["wrapped_key"] is None else (row["kek_id"], row["wrapped_key"]),
    )


async def create_subject(
    conn: asyncpg.Connection,
    keyring: KeyRing,
    tenant_id: UUID,
    external_ref: bytes | None = None,
) -> tuple[UUID, bytes]:
    """Create a subject with a fresh wrapped data key; returns (subject_id, data key)."""
    subject_id = uuid4()
    dek = new_data_key()
    kek_id, wrapped = keyring.wrap(tenant_id, subject_id, dek)
    # one round trip: the key row's foreign key is checked at the end of the statement
    await conn.execute(
        "WITH subject AS ("
        " INSERT INTO subjects (tenant_id, subject_id, external_ref) VALUES ($1, $2, $3))"
        " INSERT INTO subject_keys (tenant_id, subject_id, kek_id, wrapped_key)"
        " VALUES ($1, $2, $4, $5)",
        tenant_id,
        subject_id,
        external_ref,
        kek_id,
        wrapped,
    )
    return subject_id, dek


async def subject_by_ref(
    conn: asyncpg.Connection, tenant_id: UUID, external_ref: bytes
) -> UUID | None:
    """The subject already linked to a verified site user, if any."""
    row = await conn.fetchrow(
        "SELECT subject_id FROM subjects WHERE tenant_id = $1 AND external_ref = $2",
        tenant_id,
        external_ref,
    )
    return row["subject_id"] if row else None


async def create_session(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    subject_id: UUID,
    token_hash: bytes,
    ip_anon: str | None,
    dnt: bool,
    gpc: bool,
    session_days: int,
) -> SessionRow:
    """A new session with its own new conversation."""
    session_id, conversation_id = uuid4(), uuid4()
    # one round trip: the session's foreign key to its conversation is checked at the end
    await conn.execute(
        """
        WITH conversation AS (
            INSERT INTO conversations (tenant_id, conversation_id, subject_id)
            VALUES ($1, $4, $3))
        INSERT INTO sessions (tenant_id, session_id, subject_id, conversation_id, token_hash,
                              ip_anon, dnt, gpc, expires_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(days => $9))
        """,
        tenant_id,
        session_id,
        subject_id,
        conversation_id,
        token_hash,
        ip_anon,
        dnt,
        gpc,
        session_days,
    )
    return SessionRow(session_id, subject_id, conversation_id, False)


async def wrapped_key(
    conn: asyncpg.Connection, tenant_id: UUID, subject_id: UUID
) -> tuple[str, bytes] | None:
    """The subject's wrapped data key, or None once erased."""
    row = await conn.fetchrow(
        "SELECT kek_id, wrapped_key FROM subject_keys WHERE tenant_id = $1 AND subject_id = $2",
        tenant_id,
        subject_id,
    )
    return (row["kek_id"], row["wrapped_key"]) if row else None


class NewMessage(NamedTuple):
    """One message to write: what `insert_message` and the group committer take."""

    tenant_id: UUID
    conversation_id: UUID
    message_id: UUID
    role: str
    ciphertext: bytes
    client_ref: bytes | None = None
    reply_to: int | None = None
    status: str = "complete"
    finish_reason: str | None = None
    redaction_sealed: bytes | None = None
    # written only if the conversation's sealed map is still `map_expected` (0014)
    check_map: bool = False
    map_expected: bytes | None = None

    def args(self) -> tuple[Any, ...]:
        """The values in the parameter order of omnigate_insert_message(s)."""
        return (
            self.tenant_id,
            self.conversation_id,
            self.message_id,
            self.role,
            self.client_ref,
            self.reply_to,
            self.status,
            self.finish_reason,
            self.ciphertext,
            self.redaction_sealed,
            self.check_map,
            self.map_expected,
        )


class MapChanged(Exception):
    """Not written: the conversation's redaction map is no longer the one expected."""


# the seq a map check that failed answers with (real ones start at 1)
MAP_CHANGED = -1

# migrations/0014: sets the tenant itself, so on a pool it is one autocommit round trip
_INSERT_MESSAGE = (
    "SELECT omnigate_insert_message($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)


async def insert_message(conn: asyncpg.Connection | Pool, msg: NewMessage) -> int | None:
    """Insert a message in one round trip; None when the client_ref already exists.

    `conn` may be the pool itself: the statement is then its own tenant transaction.
    Raises MapChanged when `msg.check_map` and the map is not `msg.map_expected`.
    """
    seq: int | None = await conn.fetchval(_INSERT_MESSAGE, *msg.args())
    if seq == MAP_CHANGED:
        raise MapChanged
    return seq


def _message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(
        row["seq"],
        row["message_id"],
        row["role"],
        row["ciphertext"],
        row["created_at"],
        row["status"],
        row["finish_reason"],
        row["reply_to"],
    )


async def message_by_client_ref(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    conversation_id: UUID,
    client_ref: bytes,
) -> tuple[StoredMessage, StoredMessage | None] | None:
    """A re-sent user message and its latest complete reply, if stored."""
    row = await conn.fetchrow(
        "SELECT seq, message_id, role, ciphertext, created_at, status, finish_reason, reply_to"
        " FROM messages WHERE tenant_id = $1 AND conversation_id = $2"
        " AND client_ref = $3 AND role = 'user'",
        tenant_id,
        conversation_id,
        client_ref,
    )
    if row is None:
        return None
    reply = await conn.fetchrow(
        "SELECT seq, message_id, role, ciphertext, created_at, status, finish_reason, reply_to"
        " FROM messages WHERE tenant_id = $1 AND conversation_id = $2 AND reply_to = $3"
        " AND role = 'assistant' AND status = 'complete' ORDER BY seq DESC LIMIT 1",
        tenant_id,
        conversation_id,
        row["seq"],
    )
    return _message(row), _message(reply) if reply else None


async def lock_conversation(conn: asyncpg.Connection, conversation_id: UUID) -> None:
    """Serialize cold-path writers of one conversation until the transaction ends.

    A transaction-scoped advisory lock: the hot path never takes it, so it never waits.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))", str(conversation_id)
    )


async def unanswered_user_seqs(
    conn: asyncpg.Connection, tenant_id: UUID, conversation_id: UUID
) -> list[int]:
    """Seqs of the user messages of a conversation with no assistant row at all (oldest first)."""
    # A set difference: linear in the conversation's length whatever the planner's
    # statistics say (a NOT EXISTS anti-join was planned as a nested loop comparing
    # every user row with every reply: quadratic, and resumes run on every SSE message).
    rows = await conn.fetch(
        "SELECT seq FROM messages WHERE tenant_id = $1 AND conversation_id = $2"
        " AND role = 'user'"
        " EXCEPT SELECT reply_to FROM messages WHERE tenant_id = $1 AND conversation_id = $2"
        " AND role = 'assistant' AND reply_to IS NOT NULL"
        " ORDER BY seq",
        tenant_id,
        conversation_id,
    )
    return [r["seq"] for r in rows]


async def history(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    conversation_id: UUID,
    before: int | None,
    limit: int,
) -> list[StoredMessage]:
    """A page of a conversation, newest first up to `limit`, returned oldest first."""
    rows = await conn.fetch(
        "SELECT seq, message_id, role, ciphertext, created_at, status, finish_reason, reply_to"
        " FROM messages WHERE tenant_id = $1 AND conversation_id = $2"
        " AND ($3::bigint IS NULL OR seq < $3) ORDER BY seq DESC LIMIT $4",
        tenant_id,
        conversation_id,
        before,
        limit,
    )
    return [_message(r) for r in reversed(rows)]


async def consent_rows(
    conn: asyncpg.Connection, tenant_id: UUID, subject_id: UUID
) -> list[asyncpg.Record]:
    """The latest decision per purpose for a subject."""
    return list(
        await conn.fetch(
            "SELECT DISTINCT ON (purpose) purpose, granted, consent_version FROM consents "
            "WHERE tenant_id = $1 AND subject_id = $2 ORDER BY purpose, consent_id DESC",
            tenant_id,
            subject_id,
        )
    )


async def record_consents(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    subject_id: UUID,
    session_id: UUID | None,
    changes: list[tuple[str, bool]],
    policy_version: int,
    consent_version: int,
    source: str,
) -> None:
    """Append consent decisions, in the order given; rows are never updated."""
    if not changes:
        return
    # one statement for every purpose; WITH ORDINALITY keeps the given order of ids
    await conn.execute(
        """
        INSERT INTO consents (tenant_id, subject_id, session_id, purpose, granted,
                              policy_version, consent_version, source)
        SELECT $1, $2, $3, c.purpose, c.granted, $6, $7, $8
        FROM unnest($4::text[], $5::bool[]) WITH ORDINALITY AS c(purpose, granted, n)
        ORDER BY c.n
        """,
        tenant_id,
        subject_id,
        session_id,
        [p for p, _ in changes],
        [g for _, g in changes],
        policy_version,
        consent_version,
        source,
    )
