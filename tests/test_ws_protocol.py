"""Bad frames, Origin refusal, limits: typed errors, the process keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import weakref
from dataclasses import replace

import aiohttp
import asyncpg
import pytest
from aiohttp import WSMsgType

from gateway import metrics
from gateway import ws as ws_module
from gateway.appkeys import CONNECTIONS, SERVICES
from gateway.config import Settings
from gateway.provision import NewTenant, create_tenant
from tests.conftest import ORIGIN, Gateway, chat, hello, recv_until, reply_text, start_gateway
from tests.support import tenant_with, until

BAD_FRAMES = [
    ("not-json", "{nope", "bad_request"),
    ("array", "[1, 2]", "bad_request"),
    ("no-type", '{"id": "x"}', "bad_request"),
    ("type-not-string", '{"type": 5}', "bad_request"),
    ("unknown-type", '{"type": "launch_missiles"}', "unknown_type"),
    ("message-missing-text", '{"type": "message", "id": "a"}', "bad_request"),
    ("text-wrong-type", '{"type": "message", "id": "a", "text": 42}', "bad_request"),
    ("id-wrong-type", '{"type": "message", "id": 7, "text": "hi"}', "bad_request"),
    ("bool-as-int", '{"type": "history", "limit": true}', "bad_request"),
    ("unknown-field", '{"type": "ping", "extra": 1}', "bad_request"),
    ("empty-text", '{"type": "message", "id": "a", "text": "   "}', "bad_request"),
    ("huge-number", '{"type": "history", "before": 1e400}', "bad_request"),
    ("limit-out-of-range", '{"type": "history", "limit": 100000}', "bad_request"),
    ("long-id", '{"type": "message", "id": "' + "x" * 500 + '", "text": "hi"}', "bad_request"),
]


@pytest.mark.parametrize(
    ("raw", "code"), [(r, c) for _, r, c in BAD_FRAMES], ids=[i for i, _, _ in BAD_FRAMES]
)
async def test_malformed_frame_gets_typed_error_and_socket_survives(
    offline_gateway: Gateway, tenant: NewTenant, raw: str, code: str
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_str(raw)
    err = await ws.receive_json(timeout=5)
    assert err["type"] == "error" and err["code"] == code, err
    frames = await chat(ws, "after", "still here")
    assert reply_text(frames) == "still here"
    await ws.close()


async def test_binary_and_oversized_frames(offline_gateway: Gateway, tenant: NewTenant) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_bytes(b"\x00\x01")
    assert (await ws.receive_json(timeout=5))["code"] == "bad_request"
    await ws.send_str('{"type":"message","id":"big","text":"' + "a" * 70_000 + '"}')
    assert (await ws.receive_json(timeout=5))["code"] == "too_large"
    assert reply_text(await chat(ws, "ok", "fine")) == "fine"
    await ws.close()


async def test_message_over_policy_limit_is_too_large(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    frames = await chat(ws, "long", "word " * 1000)  # 5000 chars > default 4000
    assert frames[-1] == {
        "type": "error",
        "code": "too_large",
        "id": "long",
        "message": frames[-1]["message"],
    }
    await ws.close()


async def test_frame_before_hello_is_refused(offline_gateway: Gateway, tenant: NewTenant) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await ws.send_json({"type": "message", "id": "a", "text": "hi"})
    err = await ws.receive_json(timeout=5)
    assert err["code"] == "session_invalid"
    await ws.close()


async def _error_codes_until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
    codes = []
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return codes
        codes.append(msg.json()["code"])


async def test_repeated_abuse_closes_with_1008(offline_gateway: Gateway, tenant: NewTenant) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    for _ in range(20):
        await ws.send_str("garbage")
    codes = await _error_codes_until_closed(ws)
    assert ws.close_code == 1008
    assert set(codes) == {"bad_request"} and 0 < len(codes) <= 20


async def test_frames_before_hello_count_as_abuse(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    for i in range(40):
        await ws.send_json({"type": "message", "id": f"m{i}", "text": "hi"})
    codes = await _error_codes_until_closed(ws)
    assert ws.close_code == 1008
    assert set(codes) == {"session_invalid"} and len(codes) == 11  # OMNIGATE_MAX_BAD_FRAMES + 1


async def test_no_hello_within_first_frame_timeout_closes(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    msg = await ws.receive(timeout=10)  # settings fixture: first_frame_timeout 5 s
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
    assert ws.close_code == 1008


async def test_pings_do_not_put_off_the_hello(settings: Settings, tenant: NewTenant) -> None:
    """The deadline is for the hello itself: a socket that only pings is closed."""
    async for g in start_gateway(replace(settings, first_frame_timeout=1.0)):
        ws = await g.ws(tenant.site_key)
        started = time.monotonic()
        for _ in range(25):  # 5 s of pings, each answered
            await ws.send_json({"type": "ping"})
            msg = await ws.receive(timeout=5)
            if msg.type != WSMsgType.TEXT:
                break
            assert msg.json() == {"type": "pong"}
            await asyncio.sleep(0.2)
        assert ws.close_code == 1008
        assert time.monotonic() - started < 3


async def test_a_socket_closed_on_a_protocol_error_is_logged_with_its_code(
    offline_gateway: Gateway, tenant: NewTenant, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp closes invalid UTF-8 with 1007 and an oversized frame with 1009: each is
    reported as what it is."""
    caplog.set_level(logging.DEBUG, logger="omnigate.ws")

    def closes() -> list[tuple[int, str]]:
        return [(r.code, r.reason) for r in caplog.records if r.getMessage() == "socket closed"]

    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws._writer.send_frame(b'{"type": "ping", "x": "\xff"}', WSMsgType.TEXT)
    assert (await ws.receive(timeout=5)).type == WSMsgType.CLOSE and ws.close_code == 1007
    await until(lambda: closes() == [(1007, "invalid utf-8")])
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_str("x" * (64 * 1024 * ws_module.HARD_FRAME_FACTOR + 1))
    assert (await ws.receive(timeout=5)).type == WSMsgType.CLOSE and ws.close_code == 1009
    await until(lambda: closes() == [(1007, "invalid utf-8"), (1009, "frame too large")])


@pytest.mark.parametrize(
    "origin",
    [
        None,
        "http://evil.test",
        "http://widget.test.evil.test",
        "https://widget.test",
        "null",
        "http://widget.test/path",
    ],
    ids=["missing", "foreign", "suffix", "other-scheme", "null", "with-path"],
)
async def test_origin_refused_before_upgrade(
    offline_gateway: Gateway, tenant: NewTenant, origin: str | None
) -> None:
    headers = {"Origin": origin} if origin else {}
    async with offline_gateway.session.get(
        offline_gateway.url(f"/v1/widget/ws?site={tenant.site_key}"),
        headers={
            **headers,
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as resp:
        assert resp.status == 403


async def test_unknown_site_key_refused(offline_gateway: Gateway) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await offline_gateway.ws("pk_does_not_exist")
    assert err.value.status == 403


async def test_upgrade_sets_partitioned_session_cookie(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    cookie = ws._response.headers["Set-Cookie"]
    welcome = await hello(ws)
    assert cookie.startswith(f"__Host-omnigate_session={welcome['session_token']};")
    for attr in (
        "HttpOnly",
        "Secure",
        "SameSite=None",
        "Partitioned",
        "Path=/",
        f"Max-Age={30 * 86400}",
    ):
        assert attr in cookie
    assert "Domain" not in cookie
    await ws.close()


async def test_a_cookie_naming_no_live_session_is_replaced_on_the_upgrade(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    """Else every new tab of a visitor whose session ended would start another one."""
    from gateway.crypto import token_hash

    def with_cookie(token: str) -> dict[str, dict[str, str]]:
        return {"headers": {"Cookie": f"__Host-omnigate_session={token}"}}

    ws = await offline_gateway.ws(tenant.site_key)
    token = (await hello(ws))["session_token"]
    await ws.close()
    ws = await offline_gateway.ws(tenant.site_key, **with_cookie(token))
    assert "Set-Cookie" not in ws._response.headers  # alive: kept
    await ws.close()
    # on another site the same cookie names no session of that site: replaced there
    other = await create_tenant(app_pool, "other-site", [ORIGIN])
    ws = await offline_gateway.ws(other.site_key, **with_cookie(token))
    assert "Set-Cookie" in ws._response.headers
    assert (await hello(ws))["resumed"] is False
    await ws.close()
    ws = await offline_gateway.ws(tenant.site_key, **with_cookie(token))
    assert (await hello(ws))["resumed"] is True
    await ws.close()

    await owner_pool.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 minute' WHERE token_hash = $1",
        token_hash(token),
    )
    ws = await offline_gateway.ws(tenant.site_key, **with_cookie(token))
    fresh = ws._response.headers["Set-Cookie"]
    welcome = await hello(ws)
    await ws.close()
    assert welcome["resumed"] is False
    assert fresh.startswith(f"__Host-omnigate_session={welcome['session_token']};")
    # the next tab, with the cookie it was given, resumes that session
    ws = await offline_gateway.ws(tenant.site_key, **with_cookie(welcome["session_token"]))
    again = await hello(ws)
    await ws.close()
    assert again["resumed"] is True and again["conversation_id"] == welcome["conversation_id"]


async def test_connections_per_ip_are_capped(settings: Settings, tenant: NewTenant) -> None:
    async for g in start_gateway(replace(settings, max_connections_per_ip=3)):
        sockets = [await g.ws(tenant.site_key) for _ in range(3)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await g.ws(tenant.site_key)
        assert err.value.status == 429
        await sockets[0].close()
        # a freed slot is usable again (the server notices the close first)
        for _ in range(50):
            try:
                extra = await g.ws(tenant.site_key)
                break
            except aiohttp.WSServerHandshakeError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the slot of a closed socket was never freed")
        await hello(extra)
        assert reply_text(await chat(extra, "m", "fine")) == "fine"
        for ws in (*sockets[1:], extra):
            await ws.close()


class _Socket:
    """Stands in for a server-side WebSocketResponse in `close_all`."""

    def __init__(self, *, stalled: bool) -> None:
        self.stalled = stalled
        self.closed_with: tuple[int, bool] | None = None

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        self.closed_with = (code, drain)
        if self.stalled:  # its peer stopped reading: the close frame is never taken
            await asyncio.Event().wait()
        return True


async def test_close_all_is_not_held_up_by_a_stalled_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shutdown: every socket gets its 1001 at once; one that never takes it is left
    behind after the grace (the process's exit ends it)."""
    monkeypatch.setattr(ws_module, "TERMINATE_GRACE", 0.5)
    stalled, first, last = _Socket(stalled=True), _Socket(stalled=False), _Socket(stalled=False)
    sockets = weakref.WeakSet([first, stalled, last])
    started = time.monotonic()
    await asyncio.wait_for(ws_module.close_all(sockets), 5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    for sock in (first, stalled, last):
        assert sock.closed_with == (1001, False)


def _stop_reading(g: Gateway, client: aiohttp.ClientWebSocketResponse) -> None:
    """The client stops reading, with small socket buffers at both ends so that the
    pongs to its pings soon fill them and the server's transport pauses its writes."""
    for server_side in g.server.app[CONNECTIONS]:
        sock = server_side.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn = client._response.connection
    assert conn is not None and conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.transport.pause_reading()


async def _flood(client: aiohttp.ClientWebSocketResponse) -> None:
    """Ping until the connection is cut."""
    with contextlib.suppress(ConnectionError):
        while True:
            await client.send_str('{"type": "ping"}')


async def test_a_client_that_stops_reading_is_cut_off(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write is bounded: a peer that takes nothing loses its connection, and its
    session, IP slot and gauge are released (else its handler waits forever)."""
    monkeypatch.setattr(ws_module, "WRITE_TIMEOUT", 0.5)
    svc = offline_gateway.server.app[SERVICES]
    gauge = metrics.WS_CONNECTIONS._value.get()
    stalled = await offline_gateway.ws(tenant.site_key)
    await hello(stalled)
    assert svc.live and svc.ip_connections
    _stop_reading(offline_gateway, stalled)
    flooding = asyncio.create_task(_flood(stalled))
    try:
        await until(lambda: not svc.live and not svc.ip_connections, timeout=10)
        await until(lambda: metrics.WS_CONNECTIONS._value.get() == gauge)
    finally:
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooding


async def test_close_all_is_not_held_up_by_a_client_that_stopped_reading(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real stalled peer: its socket's transport is paused when shutdown begins."""
    monkeypatch.setattr(ws_module, "TERMINATE_GRACE", 0.5)
    stalled = await offline_gateway.ws(tenant.site_key)
    await hello(stalled)
    normal = await offline_gateway.ws(tenant.site_key)
    await hello(normal)
    _stop_reading(offline_gateway, stalled)
    flooding = asyncio.create_task(_flood(stalled))
    await asyncio.sleep(1.0)
    flooding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flooding
    assert any(
        w._payload_writer is not None and w._payload_writer._protocol._paused
        for w in offline_gateway.server.app[CONNECTIONS]
    ), "the server's writes to the stalled client never blocked"
    started = time.monotonic()
    await asyncio.wait_for(ws_module.close_all(offline_gateway.server.app[CONNECTIONS]), 10)
    assert time.monotonic() - started < 3
    msg = await normal.receive(timeout=5)
    assert msg.type == WSMsgType.CLOSE and msg.data == 1001


async def test_welcome_says_whether_this_visitor_confirmed_their_age(
    offline_gateway: Gateway, app_pool: asyncpg.Pool
) -> None:
    """The widget holds back text typed before the welcome until age is confirmed: the
    welcome must say whether it is, not only that the site asks for it."""
    t = await tenant_with(app_pool, age_confirmation=True)
    ws = await offline_gateway.ws(t.site_key)
    first = await hello(ws)
    assert first["policy"]["age_confirmation"] is True
    assert first["policy"]["age_confirmed"] is False
    await ws.send_json({"type": "consent", "age_confirmed": True})
    answer = (await recv_until(ws, "welcome"))[-1]
    assert answer["type"] == "welcome", answer
    assert answer["policy"]["age_confirmed"] is True
    await ws.close()
    ws = await offline_gateway.ws(t.site_key)
    resumed = await hello(ws, session_token=first["session_token"])
    assert resumed["resumed"] is True
    assert resumed["policy"]["age_confirmed"] is True
    await ws.close()


async def _raw_upgrade(
    g: Gateway, site_key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand: this client answers nothing, a close frame included."""
    assert g.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", g.server.port)
    writer.write(
        (
            f"GET /v1/widget/ws?site={site_key} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{g.server.port}\r\n"
            f"Origin: {ORIGIN}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def test_the_handshake_timeout_bounds_the_wait_for_the_close_answer(
    settings: Settings, tenant: NewTenant
) -> None:
    """OMNIGATE_HANDSHAKE_TIMEOUT is how long a peer that never answers the server's
    close frame keeps its connection: neither cut sooner (by a fixed grace) nor later."""
    handshake = 2.8
    quick = replace(settings, first_frame_timeout=0.2, handshake_timeout=handshake)
    async for g in start_gateway(quick):
        reader, writer = await _raw_upgrade(g, tenant.site_key)
        try:
            # no hello: the server closes with 1008 (opcode 0x8 in the first byte)
            first = await asyncio.wait_for(reader.readexactly(2), 5)
            assert first[0] & 0x0F == 0x8, first
            sent = time.monotonic()
            with contextlib.suppress(ConnectionError):
                while await asyncio.wait_for(reader.read(4096), handshake + 2):
                    pass  # the rest of the close frame; then the connection ends
            waited = time.monotonic() - sent
        finally:
            writer.close()
        assert handshake - 0.3 < waited < handshake + 1.0, waited
