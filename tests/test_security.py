"""Security probes: tokens from elsewhere, injection strings, headers on every response."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest
from aiohttp import WSMsgType

from gateway.appkeys import SERVICES
from gateway.provision import NewTenant, create_tenant
from tests.conftest import ORIGIN, Gateway, chat, hello, recv_until, reply_text

INJECTIONS = [
    "'; DROP TABLE messages; --",
    "' OR '1'='1",
    "1; SELECT pg_sleep(5)--",
    "\\'; SET app.tenant_id = '00000000-0000-0000-0000-000000000000'; --",
    "$1$2$$; COMMIT; --",
    "\x00\x01 null byte",
]


async def test_other_tenants_session_token_is_not_resumed(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    other = await create_tenant(app_pool, "other", [ORIGIN])
    ws = await offline_gateway.ws(other.site_key)
    theirs = await hello(ws)
    await chat(ws, "m", "their secret words")
    await ws.close()
    ws = await offline_gateway.ws(tenant.site_key)
    mine = await hello(ws, session_token=theirs["session_token"])
    assert mine["resumed"] is False
    assert mine["conversation_id"] != theirs["conversation_id"]
    await ws.send_json({"type": "history"})
    assert (await recv_until(ws, "history"))[-1]["messages"] == []
    await ws.close()


async def test_expired_session_token_starts_a_new_session(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    first = await hello(ws)
    await ws.close()
    await owner_pool.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second'"
        " WHERE conversation_id = $1::uuid",
        first["conversation_id"],
    )
    ws = await offline_gateway.ws(tenant.site_key)
    again = await hello(ws, session_token=first["session_token"])
    assert again["resumed"] is False and again["session_token"] != first["session_token"]
    await ws.close()
    async with offline_gateway.session.get(
        offline_gateway.url("/api/privacy/export"),
        headers={"Authorization": f"Session {first['session_token']}"},
    ) as resp:
        assert resp.status == 401


@pytest.mark.parametrize("evil", INJECTIONS, ids=range(len(INJECTIONS)))
async def test_injection_strings_are_just_text(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, evil: str
) -> None:
    before = await owner_pool.fetchval("SELECT count(*) FROM tenants")
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws, session_token=evil)
    assert welcome["resumed"] is False
    frames = await chat(ws, evil[:100] or "x", f"text {evil}")
    assert reply_text(frames) == f"text {evil}"
    await ws.send_json({"type": "consent", "grant": [evil]})
    assert (await ws.receive_json(timeout=5))["code"] == "bad_request"
    await ws.close()
    admin = {"Authorization": f"Bearer {tenant.admin_key}"}
    async with offline_gateway.session.put(
        offline_gateway.url("/api/admin/policy"),
        json={"system_prompt": evil, "model": evil},
        headers=admin,
    ) as resp:
        assert resp.status == 422  # the model name is validated; nothing half-applied
    async with offline_gateway.session.get(
        offline_gateway.url("/api/admin/conversations"),
        params={"cursor": evil, "since": evil},
        headers=admin,
    ) as resp:
        assert resp.status in (400, 422)
    async with offline_gateway.session.get(
        offline_gateway.url(f"/v1/widget/ws?site={evil}"), headers={"Origin": ORIGIN}
    ) as resp:
        assert resp.status == 403
    assert await owner_pool.fetchval("SELECT count(*) FROM tenants") == before
    stored = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE tenant_id = $1", tenant.tenant_id
    )
    assert stored == 2  # the message and its reply, stored like any other text


async def test_security_headers_on_every_get_route(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    app = offline_gateway.server.app
    assert app is not None
    paths = sorted(
        {r.canonical for r in app.router.resources() if any(route.method == "GET" for route in r)}
    )
    assert len(paths) > 15
    for path in [*paths, "/no/such/path"]:
        url = path.replace("{conversation_id}", "x").replace("{key_id}", "x").replace("{id}", "x")
        async with offline_gateway.session.get(offline_gateway.url(url)) as resp:
            for header, value in (
                ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer"),
            ):
                assert resp.headers.get(header) == value, (path, resp.status)
            csp = resp.headers.get("Content-Security-Policy", "")
            assert "default-src 'none'" in csp and "unsafe-inline" not in csp, path
            # no version banner (aiohttp's default is "Python/3.x aiohttp/3.y")
            assert resp.headers.get("Server") == "omnigate", (path, resp.headers.get("Server"))
            if path == "/no/such/path":
                assert resp.status == 404


async def test_memory_stays_bounded_under_oversized_frames(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    import gc

    import psutil

    big = '{"type":"message","id":"x","text":"' + "a" * 900_000 + '"}'  # under the 1 MiB hard cap
    proc = psutil.Process()

    async def barrage(frames: int) -> None:
        sent = 0
        while sent < frames:
            ws = await offline_gateway.ws(tenant.site_key)
            await hello(ws)
            for _ in range(11):  # the 11th bad frame closes the socket with 1008
                await ws.send_str(big)
                sent += 1
            while not ws.closed:
                msg = await ws.receive(timeout=10)
                if msg.type.name in ("CLOSE", "CLOSED", "CLOSING"):
                    break
            await ws.close()

    await barrage(22)  # warm-up: allocator pools reach their working size
    gc.collect()
    before = proc.memory_info().rss
    await barrage(110)  # ~100 MB of oversized frames
    gc.collect()
    grown = proc.memory_info().rss - before
    assert grown < 40 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB over ~100 MB of frames"
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    assert reply_text(await chat(ws, "ok", "still serving")) == "still serving"
    await ws.close()


async def test_security_headers_on_refusals_and_writes(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    probes = [
        ("GET", f"/v1/widget/ws?site={tenant.site_key}", {"Origin": "http://evil.test"}, 403),
        ("POST", f"/v1/widget/chat?site={tenant.site_key}", {"Origin": ORIGIN}, 200),
        ("PUT", "/api/admin/policy", {"Authorization": "Bearer nope"}, 401),
        ("POST", "/api/privacy/delete", {}, 401),
        ("OPTIONS", "/api/privacy/export", {"Origin": ORIGIN}, 204),
        ("DELETE", "/healthz", {}, 405),
    ]
    for method, path, headers, status in probes:
        async with g.session.request(method, g.url(path), headers=headers, data=b"{}") as resp:
            assert resp.status == status, (method, path, resp.status)
            assert resp.headers.get("X-Content-Type-Options") == "nosniff", path
            assert resp.headers.get("Referrer-Policy") == "no-referrer", path
            assert "default-src 'none'" in resp.headers.get("Content-Security-Policy", ""), path
    # the one exception: a 101 has no body to govern, and its headers stay in memory as
    # long as the socket lives (docs/performance.md, round 7)
    url = urlsplit(g.url(f"/v1/widget/ws?site={tenant.site_key}"))
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(
            f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nOrigin: {ORIGIN}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
    finally:
        writer.close()
    assert head.startswith("http/1.1 101"), head
    assert "content-security-policy" not in head
    assert "\r\nserver: omnigate\r\n" in head and "aiohttp" not in head, head
    assert "set-cookie: __host-omnigate_session=" in head  # what the 101 must carry, it still does


async def test_personal_data_responses_are_not_stored_by_caches(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    """Every /api/ response says no-store: a visitor may be authenticated by cookie alone."""
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    token = (await hello(ws, consent={"conversation_storage": True}))["session_token"]
    await chat(ws, "m", "my name is Alice")
    await ws.close()
    visitor = {"Authorization": f"Session {token}"}
    admin = {"Authorization": f"Bearer {tenant.admin_key}"}
    async with g.session.post(
        g.url("/api/gdpr/request"), json={"kind": "access"}, headers=visitor
    ) as resp:
        assert resp.status == 201
        request_id = (await resp.json())["id"]
    probes = [
        ("GET", "/api/privacy/consent", visitor, None, 200),
        ("POST", "/api/privacy/consent", visitor, {"grant": ["analytics"]}, 200),
        ("GET", f"/api/gdpr/request/{request_id}", visitor, None, 200),
        ("GET", "/api/admin/requests", admin, None, 200),
        ("GET", "/api/admin/conversations", admin, None, 200),
        ("GET", "/api/admin/audit", admin, None, 200),
        ("GET", "/api/privacy/consent", {}, None, 401),
    ]
    for method, path, headers, body, status in probes:
        async with g.session.request(method, g.url(path), headers=headers, json=body) as resp:
            assert resp.status == status, (method, path, resp.status, await resp.text())
            assert resp.headers.get("Cache-Control") == "no-store", (method, path)
    # a handler's own caching policy is kept: the widget script stays cacheable
    async with g.session.get(g.url("/widget.js")) as resp:
        assert resp.status == 200
        assert "max-age" in resp.headers.get("Cache-Control", "")


async def test_a_session_cookie_planted_without_the_host_prefix_is_not_adopted(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    # a sibling subdomain can set `omnigate_session` for the parent domain, never a
    # `__Host-` cookie: the planted session (the attacker's own) must not be resumed
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    attackers = (await hello(ws))["session_token"]
    await ws.close()
    planted = {"Cookie": f"omnigate_session={attackers}"}
    ws = await g.ws(tenant.site_key, headers=planted)
    victim = await hello(ws)
    await ws.close()
    assert victim["resumed"] is False and victim["session_token"] != attackers
    ws = await g.ws(tenant.site_key, headers={"Cookie": f"__Host-omnigate_session={attackers}"})
    assert (await hello(ws))["resumed"] is True  # the name this host sets is read
    await ws.close()


async def _the_socket(g: Gateway) -> Any:
    (conn,) = [c for conns in g.server.app[SERVICES].live.values() for c in conns]
    assert conn.visitor is not None
    return conn


async def test_a_socket_outliving_its_session_stores_nothing_more(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    # the session row expired while the socket stayed open (a socket does not slide
    # it): its token no longer reaches the privacy API, so the socket must not store
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    welcome = await hello(ws, consent={"conversation_storage": True})
    assert (await chat(ws, "a", "before"))[-1]["type"] == "done"
    (await _the_socket(g)).visitor.expires = 0.0  # its own deadline has passed
    await owner_pool.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second'"
        " WHERE conversation_id = $1::uuid",
        welcome["conversation_id"],
    )
    await ws.send_json({"type": "message", "id": "b", "text": "after expiry"})
    msg = await ws.receive(timeout=5)
    while msg.type == WSMsgType.TEXT:  # an error frame may come first
        assert orjson.loads(msg.data)["type"] == "error"
        msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4001)
    stored = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE tenant_id = $1", tenant.tenant_id
    )
    assert stored == 2 and g.server.app[SERVICES].live == {}


async def test_a_session_slid_by_another_tab_keeps_the_socket_past_its_own_deadline(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    # the socket's deadline is its hello's; another tab's hello slid the row since:
    # the session is valid, and must not be ended (4001 would make the widget drop it)
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    await hello(ws, consent={"conversation_storage": True})
    conn = await _the_socket(g)
    conn.visitor.expires = 0.0
    assert (await chat(ws, "a", "still mine"))[-1]["type"] == "done"
    assert conn.visitor.expires > time.monotonic() + 86_000  # moved to the row's expiry
    await ws.close()
