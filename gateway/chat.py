"""The message path: enforce the policy, store, forward, stream back, store the reply.

Order (DESIGN §4): rate limit → consent → size → redaction → encrypt and store →
forward → stream back (restoring placeholders) → encrypt and store the reply.
Nothing reaches the model before the visitor's message is durably stored (when
the policy keeps transcripts), and nothing is acknowledged that is not stored.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import uuid4

import asyncpg
import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import metrics, protocol, store
from gateway.claims import Claim
from gateway.crypto import CryptoError, KeyDestroyed
from gateway.db import tenant_tx
from gateway.logs import log_secrets
from gateway.protocol import ProtocolError
from gateway.redactpool import HelperFailed
from gateway.services import Services
from gateway.store import MapChanged, NewMessage
from gateway.upstream import UpstreamConfig, UpstreamError
from gateway.visitor import CONTEXT_MESSAGES, Visitor, reload_map
from policies import (
    ChatDecision,
    CompiledPolicy,
    ConsentState,
    ReplyRestorer,
    TooCostly,
    decide_chat,
)

log = logging.getLogger("omnigate.chat")

Emit = Callable[[dict[str, Any]], Awaitable[None]]

# Failures of the database that mean "not stored", as opposed to a bug.
STORAGE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def _erased(msg_id: str) -> ProtocolError:
    # the widget starts afresh: a retry would resume no session and store the text anew
    return ProtocolError(protocol.SESSION_INVALID, "this session's data was erased", id=msg_id)


def _busy(msg_id: str) -> ProtocolError:
    return ProtocolError(
        protocol.RATE_LIMITED,
        "this message is being answered on another connection; send it again shortly",
        id=msg_id,
        retry_after=BUSY_RETRY_AFTER,
        reason="busy",
    )


def _storage_error(msg_id: str) -> ProtocolError:
    return ProtocolError(
        protocol.STORAGE_UNAVAILABLE,
        "the message could not be stored; send it again",
        id=msg_id,
        retry_after=1.0,
    )


async def handle_message(svc: Services, v: Visitor, msg_id: str, text: str, emit: Emit) -> None:
    """Carry one visitor message through every check to a `done` or a typed `error`."""
    cp = await svc.tenants.policy(v.tenant_id)
    outcome = "answered"
    claim: Claim | None = None
    # what the checks decide on (no await between here and the decision): a revocation
    # that arrives while the message waits replaces it, and is applied before anything
    # is stored or forwarded (`_still_allowed`)
    seen = v.consent
    # should an exception or traceback ever carry the text, the log filter removes it
    with log_secrets(text):
        try:
            decision, claim = await _checks(svc, v, cp, msg_id, text, emit)
            outcome = (
                await _exchange(svc, v, cp, decision, claim, seen, msg_id, text, emit) or outcome
            )
        except ProtocolError as exc:
            outcome = exc.outcome or OUTCOME_BY_CODE.get(exc.code, "other")
            if exc.id is None:
                exc.id = msg_id
            metrics.count_error_frame(exc.code)
            await emit(protocol.error_frame(exc))
        except Exception:
            # a bug: logged here, while the message text is still masked in the logs
            outcome = "other"
            log.exception(
                "unexpected failure answering a message", extra={"tenant_id": str(v.tenant_id)}
            )
            metrics.count_error_frame(protocol.INTERNAL)
            await emit(
                protocol.error_frame(ProtocolError(protocol.INTERNAL, "internal error", id=msg_id))
            )
        except BaseException:
            outcome = "other"  # cancelled: the visitor went away mid-reply
            raise
        finally:
            if claim is not None:
                svc.claims.release(claim)
            metrics.count_message(outcome)


OUTCOME_BY_CODE = {
    protocol.RATE_LIMITED: "rate_limited",
    protocol.CONSENT_REQUIRED: "refused_consent",
    protocol.TOO_LARGE: "too_large",
    protocol.UPSTREAM_UNAVAILABLE: "upstream_error",
    protocol.UPSTREAM_TIMEOUT: "upstream_error",
    protocol.UPSTREAM_REJECTED: "upstream_error",
    protocol.STORAGE_UNAVAILABLE: "storage_error",
}


async def _checks(
    svc: Services, v: Visitor, cp: CompiledPolicy, msg_id: str, text: str, emit: Emit
) -> tuple[ChatDecision, Claim | None]:
    """Rate limit, consent, restriction and size, in the order of DESIGN §4; and, for a
    message that will be stored, its reply's claim (gateway/claims.py), which the
    rate-limit call takes in Redis in the same round trip."""
    with metrics.timed("policy"):
        decision = decide_chat(cp, v.consent, v.signals)
    # refusals come in DESIGN's order, after the rate limit; known now, a message refused
    # anyway takes no claim
    refusal = _refusal(v, cp, msg_id, text)
    claim = None
    if decision.allowed and decision.store_transcript and refusal is None:
        client_ref = await svc.hash_keys.hash(v.tenant_id, v.conversation_id.bytes, msg_id.encode())
        # the tenant is the hash tag, as for the buckets; internal ids and a keyed hash
        claim = svc.claims.new(f"{{{v.tenant_id}}}:{v.conversation_id}:{client_ref.hex()}")
        claim.client_ref = client_ref
    limits = cp.policy.rate_limit
    # the tenant is the hash tag: one message's buckets share a Redis Cluster slot
    tag = f"{{{v.tenant_id}}}"
    buckets = [
        (f"{tag}:s:{v.session_id}", limits.per_session_per_minute),
        (f"{tag}:t", limits.per_tenant_per_minute),
    ]
    if v.ip_key:
        buckets.append((f"{tag}:i:{v.ip_key}", limits.per_ip_per_minute))
    # all or none: a refused message spends no token of any bucket
    wait = await svc.limiter.hit(buckets, claim)
    if wait is not None:
        raise ProtocolError(
            protocol.RATE_LIMITED, "too many messages; slow down", id=msg_id, retry_after=wait
        )
    if not decision.allowed:
        await emit(protocol.consent_required(list(decision.missing)))
        raise ProtocolError(
            protocol.CONSENT_REQUIRED, "consent is needed before chatting", id=msg_id
        )
    if refusal is not None:
        raise refusal
    return decision, claim


def _still_allowed(
    v: Visitor, cp: CompiledPolicy, seen: ConsentState, msg_id: str
) -> ChatDecision | None:
    """None when consent and restriction are as the checks saw them (an identity test);
    else the decision again, raising its refusal: a revocation or restriction that
    arrived while the message waited (another socket, the privacy API, a consent frame)
    holds before anything more is stored or forwarded."""
    if v.consent is seen and not v.restricted:
        return None
    decision = decide_chat(cp, v.consent, v.signals)
    if not decision.allowed:
        raise ProtocolError(protocol.CONSENT_REQUIRED, "consent was withdrawn meanwhile", id=msg_id)
    if v.restricted:
        raise _restricted(msg_id)
    return decision


def _restricted(msg_id: str) -> ProtocolError:
    return ProtocolError(
        protocol.CONSENT_REQUIRED,
        "processing is restricted at your request",
        id=msg_id,
        outcome="restricted",
    )


def _refusal(v: Visitor, cp: CompiledPolicy, msg_id: str, text: str) -> ProtocolError | None:
    """Restriction or size: the refusals after consent."""
    if v.restricted:
        return _restricted(msg_id)
    if len(text) > cp.policy.max_message_chars:
        return ProtocolError(
            protocol.TOO_LARGE,
            f"messages are limited to {cp.policy.max_message_chars} characters",
            id=msg_id,
        )
    return None


async def _exchange(
    svc: Services,
    v: Visitor,
    cp: CompiledPolicy,
    decision: ChatDecision,
    claim: Claim | None,
    seen: ConsentState,
    msg_id: str,
    text: str,
    emit: Emit,
) -> str | None:
    """Answer an allowed message; "cut" when the reply was cut at its bound."""
    keep = decision.store_transcript
    if not keep and msg_id in v.unstored:
        # a re-send while nothing is stored: answered from this connection's memory
        await emit(protocol.ack(msg_id, None))
        await emit(protocol.delta(msg_id, v.unstored[msg_id]))
        await emit(protocol.done(msg_id, None, "stop"))
        return None
    try:
        with metrics.timed("redaction"):
            try:
                found = cp.redactor.find(text, svc.redaction.budget)
            except TooCostly:
                # costly to search (national phone numbers, lists of numbers): in a helper
                found = await svc.redaction.find(cp.redactor, text)
                metrics.REDACTION_HELPER.inc()
            redacted = cp.redactor.apply(text, found, v.placeholders)
    except Exception as exc:
        # fail closed: nothing leaves for the model when the rules could not run
        if isinstance(exc, HelperFailed):
            # an operational condition (the helper died, took too long or is saturated),
            # not a bug: named by its fixed reason, which holds no text, without traceback
            log.warning(
                "redaction helper failed", extra={"tenant_id": str(v.tenant_id), "reason": str(exc)}
            )
        else:
            log.exception("redaction failed", extra={"tenant_id": str(v.tenant_id)})
        raise ProtocolError(
            protocol.INTERNAL,
            "privacy rules could not be applied; nothing was sent",
            id=msg_id,
            outcome="redaction_failed",
        ) from None
    for entity, n in redacted.counts.items():
        metrics.count_redaction(entity, n)

    # the redaction may have waited for the helper: consent withdrawn meanwhile holds
    now = _still_allowed(v, cp, seen, msg_id)
    if claim is None or (now is not None and not now.store_transcript):
        return await _reply(svc, v, cp, seen, msg_id, redacted.text, None, emit)
    # one reply at a time per stored message, on every process: a re-send while it
    # streams elsewhere is told to wait (gateway/claims.py)
    claimed = await svc.claims.settle(claim, REPLY_LEASE)
    for _ in range(MAP_ATTEMPTS):
        # the sealed map is rewritten when it lacks placeholders issued since it was
        # read or written: by this message, or while storage was off
        grew = len(v.placeholders) != v.map_len
        try:
            user_seq = await _store_user(
                svc, v, msg_id, text, claim.client_ref, grew, claimed, emit
            )
            break
        except MapChanged:
            # another tab of this session, or retention, changed the map since this
            # connection read it: redact again with the stored one, then store
            await _reload_map(svc, v, msg_id)
            redacted = cp.redactor.apply(text, found, v.placeholders)
    else:
        raise _storage_error(msg_id)
    if user_seq is not None:
        outcome = await _reply(svc, v, cp, seen, msg_id, redacted.text, user_seq, emit)
    else:
        outcome = None  # a re-send answered from storage
    claim.answered = True  # the reply is in storage: a re-send is answered from there
    return outcome


async def _reply(
    svc: Services,
    v: Visitor,
    cp: CompiledPolicy,
    seen: ConsentState,
    msg_id: str,
    redacted: str,
    user_seq: int | None,
    emit: Emit,
) -> str | None:
    """Acknowledge the message (stored as `user_seq`, or not stored when None), stream
    the model's reply, store it when the message was, and end with `done`."""
    await emit(protocol.ack(msg_id, user_seq))
    # the write may have waited: nothing is forwarded under consent withdrawn meanwhile,
    # and a reply is not kept once storage was
    now = _still_allowed(v, cp, seen, msg_id)
    keep_reply = user_seq is not None and (now is None or now.store_transcript)

    turn = {"role": "user", "content": redacted}
    # a re-sent unanswered message is already the last turn of the resumed context
    history = v.context[:-1] if v.context and v.context[-1] == turn else v.context
    prompt = [
        {"role": "system", "content": cp.policy.system_prompt},
        *history,
        turn,
    ]
    reply, raw_reply, finish, cut = await _stream_reply(svc, v, cp, msg_id, prompt, emit)

    reply_seq: int | None = None
    if keep_reply:
        reply_seq = await _store_reply(svc, v, msg_id, reply, raw_reply, user_seq, finish)
    else:
        v.unstored[msg_id] = reply
        if len(v.unstored) > 256:
            v.unstored.pop(next(iter(v.unstored)))
    v.context[:] = [*history, turn, {"role": "assistant", "content": raw_reply}]
    del v.context[:-CONTEXT_MESSAGES]
    await emit(protocol.done(msg_id, reply_seq, finish))
    return "cut" if cut else None


# writes of one message that may find the map changed by another tab before giving up
MAP_ATTEMPTS = 3
# a claim on a reply outlives the longest reply (cut at reply_timeout, retries included)
# by the time to store it; it ends sooner when released
REPLY_LEASE = UpstreamConfig.reply_timeout + 60.0
# a re-send whose reply streams elsewhere retries after this (the widget retries
# `rate_limited` messages; by then the reply is usually stored and answered from there)
BUSY_RETRY_AFTER = 1.0


async def _store_reply(
    svc: Services,
    v: Visitor,
    msg_id: str,
    reply: str,
    raw_reply: str,
    user_seq: int | None,
    finish: str,
) -> int | None:
    """Store the reply as the visitor saw it, with a map that still knows its values.

    The reply holds the values its placeholders were restored to, and a resume redacts
    it again with the stored map alone. Retention may have pruned the map meanwhile
    (`retention.prune_maps`: values no stored message held any more, until this one):
    then the values this reply restored are issued again, and written with it.
    """
    try:
        cipher = await svc.vault.cipher_for(svc.pool, v.tenant_id, v.subject_id)
        mid = uuid4()
        with metrics.timed("crypto"):
            blob = svc.vault.seal_text(
                cipher, v.tenant_id, v.conversation_id, mid, "assistant", reply
            )
        sealed_map = None
        restored: list[tuple[str, str, str]] | None = None
        for _ in range(MAP_ATTEMPTS):
            try:
                with metrics.timed("database"):
                    # one autocommit round trip: the function sets the tenant itself
                    seq = await _insert_message(
                        svc,
                        NewMessage(
                            v.tenant_id,
                            v.conversation_id,
                            mid,
                            "assistant",
                            blob,
                            reply_to=user_seq,
                            finish_reason=finish,
                            redaction_sealed=sealed_map,
                            check_map=True,
                            map_expected=v.map_sealed,
                        ),
                    )
            except MapChanged:
                if restored is None:  # from the map that restored them, before any reload
                    restored = v.placeholders.entries_in(raw_reply)
                await _reload_map(svc, v, msg_id)
                sealed_map = None
                if v.placeholders.reissue(restored):
                    with metrics.timed("crypto"):
                        sealed_map = _sealed_map(svc, v, cipher)
                continue
            if sealed_map is not None:
                v.map_sealed, v.map_len = sealed_map, len(v.placeholders)
            return seq
    except KeyDestroyed:
        raise _erased(msg_id) from None
    except (*STORAGE_ERRORS, CryptoError):
        raise _storage_error(msg_id) from None
    raise _storage_error(msg_id)


def _sealed_map(svc: Services, v: Visitor, cipher: AESGCM) -> bytes:
    """The visitor's redaction map as stored: sealed under the subject's key."""
    raw = orjson.dumps(v.placeholders.to_dict())
    return svc.vault.seal_blob(cipher, v.tenant_id, v.conversation_id, "redaction", raw)


async def _reload_map(svc: Services, v: Visitor, msg_id: str) -> None:
    try:
        await reload_map(svc, v)
    except KeyDestroyed:
        raise _erased(msg_id) from None
    except (*STORAGE_ERRORS, CryptoError):
        raise _storage_error(msg_id) from None


async def _insert_message(svc: Services, msg: NewMessage) -> int | None:
    """A message write: group-committed with other sessions' when the writer is running."""
    if svc.writer is not None:
        return await svc.writer.insert(msg)
    return await store.insert_message(svc.pool, msg)


async def _store_user(
    svc: Services,
    v: Visitor,
    msg_id: str,
    text: str,
    client_ref: bytes,
    map_changed: bool,
    claimed: bool,
    emit: Emit,
) -> int | None:
    """Store the visitor's message; None when it was a re-send already answered.

    Only the holder of the reply's claim (`claimed`, settled before this reads
    anything) goes on to generate the reply: anyone else is told to send again once it
    is stored. A reply stored and given back before then is found, not made twice.
    """
    try:
        cipher = await svc.vault.cipher_for(svc.pool, v.tenant_id, v.subject_id)
        mid = uuid4()
        with metrics.timed("crypto"):
            blob = svc.vault.seal_text(cipher, v.tenant_id, v.conversation_id, mid, "user", text)
            sealed_map = _sealed_map(svc, v, cipher) if map_changed else None
        with metrics.timed("database"):
            # one autocommit round trip: the function sets the tenant itself
            seq = await _insert_message(
                svc,
                NewMessage(
                    v.tenant_id,
                    v.conversation_id,
                    mid,
                    "user",
                    blob,
                    client_ref=client_ref,
                    redaction_sealed=sealed_map,
                    check_map=True,
                    map_expected=v.map_sealed,
                ),
            )
        if seq is not None:
            if sealed_map is not None:
                v.map_sealed, v.map_len = sealed_map, len(v.placeholders)
            if not claimed:
                # the same id, sent at the same moment elsewhere, holds the claim
                raise _busy(msg_id)
            return seq
        async with tenant_tx(svc.pool, v.tenant_id) as conn:
            found = await store.message_by_client_ref(
                conn, v.tenant_id, v.conversation_id, client_ref
            )
        if found is None:
            # the row it collided with is gone again (erased between the two statements)
            raise CryptoError("re-sent message vanished")
        user, reply = found
        stored = svc.vault.open_text(
            cipher, v.tenant_id, v.conversation_id, user.message_id, "user", user.ciphertext
        )
        if stored != text:
            raise ProtocolError(
                protocol.BAD_REQUEST, "id already used for another message", id=msg_id
            )
        if reply is None:
            if not claimed:
                raise _busy(msg_id)  # its reply is streaming on another connection
            # stored but never answered (the connection dropped): answer it now
            return user.seq
        text_out = svc.vault.open_text(
            cipher, v.tenant_id, v.conversation_id, reply.message_id, "assistant", reply.ciphertext
        )
    except KeyDestroyed:
        raise _erased(msg_id) from None
    except asyncpg.ForeignKeyViolationError:
        # the conversation is gone: erased by a process whose event this one missed?
        with contextlib.suppress(*STORAGE_ERRORS):
            if await svc.vault.destroyed(svc.pool, v.tenant_id, v.subject_id):
                raise _erased(msg_id) from None
        raise _storage_error(msg_id) from None
    except (*STORAGE_ERRORS, CryptoError):
        raise _storage_error(msg_id) from None
    await emit(protocol.ack(msg_id, user.seq))
    await emit(protocol.delta(msg_id, text_out))
    await emit(protocol.done(msg_id, reply.seq, reply.finish_reason or "stop"))
    return None


async def _stream_reply(
    svc: Services,
    v: Visitor,
    cp: CompiledPolicy,
    msg_id: str,
    prompt: list[dict[str, str]],
    emit: Emit,
) -> tuple[str, str, str, bool]:
    """Stream the model's reply to the visitor; returns (shown text, model text, finish,
    whether the gateway cut it at its size or time bound)."""
    restorer = ReplyRestorer(v.placeholders) if cp.policy.redact.restore_in_reply else None
    shown: list[str] = []
    raw: list[str] = []
    config = await svc.upstream_for(v.tenant_id, cp)
    stream = svc.model.stream_chat(prompt, config=config)
    started = time.perf_counter()
    first = True
    try:
        # leaving this block early (visitor gone) closes the upstream request
        async with stream:
            async for piece in stream:
                if first:
                    metrics.UPSTREAM_TTFT.observe(time.perf_counter() - started)
                    first = False
                raw.append(piece)
                out = restorer.feed(piece) if restorer else piece
                if out:
                    shown.append(out)
                    await emit(protocol.delta(msg_id, out))
    except UpstreamError as exc:
        metrics.count_upstream_error(exc.kind)
        log.warning(
            "upstream failed",
            exc_info=True,
            extra={"tenant_id": str(v.tenant_id), "kind": exc.kind, "code": exc.code},
        )
        raise ProtocolError(
            exc.code, UPSTREAM_MESSAGES[exc.code], id=msg_id, retry_after=exc.retry_after
        ) from None
    metrics.UPSTREAM_DURATION.observe(time.perf_counter() - started)
    if restorer:
        tail = restorer.flush()
        if tail:
            shown.append(tail)
            await emit(protocol.delta(msg_id, tail))
    if stream.limited:
        # a looping or hostile upstream (docs/operations.md): the reply is kept as cut
        log.warning(
            "upstream reply cut",
            extra={"tenant_id": str(v.tenant_id), "reason": stream.limited},
        )
    return "".join(shown), "".join(raw), stream.finish_reason or "stop", bool(stream.limited)


UPSTREAM_MESSAGES = {
    protocol.UPSTREAM_UNAVAILABLE: "the assistant is unavailable right now; try again shortly",
    protocol.UPSTREAM_TIMEOUT: "the assistant took too long to answer",
    protocol.UPSTREAM_REJECTED: "the assistant refused this request",
}
