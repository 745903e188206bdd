"""A visitor's session: created or resumed on hello, with consent state and signals."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import bus, identity, metrics, store
from gateway.crypto import CryptoError, new_token, token_hash
from gateway.db import tenant_tx
from gateway.protocol import BAD_REQUEST, RATE_LIMITED, SESSION_INVALID, ProtocolError
from gateway.services import Services
from policies import (
    PURPOSES,
    TRACKING_PURPOSES,
    CompiledPolicy,
    ConsentState,
    PlaceholderMap,
    Signals,
    UnknownPurpose,
    apply_consent_change,
    day_of,
    decide_chat,
    signals_from,
)

AGE_PURPOSE = "age_confirmation"
CONTEXT_MESSAGES = 20


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the gateway keeps of the HTTP request: never the raw IP or the raw headers."""

    ip_anon: str | None
    signal_headers: Mapping[str, str]
    cookie_token: str | None
    # minted before a WebSocket upgrade so it can go into Set-Cookie on the 101
    new_token: str | None = None
    # browser family, major version and device class: all analytics keeps of a User-Agent
    client: Mapping[str, Any] = field(default_factory=dict)
    # what per-IP limits count by: ip_anon under truncate (a /24 or /48); under hash and
    # full a keyed hash of the address (IPv4) or its /64 (IPv6); None under drop
    ip_key: str | None = None


@dataclass(slots=True)
class Visitor:
    """The in-memory state of one visitor on one connection."""

    tenant_id: UUID
    session_id: UUID
    subject_id: UUID
    conversation_id: UUID
    token: str
    resumed: bool
    consent: ConsentState
    signals: Signals
    restricted: bool = False
    # what per-IP limits count the visitor by (RequestContext.ip_key; None under drop)
    ip_key: str | None = None
    placeholders: PlaceholderMap = field(default_factory=PlaceholderMap)
    # the conversation's sealed map as this connection last read or wrote it: a message
    # is stored only while the stored map is still this one (migrations/0014)
    map_sealed: bytes | None = None
    # how many placeholders that sealed map holds: more in memory means it must be written
    map_len: int = 0
    # the last exchanges in the redacted form the model saw, for its context
    context: list[dict[str, str]] = field(default_factory=list)
    # client ids answered while the transcript is not kept (dedupe without storage)
    unstored: dict[str, str] = field(default_factory=dict)
    # consent changed outside this connection (privacy API, a request, a bus gap): read it
    # again from the database before the next message is checked
    consent_stale: bool = False
    # bumped by every change of `consent` that a concurrent re-read must not overwrite
    consent_epoch: int = 0
    # time.monotonic() by which the session row expires (a socket does not slide it)
    expires: float = math.inf


def consent_state(rows: Sequence[Mapping[str, Any]], cp: CompiledPolicy) -> ConsentState:
    """Current consent from the latest row per purpose; grants under an older version are stale."""
    current = cp.policy.consent_version
    latest = [r for r in rows if r["granted"]]
    granted = frozenset(
        r["purpose"] for r in latest if r["purpose"] in PURPOSES and r["consent_version"] == current
    )
    versions = [r["consent_version"] for r in latest]
    version = current if not versions or current in versions else max(versions)
    # an age confirmation is a fact, not a consent: it survives a consent_version change
    # (docs/policy-reference.md), as it does in memory on an open socket
    age = any(r["purpose"] == AGE_PURPOSE for r in latest)
    revoked = frozenset(r["purpose"] for r in rows if not r["granted"] and r["purpose"] in PURPOSES)
    return ConsentState(granted=granted, version=version, age_confirmed=age, revoked=revoked)


async def read_consent(svc: Services, v: Visitor, cp: CompiledPolicy) -> tuple[ConsentState, bool]:
    """The visitor's recorded consent and restriction, as a hello would load them."""
    async with tenant_tx(svc.pool, v.tenant_id) as conn:
        restricted = await conn.fetchval(
            "SELECT restricted FROM subjects WHERE tenant_id = $1 AND subject_id = $2",
            v.tenant_id,
            v.subject_id,
        )
        if restricted is None:
            raise ProtocolError(SESSION_INVALID, "this session's data was erased")
        rows = await store.consent_rows(conn, v.tenant_id, v.subject_id)
    return consent_state(rows, cp), bool(restricted)


def consent_changes(data: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Grants and revokes from `{purpose: bool}` or `{grant?: [purpose], revoke?: [purpose]}`."""
    if "grant" in data or "revoke" in data:
        lists = (data.get("grant", []), data.get("revoke", []))
        if data.keys() - {"grant", "revoke"} or not all(
            isinstance(names, list) and all(isinstance(p, str) for p in names) for names in lists
        ):
            raise ProtocolError(BAD_REQUEST, "consent grant and revoke must list purpose names")
        return list(lists[0]), list(lists[1])
    grant = [p for p, v in data.items() if v is True]
    revoke = [p for p, v in data.items() if v is False]
    if len(grant) + len(revoke) != len(data):
        raise ProtocolError(BAD_REQUEST, "consent values must be true or false")
    return grant, revoke


def consent_update(
    v: Visitor,
    cp: CompiledPolicy,
    grant: list[str],
    revoke: list[str],
    age_confirmed: bool | None,
) -> tuple[ConsentState, list[tuple[str, bool]]]:
    """The consent state after a change, and the decisions to record (none if nothing changed)."""
    grant = [p for p in grant if p != "necessary"]
    revoke = [p for p in revoke if p != "necessary"]
    try:
        state, events = apply_consent_change(v.consent, grant, revoke, cp.policy.consent_version)
    except UnknownPurpose:
        raise ProtocolError(BAD_REQUEST, "unknown consent purpose") from None
    changes = [(e.purpose, e.granted) for e in events]
    if age_confirmed and not v.consent.age_confirmed:
        changes.append((AGE_PURPOSE, True))
        state = ConsentState(state.granted, state.version, True, state.revoked)
    return state, changes


async def record_consent(
    conn: asyncpg.Connection,
    v: Visitor,
    cp: CompiledPolicy,
    changes: list[tuple[str, bool]],
    source: str,
) -> None:
    """Record consent decisions (append-only, with policy and consent versions)."""
    if not changes:
        return
    await store.record_consents(
        conn,
        v.tenant_id,
        v.subject_id,
        v.session_id,
        changes,
        cp.version,
        cp.policy.consent_version,
        source,
    )
    for purpose, granted in changes:
        if purpose != AGE_PURPOSE:
            metrics.count_consent(purpose, "granted" if granted else "revoked")


async def apply_consent(
    conn: asyncpg.Connection,
    v: Visitor,
    cp: CompiledPolicy,
    grant: list[str],
    revoke: list[str],
    age_confirmed: bool | None,
    source: str,
) -> list[tuple[str, bool]]:
    """Apply and record consent changes; the decisions recorded (none if nothing changed)."""
    state, changes = consent_update(v, cp, grant, revoke, age_confirmed)
    await record_consent(conn, v, cp, changes, source)
    v.consent = state
    return changes


async def announce_consent(svc: Services, v: Visitor, changes: list[tuple[str, bool]]) -> None:
    """After the decisions are committed: the visitor's other sockets (other tabs, other
    devices of a verified user, on any process) apply them before their next message."""
    if changes:
        revoked = [purpose for purpose, granted in changes if not granted]
        await bus.publish_consent(svc.bus, v.tenant_id, v.subject_id, revoked)


async def open_session(
    svc: Services,
    tenant_id: UUID,
    cp: CompiledPolicy,
    ctx: RequestContext,
    hello: Mapping[str, Any],
) -> Visitor:
    """Resume the session a valid token names, or start a new one; apply hello's consent.

    A resume is one round trip (the SSE fallback resumes on every message); a
    transaction follows only when there is something to write: a consent change, or
    replies that never completed.
    """
    signals = signals_from(ctx.signal_headers, hello.get("signals"), cp.policy.honor_dnt)
    grant, revoke = consent_changes(hello.get("consent") or {})
    age = hello.get("age_confirmed")
    # who the hello verifies as (None: no one), before any session is looked up: the
    # session of another site user on this browser, of one who just signed in, or of a
    # signed-in user who left is never resumed, nor touched by the attempt
    ref = await _hello_ref(svc, tenant_id, hello.get("user"))
    resumed = await _resume(svc, tenant_id, cp, ctx, hello, signals, ref)
    if resumed is None:
        await _may_open_session(svc, tenant_id, cp, ctx)
        # a new session and its consent commit together, or not at all
        async with tenant_tx(svc.pool, tenant_id) as conn:
            v, new_subject = await _new_session(conn, svc, tenant_id, cp, ctx, signals, ref)
            changes = await apply_consent(conn, v, cp, grant, revoke, age, "widget")
            v.consent, by_signal = _known_consumer_gpc(v.consent, cp, ref, signals)
            await record_consent(conn, v, cp, by_signal, "signal")
        if not new_subject:  # a known user's subject may have sockets open elsewhere
            await announce_consent(svc, v, changes + by_signal)
        return v
    token, found = resumed
    v = _visitor(tenant_id, found.session, token, consent_state(found.consents, cp), signals, ctx)
    try:
        cipher = svc.vault.unwrapped(tenant_id, v.subject_id, found.wrapped_key)
    except CryptoError:
        raise ProtocolError(SESSION_INVALID, "this session's data was erased") from None
    state, changes = consent_update(v, cp, grant, revoke, age)
    state, by_signal = _known_consumer_gpc(state, cp, ref, signals)
    # the common resume writes nothing: no transaction at all
    if changes or by_signal or found.unanswered:
        async with tenant_tx(svc.pool, tenant_id) as conn:
            await record_consent(conn, v, cp, changes, "widget")
            await record_consent(conn, v, cp, by_signal, "signal")
            if found.unanswered:
                await _mark_interrupted(svc, conn, v, cipher)
        await announce_consent(svc, v, changes + by_signal)
    v.consent = state
    _load_context(svc, v, found, cipher)
    return v


def _known_consumer_gpc(
    state: ConsentState, cp: CompiledPolicy, ref: bytes | None, signals: Signals
) -> tuple[ConsentState, list[tuple[str, bool]]]:
    """Global Privacy Control from a verified site user holds for the user, not only for
    this browser: recorded as a refusal of analytics and marketing (source `signal`),
    which every session of the user loads and its open sockets apply (CCPA regulations
    §7025(c)(1): a signal from a known consumer applies to the consumer). An anonymous
    visitor's GPC holds for the browser that sends it (`effective_purposes`). Recorded
    once: a refusal already on record is not written again.

    A purpose the policy requires is not refused: a refusal would stop the user chatting
    anywhere, where GPC stops only tracking; on the browser that sends it the signal still
    switches it off, as for anyone."""
    if ref is None or not signals.gpc:
        return state, []
    purposes = TRACKING_PURPOSES - cp.required
    new, events = apply_consent_change(state, (), purposes, cp.policy.consent_version)
    return new, [(e.purpose, e.granted) for e in events]


async def _resume(
    svc: Services,
    tenant_id: UUID,
    cp: CompiledPolicy,
    ctx: RequestContext,
    hello: Mapping[str, Any],
    signals: Signals,
    ref: bytes | None,
) -> tuple[str, store.ResumedSession] | None:
    """The live session named by hello's token, else by the cookie's, with its token:
    one that belongs to the visitor `ref` names (store.resume)."""
    for token in (hello.get("session_token"), ctx.cookie_token):
        if not token:
            continue
        found = await store.resume(
            svc.pool,
            tenant_id,
            token_hash(token),
            ctx.ip_anon,
            signals.dnt,
            signals.gpc,
            cp.policy.session_days,
            CONTEXT_MESSAGES,
            ref,
        )
        if found is not None:
            return token, found
    return None


async def _may_open_session(
    svc: Services, tenant_id: UUID, cp: CompiledPolicy, ctx: RequestContext
) -> None:
    """A new session writes a subject, a data key, a session and a conversation: at most
    `new_sessions_per_ip_per_minute` per IP and `per_tenant_per_minute` per site, else
    `rate_limited` (storage must not grow at a client's pace)."""
    limits = cp.policy.rate_limit
    tag = f"{{{tenant_id}}}"  # the tenant is the hash tag, as for messages (gateway/chat.py)
    buckets = [(f"{tag}:nt", limits.per_tenant_per_minute)]
    if ctx.ip_key:
        buckets.append((f"{tag}:n:{ctx.ip_key}", limits.new_sessions_per_ip_per_minute))
    wait = await svc.limiter.hit(buckets)
    if wait is not None:
        raise ProtocolError(
            RATE_LIMITED, "too many new sessions; try again shortly", retry_after=wait
        )


async def _hello_ref(svc: Services, tenant_id: UUID, user: Any) -> bytes | None:
    """The external_ref hello's `user` verifies as; None for no user, or one that does
    not verify (ignored, as everywhere)."""
    if user is None:
        return None
    async with tenant_tx(svc.pool, tenant_id) as conn:
        return await identity.verified_ref(conn, svc.keyring, svc.hash_keys, tenant_id, user)


def _visitor(
    tenant_id: UUID,
    row: store.SessionRow,
    token: str,
    consent: ConsentState,
    signals: Signals,
    ctx: RequestContext,
) -> Visitor:
    return Visitor(
        tenant_id,
        row.session_id,
        row.subject_id,
        row.conversation_id,
        token,
        row.resumed,
        consent,
        signals,
        row.restricted,
        ctx.ip_key,
    )


async def _new_session(
    conn: asyncpg.Connection,
    svc: Services,
    tenant_id: UUID,
    cp: CompiledPolicy,
    ctx: RequestContext,
    signals: Signals,
    ref: bytes | None,
) -> tuple[Visitor, bool]:
    """A new session, for a new subject or the existing one of the verified site user
    `ref` names; and whether the subject is new."""
    token = ctx.new_token or new_token()
    subject_id, dek = await identity.subject_for_ref(conn, svc.keyring, tenant_id, ref)
    if dek is not None:  # made just now
        svc.vault.remember(tenant_id, subject_id, dek)
    row = await store.create_session(
        conn,
        tenant_id,
        subject_id,
        token_hash(token),
        ctx.ip_anon,
        signals.dnt,
        signals.gpc,
        cp.policy.session_days,
    )
    # a subject made in this transaction has no decisions yet: no query for them
    rows = [] if dek is not None else await store.consent_rows(conn, tenant_id, subject_id)
    return _visitor(tenant_id, row, token, consent_state(rows, cp), signals, ctx), dek is not None


async def _mark_interrupted(
    svc: Services, conn: asyncpg.Connection, v: Visitor, cipher: AESGCM
) -> None:
    """On resume, record every reply that never completed as an `interrupted` assistant row.

    A user message with no assistant row at all was being answered when its connection
    (or its worker) died, or its reply failed: an empty sealed marker makes that visible
    in history. It costs nothing per message: only a resume that found such messages
    comes here. A reply still streaming on another live socket of the same session gets
    a marker too; when it completes, its `complete` row follows the marker and
    supersedes it (docs/protocol.md).
    """
    await store.lock_conversation(conn, v.conversation_id)  # two resumes mark once
    # read again under the lock: a concurrent resume may have marked them meanwhile
    seqs = await store.unanswered_user_seqs(conn, v.tenant_id, v.conversation_id)
    if not seqs:
        return
    for seq in seqs:
        mid = uuid4()
        blob = svc.vault.seal_text(cipher, v.tenant_id, v.conversation_id, mid, "assistant", "")
        await store.insert_message(
            conn,
            store.NewMessage(
                v.tenant_id,
                v.conversation_id,
                mid,
                "assistant",
                blob,
                reply_to=seq,
                status="interrupted",
                finish_reason="interrupted",
            ),
        )


def _load_context(svc: Services, v: Visitor, found: store.ResumedSession, cipher: AESGCM) -> None:
    """Restore the redaction map and the model's recent context after a reconnect.

    `found.recent` holds no interrupted markers: they are empty, nothing the model said.
    """
    v.placeholders = open_map(svc, v, cipher, found.redaction_sealed)
    v.map_sealed, v.map_len = found.redaction_sealed, len(v.placeholders)
    for message_id, role, ciphertext in found.recent:
        text = svc.vault.open_text(
            cipher, v.tenant_id, v.conversation_id, message_id, role, ciphertext
        )
        # the stored text is what the visitor saw; the model sees it redacted again
        v.context.append({"role": role, "content": v.placeholders.reapply(text)})


def open_map(svc: Services, v: Visitor, cipher: AESGCM, sealed: bytes | None) -> PlaceholderMap:
    """A conversation's redaction map from its sealed form (empty when there is none)."""
    if not sealed:
        return PlaceholderMap()
    raw = svc.vault.open_blob(cipher, v.tenant_id, v.conversation_id, "redaction", sealed)
    return PlaceholderMap.from_dict(orjson.loads(raw))


async def reload_map(svc: Services, v: Visitor) -> None:
    """Read the conversation's map again: another connection of the session, or retention,
    changed it since this one read it. A map cleared by retention (its messages are gone)
    takes the context with it: the turns left in memory speak of placeholders no longer
    issued."""
    async with tenant_tx(svc.pool, v.tenant_id) as conn:
        cipher = await svc.vault.cipher(conn, v.tenant_id, v.subject_id)
        sealed = await conn.fetchval(
            "SELECT redaction_sealed FROM conversations "
            "WHERE tenant_id = $1 AND conversation_id = $2",
            v.tenant_id,
            v.conversation_id,
        )
    v.placeholders = open_map(svc, v, cipher, sealed)
    v.map_sealed, v.map_len = sealed, len(v.placeholders)
    if sealed is None:
        v.context.clear()


def welcome(v: Visitor, cp: CompiledPolicy) -> dict[str, Any]:
    """The answer to hello (and to a consent change): session and the policy as it applies."""
    decision = decide_chat(cp, v.consent, v.signals)
    return {
        "type": "welcome",
        "session_token": v.token,
        "conversation_id": str(v.conversation_id),
        "resumed": v.resumed,
        "policy": {
            "required_consents": sorted(cp.policy.required_consents),
            "granted": sorted(v.consent.granted),
            "retention_days": cp.policy.retention_days,
            "tracking": "on" if decision.tracking and not v.restricted else "off",
            # whether this visitor's messages are kept, as decided now (a widget shows it)
            "storage": "on" if decision.store_transcript else "off",
            "age_confirmation": cp.policy.age_confirmation,
            # whether this visitor confirmed it: a widget holds back what was typed
            # before the welcome until they do
            "age_confirmed": v.consent.age_confirmed,
            "min_age": cp.policy.min_age,
            "consent_version": cp.policy.consent_version,
            "privacy_policy_url": cp.policy.privacy_policy_url,
        },
    }


def today() -> int:
    """The day number used for daily salt rotation (the supervisor's clock too)."""
    return day_of(time.time())
