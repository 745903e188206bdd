"""Admin API over a real gateway: auth failures, policy versions reaching live sockets, history."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest

from gateway.provision import NewTenant, create_tenant
from tests.conftest import ORIGIN, Gateway, chat, hello
from tests.support import call


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer ak_wrong"},
        {"Authorization": "Bearer " + "x" * 500},
        {"Authorization": "Session ak_whatever"},
    ],
    ids=["missing", "basic", "no-key", "blank-key", "wrong-key", "oversized", "wrong-scheme"],
)
async def test_auth_failures_are_401(
    offline_gateway: Gateway, tenant: NewTenant, headers: dict[str, str]
) -> None:
    async with offline_gateway.session.get(
        offline_gateway.url("/api/admin/policy"), headers=headers
    ) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        body = await r.json()
    assert body["error"]["code"] == "unauthorized"


async def _raw_get(gw: Gateway, path: str, header: bytes) -> tuple[int, bytes]:
    """A GET with one raw header line: aiohttp's client will not send non-UTF-8 bytes."""
    assert gw.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        writer.write(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Origin: " + ORIGIN.encode() + b"\r\n" + header + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("path", "header", "code"),
    [
        ("/api/admin/policy", b"Authorization: Bearer ak_\xff", "unauthorized"),
        ("/api/admin/policy", b"Authorization: Bearer \xc3\x28\xed\xa0\x80", "unauthorized"),
        ("/api/privacy/export", b"Authorization: Session tok\xff", "session_invalid"),
        ("/api/privacy/export", b"Cookie: __Host-omnigate_session=tok\xfe", "session_invalid"),
    ],
    ids=["admin-bearer", "admin-bad-utf8", "privacy-session", "privacy-cookie"],
)
@pytest.mark.usefixtures("no_tracebacks")
async def test_non_utf8_credential_is_a_wrong_credential(
    offline_gateway: Gateway, tenant: NewTenant, path: str, header: bytes, code: str
) -> None:
    status, body = await _raw_get(offline_gateway, path, header)
    assert status == 401, body
    assert orjson.loads(body)["error"]["code"] == code


@pytest.mark.usefixtures("no_tracebacks")
async def test_non_utf8_session_cookie_on_upgrade_is_no_session(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    upgrade = (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Cookie: __Host-omnigate_session=tok\xff"
    )
    assert offline_gateway.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", offline_gateway.server.port)
    try:
        writer.write(
            f"GET /v1/widget/ws?site={tenant.site_key} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Origin: {ORIGIN}\r\n".encode()
            + upgrade
            + b"\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 101"), head
    # the unknown cookie is replaced by a fresh session's, as for any stale cookie
    assert b"Set-Cookie: __Host-omnigate_session=" in head


def test_token_hash_is_total() -> None:
    """Any str hashes (lone surrogates included); valid tokens hash as their UTF-8 bytes."""
    import hashlib

    from gateway.crypto import token_hash

    assert token_hash("ak_abc") == hashlib.sha256(b"ak_abc").digest()
    assert token_hash("ak_é") == hashlib.sha256("ak_é".encode()).digest()
    for odd in ("ak_\udcff", "\ud800", "\udfff\ud800"):
        assert len(token_hash(odd)) == 32
    assert token_hash("ak_\udcff") != token_hash("ak_\udcfe")


async def test_revoked_key_is_401_at_once(offline_gateway: Gateway, tenant: NewTenant) -> None:
    status, created = await call(
        offline_gateway, "POST", "/api/admin/keys", tenant.admin_key, {"label": "ci"}
    )
    assert (
        status == 201
        and created["key"].startswith("ak_")
        and created["last4"] == created["key"][-4:]
    )
    second = created["key"]
    assert (await call(offline_gateway, "GET", "/api/admin/policy", second))[0] == 200
    status, listed = await call(offline_gateway, "GET", "/api/admin/keys", tenant.admin_key)
    assert status == 200 and len(listed["keys"]) == 2
    assert all("key" not in k and "key_hash" not in k for k in listed["keys"])
    status, revoked = await call(
        offline_gateway, "DELETE", f"/api/admin/keys/{created['id']}", tenant.admin_key
    )
    assert status == 200 and revoked["revoked_at"] is not None
    status, body = await call(offline_gateway, "GET", "/api/admin/policy", second)
    assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_last_active_key_cannot_be_revoked(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    status, listed = await call(offline_gateway, "GET", "/api/admin/keys", tenant.admin_key)
    (only,) = listed["keys"]
    status, body = await call(
        offline_gateway, "DELETE", f"/api/admin/keys/{only['id']}", tenant.admin_key
    )
    assert status == 409 and body["error"]["code"] == "conflict"
    assert (await call(offline_gateway, "GET", "/api/admin/policy", tenant.admin_key))[0] == 200


async def test_other_tenant_objects_are_404(
    gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    other = await create_tenant(app_pool, f"o-{uuid.uuid4().hex[:8]}", [ORIGIN])
    ws = await gateway.ws(tenant.site_key)
    welcome = await hello(ws, consent={"conversation_storage": True})
    await chat(ws, "m1", "private words")
    await ws.close()
    cid = welcome["conversation_id"]
    status, own = await call(gateway, "GET", f"/api/admin/conversations/{cid}", tenant.admin_key)
    assert status == 200 and own["messages"][0]["text"] == "private words"
    status, body = await call(gateway, "GET", f"/api/admin/conversations/{cid}", other.admin_key)
    assert status == 404 and body["error"]["code"] == "not_found"
    for bad in ("not-a-uuid", "123", str(uuid.uuid4())):
        status, body = await call(
            gateway, "GET", f"/api/admin/conversations/{bad}", tenant.admin_key
        )
        assert status == 404 and body["error"]["code"] == "not_found", bad
    # another tenant's keys cannot be revoked either, and say nothing about existence
    _, keys = await call(gateway, "GET", "/api/admin/keys", tenant.admin_key)
    status, _ = await call(
        gateway, "DELETE", f"/api/admin/keys/{keys['keys'][0]['id']}", other.admin_key
    )
    assert status == 404
    _, sites = await call(gateway, "GET", "/api/admin/site-keys", other.admin_key)
    assert len(sites["keys"]) == 1


async def test_policy_put_reaches_a_live_socket(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    ok = await chat(ws, "a", "twelve chars")
    assert ok[-1]["type"] == "done"
    status, got = await call(offline_gateway, "GET", "/api/admin/policy", tenant.admin_key)
    assert status == 200 and got["version"] == 1
    status, put = await call(
        offline_gateway, "PUT", "/api/admin/policy", tenant.admin_key, {"max_message_chars": 5}
    )
    assert status == 200, put
    assert put["version"] == 2
    assert put["diff"] == {"max_message_chars": {"old": 4000, "new": 5}}
    assert put["policy"]["allowed_origins"] == [ORIGIN]  # partial doc merged on the current one
    refused = await chat(ws, "b", "twelve chars")
    assert refused[-1]["type"] == "error" and refused[-1]["code"] == "too_large"
    await ws.close()
    status, got = await call(offline_gateway, "GET", "/api/admin/policy", tenant.admin_key)
    assert got["version"] == 2 and got["policy"]["max_message_chars"] == 5


async def test_invalid_policy_is_422_with_every_field(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    status, body = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"retention_days": 0, "ip_mode": "nope", "bogus": 1},
    )
    assert status == 422
    assert body["error"]["code"] == "invalid_policy"
    fields = {f["field"] for f in body["error"]["fields"]}
    assert {"retention_days", "ip_mode", "bogus"} <= fields
    status, got = await call(offline_gateway, "GET", "/api/admin/policy", tenant.admin_key)
    assert got["version"] == 1  # nothing stored
    status, body = await call(offline_gateway, "PUT", "/api/admin/policy", tenant.admin_key, [1])
    assert status == 400 and body["error"]["code"] == "bad_request"


async def test_history_records_who_and_what(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    await call(
        offline_gateway, "PUT", "/api/admin/policy", tenant.admin_key, {"retention_days": 30}
    )
    await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"allowed_origins": [ORIGIN, "https://shop.example"]},
    )
    status, hist = await call(offline_gateway, "GET", "/api/admin/policy/history", tenant.admin_key)
    assert status == 200
    versions = hist["versions"]
    assert [v["version"] for v in versions] == [3, 2, 1]
    assert versions[0]["diff"] == {
        "allowed_origins": {"old": [ORIGIN], "new": sorted([ORIGIN, "https://shop.example"])}
    }
    assert versions[1]["diff"] == {"retention_days": {"old": 90, "new": 30}}
    key_id = await owner_pool.fetchval(
        "SELECT admin_key_id FROM admin_keys WHERE tenant_id = $1", tenant.tenant_id
    )
    assert versions[0]["created_by"] == f"admin:{key_id}" and versions[2]["created_by"] == "cli"
    actions = await owner_pool.fetch(
        "SELECT actor, action, target FROM audit_log WHERE tenant_id = $1 ORDER BY seq",
        tenant.tenant_id,
    )
    assert [(a["action"], a["target"]) for a in actions] == [
        ("tenant.create", f"tenant:{tenant.tenant_id}"),
        ("policy.update", "policy:2"),
        ("policy.update", "policy:3"),
    ]
    # the new origin is allowed for the widget at once
    ws = await offline_gateway.ws(tenant.site_key, origin="https://shop.example")
    await hello(ws)
    await ws.close()


async def test_concurrent_puts_never_overwrite(offline_gateway: Gateway, tenant: NewTenant) -> None:
    results = await asyncio.gather(
        *(
            call(
                offline_gateway, "PUT", "/api/admin/policy", tenant.admin_key, {"retention_days": d}
            )
            for d in (10, 20, 30, 40)
        )
    )
    statuses = sorted(s for s, _ in results)
    assert set(statuses) <= {200, 409} and 200 in statuses
    for status, body in results:
        if status == 409:
            assert body["error"]["code"] == "conflict"
    _, hist = await call(offline_gateway, "GET", "/api/admin/policy/history", tenant.admin_key)
    assert len(hist["versions"]) == 1 + statuses.count(200)


async def test_if_match_guards_against_lost_updates(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    status, body = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"retention_days": 5},
        headers={"If-Match": '"7"'},
    )
    assert status == 409 and body["error"]["version"] == 1
    status, _ = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"retention_days": 5},
        headers={"If-Match": '"1"'},
    )
    assert status == 200


@pytest.mark.parametrize(
    ("header", "status"),
    [("*", 200), ('W/"1"', 400), ("1_0", 400), ('"1", "2"', 400), ("+1", 400)],
    ids=["any", "weak", "underscore", "list", "signed"],
)
async def test_if_match_takes_a_version_or_star(
    offline_gateway: Gateway, tenant: NewTenant, header: str, status: int
) -> None:
    got, body = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"retention_days": 5},
        headers={"If-Match": header},
    )
    assert got == status, body
    _, hist = await call(offline_gateway, "GET", "/api/admin/policy/history", tenant.admin_key)
    assert len(hist["versions"]) == (2 if status == 200 else 1)


@pytest.mark.parametrize(
    "url", ["http://[", "https://[::1", "https://a\uff03b.com", "https://exa\u2100mple.com/"]
)
async def test_an_unparseable_privacy_policy_url_is_422(
    offline_gateway: Gateway, tenant: NewTenant, url: str
) -> None:
    status, body = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"privacy_policy_url": url},
    )
    assert status == 422, body
    assert [f["field"] for f in body["error"]["fields"]] == ["privacy_policy_url"]


async def test_a_put_that_changes_nothing_stores_no_version(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g, key = offline_gateway, tenant.admin_key
    _, current = await call(g, "GET", "/api/admin/policy", key)
    same = {"retention_days": current["policy"]["retention_days"]}
    for body in ({}, same, {"policy": current["policy"]}):
        status, got = await call(g, "PUT", "/api/admin/policy", key, body)
        assert status == 200 and got["version"] == 1 and got["diff"] == {}, got
    _, hist = await call(g, "GET", "/api/admin/policy/history", key)
    assert [v["version"] for v in hist["versions"]] == [1]
    audited = await owner_pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'policy.update'",
        tenant.tenant_id,
    )
    assert audited == 0


async def test_consent_version_never_decreases(offline_gateway: Gateway, tenant: NewTenant) -> None:
    g, key = offline_gateway, tenant.admin_key
    status, _ = await call(g, "PUT", "/api/admin/policy", key, {"consent_version": 3})
    assert status == 200
    status, body = await call(g, "PUT", "/api/admin/policy", key, {"consent_version": 2})
    assert status == 422
    assert body["error"]["fields"] == [{"field": "consent_version", "message": "must not decrease"}]
    _, got = await call(g, "GET", "/api/admin/policy", key)
    assert got["version"] == 2 and got["policy"]["consent_version"] == 3


async def test_site_keys_create_and_revoke(offline_gateway: Gateway, tenant: NewTenant) -> None:
    status, created = await call(offline_gateway, "POST", "/api/admin/site-keys", tenant.admin_key)
    assert status == 201 and created["key"].startswith("pk_")
    ws = await offline_gateway.ws(created["key"])
    await hello(ws)
    await ws.close()
    status, listed = await call(offline_gateway, "GET", "/api/admin/site-keys", tenant.admin_key)
    assert len(listed["keys"]) == 2 and all("key" not in k for k in listed["keys"])
    status, revoked = await call(
        offline_gateway, "DELETE", f"/api/admin/site-keys/{created['id']}", tenant.admin_key
    )
    assert status == 200 and revoked["revoked_at"]
    async with offline_gateway.session.get(
        offline_gateway.url(f"/v1/widget/ws?site={created['key']}"),
        headers={
            "Origin": ORIGIN,
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as r:
        assert r.status == 403


async def test_revoking_a_site_key_again_answers_the_same_and_audits_once(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g, key = offline_gateway, tenant.admin_key
    _, created = await call(g, "POST", "/api/admin/site-keys", key)
    answers = [await call(g, "DELETE", f"/api/admin/site-keys/{created['id']}", key) for _ in "ab"]
    assert answers[0] == answers[1] and answers[0][0] == 200
    audited = await owner_pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'site_key.revoke'",
        tenant.tenant_id,
    )
    assert audited == 1


# --- values PostgreSQL refuses are the client's error, not an outage ------------------


def _refused_value(status: int, body: dict[str, object], secret: str) -> None:
    assert status == 422, body
    assert body == {"error": {"code": "invalid_request", "message": "a value could not be stored"}}
    assert secret not in str(body)


@pytest.mark.usefixtures("no_tracebacks")
async def test_nul_in_admin_key_label_is_refused_not_an_outage(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    status, body = await call(
        offline_gateway, "POST", "/api/admin/keys", tenant.admin_key, {"label": "a\u0000zz"}
    )
    _refused_value(status, body, "zz")
    n = await owner_pool.fetchval(
        "SELECT count(*) FROM admin_keys WHERE tenant_id = $1", tenant.tenant_id
    )
    assert n == 1  # nothing stored
    # the gateway is fine: the next request with a storable value succeeds
    status, _ = await call(
        offline_gateway, "POST", "/api/admin/keys", tenant.admin_key, {"label": "ok"}
    )
    assert status == 201


@pytest.mark.usefixtures("no_tracebacks")
async def test_nul_in_system_prompt_is_refused_not_an_outage(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    status, body = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"system_prompt": "be kind\u0000secretword"},
    )
    _refused_value(status, body, "secretword")
    status, got = await call(offline_gateway, "GET", "/api/admin/policy", tenant.admin_key)
    assert status == 200 and got["version"] == 1


@pytest.mark.usefixtures("no_tracebacks")
async def test_nul_in_request_reason_is_refused_not_an_outage(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    token = (await hello(ws, consent={"conversation_storage": True}))["session_token"]
    async with g.session.post(
        g.url("/api/gdpr/request"),
        json={"kind": "access"},
        headers={"Authorization": f"Session {token}"},
    ) as r:
        assert r.status == 201
        doc = await r.json()
    status, body = await call(
        g,
        "POST",
        f"/api/admin/requests/{doc['id']}/reject",
        tenant.admin_key,
        {"reason": "dup\u0000secretword"},
    )
    _refused_value(status, body, "secretword")
    status, listed = await call(g, "GET", "/api/admin/requests", tenant.admin_key)
    assert [x["status"] for x in listed["requests"]] == ["received"]
    await ws.close()


async def test_storage_outage_is_still_503(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only data errors (SQLSTATE class 22) are the client's: a lost connection is not."""
    from gateway import store

    async def gone(*_: object) -> None:
        raise asyncpg.ConnectionDoesNotExistError("connection was closed")

    monkeypatch.setattr(store, "latest_policy", gone)
    status, body = await call(offline_gateway, "GET", "/api/admin/policy", tenant.admin_key)
    assert status == 503 and body["error"]["code"] == "storage_unavailable"


async def _history_pages(
    g: Gateway, key: str, limit: int, before: int | None = None
) -> list[dict[str, object]]:
    """GET /api/admin/policy/history page by page, following next_before to its null."""
    pages: list[dict[str, object]] = []
    while True:
        params = {"limit": str(limit), **({"before": str(before)} if before is not None else {})}
        status, page = await call(g, "GET", "/api/admin/policy/history", key, params=params)
        assert status == 200, page
        pages.append(page)
        before = page["next_before"]
        if before is None:
            return pages
        assert len(pages) < 20, "next_before does not advance"


async def _seven_versions(g: Gateway, t: NewTenant) -> None:
    """Versions 2 to 7 on top of the tenant's first: retention_days 31 to 36."""
    for days in range(31, 37):
        status, body = await call(
            g, "PUT", "/api/admin/policy", t.admin_key, {"retention_days": days}
        )
        assert status == 200, body


@pytest.mark.usefixtures("no_tracebacks")
async def test_policy_history_pages_back_with_before(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g, key = offline_gateway, tenant.admin_key
    await _seven_versions(g, tenant)
    pages = await _history_pages(g, key, limit=3)
    assert [[v["version"] for v in p["versions"]] for p in pages] == [[7, 6, 5], [4, 3, 2], [1]]
    assert [p["next_before"] for p in pages] == [5, 2, None]
    versions = [v for p in pages for v in p["versions"]]
    assert versions[0]["diff"] == {"retention_days": {"old": 35, "new": 36}}
    assert versions[-1]["created_by"] == "cli"
    # the default page (100) holds all seven: no next page
    status, whole = await call(g, "GET", "/api/admin/policy/history", key)
    assert status == 200 and whole["next_before"] is None
    assert [v["version"] for v in whole["versions"]] == [7, 6, 5, 4, 3, 2, 1]
    # from any version down; nothing before the first
    rest = await _history_pages(g, key, limit=2, before=6)
    assert [[v["version"] for v in p["versions"]] for p in rest] == [[5, 4], [3, 2], [1]]
    status, empty = await call(g, "GET", "/api/admin/policy/history", key, params={"before": "1"})
    assert status == 200 and empty == {"versions": [], "next_before": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"before": "x"}, "before"),
        ({"before": "0"}, "before"),
        ({"before": "-3"}, "before"),
        ({"before": "2.5"}, "before"),
        ({"before": str(2**62 + 1)}, "before"),
        ({"before": ""}, "before"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
    ids=[
        "word",
        "zero",
        "negative",
        "fraction",
        "huge",
        "empty",
        "limit-0",
        "limit-101",
        "limit-word",
    ],
)
@pytest.mark.usefixtures("no_tracebacks")
async def test_policy_history_refuses_a_bad_page(
    offline_gateway: Gateway, tenant: NewTenant, params: dict[str, str], field: str
) -> None:
    """Refused as the audit log refuses them: 400 bad_request naming the parameter."""
    status, body = await call(
        offline_gateway, "GET", "/api/admin/policy/history", tenant.admin_key, params=params
    )
    assert status == 400, body
    assert body["error"]["code"] == "bad_request"
    assert [f["field"] for f in body["error"]["fields"]] == [field]
