"""Visitor privacy API over a real gateway: consent, export, erasure, certificates, GPC."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest

from gateway import certs
from gateway.appkeys import SERVICES
from gateway.crypto import CryptoError, KeyRing
from gateway.db import tenant_tx
from gateway.provision import NewTenant, create_tenant
from gateway.vault import Vault
from tests.conftest import MASTER_KEY, ORIGIN, Gateway, chat, hello
from tests.support import set_policy, tenant_with


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Session {token}"}


async def visitor(g: Gateway, t: NewTenant, *texts: str) -> tuple[Any, dict[str, Any]]:
    """A visitor with a stored conversation; returns (open socket, welcome)."""
    ws = await g.ws(t.site_key)
    welcome = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
    for n, text in enumerate(texts):
        frames = await chat(ws, f"m{n}", text)
        assert frames[-1]["type"] == "done", frames
    return ws, welcome


async def export_of(g: Gateway, token: str) -> tuple[int, Any]:
    async with g.session.get(g.url("/api/privacy/export"), headers=auth(token)) as r:
        return r.status, await r.json(content_type=None)


async def test_export_holds_exactly_this_visitors_data(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws_a, a = await visitor(g, tenant, "alpha one", "alpha two")
    ws_b, _b = await visitor(g, tenant, "bravo secret words")
    other = await create_tenant(app_pool, "other", [ORIGIN])
    ws_c, _ = await visitor(g, other, "charlie elsewhere")
    status, doc = await export_of(g, a["session_token"])
    assert status == 200
    texts = [m["text"] for c in doc["conversations"] for m in c["messages"]]
    assert texts == ["alpha one", "alpha one", "alpha two", "alpha two"]
    assert [c["conversation_id"] for c in doc["conversations"]] == [a["conversation_id"]]
    assert "bravo" not in str(doc) and "charlie" not in str(doc)
    assert [s["conversation_id"] for s in doc["sessions"]] == [a["conversation_id"]]
    assert {"ip_anon", "dnt", "gpc"} <= set(doc["sessions"][0])
    assert doc["consents"]["current"]["conversation_storage"]["granted"] is True
    assert doc["recipients"][0]["name"] == "offline model"
    assert doc["retention"]["messages_days"] == 90
    assert doc["purposes"] and doc["source"]
    for ws in (ws_a, ws_b, ws_c):
        await ws.close()


async def test_export_names_the_upstream_host(gateway: Gateway, tenant: NewTenant) -> None:
    ws, w = await visitor(gateway, tenant, "hi")
    _, doc = await export_of(gateway, w["session_token"])
    assert doc["recipients"][0]["name"] == "OpenAI-compatible upstream at 127.0.0.1"
    await ws.close()


async def test_export_streams_ten_thousand_messages(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool, settings: Any
) -> None:
    ws, w = await visitor(offline_gateway, tenant, "seed")
    tid, cid = tenant.tenant_id, UUID(w["conversation_id"])
    from gateway import store
    from gateway.db import tenant_tx

    vault = Vault(KeyRing((MASTER_KEY,)))
    async with tenant_tx(app_pool, tid) as conn:
        sid = await conn.fetchval(
            "SELECT subject_id FROM conversations WHERE conversation_id = $1", cid
        )
        cipher = await vault.cipher(conn, tid, sid)
        for i in range(10_000):
            mid = __import__("uuid").uuid4()
            blob = vault.seal_text(cipher, tid, cid, mid, "user", f"n{i}")
            await store.insert_message(conn, store.NewMessage(tid, cid, mid, "user", blob))
    status, doc = await export_of(offline_gateway, w["session_token"])
    assert status == 200
    assert len(doc["conversations"][0]["messages"]) == 10_002
    assert doc["conversations"][0]["messages"][-1]["text"] == "n9999"
    await ws.close()


async def test_privacy_api_needs_a_valid_session(offline_gateway: Gateway) -> None:
    g = offline_gateway
    for path in ("/api/privacy/export", "/api/privacy/consent"):
        async with g.session.get(g.url(path)) as r:
            assert r.status == 401
        async with g.session.get(g.url(path), headers=auth("nope")) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "session_invalid"


async def test_consent_get_and_post(offline_gateway: Gateway, tenant: NewTenant) -> None:
    g = offline_gateway
    ws, w = await visitor(g, tenant)
    h = auth(w["session_token"])
    url = g.url("/api/privacy/consent")
    async with g.session.post(
        url, json={"grant": ["analytics"], "revoke": ["ai_processing"]}, headers=h
    ) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["purposes"]["analytics"]["granted"] is True
    assert doc["purposes"]["analytics"]["consent_version"] == 1
    assert doc["purposes"]["ai_processing"]["granted"] is False
    assert [x["source"] for x in doc["history"]][-2:] == ["api", "api"]
    async with g.session.get(url, headers=h) as r:
        assert (await r.json())["purposes"] == doc["purposes"]
    async with g.session.post(url, json={"grant": ["telepathy"]}, headers=h) as r:
        assert r.status == 422
    await ws.close()


async def test_gpc_json(offline_gateway: Gateway) -> None:
    async with offline_gateway.session.get(offline_gateway.url("/.well-known/gpc.json")) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        doc = await r.json()
    assert doc["gpc"] is True and len(doc["lastUpdate"]) == 10


async def test_delete_erases_everything_and_closes_the_socket(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, w = await visitor(g, tenant, "erase me please")
    other_ws, other = await visitor(g, tenant, "keep me")
    tid, cid = tenant.tenant_id, UUID(w["conversation_id"])
    sid = await owner_pool.fetchval(
        "SELECT subject_id FROM conversations WHERE conversation_id = $1", cid
    )
    copied = await owner_pool.fetchrow(
        "SELECT message_id, role, ciphertext FROM messages WHERE conversation_id = $1 LIMIT 1", cid
    )
    vault = Vault(KeyRing((MASTER_KEY,)))
    async with owner_pool.acquire() as conn:
        # before erasure the copied ciphertext opens with the subject's key
        cipher = await vault.cipher(conn, tid, sid)
        text = vault.open_text(
            cipher, tid, cid, copied["message_id"], copied["role"], copied["ciphertext"]
        )
        assert text == "erase me please"
    async with g.session.post(g.url("/api/privacy/delete"), headers=auth(w["session_token"])) as r:
        assert r.status == 200
        cert = await r.json()
    # the live socket is closed with 4001 by the erasure event
    msg = await ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == 4001
    body = cert["certificate"]
    assert body["tenant_id"] == str(tid) and body["items"]["messages"] == 2
    assert str(sid) not in str(cert)
    async with g.session.get(g.url("/api/privacy/certificate-key")) as r:
        key = await r.json()
    assert key["algorithm"] == "Ed25519" and key["key_id"] == cert["key_id"]
    assert certs.verify(cert, key["public_key"])
    tampered = {**cert, "certificate": {**body, "items": {**body["items"], "messages": 1}}}
    assert not certs.verify(tampered, key["public_key"])
    status, _ = await export_of(g, w["session_token"])
    assert status == 401
    for table in (
        "subjects",
        "subject_keys",
        "sessions",
        "conversations",
        "consents",
        "analytics_events",
    ):
        n = await owner_pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE tenant_id = $1 AND subject_id = $2", tid, sid
        )
        assert n == 0, table
    assert (
        await owner_pool.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", cid)
        == 0
    )
    # the copied ciphertext cannot be opened any more: no key for it is left anywhere
    fresh = Vault(KeyRing((MASTER_KEY,)))  # no cache: only what the database still holds
    async with owner_pool.acquire() as conn:
        with pytest.raises(CryptoError):
            await fresh.cipher(conn, tid, sid)
    assert (
        await owner_pool.fetchval("SELECT count(*) FROM subject_keys WHERE subject_id = $1", sid)
        == 0
    )
    # the audit entry holds no subject id
    entry = await owner_pool.fetchrow(
        "SELECT * FROM audit_log WHERE tenant_id = $1 AND action = 'erasure'", tid
    )
    assert entry is not None and str(sid) not in str(dict(entry))
    status, doc = await export_of(g, other["session_token"])
    assert status == 200 and "keep me" in str(doc)
    await other_ws.close()
    await asyncio.sleep(0)


async def test_the_export_says_which_decisions_are_in_force(
    offline_gateway: Gateway, app_pool: asyncpg.Pool
) -> None:
    # a grant under an earlier consent_version is shown as what it is: stale
    g = offline_gateway
    t = await tenant_with(app_pool)
    ws = await g.ws(t.site_key)
    w = await hello(ws, consent={"analytics": True, "marketing": False})
    await ws.close()
    await set_policy(app_pool, t, 3, consent_version=2)
    g.server.app[SERVICES].tenants.invalidate(t.tenant_id)
    status, doc = await export_of(g, w["session_token"])
    assert status == 200
    current = doc["consents"]["current"]
    assert current["analytics"]["granted"] is True and current["analytics"]["in_force"] is False
    assert current["marketing"]["in_force"] is False
    async with g.session.get(
        g.url("/api/privacy/consent"), headers={"Authorization": f"Session {w['session_token']}"}
    ) as resp:
        api = await resp.json()
    assert api["purposes"]["analytics"]["granted"] is False  # what the consent API says too


async def test_each_change_of_a_privacy_signal_is_kept_and_exported(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    # the session row holds only the latest signals; a resume must not erase the record
    # that GPC was sent before
    async def say_hello(token: str | None, **fields: Any) -> dict[str, Any]:
        ws = await offline_gateway.ws(tenant.site_key)
        w = await hello(ws, **({"session_token": token} if token else {}), **fields)
        await ws.close()
        return w

    plain = await say_hello(None)  # neither signal: nothing recorded
    first = await say_hello(None, signals={"gpc": True})
    token = first["session_token"]
    await say_hello(token, signals={"gpc": True})  # unchanged: nothing new
    await say_hello(token)  # GPC off
    await say_hello(token, signals={"dnt": True, "gpc": True})
    status, doc = await export_of(offline_gateway, token)
    assert status == 200
    assert [(s["dnt"], s["gpc"]) for s in doc["signals"]] == [
        (False, True),
        (False, False),
        (True, True),
    ]
    assert doc["sessions"][0]["gpc"] is True  # the row: the latest only
    _, plain_doc = await export_of(offline_gateway, plain["session_token"])
    assert plain_doc["signals"] == []
    # append-only for the gateway's role
    for sql in ("UPDATE signal_records SET gpc = false", "DELETE FROM signal_records"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_tx(app_pool, tenant.tenant_id) as conn:
                await conn.execute(sql)
    # and erased with the visitor
    async with offline_gateway.session.post(
        offline_gateway.url("/api/privacy/delete"), headers=auth(token)
    ) as r:
        assert r.status == 200
        certificate = (await r.json())["certificate"]
    assert certificate["items"]["signal_records"] == 3
    left = await owner_pool.fetchval(
        "SELECT count(*) FROM signal_records WHERE tenant_id = $1", tenant.tenant_id
    )
    assert left == 0


async def test_an_export_needs_one_free_connection_not_two(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    # Reading the tenant's upstream settings may need a connection; an export that
    # asked for it while holding its snapshot's needed two, so as many concurrent
    # exports as the pool has connections could each wait for another, and every
    # tenant's database access hung with them. An admin change empties that cache.
    ws = await offline_gateway.ws(tenant.site_key)
    token = (await hello(ws))["session_token"]
    await ws.close()
    svc = offline_gateway.server.app[SERVICES]
    pool = svc.pool
    busy = pool.get_size() - pool.get_idle_size()
    held = [await pool.acquire() for _ in range(pool.get_max_size() - busy - 1)]
    try:
        svc.forget_upstream(tenant.tenant_id)
        status, _ = await asyncio.wait_for(export_of(offline_gateway, token), 10)
        assert status == 200
    finally:
        for conn in held:
            await pool.release(conn)
