"""The widget protocol state machine for one connection, driven by a `send` callable.

It knows nothing of sockets: the WebSocket handler feeds it text frames and
gives it `send`; tests can give it `list.append` wrapped in a coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from uuid import UUID

from gateway import chat, metrics, protocol, store
from gateway.analytics import record_page_view
from gateway.crypto import CryptoError
from gateway.db import tenant_tx
from gateway.protocol import Frame, ProtocolError
from gateway.services import Services
from gateway.visitor import (
    RequestContext,
    Visitor,
    announce_consent,
    apply_consent,
    consent_changes,
    open_session,
    read_consent,
    welcome,
)
from policies import PURPOSES, ConsentState, apply_consent_change, decide_chat

log = logging.getLogger("omnigate.connection")

# refusals of a frame the client got wrong, each counted toward closing the socket
# (`max_bad_frames`); a frame before hello counts too (`dispatch`)
_BAD_FRAME = frozenset({protocol.BAD_REQUEST, protocol.UNKNOWN_TYPE, protocol.TOO_LARGE})
# and each logged; the others (a limit, a policy) are not the client's mistake and
# are counted in omnigate_error_frames_total only
_MALFORMED = _BAD_FRAME | {protocol.SESSION_INVALID}

Send = Callable[[dict[str, Any]], Awaitable[None]]

# Messages waiting behind the one being answered; more is a flood.
PENDING_MESSAGES = 8


class ConsentChanges:
    """How many consent changes made elsewhere this process has been told of.

    A hello reads consent before its connection joins `svc.live`; a change announced
    in between would find no connection to apply to. The hello compares this count
    before and after, and reads consent again when it moved.
    """

    count = 0


class Connection:
    """One widget connection: hello first, then messages answered in order."""

    # thousands of these live at once: no per-instance __dict__
    __slots__ = (
        "__weakref__",
        "_idle",
        "_on_terminate",
        "_queue",
        "_socket",
        "_worker",
        "bad_frames",
        "ctx",
        "send",
        "svc",
        "tenant_id",
        "visitor",
    )

    def __init__(
        self,
        svc: Services,
        tenant_id: UUID,
        ctx: RequestContext,
        send: Send,
        on_terminate: Callable[[str], None] | None = None,
        *,
        socket: bool = True,
    ) -> None:
        self.svc = svc
        self.tenant_id = tenant_id
        self.ctx = ctx
        self.send = send
        self.visitor: Visitor | None = None
        self.bad_frames = 0
        # made on the first message: a socket that only idles holds neither
        self._queue: asyncio.Queue[tuple[str, str]] | None = None
        self._worker: asyncio.Task[None] | None = None
        # set whenever nothing is queued or being answered (graceful shutdown waits on it)
        self._idle: asyncio.Event | None = None
        # called, without waiting on the peer, when the session ends from outside
        self._on_terminate = on_terminate
        # a socket stays open between messages (the HTTP fallback answers one and ends)
        self._socket = socket

    async def receive(self, raw: str | bytes) -> None:
        """Handle one client frame; every failure becomes an `error` frame."""
        try:
            frame = protocol.parse_frame(raw)
            await self.dispatch(frame)
        except ProtocolError as exc:
            if exc.code in _BAD_FRAME:
                self.bad_frames += 1
            await self.error(exc)
        except chat.STORAGE_ERRORS:
            await self.error(
                ProtocolError(
                    protocol.STORAGE_UNAVAILABLE,
                    "storage is unavailable; try again",
                    retry_after=1.0,
                )
            )
        except Exception:
            log.exception("unexpected failure handling a frame")
            await self.error(ProtocolError(protocol.INTERNAL, "internal error"))

    async def error(self, exc: ProtocolError) -> None:
        """Send a typed error frame and count it; a malformed frame also gets a log line."""
        metrics.count_error_frame(exc.code)
        if exc.code in _MALFORMED:
            # the code only: the message can quote a field name the client chose
            log.info("frame refused", extra={"code": exc.code, "tenant_id": str(self.tenant_id)})
        await self.send(protocol.error_frame(exc))

    async def dispatch(self, frame: Frame) -> None:
        """Route a validated frame to its handler."""
        if frame.type == "ping":
            await self.send({"type": "pong"})
            return
        if frame.type == "hello":
            await self.hello(frame.data)
            return
        if self.visitor is None:
            # a bad frame: a client that keeps sending without a session is closed (1008)
            self.bad_frames += 1
            raise ProtocolError(protocol.SESSION_INVALID, "send hello first")
        if time.monotonic() > self.visitor.expires and not await self._still_live(self.visitor):
            # the session row has expired: its token no longer reaches the privacy API,
            # so nothing more is stored under it; the widget starts afresh
            self.terminate("expired")
            raise ProtocolError(protocol.SESSION_INVALID, "this session has expired")
        handler = _HANDLERS[frame.type]
        await handler(self, self.visitor, frame.data)

    async def _still_live(self, v: Visitor) -> bool:
        """Past the deadline this socket computed, read the row's own expiry (another
        tab's hello may have slid it): True, with the deadline moved, while it holds."""
        async with tenant_tx(self.svc.pool, self.tenant_id) as conn:
            left = await conn.fetchval(
                "SELECT extract(epoch FROM expires_at - now()) FROM sessions"
                " WHERE tenant_id = $1 AND session_id = $2",
                self.tenant_id,
                v.session_id,
            )
        if left is None or left <= 0:
            return False
        v.expires = time.monotonic() + float(left)
        return True

    async def hello(self, data: dict[str, Any]) -> None:
        """Open or resume the session and answer `welcome` (and `consent_required`)."""
        if self.visitor is not None:
            raise ProtocolError(protocol.BAD_REQUEST, "hello was already sent")
        cp = await self.svc.tenants.policy(self.tenant_id)
        changes = ConsentChanges.count
        self.visitor = await open_session(self.svc, self.tenant_id, cp, self.ctx, data)
        # the hello wrote the expiry (or did within the minute before: the margin)
        self.visitor.expires = time.monotonic() + cp.policy.session_days * 86400 - 60
        metrics.SESSIONS_ACTIVE.inc()
        key = (self.tenant_id, self.visitor.subject_id)
        # a list: a visitor has one or two sockets, and an empty set weighs 216 bytes
        self.svc.live.setdefault(key, []).append(self)
        if self.svc.vault.cache.erased(*key):
            # erased while the session loaded: the event found no connection to end
            self._leave()
            raise ProtocolError(protocol.SESSION_INVALID, "this session's data was erased")
        if ConsentChanges.count != changes:
            # a change announced while the session loaded may be this visitor's
            self.visitor.consent_stale = True
        for signal in ("dnt", "gpc"):
            if getattr(self.visitor.signals, signal):
                metrics.count_privacy_signal(signal)
        await self.send(welcome(self.visitor, cp))
        await self._ask_consent_if_needed()
        if not self._socket and self.visitor.resumed:
            # the HTTP fallback sends its hello with every message: a page view is the
            # hello that starts a session there, not each message (docs/protocol.md)
            return
        try:
            await record_page_view(self.svc, self.visitor, cp, data.get("context"), self.ctx.client)
        except chat.STORAGE_ERRORS as exc:
            # a lost page view must not turn a good hello into an error the widget retries
            log.warning("page view not recorded", extra={"kind": type(exc).__name__})

    async def _ask_consent_if_needed(self) -> None:
        assert self.visitor is not None
        cp = await self.svc.tenants.policy(self.tenant_id)
        decision = decide_chat(cp, self.visitor.consent, self.visitor.signals)
        if not decision.allowed:
            await self.send(protocol.consent_required(list(decision.missing)))

    async def on_message(self, v: Visitor, data: dict[str, Any]) -> None:
        """Queue a visitor message behind the one being answered."""
        if self._queue is None or self._idle is None:
            self._queue, self._idle = asyncio.Queue(PENDING_MESSAGES), asyncio.Event()
        try:
            self._queue.put_nowait((data["id"], data["text"]))
        except asyncio.QueueFull:
            raise ProtocolError(
                protocol.RATE_LIMITED, "wait for the current reply", id=data["id"], retry_after=1.0
            ) from None
        self._idle.clear()
        if self._worker is None:
            self._worker = asyncio.create_task(self._answer_in_order(v))

    async def _answer_in_order(self, v: Visitor) -> None:
        assert self._queue is not None and self._idle is not None
        while True:
            msg_id, text = await self._queue.get()
            try:
                if not self.svc.bus.hears_all():
                    # Redis is away: a revocation, restriction or erasure made through
                    # another process would not reach this socket. Read the record
                    # before each message until the bus is back (fail closed)
                    v.consent_stale = True
                # an attribute test per message; the read only when a change is owed
                if v.consent_stale and not await self.consent_read(v, msg_id):
                    continue
                await chat.handle_message(self.svc, v, msg_id, text, self.send)
                if self.svc.vault.cache.erased(self.tenant_id, v.subject_id):
                    # the message found the subject's key destroyed: an erasure whose
                    # event this process missed (session_invalid was sent)
                    self.terminate("erased")
            except Exception as exc:
                # handle_message logs its own failures while the text is masked; whatever
                # escapes it is named only by type, never with a traceback quoting the text
                log.error("failure answering a message", extra={"kind": type(exc).__name__})
                await self.error(ProtocolError(protocol.INTERNAL, "internal error", id=msg_id))
            finally:
                if self._queue.empty():
                    self._idle.set()

    async def consent_read(self, v: Visitor, msg_id: str) -> bool:
        """Before a message is checked: apply the consent change made elsewhere it owes.

        False when the record could not be read: the message is refused (nothing is
        forwarded on consent that may have been revoked) and the widget sends it again.
        """
        try:
            await self.fresh_consent(v)
        except chat.STORAGE_ERRORS:
            metrics.count_message("storage_error")
            await self.error(
                ProtocolError(
                    protocol.STORAGE_UNAVAILABLE,
                    "storage is unavailable; try again",
                    id=msg_id,
                    retry_after=1.0,
                )
            )
            return False
        except ProtocolError as exc:  # the subject was erased meanwhile
            exc.id = msg_id
            metrics.count_message("other")
            await self.error(exc)
            self.terminate("erased")  # an erasure event this process missed
            return False
        return True

    async def fresh_consent(self, v: Visitor) -> None:
        """Read the visitor's consent (and restriction) again while a re-read is owed."""
        # stays owed until a read is applied: a concurrent caller reads for itself rather
        # than check a message against a state still being read (a failed read stays owed)
        while v.consent_stale:
            epoch = v.consent_epoch
            cp = await self.svc.tenants.policy(self.tenant_id)
            state, restricted = await read_consent(self.svc, v, cp)
            if v.consent_epoch != epoch:
                continue  # changed while we read: read again
            v.consent = state
            v.consent_stale = False
            # the record decides, a lift included: a restriction event that came during
            # the read changed the epoch, so a read older than it was done again above
            v.restricted = restricted

    def consent_changed(self, revoke: Iterable[str]) -> ConsentState | None:
        """Consent changed outside this connection; returns the state before (None: no visitor).

        Revocations hold at once, from the event itself, with no await before the next
        message is checked. Everything else (grants, above all) is taken only from the
        database, the record, read again before the next message (`fresh_consent`).
        """
        v = self.visitor
        if v is None:
            return None
        before = v.consent
        gone = [p for p in revoke if p in PURPOSES]
        if gone:
            v.consent, _ = apply_consent_change(v.consent, (), gone, v.consent.version)
        v.consent_epoch += 1
        v.consent_stale = True
        return before

    async def refresh_consent(self, before: ConsentState) -> None:
        """After `consent_changed`: read the record now and tell the widget what changed.

        A socket gets what a `consent` frame is answered with: a fresh `welcome`, and
        `consent_required` when a required purpose is now missing. The HTTP fallback's
        single reply is not interrupted: its next request loads the session afresh.
        """
        v = self.visitor
        if v is None:
            return
        try:
            await self.fresh_consent(v)
            if not self._socket or v.consent == before:
                return
            cp = await self.svc.tenants.policy(self.tenant_id)
            v.resumed = True
            await self.send(welcome(v, cp))
            await self._ask_consent_if_needed()
        except (*chat.STORAGE_ERRORS, ProtocolError) as exc:
            # revocations already hold; the next message reads again, or is refused
            log.warning("consent not read again", extra={"kind": type(exc).__name__})
            if isinstance(exc, ProtocolError) and exc.code == protocol.SESSION_INVALID:
                self.terminate("erased")  # an erasure event this process missed
        except Exception:
            log.exception("unexpected failure applying a consent change")

    async def on_consent(self, v: Visitor, data: dict[str, Any]) -> None:
        """Grant or revoke purposes, record them, and answer with a fresh welcome."""
        cp = await self.svc.tenants.policy(self.tenant_id)
        grant, revoke = consent_changes({k: data[k] for k in ("grant", "revoke") if k in data})
        # the change builds on what is recorded, including changes made elsewhere
        await self.fresh_consent(v)
        async with tenant_tx(self.svc.pool, self.tenant_id) as conn:
            changes = await apply_consent(
                conn, v, cp, grant, revoke, data.get("age_confirmed"), "widget"
            )
            state = v.consent
        if v.consent is not state:
            # a re-read that began before this commit replaced it: read again before the
            # next message (the record now holds this change)
            v.consent_stale = True
        v.consent_epoch += 1  # a re-read spanning the commit reads again
        await announce_consent(self.svc, v, changes)  # the visitor's other tabs and devices
        v.resumed = True
        await self.send(welcome(v, cp))
        await self._ask_consent_if_needed()

    async def on_history(self, v: Visitor, data: dict[str, Any]) -> None:
        """A page of this session's conversation, decrypted for its visitor."""
        limit = data.get("limit") or 50
        async with tenant_tx(self.svc.pool, self.tenant_id) as conn:
            try:
                cipher = await self.svc.vault.cipher(conn, v.tenant_id, v.subject_id)
            except CryptoError:
                raise ProtocolError(
                    protocol.SESSION_INVALID, "this session's data was erased"
                ) from None
            rows = await store.history(
                conn, v.tenant_id, v.conversation_id, data.get("before"), limit
            )
        messages = [
            {
                "seq": m.seq,
                "role": m.role,
                "at": m.created_at.isoformat(),
                "status": m.status,
                "reply_to": m.reply_to,
                "text": self.svc.vault.open_text(
                    cipher, v.tenant_id, v.conversation_id, m.message_id, m.role, m.ciphertext
                ),
            }
            for m in rows
        ]
        await self.send({"type": "history", "messages": messages})

    async def close(self) -> None:
        """Stop answering: the in-flight reply's upstream request is cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._leave()

    def _leave(self) -> None:
        """Leave the live registry and drop the visitor (its map and context go with it)."""
        if self.visitor is None:
            return
        metrics.SESSIONS_ACTIVE.dec()
        key = (self.tenant_id, self.visitor.subject_id)
        self.visitor = None
        live = self.svc.live.get(key)
        if live is not None:
            with contextlib.suppress(ValueError):
                live.remove(self)
            if not live:
                del self.svc.live[key]

    def terminate(self, reason: str) -> None:
        """End this connection from outside (erasure), now, without waiting on the peer.

        The reply in flight is cancelled, the visitor is dropped (a later frame finds no
        session), and the transport is told to end, which it does in the background: a
        peer that stopped reading must not hold up the bus event that got us here.
        """
        if self._worker is not None:
            self._worker.cancel()
        self._leave()
        if self._on_terminate is not None:
            self._on_terminate(reason)

    async def drain(self, grace: float) -> None:
        """Let the queued and in-flight replies finish, up to `grace` seconds."""
        if self._idle is None:
            return  # never had a message
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)


def consent_changed_elsewhere(
    live: dict[tuple[UUID, UUID], list[Any]],
    tenant_id: UUID | None,
    subject_id: UUID | None,
    revoke: Iterable[str],
) -> list[tuple[Connection, ConsentState]]:
    """Apply a consent change announced on the bus to this process's connections.

    Synchronous on purpose: when it returns, no message of the subject can be checked
    against the old consent. `tenant_id` None (the bus may have missed changes): every
    connection here reads its consent again before its next message. Returns the
    subject's connections with their state before the change, to `refresh_consent`.
    """
    ConsentChanges.count += 1
    if tenant_id is None or subject_id is None:
        for conns in list(live.values()):
            for conn in conns:
                conn.consent_changed(())
        return []
    revoke = list(revoke)
    changed = []
    for conn in list(live.get((tenant_id, subject_id), ())):
        before = conn.consent_changed(revoke)
        if before is not None:
            changed.append((conn, before))
    return changed


_HANDLERS: dict[str, Callable[[Connection, Visitor, dict[str, Any]], Awaitable[None]]] = {
    "message": Connection.on_message,
    "consent": Connection.on_consent,
    "history": Connection.on_history,
}
