"""The visitor's export survives a message whose ciphertext does not open."""

from __future__ import annotations

import asyncpg
import orjson

from gateway.provision import NewTenant
from tests.conftest import Gateway, chat, hello
from tests.test_admin_data import CORRUPT_FIRST_MESSAGE


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
