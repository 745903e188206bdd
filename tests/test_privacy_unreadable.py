"""Export and erasure edges: unreadable messages, what the audit log and errors may name."""

from __future__ import annotations

import time
from typing import Any
from uuid import uuid4

import aiohttp
import asyncpg
import orjson
import pytest

from gateway import export, metrics
from gateway.appkeys import SERVICES
from gateway.erasure import SubjectNotFound, erase_subject, subject_ref
from gateway.provision import NewTenant
from tests.conftest import Gateway, chat, hello
from tests.support import CORRUPT_FIRST_MESSAGE


async def test_export_with_an_unreadable_message_is_valid_json(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    w = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
    assert (await chat(ws, "m", "hello there"))[-1]["type"] == "done"
    await owner_pool.execute(CORRUPT_FIRST_MESSAGE, w["conversation_id"])
    async with g.session.get(
        g.url("/api/privacy/export"), headers={"Authorization": f"Session {w['session_token']}"}
    ) as r:
        assert r.status == 200
        raw = await r.read()
    doc = orjson.loads(raw)  # complete JSON, not cut off at the bad message
    messages = doc["conversations"][0]["messages"]
    assert [(m["role"], m["text"], m.get("unreadable", False)) for m in messages] == [
        ("user", None, True),
        ("assistant", "hello there", False),
    ]
    await ws.close()


async def test_export_failing_mid_stream_cuts_the_connection(
    offline_gateway: Gateway,
    tenant: NewTenant,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    w = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
    for i in range(3):
        assert (await chat(ws, f"m{i}", "a secret plan"))[-1]["type"] == "done"
    real, calls = export._dump, 0

    def failing(value: Any) -> bytes:  # the database going away after a few rows
        nonlocal calls
        calls += 1
        if calls == 4:
            raise OSError("connection lost")
        return real(value)

    monkeypatch.setattr(export, "_dump", failing)
    before = metrics.PRIVACY_REQUESTS.labels(kind="export", status="failed")._value.get()
    t0 = time.monotonic()
    # the 200 was sent: the client must see a cut body at once, not wait for more
    with pytest.raises(aiohttp.ClientPayloadError):
        async with g.session.get(
            g.url("/api/privacy/export"),
            headers={"Authorization": f"Session {w['session_token']}"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r:
            assert r.status == 200
            await r.read()
    assert time.monotonic() - t0 < 5
    after = metrics.PRIVACY_REQUESTS.labels(kind="export", status="failed")._value.get()
    assert after == before + 1
    assert "export failed mid-stream" in caplog.text and "secret plan" not in caplog.text
    # the gateway keeps serving, and the export works again
    monkeypatch.setattr(export, "_dump", real)
    async with g.session.get(
        g.url("/api/privacy/export"), headers={"Authorization": f"Session {w['session_token']}"}
    ) as r:
        assert r.status == 200
        assert len(orjson.loads(await r.read())["conversations"][0]["messages"]) == 6
    await ws.close()


async def test_export_audit_names_the_subject_ref_not_the_session(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    w = await hello(ws, consent={"conversation_storage": True})
    sid = await owner_pool.fetchval(
        "SELECT subject_id FROM sessions WHERE conversation_id = $1::uuid", w["conversation_id"]
    )
    session_id = await owner_pool.fetchval(
        "SELECT session_id FROM sessions WHERE conversation_id = $1::uuid", w["conversation_id"]
    )
    async with g.session.get(
        g.url("/api/privacy/export"), headers={"Authorization": f"Session {w['session_token']}"}
    ) as r:
        assert r.status == 200
        await r.read()
    target = await owner_pool.fetchval(
        "SELECT target FROM audit_log WHERE tenant_id = $1 AND action = 'export'",
        tenant.tenant_id,
    )
    assert target == f"subject_ref:{subject_ref(tenant.tenant_id, sid)}"
    assert str(session_id) not in target and str(sid) not in target
    await ws.close()


async def test_subject_not_found_does_not_name_the_subject(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    svc = offline_gateway.server.app[SERVICES]
    missing = uuid4()
    with pytest.raises(SubjectNotFound) as caught:
        await erase_subject(svc, tenant.tenant_id, missing, "test")
    assert str(missing) not in str(caught.value) and str(missing) not in repr(caught.value)
