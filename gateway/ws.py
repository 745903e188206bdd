"""Widget transports: the WebSocket and the HTTP/SSE fallback, over one Connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any
from uuid import UUID

import orjson
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from gateway import metrics, protocol
from gateway.appkeys import CONNECTIONS, SERVICES
from gateway.chat import STORAGE_ERRORS, handle_message
from gateway.connection import Connection, Send
from gateway.crypto import new_token, token_hash
from gateway.httpctx import cookie_name, origin_allowed, request_context, set_session_cookie
from gateway.protocol import ProtocolError
from gateway.services import Services
from gateway.visitor import Visitor

log = logging.getLogger("omnigate.ws")

WRITE_QUEUE = 256
# a frame the peer has not taken within this long: it stopped reading, and is cut off
# (aiohttp's heartbeat cannot end a connection whose unsent bytes are never taken)
WRITE_TIMEOUT = 5.0
# A socket's close gives its peer OMNIGATE_HANDSHAKE_TIMEOUT to answer the close frame,
# then cuts its connection. Two closes allow at most this long instead: an ended
# session's (4001: its data was erased) and every socket's at shutdown (1001).
TERMINATE_GRACE = 2.0
# closes in progress, held until done (the event that ended the session does not wait)
_ending: set[asyncio.Task[None]] = set()
# aiohttp closes with 1009 past this; frames between our limit and this get a typed error
HARD_FRAME_FACTOR = 16


async def _tenant_and_policy(request: web.Request) -> tuple[Any, Any, str]:
    svc = request.app[SERVICES]
    site = request.query.get("site", "")
    tenant_id = await svc.tenants.resolve_site(site) if 0 < len(site) <= 200 else None
    if tenant_id is None:
        raise web.HTTPForbidden(text="unknown site")
    cp = await svc.tenants.policy(tenant_id)
    origin = origin_allowed(request, cp)
    if origin is None:
        raise web.HTTPForbidden(text="origin not allowed")
    return tenant_id, cp, origin


async def widget_ws(request: web.Request) -> web.StreamResponse:
    """`GET /v1/widget/ws?site=KEY`: Origin checked before the upgrade."""
    svc = request.app[SERVICES]
    tenant_id, cp, _ = await _tenant_and_policy(request)
    # a cookie naming no live session (expired, erased by the site owner, deleted by
    # retention) is replaced on the 101: else every new tab would start a new session
    cookie = request.cookies.get(cookie_name(svc.settings.cookie_secure))
    minted = None
    if not cookie or not await _session_alive(svc, tenant_id, cookie):
        minted = new_token()
    ctx = request_context(request, svc, cp, tenant_id, minted)
    # per IP key (docs/policy-reference.md, IP modes) and per process; none under drop
    ip_key = f"{tenant_id}:{ctx.ip_key}" if ctx.ip_key else None
    if ip_key and svc.ip_connections.get(ip_key, 0) >= svc.settings.max_connections_per_ip:
        raise web.HTTPTooManyRequests(
            text="too many connections from this address", headers={"Retry-After": "10"}
        )
    settings = svc.settings
    ws = web.WebSocketResponse(
        heartbeat=30.0,
        max_msg_size=settings.max_frame_bytes * HARD_FRAME_FACTOR,
        timeout=settings.handshake_timeout,
        # frames are small JSON; a deflate context per socket costs memory and CPU for little
        compress=False,
    )
    if minted is not None:
        set_session_cookie(ws, svc, cp, minted)
    # counted before the awaited upgrade, so concurrent upgrades cannot all pass the check
    if ip_key:
        svc.ip_connections[ip_key] = svc.ip_connections.get(ip_key, 0) + 1
    try:
        await ws.prepare(request)
    except BaseException:
        _release_ip(svc, ip_key)
        raise
    request.app[CONNECTIONS].add(ws)
    metrics.WS_CONNECTIONS.inc()

    outbox = Outbox(ws, WRITE_QUEUE, request.transport)
    conn = Connection(svc, tenant_id, ctx, outbox.send, outbox.terminate)
    close: tuple[int, bytes] = (WSCloseCode.OK, b"")
    try:
        close = await _read_loop(
            ws,
            conn,
            outbox,
            settings.first_frame_timeout,
            settings.max_frame_bytes,
            settings.max_bad_frames,
        )
    finally:
        await conn.close()
        # flush what was already answered (error frames included) before closing
        await outbox.flush(2.0)
        metrics.WS_CONNECTIONS.dec()
        _release_ip(svc, ip_key)
        log.debug("socket closed", extra={"code": close[0], "reason": close[1].decode()})
        await _bounded_close(ws, request.transport, *close, settings.handshake_timeout)
    return ws


async def _session_alive(svc: Services, tenant_id: UUID, token: str) -> bool:
    """Whether `token` names a live session of the tenant (one round trip, on connect only).

    A storage failure counts as alive: the hello's resume decides, as it did before.
    """
    try:
        alive = await svc.pool.fetchval(
            "SELECT omnigate_session_alive($1, $2)", tenant_id, token_hash(token)
        )
    except STORAGE_ERRORS:
        return True
    return bool(alive)


def _release_ip(svc: Services, ip_key: str | None) -> None:
    if ip_key:
        left = svc.ip_connections.get(ip_key, 1) - 1
        if left > 0:
            svc.ip_connections[ip_key] = left
        else:
            svc.ip_connections.pop(ip_key, None)


class Outbox:
    """The frames owed to one socket, written in order.

    A frame with nothing ahead of it is written at once by its sender (no task, no
    hop through the event loop). Frames that arrive while a write waits for the
    socket queue behind it and are written by one task, which exists only while
    they wait; deltas of one reply queued that way go out as one frame. A full
    outbox makes `send` wait: a slow reader slows its own reply stream.
    """

    __slots__ = (
        "broken",
        "frames",
        "gone",
        "limit",
        "space",
        "task",
        "transport",
        "watchdog",
        "write_started",
        "writing",
        "ws",
    )

    def __init__(
        self, ws: web.WebSocketResponse, limit: int, transport: asyncio.Transport | None = None
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.limit = limit
        # a list, not a deque: an empty deque reserves a 64-slot block per idle socket
        self.frames: list[dict[str, Any]] = []
        # made only when a reader falls behind far enough to fill the outbox
        self.space: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.writing = False  # a sender is inside its own write
        self.broken = False  # nothing more is written (the peer is gone, or terminated)
        self.gone = False  # the peer went away or stopped reading: its connection is cut
        # when the write in progress began; one timer checks it (see `_put`)
        self.write_started: float | None = None
        self.watchdog: asyncio.TimerHandle | None = None

    def terminate(self, reason: str) -> None:
        """Close with 4001 (the session is gone: erased); the widget starts afresh.

        Nothing queued goes out any more. The close runs in the background and is
        bounded by TERMINATE_GRACE (aiohttp stops waiting for the answer sooner if the
        handshake timeout is shorter): a peer that stopped reading has its connection cut.
        """
        self.broken = True
        self.frames.clear()
        if self.space is not None:
            self.space.set()
        task = asyncio.create_task(self._close(4001, reason))
        _ending.add(task)
        task.add_done_callback(_ending.discard)

    async def _close(self, code: int, reason: str) -> None:
        await _bounded_close(self.ws, self.transport, code, reason.encode(), TERMINATE_GRACE)

    async def send(self, frame: dict[str, Any]) -> None:
        """Write a frame, or queue it behind the write in progress (dropped once the
        socket is gone)."""
        while len(self.frames) >= self.limit and not self.broken:
            if self.space is None:
                self.space = asyncio.Event()
            self.space.clear()
            await self.space.wait()
        if self.broken or self.ws.closed:
            return
        if self.writing or self.task is not None:
            self.frames.append(frame)
            return
        self.writing = True
        try:
            await self._put(frame)
        finally:
            self.writing = False
            # what queued behind this write gets its writer, even if this sender was
            # cancelled while it waited for the socket
            if self.frames and self.task is None:
                self.task = asyncio.create_task(self._write())

    async def _put(self, frame: dict[str, Any]) -> None:
        # Bounded: its sender (the read loop, for one) must not wait on a stalled peer.
        # Not a timeout per write (5 µs each, on every delta): one timer, armed at most
        # once per WRITE_TIMEOUT, cuts the connection if a write is still waiting then.
        loop = asyncio.get_running_loop()
        self.write_started = loop.time()
        if self.watchdog is None:
            self.watchdog = loop.call_later(WRITE_TIMEOUT, self._check_write)
        try:
            # orjson's bytes go out as the text frame's payload: no str round trip
            await self.ws.send_frame(protocol.encode(frame), WSMsgType.TEXT)
        except (ConnectionError, RuntimeError):
            # the peer went away mid-write, or was cut: nothing more can be delivered
            self._cut()
        finally:
            self.write_started = None

    def _check_write(self) -> None:
        self.watchdog = None
        if self.write_started is None or self.gone:
            return  # no write waiting: the next write arms the timer again
        left = self.write_started + WRITE_TIMEOUT - asyncio.get_running_loop().time()
        if left > 0:
            self.watchdog = asyncio.get_running_loop().call_later(left, self._check_write)
        else:
            # it stopped reading: aborting ends the waiting write with ConnectionError
            self._cut()

    def _cut(self) -> None:
        """Drop what is owed and the connection itself."""
        self.broken = self.gone = True
        self.frames.clear()
        if self.space is not None:
            self.space.set()
        if self.transport is not None:
            # close() would wait for unsent bytes a stalled peer never takes; abort does not
            self.transport.abort()

    async def _write(self) -> None:
        try:
            while self.frames and not self.broken:
                frame = self.frames.pop(0)  # at most `limit` (256) entries
                if frame["type"] == "delta":
                    text = [frame["text"]]
                    while (
                        self.frames
                        and self.frames[0]["type"] == "delta"
                        and self.frames[0]["id"] == frame["id"]
                    ):
                        text.append(self.frames.pop(0)["text"])
                    if len(text) > 1:
                        frame = protocol.delta(frame["id"], "".join(text))
                if self.space is not None:
                    self.space.set()
                await self._put(frame)
        finally:
            self.task = None

    async def flush(self, grace: float) -> None:
        """Wait (bounded) until every queued frame is written."""
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.task), grace)


_HELLO_TIMEOUT = (WSCloseCode.POLICY_VIOLATION, b"hello timeout")


async def _read_loop(
    ws: web.WebSocketResponse,
    conn: Connection,
    outbox: Outbox,
    hello_timeout: float,
    max_frame: int,
    max_bad: int,
) -> tuple[int, bytes]:
    """Feed frames to the connection; returns the close code and reason."""
    loop = asyncio.get_running_loop()
    # the hello must be accepted by then: no other frame (a ping) puts it off
    hello_by: float | None = loop.time() + hello_timeout
    while not ws.closed:
        if outbox.gone:
            return WSCloseCode.ABNORMAL_CLOSURE, b"connection lost"
        if hello_by is not None and conn.visitor is not None:
            hello_by = None  # greeted (a session erased later leaves it so)
        timeout = None if hello_by is None else hello_by - loop.time()
        if timeout is not None and timeout <= 0:
            return _HELLO_TIMEOUT
        try:
            msg = await ws.receive(timeout=timeout)
        except TimeoutError:
            return _HELLO_TIMEOUT
        if msg.type == WSMsgType.TEXT:
            if len(msg.data) > max_frame:
                conn.bad_frames += 1
                await conn.error(
                    ProtocolError(protocol.TOO_LARGE, f"frames are limited to {max_frame} bytes")
                )
            else:
                await conn.receive(msg.data)
        elif msg.type == WSMsgType.BINARY:
            conn.bad_frames += 1
            await conn.error(ProtocolError(protocol.BAD_REQUEST, "binary frames are not accepted"))
        elif msg.type == WSMsgType.ERROR:
            return _error_close(msg.data)
        else:
            return WSCloseCode.OK, b""
        if conn.bad_frames > max_bad:
            return WSCloseCode.POLICY_VIOLATION, b"too many bad frames"
    return WSCloseCode.OK, b""


# the close reasons of the protocol errors aiohttp closes a socket on
_PROTOCOL_ERRORS: dict[int, bytes] = {
    WSCloseCode.MESSAGE_TOO_BIG: b"frame too large",
    WSCloseCode.INVALID_TEXT: b"invalid utf-8",
}


def _error_close(exc: BaseException) -> tuple[int, bytes]:
    """The close code and reason of a socket aiohttp has already closed on an error."""
    if isinstance(exc, WebSocketError):
        # a protocol error in the client's frames: aiohttp closed with its code
        reason = _PROTOCOL_ERRORS.get(exc.code, b"protocol error")
        return exc.code, reason
    if isinstance(exc, TimeoutError):
        return WSCloseCode.ABNORMAL_CLOSURE, b"keep-alive timeout"  # no pong to its ping
    return WSCloseCode.ABNORMAL_CLOSURE, b"connection lost"


async def widget_chat(request: web.Request) -> web.StreamResponse:
    """`POST /v1/widget/chat?site=KEY`: one message answered as text/event-stream.

    The body is a `message` frame; it may carry `hello` (the hello fields) for a
    visitor without a session. Events: welcome, consent_required, ack, delta, done, error.
    """
    svc = request.app[SERVICES]
    tenant_id, cp, origin = await _tenant_and_policy(request)
    body = await _request_body(request, svc.settings.max_frame_bytes)
    ctx = request_context(request, svc, cp, tenant_id)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }
    )
    events: list[dict[str, Any]] = []
    prepared = False
    gone = False  # the client went away: nothing more can be written
    ended: str | None = None  # the session ended from outside (erasure)
    work: asyncio.Task[None] | None = None  # the message being answered

    async def send(frame: dict[str, Any]) -> None:
        nonlocal gone
        if not prepared:
            events.append(frame)
            return
        if gone:
            return
        try:
            await resp.write(
                b"event: " + frame["type"].encode() + b"\ndata: " + orjson.dumps(frame) + b"\n\n"
            )
        except ConnectionError:
            # as a closed WebSocket: the reply in flight and its upstream request stop
            gone = True
            if work is not None:
                work.cancel()

    def on_terminate(reason: str) -> None:
        nonlocal ended
        ended = reason
        if work is not None:
            work.cancel()

    conn = Connection(svc, tenant_id, ctx, send, on_terminate, socket=False)
    try:
        frame = await _open_fallback(conn, body, svc.settings.max_frame_bytes)
        visitor = conn.visitor  # None when the hello failed, or the session ended meanwhile
        if visitor is not None:
            set_session_cookie(resp, svc, cp, visitor.token)
        try:
            await resp.prepare(request)
        except ConnectionError:
            gone = True
        prepared = True
        for ev in events:
            await send(ev)
        if frame is not None and visitor is not None and not gone and not ended:
            work = asyncio.create_task(
                _answer(conn, visitor, frame.data["id"], frame.data["text"], send)
            )
            try:
                await work
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this request itself was cancelled (shutdown), not only its reply
        if ended:
            await send(
                protocol.error_frame(
                    ProtocolError(protocol.SESSION_INVALID, "this session's data was erased")
                )
            )
    finally:
        # the connection leaves the live registry whatever happened, the client gone included
        await conn.close()
    if not gone:
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
    return resp


async def _answer(conn: Connection, v: Visitor, msg_id: str, text: str, send: Send) -> None:
    """The fallback's one message, as a socket answers each: a consent change announced
    while its session loaded is read first."""
    if v.consent_stale and not await conn.consent_read(v, msg_id):
        return
    await handle_message(conn.svc, v, msg_id, text, send)


async def _request_body(request: web.Request, limit: int) -> bytes | ProtocolError:
    """The body to parse, or why it is refused: not JSON (left unread), or unreadable.

    Requiring `application/json` also makes every cross-origin browser POST send the
    preflight, which only allowed origins pass. A client that goes away mid-upload makes
    the read raise ConnectionResetError, which error_middleware ends quietly.
    """
    if request.content_type != "application/json":  # parameters (charset) are allowed
        return ProtocolError(protocol.BAD_REQUEST, "the body must be application/json")
    try:
        return await _read_body(request, limit)
    except web.RequestPayloadError:
        # not in the Content-Encoding it declares, say: the client's error, not a bug
        return ProtocolError(protocol.BAD_REQUEST, "the body could not be read")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, or its first `limit` + 1 bytes: enough to answer `too_large` as an event
    (aiohttp's own limit, `client_max_size`, would answer a plain-text 413)."""
    chunks: list[bytes] = []
    size = 0
    while request.can_read_body and size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _open_fallback(
    conn: Connection, body: bytes | ProtocolError, max_bytes: int
) -> protocol.Frame | None:
    """Parse the fallback's body and open its session; None (an error sent) on failure.

    A refusal goes through the connection's error path (counted, and logged when the
    body is malformed, as on a socket); until the stream opens, `send` queues it behind
    any welcome already queued. Every refusal names the body's message `id` when it has
    a valid one: the widget retries or fails that message rather than leave it pending.
    """
    msg_id: str | None = None
    try:
        if isinstance(body, ProtocolError):
            raise body
        if len(body) > max_bytes:
            raise ProtocolError(protocol.TOO_LARGE, "request body too large")
        data = orjson.loads(body) if body else None
        if not isinstance(data, dict):
            raise ProtocolError(protocol.BAD_REQUEST, "body must be a JSON message object")
        msg_id = _message_id(data.get("id"))
        hello = data.pop("hello", None)
        if hello is None:
            hello = {}
        elif not isinstance(hello, dict):  # 0, false, "" and [] included
            raise ProtocolError(protocol.BAD_REQUEST, "hello must be an object")
        data.setdefault("type", "message")
        frame = protocol.parse_frame(orjson.dumps(data))
        if frame.type != "message":
            raise ProtocolError(protocol.BAD_REQUEST, "only message frames are accepted here")
        try:
            hello_frame = protocol.parse_frame(
                orjson.dumps({**hello, "type": "hello", "v": protocol.PROTOCOL_VERSION})
            )
        except ProtocolError as exc:
            exc.id = msg_id  # an `id` inside the hello (refused) is not the message's
            raise
        await conn.hello(hello_frame.data)
    except orjson.JSONDecodeError:
        error = ProtocolError(protocol.BAD_REQUEST, "body is not valid JSON")
    except ProtocolError as exc:
        error = exc
    except STORAGE_ERRORS:
        # the session could not be opened: nothing was stored, nothing acknowledged
        error = ProtocolError(
            protocol.STORAGE_UNAVAILABLE, "storage is unavailable; try again", retry_after=1.0
        )
    else:
        return frame
    if error.id is None:
        # the message is what was refused (a widget retries it as it would any)
        error.id = msg_id
    await conn.error(error)
    return None


def _message_id(value: object) -> str | None:
    """`value` when it is a valid `message` id (a string of 1-128 characters)."""
    if isinstance(value, str) and 0 < len(value) <= protocol.MAX_CLIENT_ID:
        return value
    return None


async def widget_chat_preflight(request: web.Request) -> web.StreamResponse:
    """CORS preflight for the fallback: answered only for allowed origins."""
    _, _, origin = await _tenant_and_policy(request)
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


async def _bounded_close(
    ws: web.WebSocketResponse,
    transport: asyncio.Transport | None,
    code: int,
    message: bytes,
    grace: float,
) -> None:
    """Send the close frame without waiting for the socket to drain, and give the peer
    `grace` seconds to answer it; a peer that does not (it stopped reading, or never
    answers) has its connection cut."""
    try:
        async with asyncio.timeout(grace):
            await ws.close(code=code, message=message, drain=False)
    except TimeoutError:
        if transport is not None:
            transport.abort()  # it stopped reading: drop what it never took
    if transport is not None and transport.is_closing() and transport.get_write_buffer_size():
        # closed earlier (aiohttp's heartbeat) with bytes the peer never took: a closing
        # transport would wait for them forever
        transport.abort()


async def close_all(sockets: weakref.WeakSet[web.WebSocketResponse]) -> None:
    """Close every open widget socket with 1001 so widgets reconnect elsewhere.

    All at once, each bounded by TERMINATE_GRACE rather than the handshake timeout
    (aiohttp stops waiting for an answer sooner if that is shorter): one stalled client
    must not hold up the others' close frames, nor the shutdown behind them. A socket
    that does not take its close in time is left to the process's exit, which ends it.
    """
    await asyncio.gather(
        *(
            _bounded_close(
                ws, None, WSCloseCode.GOING_AWAY, b"server shutting down", TERMINATE_GRACE
            )
            for ws in list(sockets)
        ),
        return_exceptions=True,
    )
