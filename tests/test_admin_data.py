"""Admin API data: conversation paging, audited transcript reads, audit verify, BYO upstream."""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway import netguard
from gateway.admin import ApiError, decode_cursor, encode_cursor
from gateway.appkeys import SERVICES
from gateway.config import Settings
from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant, create_tenant
from tests.conftest import ORIGIN, Gateway, chat, hello, reply_text, start_gateway
from tests.support import CORRUPT_FIRST_MESSAGE, call


async def _conversation(gw: Gateway, site_key: str, text: str) -> str:
    ws = await gw.ws(site_key)
    welcome = await hello(ws, consent={"conversation_storage": True})
    frames = await chat(ws, "m", text)
    assert frames[-1]["type"] == "done", frames
    await ws.close()
    return str(welcome["conversation_id"])


def test_cursor_round_trip_and_garbage() -> None:
    from datetime import UTC, datetime

    at, cid = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), uuid.uuid4()
    assert decode_cursor(encode_cursor(at, cid)) == (at, cid)
    for garbage in [
        "!!!",
        "WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiw1XQ",  # ["2024-...", 5]: an id that is a number
        _b64(["2024-01-01T00:00:00+00:00", [1]]),
        _b64([5, str(cid)]),
        _b64({"2024-01-01T00:00:00+00:00": 1, str(cid): 2}),  # unpacks to two strings
        _b64(["2024-01-01T00:00:00", str(cid)]),  # no time zone
        _b64(["0001-01-01T00:00:00+14:00", str(cid)]),  # before year 1 in UTC
        _b64([at.isoformat(), str(cid), "extra"]),
        _b64(None),
    ]:
        with pytest.raises(ApiError) as err:
            decode_cursor(garbage)
        assert err.value.status == 400 and err.value.code == "bad_request", garbage


def _b64(value: Any) -> str:
    import base64

    import orjson

    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


async def test_conversations_paginate_with_cursor(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    ids = [await _conversation(offline_gateway, tenant.site_key, f"hello {i}") for i in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        q = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        status, page = await call(
            offline_gateway, "GET", "/api/admin/conversations", tenant.admin_key, params=q
        )
        assert status == 200, page
        pages += 1
        for c in page["conversations"]:
            assert set(c) == {"id", "started_at", "last_message_at", "message_count", "anonymized"}
            assert c["message_count"] == 2 and c["anonymized"] is False
            seen.append(c["id"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 5
    assert seen == list(reversed(ids))  # newest activity first
    # since/until filter on last activity
    last = await owner_pool.fetchval(
        "SELECT last_message_at FROM conversations WHERE conversation_id = $1", uuid.UUID(ids[-1])
    )
    status, page = await call(
        offline_gateway,
        "GET",
        "/api/admin/conversations",
        tenant.admin_key,
        params={"since": last.isoformat()},
    )
    assert [c["id"] for c in page["conversations"]] == [ids[-1]]
    status, page = await call(
        offline_gateway,
        "GET",
        "/api/admin/conversations",
        tenant.admin_key,
        params={"until": last.isoformat()},
    )
    assert len(page["conversations"]) == 4


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "x"},
        {"cursor": "!!!"},
        {"cursor": "WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiw1XQ"},
        {"since": "yesterday"},
        {"since": "2024-01-01T00:00:00"},
        {"since": "0001-01-01T00:00:00+14:00"},
        {"until": "9999-12-31T23:59:59-14:00"},
    ],
    ids=[
        "zero",
        "too-many",
        "nan",
        "bad-cursor",
        "numeric-cursor-id",
        "bad-since",
        "naive-since",
        "since-before-year-1",
        "until-after-9999",
    ],
)
@pytest.mark.usefixtures("no_tracebacks")
async def test_conversation_list_rejects_bad_params(
    offline_gateway: Gateway, tenant: NewTenant, params: dict[str, str]
) -> None:
    status, body = await call(
        offline_gateway, "GET", "/api/admin/conversations", tenant.admin_key, params=params
    )
    assert status == 400 and body["error"]["code"] == "bad_request"


async def test_transcript_read_is_audited_and_chain_verifies_until_tampered(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    cid = await _conversation(offline_gateway, tenant.site_key, "my order is late")
    status, tr = await call(
        offline_gateway, "GET", f"/api/admin/conversations/{cid}", tenant.admin_key
    )
    assert status == 200
    assert [(m["role"], m["text"]) for m in tr["messages"]] == [
        ("user", "my order is late"),
        ("assistant", "my order is late"),
    ]
    status, log = await call(offline_gateway, "GET", "/api/admin/audit", tenant.admin_key)
    assert status == 200
    entry, created = log["entries"]
    assert entry["action"] == "conversation.read" and entry["target"] == f"conversation:{cid}"
    assert entry["actor"].startswith("admin:")
    assert (created["seq"], created["action"]) == (1, "tenant.create")
    status, ver = await call(offline_gateway, "GET", "/api/admin/audit/verify", tenant.admin_key)
    assert ver == {"ok": True, "broken_at": None, "checked": 2}
    await call(offline_gateway, "GET", f"/api/admin/conversations/{cid}", tenant.admin_key)
    await owner_pool.execute(
        "UPDATE audit_log SET action = 'nothing.happened' WHERE tenant_id = $1 AND seq = 2",
        tenant.tenant_id,
    )
    status, ver = await call(offline_gateway, "GET", "/api/admin/audit/verify", tenant.admin_key)
    assert status == 200 and ver["ok"] is False and ver["broken_at"] == 2


async def test_audit_pages_back(offline_gateway: Gateway, tenant: NewTenant) -> None:
    for d in (10, 20, 30):
        await call(
            offline_gateway, "PUT", "/api/admin/policy", tenant.admin_key, {"retention_days": d}
        )
    _, first = await call(
        offline_gateway, "GET", "/api/admin/audit", tenant.admin_key, params={"limit": "2"}
    )
    # seq 1 is the tenant's creation
    assert [e["seq"] for e in first["entries"]] == [4, 3] and first["next_before"] == 3
    _, rest = await call(
        offline_gateway,
        "GET",
        "/api/admin/audit",
        tenant.admin_key,
        params={"limit": "2", "before": "3"},
    )
    assert [e["seq"] for e in rest["entries"]] == [2, 1] and rest["next_before"] is None


# --- bring-your-own upstream -----------------------------------------------------


@pytest.fixture
def allow_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake upstream is plain http on loopback."""
    monkeypatch.setattr(netguard, "ALLOW_HTTP", True)


async def _byo_flow(
    gw: Gateway, app_pool: asyncpg.Pool, fake: FakeUpstream, url: str, online: bool
) -> None:
    a = await create_tenant(app_pool, f"a-{uuid.uuid4().hex[:8]}", [ORIGIN])
    b = await create_tenant(app_pool, f"b-{uuid.uuid4().hex[:8]}", [ORIGIN])
    secret = "sk-tenant-a-" + uuid.uuid4().hex
    status, put = await call(
        gw,
        "PUT",
        "/api/admin/upstream",
        a.admin_key,
        {"api_key": secret, "base_url": url, "model": "tenant-a-model"},
    )
    assert status == 200, put
    assert put == {
        "configured": True,
        "base_url": url,
        "model": "tenant-a-model",
        "api_key_last4": secret[-4:],
    }
    status, got = await call(gw, "GET", "/api/admin/upstream", a.admin_key)
    assert got == put and secret not in str(got)
    status, got_b = await call(gw, "GET", "/api/admin/upstream", b.admin_key)
    assert got_b["configured"] is False

    fake.requests.clear()
    ws = await gw.ws(a.site_key)
    welcome = await hello(ws)
    frames = await chat(ws, "1", "hi from a")
    assert reply_text(frames) == "hi from a", frames
    (req,) = fake.requests
    assert req["authorization"] is True and req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "tenant-a-model"
    await ws.close()
    # the visitor's export names where their messages went: the tenant's upstream
    headers = {"Authorization": f"Session {welcome['session_token']}"}
    async with gw.session.get(gw.url("/api/privacy/export"), headers=headers) as r:
        doc = await r.json(content_type=None)
    host = url.split("//")[1].split(":")[0]
    assert [x["name"] for x in doc["recipients"]] == [f"OpenAI-compatible upstream at {host}"]

    # reverting takes effect on the next message, via the bus
    status, _ = await call(gw, "DELETE", "/api/admin/upstream", a.admin_key)
    assert status == 200
    status, got = await call(gw, "GET", "/api/admin/upstream", a.admin_key)
    assert got["configured"] is False
    fake.requests.clear()
    ws = await gw.ws(a.site_key)
    await hello(ws)
    assert reply_text(await chat(ws, "2", "back to default")) == "back to default"
    await ws.close()
    if online:
        assert [r["body"]["model"] for r in fake.requests] == ["gpt-4o-mini"]
    else:
        assert fake.requests == []  # the offline model answered

    _, log = await call(gw, "GET", "/api/admin/audit", a.admin_key)
    assert [e["action"] for e in log["entries"]] == [
        "upstream.delete",
        "export",
        "upstream.set",
        "tenant.create",
    ]
    assert secret not in str(log)


async def test_byo_upstream_on_an_offline_gateway(
    settings: Settings, app_pool: asyncpg.Pool, fake: tuple[FakeUpstream, str], allow_http: None
) -> None:
    upstream, url = fake
    async for gw in start_gateway(settings):
        await _byo_flow(gw, app_pool, upstream, url, online=False)


async def test_byo_upstream_beside_the_gateway_default(
    gateway: Gateway, app_pool: asyncpg.Pool, fake: tuple[FakeUpstream, str], allow_http: None
) -> None:
    upstream, url = fake
    b = await create_tenant(app_pool, f"b-{uuid.uuid4().hex[:8]}", [ORIGIN])
    ws = await gateway.ws(b.site_key)
    await hello(ws)
    upstream.requests.clear()
    await chat(ws, "1", "hi from b")
    (req,) = upstream.requests
    assert req["body"]["model"] == "gpt-4o-mini"  # the gateway default with B's policy model
    await ws.close()
    await _byo_flow(gateway, app_pool, upstream, url, online=True)


async def _rebound_name_reaches_nothing(
    gw: Gateway,
    app_pool: asyncpg.Pool,
    fake: FakeUpstream,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # set while private addresses were allowed; the name now leads to loopback, as a
    # public name re-pointed after the check would (DNS rebinding)
    named = url.replace("127.0.0.1", "localhost")
    a = await create_tenant(app_pool, f"a-{uuid.uuid4().hex[:8]}", [ORIGIN])
    body = {"api_key": "sk-tenant-" + uuid.uuid4().hex, "base_url": named}
    status, _ = await call(gw, "PUT", "/api/admin/upstream", a.admin_key, body)
    assert status == 200
    ws = await gw.ws(a.site_key)
    await hello(ws)
    assert reply_text(await chat(ws, "1", "while allowed")) == "while allowed"
    monkeypatch.setattr(netguard, "ALLOW_HTTP", False)  # production from here on
    fake.requests.clear()
    frames = await chat(ws, "2", "after the rebinding")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "upstream_unavailable"
    assert fake.requests == []  # no connection reached the private address
    assert "tenant upstream refused: its name resolves to no public address" in caplog.text
    assert body["api_key"] not in caplog.text
    await ws.close()


async def test_byo_name_rebound_to_a_private_address_on_an_offline_gateway(
    settings: Settings,
    app_pool: asyncpg.Pool,
    fake: tuple[FakeUpstream, str],
    allow_http: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async for gw in start_gateway(settings):
        await _rebound_name_reaches_nothing(gw, app_pool, *fake, monkeypatch, caplog)


async def test_byo_name_rebound_to_a_private_address_beside_the_default(
    gateway: Gateway,
    app_pool: asyncpg.Pool,
    fake: tuple[FakeUpstream, str],
    allow_http: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _rebound_name_reaches_nothing(gateway, app_pool, *fake, monkeypatch, caplog)
    # the gateway's own upstream (set by its operator, here on loopback) is not guarded
    b = await create_tenant(app_pool, f"b-{uuid.uuid4().hex[:8]}", [ORIGIN])
    ws = await gateway.ws(b.site_key)
    await hello(ws)
    assert reply_text(await chat(ws, "1", "operator upstream")) == "operator upstream"
    await ws.close()


async def test_public_only_resolver_keeps_public_addresses() -> None:
    class Fixed(AbstractResolver):
        def __init__(self, *hosts: str) -> None:
            self.hosts = hosts

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            return [
                ResolveResult(hostname=host, host=h, port=port, family=family, proto=0, flags=0)
                for h in self.hosts
            ]

        async def close(self) -> None:
            pass

    mixed = netguard.PublicOnlyResolver(Fixed("10.0.0.7", "93.184.216.34", "::ffff:127.0.0.1"))
    assert [r["host"] for r in await mixed.resolve("api.example", 443)] == ["93.184.216.34"]
    for private in ("127.0.0.1", "169.254.169.254", "fd00::1", "64:ff9b::a00:1", "::1"):
        with pytest.raises(OSError):
            await netguard.PublicOnlyResolver(Fixed(private)).resolve("api.example", 443)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"base_url": "https://api.example/v1"}, "api_key"),
        ({"api_key": "sk-12345678", "base_url": "http://169.254.169.254/v1"}, "base_url"),
        ({"api_key": "sk-12345678", "base_url": "https://u:p@api.example/v1"}, "base_url"),
        ({"api_key": "sk-12345678", "base_url": "https://api.example/v1", "model": "a b"}, "model"),
        ({"api_key": "sk-12345678", "base_url": "https://api.example", "extra": 1}, "extra"),
        ({"api_key": "sk-12345678", "base_url": "https://[x"}, "base_url"),
        ({"api_key": "sk-12345678", "base_url": "https://\u2100.com"}, "base_url"),
        ({"api_key": "sk-12345678", "base_url": "https://api.example:99999/v1"}, "base_url"),
        ({"api_key": "sk-12345678", "base_url": "https://api.example:0/v1"}, "base_url"),
        ({"api_key": "sk-12345678", "base_url": "https://api.example:x/v1"}, "base_url"),
    ],
    ids=[
        "no-key",
        "http",
        "credentials",
        "bad-model",
        "unknown-field",
        "unclosed-ipv6",
        "nfkc-netloc",
        "port-too-big",
        "port-zero",
        "port-not-a-number",
    ],
)
@pytest.mark.usefixtures("no_tracebacks")
async def test_byo_upstream_validation(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    body: dict[str, Any],
    field: str,
) -> None:
    status, resp = await call(offline_gateway, "PUT", "/api/admin/upstream", tenant.admin_key, body)
    assert status == 422 and resp["error"]["fields"][0]["field"] == field
    assert resp["error"]["code"] == "invalid_request"
    stored = await owner_pool.fetchval(
        "SELECT upstream_sealed FROM tenants WHERE tenant_id = $1", tenant.tenant_id
    )
    assert stored is None


@pytest.mark.parametrize("url", ["https://api.example:8443/v1", "https://api.example:443"])
async def test_byo_upstream_accepts_a_valid_port(
    offline_gateway: Gateway, tenant: NewTenant, url: str
) -> None:
    body = {"api_key": "sk-12345678", "base_url": url}
    status, resp = await call(offline_gateway, "PUT", "/api/admin/upstream", tenant.admin_key, body)
    assert status == 200 and resp["base_url"] == url, resp


@pytest.mark.parametrize(
    "api_key",
    ["sk-a\x01bcdefgh", "sk-abcdefgh\x7f", "sk-abc\ndefgh", "sk-abc defgh", "sk-abcdéfgh"],
    ids=["control", "del", "newline", "space", "non-ascii"],
)
async def test_byo_key_must_be_visible_ascii(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, api_key: str
) -> None:
    """A key that cannot go into an Authorization header is refused, not stored to fail later."""
    body = {"api_key": api_key, "base_url": "https://api.example/v1"}
    status, resp = await call(offline_gateway, "PUT", "/api/admin/upstream", tenant.admin_key, body)
    assert status == 422, resp
    assert resp["error"]["code"] == "invalid_request"
    assert resp["error"]["fields"][0]["field"] == "api_key"
    assert api_key not in str(resp)
    stored = await owner_pool.fetchval(
        "SELECT upstream_sealed FROM tenants WHERE tenant_id = $1", tenant.tenant_id
    )
    assert stored is None


async def test_byo_key_is_sealed_at_rest(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    secret = "sk-live-" + uuid.uuid4().hex
    status, _ = await call(
        offline_gateway,
        "PUT",
        "/api/admin/upstream",
        tenant.admin_key,
        {"api_key": secret, "base_url": "https://api.example/v1"},
    )
    assert status == 200
    row = await owner_pool.fetchrow(
        "SELECT upstream_sealed, upstream_key_last4 FROM tenants WHERE tenant_id = $1",
        tenant.tenant_id,
    )
    assert (
        secret.encode() not in row["upstream_sealed"] and row["upstream_key_last4"] == secret[-4:]
    )


async def test_services_upstream_for_is_cached(
    settings: Settings, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    from gateway.app import build_services
    from gateway.upstream import OfflineModel
    from policies import Policy, compile_policy

    svc = build_services(replace(settings), app_pool, OfflineModel(), None)
    cp = compile_policy(Policy(), 1)
    assert await svc.upstream_for(tenant.tenant_id, cp) is None
    assert tenant.tenant_id in svc.byo  # cached: the next message does not query
    svc.forget_upstream(tenant.tenant_id)
    assert tenant.tenant_id not in svc.byo
    await svc.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/v1",
        "https://169.254.169.254/latest",
        "https://[::1]/v1",
        "https://10.1.2.3/v1",
        "https://localhost/v1",
        "https://[::ffff:127.0.0.1]/v1",
        "https://internal.test/v1",  # resolves (below) to a private address
    ],
)
async def test_byo_upstream_refuses_private_hosts(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    import socket

    real = socket.getaddrinfo

    def fake_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "internal.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 443))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    body = {"api_key": "sk-12345678", "base_url": url}
    status, resp = await call(offline_gateway, "PUT", "/api/admin/upstream", tenant.admin_key, body)
    assert status == 422, resp
    assert resp["error"]["fields"][0]["field"] == "base_url"
    assert "public host" in resp["error"]["fields"][0]["message"]


async def test_byo_upstream_audit_logs_only_the_host(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    url = "https://api.example/v1/tok-" + uuid.uuid4().hex
    body = {"api_key": "sk-12345678", "base_url": url}
    status, resp = await call(offline_gateway, "PUT", "/api/admin/upstream", tenant.admin_key, body)
    assert status == 200, resp
    rows = await owner_pool.fetch(
        "SELECT details::text AS d FROM audit_log WHERE tenant_id = $1 AND action = 'upstream.set'",
        tenant.tenant_id,
    )
    assert len(rows) == 1 and "api.example" in rows[0]["d"] and "tok-" not in rows[0]["d"]


async def test_transcript_with_an_unreadable_message_is_still_read_and_audited(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    cid = await _conversation(offline_gateway, tenant.site_key, "my order is late")
    await owner_pool.execute(CORRUPT_FIRST_MESSAGE, cid)
    status, tr = await call(
        offline_gateway, "GET", f"/api/admin/conversations/{cid}", tenant.admin_key
    )
    assert status == 200, tr
    assert [(m["role"], m["text"], m.get("unreadable", False)) for m in tr["messages"]] == [
        ("user", None, True),
        ("assistant", "my order is late", False),
    ]
    status, log = await call(offline_gateway, "GET", "/api/admin/audit", tenant.admin_key)
    entry, _created = log["entries"]
    assert entry["action"] == "conversation.read" and entry["target"] == f"conversation:{cid}"


async def stored_visitor(g: Gateway, site_key: str) -> tuple[ClientWebSocketResponse, Any]:
    """A visitor on a socket whose conversation is kept: the socket and its welcome."""
    ws = await g.ws(site_key)
    return ws, await hello(ws, consent={"conversation_storage": True, "ai_processing": True})


async def test_erase_by_conversation_reaches_an_anonymous_visitor(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, w = await stored_visitor(g, tenant.site_key)
    assert (await chat(ws, "m", "please forget me"))[-1]["type"] == "done"
    conv = w["conversation_id"]
    subject = await owner_pool.fetchval(
        "SELECT subject_id FROM conversations WHERE conversation_id = $1::uuid", conv
    )
    path = "/api/admin/subjects/erase-by-conversation"
    # another tenant cannot reach it: row-level security hides the conversation
    other = await create_tenant(app_pool, f"o-{uuid.uuid4().hex[:8]}", [ORIGIN])
    status, _ = await call(g, "POST", path, other.admin_key, {"conversation_id": conv})
    assert status == 404

    status, out = await call(g, "POST", path, tenant.admin_key, {"conversation_id": conv})
    assert status == 200 and out["erased"] is True and out["subject_id"] == str(subject)
    assert out["certificate"]["certificate"]["items"]["messages"] == 2
    for sql in (
        "SELECT count(*) FROM subjects WHERE subject_id = $1::uuid",
        "SELECT count(*) FROM subject_keys WHERE subject_id = $1::uuid",
        "SELECT count(*) FROM consents WHERE subject_id = $1::uuid",
    ):
        assert await owner_pool.fetchval(sql, str(subject)) == 0, sql
    assert (
        await owner_pool.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1::uuid", conv
        )
        == 0
    )
    msg = await ws.receive(timeout=5)  # the live socket is closed by the erasure
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4001)

    status, _ = await call(g, "POST", path, tenant.admin_key, {"conversation_id": conv})
    assert status == 404  # nothing left
    for bad in ({}, {"conversation_id": "nope"}, {"conversation_id": 7}):
        status, out = await call(g, "POST", path, tenant.admin_key, bad)
        assert status == 422 and out["error"]["fields"][0]["field"] == "conversation_id"


async def test_an_erasure_does_not_wait_for_a_socket_that_stopped_reading(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A peer that stopped reading never lets the close frame out. The erasure (and the
    # bus event every other change after it waits behind) must not wait for it.
    from aiohttp import web

    from gateway import ws as ws_module

    monkeypatch.setattr(ws_module, "TERMINATE_GRACE", 0.3, raising=False)
    real_close = web.WebSocketResponse.close

    async def stalled(self: web.WebSocketResponse, *, code: int = 1000, **kw: Any) -> bool:
        if code == 4001:
            await asyncio.Event().wait()  # as a drain that never ends
        return await real_close(self, code=code, **kw)

    monkeypatch.setattr(web.WebSocketResponse, "close", stalled)
    g = offline_gateway
    ws, w = await stored_visitor(g, tenant.site_key)
    assert (await chat(ws, "m", "please forget me"))[-1]["type"] == "done"
    path = "/api/admin/subjects/erase-by-conversation"
    async with asyncio.timeout(2):
        status, out = await call(
            g, "POST", path, tenant.admin_key, {"conversation_id": w["conversation_id"]}
        )
    assert status == 200 and out["erased"] is True
    # the stalled socket is cut after the grace, not left open holding the visitor
    msg = await ws.receive(timeout=3)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR), msg
    assert offline_gateway.server.app[SERVICES].live == {}


async def test_an_erasure_while_a_session_resumes_is_not_missed(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The event comes while the hello is loading the session: no socket is registered
    # for it to close yet. The hello must not go on to serve the erased visitor.
    from gateway import store
    from gateway.erasure import erase_subject

    g = offline_gateway
    svc = g.server.app[SERVICES]
    ws, w = await stored_visitor(g, tenant.site_key)
    await ws.close()
    real_resume = store.resume

    async def erased_meanwhile(*args: Any, **kw: Any) -> Any:
        found = await real_resume(*args, **kw)
        assert found is not None
        await erase_subject(svc, tenant.tenant_id, found.session.subject_id, "test")
        return found

    monkeypatch.setattr(store, "resume", erased_meanwhile)
    ws = await g.ws(tenant.site_key)
    await ws.send_json({"type": "hello", "v": 1, "session_token": w["session_token"]})
    frame = await ws.receive_json(timeout=3)
    assert (frame["type"], frame.get("code")) == ("error", "session_invalid"), frame
    assert svc.live == {}


async def test_a_socket_whose_erasure_event_was_missed_ends_at_its_next_read(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process never heard of the erasure (made elsewhere while the bus was down).
    # When the bus comes back every socket reads its record again: this one finds it gone.
    from gateway import connection

    g = offline_gateway
    svc = g.server.app[SERVICES]
    ws, w = await stored_visitor(g, tenant.site_key)
    with monkeypatch.context() as m:

        async def missed(kind: str, payload: dict[str, Any]) -> None:
            return None

        m.setattr(svc.bus, "publish", missed)
        m.setattr(svc.vault.cache, "forget", lambda *a: None)
        status, _ = await call(
            g,
            "POST",
            "/api/admin/subjects/erase-by-conversation",
            tenant.admin_key,
            {"conversation_id": w["conversation_id"]},
        )
        assert status == 200
    assert svc.live  # still open: nobody told it
    connection.consent_changed_elsewhere(svc.live, None, None, ())  # the reconnect's re-read
    await ws.send_json({"type": "message", "id": "m2", "text": "still there?"})
    frame = await ws.receive_json(timeout=3)
    assert (frame["type"], frame.get("code")) == ("error", "session_invalid"), frame
    msg = await ws.receive(timeout=3)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4001)
    assert svc.live == {}


async def test_a_message_that_finds_the_key_destroyed_ends_its_connection(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    # the erasure happened where this process never heard of it: the key row is gone
    # and no event came; the next message is refused and the socket ends
    g = offline_gateway
    svc = g.server.app[SERVICES]
    ws, _ = await stored_visitor(g, tenant.site_key)
    assert (await chat(ws, "a", "first"))[-1]["type"] == "done"
    subject = next(iter(svc.live))[1]
    await owner_pool.execute("DELETE FROM subject_keys WHERE subject_id = $1", subject)
    svc.vault.cache.clear()  # as after a restart: nothing cached
    await ws.send_json({"type": "message", "id": "b", "text": "second"})
    frame = await ws.receive_json(timeout=3)
    assert (frame["type"], frame["code"], frame["id"]) == ("error", "session_invalid", "b")
    msg = await ws.receive(timeout=3)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4001)
    assert svc.live == {}


async def test_a_message_after_an_erasure_this_process_missed_with_the_key_cached_ends_it(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    # erased elsewhere, the event lost, and the key still cached here: the write finds
    # the conversation gone, and that is an erasure, not an outage to retry forever
    g = offline_gateway
    svc = g.server.app[SERVICES]
    ws, _ = await stored_visitor(g, tenant.site_key)
    assert (await chat(ws, "a", "first"))[-1]["type"] == "done"
    subject = next(iter(svc.live))[1]
    assert svc.vault.cache.get(tenant.tenant_id, subject) is not None
    await owner_pool.execute("DELETE FROM subject_keys WHERE subject_id = $1", subject)
    await owner_pool.execute("DELETE FROM subjects WHERE subject_id = $1", subject)
    await ws.send_json({"type": "message", "id": "b", "text": "second"})
    frame = await ws.receive_json(timeout=3)
    assert (frame["type"], frame["code"], frame["id"]) == ("error", "session_invalid", "b")
    msg = await ws.receive(timeout=3)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4001)
    assert svc.live == {} and svc.vault.cache.erased(tenant.tenant_id, subject)
