"""POST /v1/widget/chat answers the same events as text/event-stream."""

from __future__ import annotations

import orjson

from gateway.provision import NewTenant
from tests.conftest import ORIGIN, Gateway
from tests.support import parse_sse, post


async def test_sse_chat_and_resume(offline_gateway: Gateway, tenant: NewTenant) -> None:
    status, headers, body = await post(
        offline_gateway, tenant.site_key, {"id": "s1", "text": "over plain http"}
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    events = parse_sse(body)
    types = [e["type"] for e in events]
    assert types[0] == "welcome" and types[1] == "ack" and types[-1] == "done", types
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "over plain http"
    token = events[0]["session_token"]
    _, _, body2 = await post(
        offline_gateway,
        tenant.site_key,
        {"id": "s2", "text": "again", "hello": {"session_token": token}},
    )
    events2 = parse_sse(body2)
    assert events2[0]["resumed"] is True
    assert events2[0]["conversation_id"] == events[0]["conversation_id"]


async def test_sse_bad_body_gets_typed_error(offline_gateway: Gateway, tenant: NewTenant) -> None:
    for body in (
        b"{not json",
        b"[]",
        orjson.dumps({"id": 5, "text": "x"}),
        orjson.dumps({"type": "ping"}),
    ):
        async with offline_gateway.session.post(
            offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"),
            data=body,
            headers={"Origin": ORIGIN},
        ) as resp:
            events = parse_sse(await resp.read())
        assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_request", events


async def test_sse_foreign_origin_refused(offline_gateway: Gateway, tenant: NewTenant) -> None:
    status, _, _ = await post(
        offline_gateway, tenant.site_key, {"id": "x", "text": "hi"}, Origin="http://evil.test"
    )
    assert status == 403


async def test_preflight_only_for_allowed_origin(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    url = offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}")
    async with offline_gateway.session.options(url, headers={"Origin": ORIGIN}) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with offline_gateway.session.options(url, headers={"Origin": "http://evil.test"}) as resp:
        assert resp.status == 403
