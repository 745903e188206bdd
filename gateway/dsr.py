"""Data-subject requests (GDPR, CCPA): deadlines, transitions, and their SQL.

Deadlines: acknowledgement 48 hours after receipt; due one month, at most 30 days
(GDPR Art. 12(3)), or 45 days (CCPA) after receipt. A request may be extended once,
with a reason, before its deadline has passed: by up to 60 days (GDPR), or 45 days
(CCPA `know` and `delete`; an `opt_out` never). Every transition is audited in the
same transaction.

A request whose subject was erased (`subject_id` NULL) keeps no free text: the
erasure cleared it, and nothing would clear text written afterwards.
"""

from __future__ import annotations

import base64
import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import audit, bus, metrics
from gateway.crypto import CryptoError
from gateway.vault import Vault
from policies import TRACKING_PURPOSES as TRACKING

GDPR_KINDS = frozenset(
    {
        "access",
        "rectification",
        "erasure",
        "portability",
        "restriction",
        "objection",
        "automated_decision",
    }
)
CCPA_KINDS = frozenset({"know", "delete", "opt_out"})
#: kinds that switch tracking off at intake, and the purposes they revoke
TRACKING_OFF_KINDS = frozenset({"objection", "opt_out"})
# in a fixed order: the effects a request reports, and the rows it records
TRACKING_PURPOSES = tuple(sorted(TRACKING))
ACK_WITHIN = timedelta(hours=48)
#: at most; a GDPR request is due within one month too (`deadlines`)
DUE_WITHIN = {"gdpr": timedelta(days=30), "ccpa": timedelta(days=45)}
#: GDPR: two further months, as days (added to a due date of one month at most, 60 days
#: never end later than three months after receipt); CCPA: 45 further days
MAX_EXTENSION_DAYS = {"gdpr": 60, "ccpa": 45}
#: an opt-out is applied at intake and the CCPA allows it no extension
NOT_EXTENDABLE_KINDS = frozenset({"opt_out"})
OPEN = ("received", "acknowledged")
#: open and not yet acknowledged (the acknowledge transition moves a request out of it)
UNACKNOWLEDGED = "received"
STATUSES = ("received", "acknowledged", "completed", "rejected")
#: the list filters beyond the statuses themselves
FILTERS = ("open", "overdue", "ack_overdue")
MAX_DETAILS = 4000
#: details are the visitor's own words: stored sealed under the subject's data key (DESIGN §5)
SEALED_PREFIX = "sealed:v1:"
_DETAILS_PURPOSE = "request_details"

_COLUMNS = (
    "request_id, regime, kind, status, created_at, ack_due_at, due_at, acknowledged_at, "
    "extended_at, extension_days, extension_reason, closed_at, resolution, details, subject_id"
)


class RequestError(Exception):
    """A transition that the request's state or the rules refuse; `code` is machine-readable."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Deadlines:
    """When a request must be acknowledged and answered."""

    ack_due_at: datetime
    due_at: datetime


def one_month_after(at: datetime) -> datetime:
    """`at` plus one calendar month in UTC, clamped to the month's end like PostgreSQL's
    `+ interval '1 month'` (31 January gives 28 or 29 February)."""
    utc = at.astimezone(UTC)
    year, month = (utc.year + 1, 1) if utc.month == 12 else (utc.year, utc.month + 1)
    day = min(utc.day, calendar.monthrange(year, month)[1])
    return utc.replace(year=year, month=month, day=day).astimezone(at.tzinfo)


def deadlines(regime: str, received_at: datetime) -> Deadlines:
    """The deadlines of a request received at `received_at`."""
    due = received_at + DUE_WITHIN[regime]
    if regime == "gdpr":
        # Art. 12(3) says one month: for 30 or 31 January, 30 days would end in March
        due = min(due, one_month_after(received_at))
    return Deadlines(received_at + ACK_WITHIN, due)


def public(row: asyncpg.Record | dict[str, Any], *, admin: bool = False) -> dict[str, Any]:
    """A request as returned by the API (`id` instead of request_id; no subject to visitors)."""
    doc = dict(row)
    # asyncpg's UUID type is not one orjson knows: ids go out as strings
    doc["id"] = str(doc.pop("request_id"))
    subject = doc.pop("subject_id", None)
    if admin:
        doc["subject_id"] = None if subject is None else str(subject)
    now = datetime.now(doc["due_at"].tzinfo)
    doc["overdue"] = doc["status"] in OPEN and doc["due_at"] < now
    # answering (completing or rejecting) without acknowledging first ends it too
    doc["ack_overdue"] = doc["status"] == UNACKNOWLEDGED and doc["ack_due_at"] < now
    return doc


def seal_details(cipher: AESGCM, tenant_id: UUID, request_id: UUID, text: str) -> str:
    """The column value for a request's free text: sealed, base64, with a version prefix."""
    blob = Vault.seal_blob(cipher, tenant_id, request_id, _DETAILS_PURPOSE, text.encode())
    return SEALED_PREFIX + base64.b64encode(blob).decode()


def open_details(
    cipher: AESGCM | None, tenant_id: UUID, request_id: UUID, stored: str | None
) -> str | None:
    """The free text of a request; None when it is gone or does not open (key destroyed)."""
    if stored is None or not stored.startswith(SEALED_PREFIX):
        return stored  # NULL, or written before details were sealed
    if cipher is None:
        return None
    try:
        blob = base64.b64decode(stored[len(SEALED_PREFIX) :], validate=True)
        return Vault.open_blob(cipher, tenant_id, request_id, _DETAILS_PURPOSE, blob).decode()
    except (CryptoError, ValueError):
        return None


def opened(row: asyncpg.Record, cipher: AESGCM | None, tenant_id: UUID) -> dict[str, Any]:
    """A request row as a dict with its details opened."""
    doc = dict(row)
    doc["details"] = open_details(cipher, tenant_id, doc["request_id"], doc.get("details"))
    return doc


async def create(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    subject_id: UUID,
    regime: str,
    kind: str,
    details: str | None,
    cipher: AESGCM | None = None,
) -> asyncpg.Record:
    """Record a new request and apply what must happen at once (restriction, objection).

    With `details`, `cipher` (the subject's data key) is required: the text is stored sealed.
    """
    now: datetime = await conn.fetchval("SELECT date_trunc('milliseconds', now())")
    d = deadlines(regime, now)
    request_id = uuid4()
    if details is not None:
        if cipher is None:
            raise ValueError("request details are stored sealed: the subject's key is needed")
        details = seal_details(cipher, tenant_id, request_id, details)
    row = await conn.fetchrow(
        "INSERT INTO privacy_requests (tenant_id, request_id, subject_id, regime, kind,"  # noqa: S608
        " created_at, ack_due_at, due_at, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        f" RETURNING {_COLUMNS}",
        tenant_id,
        request_id,
        subject_id,
        regime,
        kind,
        now,
        d.ack_due_at,
        d.due_at,
        details,
    )
    effects = await apply_immediate(conn, tenant_id, subject_id, kind)
    await audit.append(
        conn,
        tenant_id,
        "visitor",
        "request.received",
        f"request:{request_id}",
        {"regime": regime, "kind": kind, "effects": effects},
    )
    metrics.count_privacy_request(kind, "received")
    assert row is not None
    return row


async def apply_immediate(
    conn: asyncpg.Connection, tenant_id: UUID, subject_id: UUID, kind: str
) -> list[str]:
    """Restriction stops processing now; objection and opt-out stop analytics and marketing now."""
    if kind == "restriction":
        await conn.execute(
            "UPDATE subjects SET restricted = true WHERE tenant_id = $1 AND subject_id = $2",
            tenant_id,
            subject_id,
        )
        return ["processing_restricted"]
    if kind in TRACKING_OFF_KINDS:
        await conn.execute(
            "UPDATE subjects SET tracking_opt_out = true WHERE tenant_id = $1 AND subject_id = $2",
            tenant_id,
            subject_id,
        )
        await conn.execute(
            """
            INSERT INTO consents (tenant_id, subject_id, purpose, granted, policy_version,
                                  consent_version, source)
            SELECT $1, $2, p, false,
                   COALESCE((SELECT max(version) FROM policies WHERE tenant_id = $1), 0),
                   COALESCE((SELECT (doc->>'consent_version')::int FROM policies
                             WHERE tenant_id = $1 ORDER BY version DESC LIMIT 1), 1),
                   'request'
            FROM unnest($3::text[]) AS p
            """,
            tenant_id,
            subject_id,
            list(TRACKING_PURPOSES),
        )
        return [f"{p}_off" for p in TRACKING_PURPOSES]
    return []


async def publish_effects(
    event_bus: bus.LocalBus, tenant_id: UUID, subject_id: UUID, kind: str
) -> None:
    """After `create` committed: carry its immediate effect to the subject's open sockets.

    Every process (through Redis when configured) applies it before the subject's next
    message: a restriction refuses chat, an objection or opt-out revokes tracking
    purposes (which refuses chat too when the policy requires one of them).
    """
    if kind == "restriction":
        await event_bus.publish(
            bus.SUBJECT_RESTRICTED, {"tenant_id": str(tenant_id), "subject_id": str(subject_id)}
        )
    elif kind in TRACKING_OFF_KINDS:
        await bus.publish_consent(event_bus, tenant_id, subject_id, TRACKING_PURPOSES)


async def publish_outcome(event_bus: bus.LocalBus, tenant_id: UUID, row: asyncpg.Record) -> None:
    """After `transition` committed: tell the subject's open sockets what it changed.

    A rejected restriction request may have lifted the restriction (`_lift_restriction`).
    A lift, like a consent grant, is never taken from an event: the consent event,
    revoking nothing, makes the subject's sockets on every process read their state
    again from the database before their next message.
    """
    subject_id = row["subject_id"]
    if row["kind"] == "restriction" and row["status"] == "rejected" and subject_id is not None:
        await bus.publish_consent(event_bus, tenant_id, subject_id, ())


async def _lift_restriction(conn: asyncpg.Connection, tenant_id: UUID, subject_id: UUID) -> bool:
    """Lift the subject's restriction unless another restriction request holds it.

    An open one still asks for it; a completed one granted it (Art. 18), and it stays.
    Returns whether it was lifted.
    """
    lifted = await conn.fetchval(
        """
        UPDATE subjects SET restricted = false
        WHERE tenant_id = $1 AND subject_id = $2 AND restricted
          AND NOT EXISTS (SELECT 1 FROM privacy_requests
                          WHERE tenant_id = $1 AND subject_id = $2 AND kind = 'restriction'
                            AND status = ANY($3::text[]))
        RETURNING true
        """,
        tenant_id,
        subject_id,
        [*OPEN, "completed"],
    )
    return lifted is True


async def get(
    conn: asyncpg.Connection, tenant_id: UUID, request_id: UUID, subject_id: UUID | None = None
) -> asyncpg.Record | None:
    """One request; with `subject_id`, only if it belongs to that subject."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM privacy_requests WHERE tenant_id = $1 AND request_id = $2"  # noqa: S608
        " AND ($3::uuid IS NULL OR subject_id = $3)",
        tenant_id,
        request_id,
        subject_id,
    )
    return row


async def list_requests(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    status: str | None,
    limit: int,
    after: tuple[datetime, UUID] | None = None,
) -> list[asyncpg.Record]:
    """Requests of a tenant, soonest due first, optionally of one status or filter (FILTERS).

    Keyset-paginated on (due_at, request_id), a total order: `after` is the position of
    the previous page's last request, and only the requests after it are listed.
    """
    statuses: list[str] | None = [status] if status else None
    where = "($2::text[] IS NULL OR status = ANY($2::text[]))"
    if status in ("overdue", "open"):
        statuses = list(OPEN)
    if status == "overdue":
        where += " AND due_at < now()"
    if status == "ack_overdue":
        statuses = [UNACKNOWLEDGED]
        where += " AND ack_due_at < now()"
    after_at, after_id = after if after is not None else (None, None)
    return list(
        await conn.fetch(
            f"SELECT {_COLUMNS} FROM privacy_requests WHERE tenant_id = $1 AND {where}"  # noqa: S608
            " AND ($3::timestamptz IS NULL OR (due_at, request_id) > ($3, $4::uuid))"
            " ORDER BY due_at, request_id LIMIT $5",
            tenant_id,
            statuses,
            after_at,
            after_id,
            limit,
        )
    )


async def transition(
    conn: asyncpg.Connection,
    tenant_id: UUID,
    request_id: UUID,
    action: str,
    actor: str,
    *,
    days: int | None = None,
    reason: str | None = None,
    resolution: str | None = None,
) -> asyncpg.Record:
    """Acknowledge, extend, complete or reject a request (audited); RequestError if refused.

    On a request whose subject was erased (by this very completion, or before), the
    reason or resolution is required as usual but not stored: the erasure cleared the
    request's free text, and nothing would ever clear text written after it.
    """
    for name, value in (("reason", reason), ("resolution", resolution)):
        if value is not None and not isinstance(value, str):
            raise RequestError(422, f"bad_{name}", f"{name} must be a string")
    if action == "reject":
        # rejecting a restriction request may lift the restriction: its subject is locked
        # first, before the request, in the order an erasure locks them (no deadlock), so
        # of two rejections running at once the second sees the first and lifts it
        await conn.execute(
            "SELECT 1 FROM subjects s JOIN privacy_requests r USING (tenant_id, subject_id)"
            " WHERE r.tenant_id = $1 AND r.request_id = $2 AND r.kind = 'restriction'"
            " FOR UPDATE OF s",
            tenant_id,
            request_id,
        )
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM privacy_requests WHERE tenant_id = $1 AND request_id = $2"  # noqa: S608
        " FOR UPDATE",
        tenant_id,
        request_id,
    )
    if row is None:
        raise RequestError(404, "not_found", "no such request")
    if row["status"] not in OPEN:
        raise RequestError(409, "closed", f"the request is already {row['status']}")
    details: dict[str, Any] = {"regime": row["regime"], "kind": row["kind"]}
    keep_text = row["subject_id"] is not None
    if action == "acknowledge":
        if row["status"] == "acknowledged":
            raise RequestError(409, "already_acknowledged", "the request is already acknowledged")
        sql = "status = 'acknowledged', acknowledged_at = now()"
        args: list[Any] = []
        status = "acknowledged"
    elif action == "extend":
        if row["kind"] in NOT_EXTENDABLE_KINDS:
            raise RequestError(422, "not_extendable", f"{row['kind']} requests cannot be extended")
        if row["extended_at"] is not None:
            raise RequestError(409, "already_extended", "a request can be extended only once")
        # GDPR Art. 12(3) and the CCPA alike: the extension is notified within the
        # original period
        if await conn.fetchval("SELECT $1::timestamptz <= now()", row["due_at"]):
            raise RequestError(
                409,
                "deadline_passed",
                "the deadline has passed: the request can no longer be extended",
            )
        most = MAX_EXTENSION_DAYS[row["regime"]]
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= most:
            raise RequestError(422, "bad_days", f"days must be 1-{most}")
        if not reason or not reason.strip():
            raise RequestError(422, "reason_required", "an extension needs a reason")
        sql = (
            "extended_at = now(), extension_days = $3, extension_reason = $4,"
            " due_at = due_at + make_interval(days => $3)"
        )
        args = [days, reason.strip()[:1000] if keep_text else None]
        status = row["status"]
        details["days"] = days
    elif action in ("complete", "reject"):
        if action == "reject" and (not reason or not reason.strip()):
            raise RequestError(422, "reason_required", "a rejection needs a reason")
        status = "completed" if action == "complete" else "rejected"
        sql = "status = $3, closed_at = now(), resolution = $4"
        text = (resolution or reason or "").strip()[:1000] or None
        args = [status, text if keep_text else None]
    else:
        raise RequestError(404, "not_found", "unknown action")
    updated = await conn.fetchrow(
        f"UPDATE privacy_requests SET {sql} WHERE tenant_id = $1 AND request_id = $2"  # noqa: S608
        f" RETURNING {_COLUMNS}",
        tenant_id,
        request_id,
        *args,
    )
    if action == "reject" and row["kind"] == "restriction" and row["subject_id"] is not None:
        if await _lift_restriction(conn, tenant_id, row["subject_id"]):
            details["effects"] = ["restriction_lifted"]
    await audit.append(
        conn, tenant_id, actor, f"request.{action}", f"request:{request_id}", details
    )
    # each status reached is counted once; an extension reaches none
    if status != row["status"]:
        metrics.count_privacy_request(row["kind"], status)
    assert updated is not None
    return updated


async def overdue_counts(conn: asyncpg.Connection, tenant_id: UUID) -> tuple[int, int]:
    """Open requests of one tenant past their due date, and unacknowledged ones past ack_due_at."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE due_at < now()) AS overdue,"
        " count(*) FILTER (WHERE status = $3 AND ack_due_at < now()) AS ack_overdue"
        " FROM privacy_requests WHERE tenant_id = $1 AND status = ANY($2::text[])",
        tenant_id,
        list(OPEN),
        UNACKNOWLEDGED,
    )
    assert row is not None
    return int(row["overdue"]), int(row["ack_overdue"])
