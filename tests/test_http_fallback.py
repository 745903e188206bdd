"""POST /v1/widget/chat answers the same events as text/event-stream."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse, ServerDisconnectedError, web

from gateway import connection, metrics, ws
from gateway.appkeys import SERVICES
from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant
from tests.conftest import ORIGIN, Gateway
from tests.support import bearer, call, parse_sse, post, until

# what the widget sends, and the only body type the fallback reads
JSON = {"Content-Type": "application/json"}


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
            headers={"Origin": ORIGIN, **JSON},
        ) as resp:
            events = parse_sse(await resp.read())
        assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_request", events


async def test_a_body_over_aiohttps_limit_is_too_large_as_any_oversized_body(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    """Over 1 MiB (aiohttp's `client_max_size`) as between 64 KiB and 1 MiB: an event,
    not aiohttp's plain-text 413."""
    answers = []
    for size in (100_000, 2 * 1024 * 1024):
        async with offline_gateway.session.post(
            offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"),
            data=io.BytesIO(orjson.dumps({"id": "big", "text": "x" * size})),
            headers={"Origin": ORIGIN, **JSON},
        ) as resp:
            answers.append((resp.status, resp.content_type, parse_sse(await resp.read())))
    assert answers[1] == answers[0]
    status, content_type, events = answers[0]
    assert status == 200 and content_type == "text/event-stream"
    assert [(e["type"], e["code"]) for e in events] == [("error", "too_large")]


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


# --- a reply that ends early: the visitor leaves, or their data is erased -------------


async def _open_stream(g: Gateway, site: str, body: Any) -> ClientResponse:
    resp = await g.session.post(
        g.url(f"/v1/widget/chat?site={site}"),
        data=orjson.dumps(body),
        headers={"Origin": ORIGIN, **JSON},
    )
    assert resp.status == 200
    return resp


async def _events_until(resp: ClientResponse, kind: str) -> list[dict[str, Any]]:
    """Read SSE events as they come, up to the first of type `kind`."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(orjson.loads(line[6:]))
                if events[-1]["type"] == kind:
                    return events
    raise AssertionError(f"the stream ended before {kind}: {events}")


CONSENT = {"consent": {"conversation_storage": True, "ai_processing": True}}


async def test_a_visitor_leaving_mid_reply_stops_it_quietly(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str], no_tracebacks: None
) -> None:
    upstream, _ = fake
    upstream.queue("slow", reply="one two three four five six seven eight", delay_ms=100)
    svc = gateway.server.app[SERVICES]
    body = {"id": "m1", "text": "hi", "hello": CONSENT}
    resp = await _open_stream(gateway, tenant.site_key, body)
    await _events_until(resp, "delta")
    resp.close()  # the tab is closed mid-reply
    # as on a WebSocket: the upstream request is cancelled, not read to its end
    async with asyncio.timeout(3):
        await upstream.disconnected.wait()
    await until(lambda: not svc.live)
    # no false storage outage: the next visitor is answered
    status, _, body = await post(gateway, tenant.site_key, {"id": "m2", "text": "hello again"})
    assert status == 200 and parse_sse(body)[-1]["type"] == "done"


async def test_erasure_mid_reply_ends_the_stream_with_session_invalid(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str], owner_pool: asyncpg.Pool
) -> None:
    upstream, _ = fake
    upstream.queue("slow", reply="one two three four five six seven eight", delay_ms=100)
    resp = await _open_stream(
        gateway, tenant.site_key, {"id": "m1", "text": "forget me", "hello": CONSENT}
    )
    before = await _events_until(resp, "delta")
    conv = before[0]["conversation_id"]
    status, out = await call(
        gateway,
        "POST",
        "/api/admin/subjects/erase-by-conversation",
        tenant.admin_key,
        {"conversation_id": conv},
    )
    assert status == 200 and out["erased"] is True
    rest = parse_sse(await resp.read())
    # the reply stops; the widget is told to start afresh rather than to retry the message
    assert [e["type"] for e in rest] == ["error"] and rest[0]["code"] == "session_invalid", rest
    async with asyncio.timeout(3):
        await upstream.disconnected.wait()
    assert (
        await owner_pool.fetchval(
            "SELECT count(*) FROM messages WHERE tenant_id = $1", tenant.tenant_id
        )
        == 0
    )


async def test_a_client_gone_before_the_stream_opens_leaves_no_session_behind(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = offline_gateway.server.app[SERVICES]
    real_prepare = web.StreamResponse.prepare

    async def gone(self: web.StreamResponse, request: web.BaseRequest) -> Any:
        if self.content_type == "text/event-stream":
            raise ConnectionResetError("peer gone")
        return await real_prepare(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", gone)
    active = metrics.SESSIONS_ACTIVE._value.get()
    with pytest.raises(ServerDisconnectedError):  # nothing could be written to it
        await post(offline_gateway, tenant.site_key, {"id": "m1", "text": "hi", "hello": CONSENT})
    # the session it opened (its map and context in memory) left the live registry
    assert svc.live == {}
    assert metrics.SESSIONS_ACTIVE._value.get() == active


async def test_a_refused_new_session_names_the_message_it_refused(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    status, _ = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        {"rate_limit": {"new_sessions_per_ip_per_minute": 1}},
    )
    assert status == 200
    _, _, body = await post(offline_gateway, tenant.site_key, {"id": "m1", "text": "first"})
    assert parse_sse(body)[-1]["type"] == "done"
    _, _, body = await post(offline_gateway, tenant.site_key, {"id": "m2", "text": "second"})
    [refused] = parse_sse(body)
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "rate_limited", "m2")
    assert refused["retry_after"] > 0


# --- refusals of the request itself --------------------------------------------------


def _error_frames(code: str) -> float:
    return float(metrics.ERROR_FRAMES.labels(code=code)._value.get())


def _requests(status: int) -> float:
    return float(
        metrics.HTTP_REQUESTS.labels(route="/v1/widget/chat", status=str(status))._value.get()
    )


async def test_a_refusal_is_logged_and_counted_as_on_a_socket(
    offline_gateway: Gateway, tenant: NewTenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="omnigate")
    for body, code in ((b"{not json", "bad_request"), (b" " * 70_000, "too_large")):
        before = _error_frames(code)
        caplog.clear()
        async with offline_gateway.session.post(
            offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"),
            data=body,
            headers={"Origin": ORIGIN, **JSON},
        ) as resp:
            assert [e["code"] for e in parse_sse(await resp.read())] == [code]
        assert _error_frames(code) == before + 1
        refused = [r for r in caplog.records if r.getMessage() == "frame refused"]
        assert [getattr(r, "code", None) for r in refused] == [code]
        # the code only: nothing of the body reaches the line
        assert "not json" not in caplog.text


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_refused_hello_names_the_message(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    """The widget fails or retries the message an error names; one without `id` would
    leave it pending. Any hello but an object or null is refused, 0 and [] included."""
    for hello in ({"age_confirmed": "yes"}, {"id": "other"}, "x", 0, False, "", []):
        _, _, body = await post(
            offline_gateway, tenant.site_key, {"id": "m1", "text": "hi", "hello": hello}
        )
        assert [(e["type"], e["code"], e.get("id")) for e in parse_sse(body)] == [
            ("error", "bad_request", "m1")
        ], hello
    # an id the protocol does not accept is not echoed
    _, _, body = await post(
        offline_gateway, tenant.site_key, {"id": "x" * 129, "text": "hi", "hello": 0}
    )
    [refused] = parse_sse(body)
    assert refused["code"] == "bad_request" and "id" not in refused
    # a null hello is no hello
    _, _, body = await post(
        offline_gateway, tenant.site_key, {"id": "m2", "text": "hi", "hello": None}
    )
    assert parse_sse(body)[-1]["type"] == "done"


async def test_a_session_that_cannot_open_names_the_message(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storage_unavailable with its `id`: the widget retries the message after the wait."""

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("database unreachable")

    monkeypatch.setattr(connection, "open_session", down)
    before = _error_frames("storage_unavailable")
    _, _, body = await post(offline_gateway, tenant.site_key, {"id": "m1", "text": "hi"})
    [refused] = parse_sse(body)
    assert (refused["code"], refused.get("id"), refused["retry_after"]) == (
        "storage_unavailable",
        "m1",
        1.0,
    )
    assert _error_frames("storage_unavailable") == before + 1


@pytest.mark.usefixtures("no_tracebacks")
async def test_only_a_json_body_is_read(offline_gateway: Gateway, tenant: NewTenant) -> None:
    """Any other Content-Type is refused (so every cross-origin browser POST needs the
    preflight); parameters are allowed."""
    url = offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}")
    body = orjson.dumps({"id": "c1", "text": "hi"})
    for ctype in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ):
        headers = {"Origin": ORIGIN} if ctype is None else {"Origin": ORIGIN, "Content-Type": ctype}
        async with offline_gateway.session.post(
            url, data=body, headers=headers, skip_auto_headers=["Content-Type"]
        ) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            events = parse_sse(await resp.read())
        assert [(e["type"], e["code"]) for e in events] == [("error", "bad_request")], ctype
    async with offline_gateway.session.post(
        url,
        data=body,
        headers={"Origin": ORIGIN, "Content-Type": "application/json; charset=utf-8"},
    ) as resp:
        assert parse_sse(await resp.read())[-1]["type"] == "done"


@pytest.mark.usefixtures("no_tracebacks")
async def test_a_body_that_does_not_decode_is_a_bad_request(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    """Content-Encoding: gzip on a body that is not gzip: aiohttp fails its read. The
    fallback answers an event; any other route a JSON 400. Never a 500."""
    broken = {"Content-Encoding": "gzip", **JSON}
    async with offline_gateway.session.post(
        offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"),
        data=b"this is not gzip",
        headers={"Origin": ORIGIN, **broken},
    ) as resp:
        status, ctype, body = resp.status, resp.content_type, await resp.read()
    assert (status, ctype) == (200, "text/event-stream"), body
    assert [(e["type"], e["code"]) for e in parse_sse(body)] == [("error", "bad_request")]
    async with offline_gateway.session.put(
        offline_gateway.url("/api/admin/policy"),
        data=b"this is not gzip",
        headers={**bearer(tenant.admin_key), **broken},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "bad_request"


async def test_a_client_leaving_mid_upload_is_not_a_storage_outage(
    offline_gateway: Gateway, tenant: NewTenant, caplog: pytest.LogCaptureFixture
) -> None:
    """Content-Length promises more than is sent, then the client closes: the read fails
    with ConnectionResetError, an OSError, yet no storage alert (log line, 503) follows."""
    caplog.set_level(logging.INFO, logger="omnigate")
    outages, gone = _requests(503), _requests(499)
    url = urlsplit(offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"))
    _, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        f"POST {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nOrigin: {ORIGIN}\r\n"
        "Content-Length: 1000\r\nContent-Type: application/json\r\n\r\n"
        '{"id":'.encode()
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body
    writer.close()
    await until(lambda: _requests(499) == gone + 1)
    assert _requests(503) == outages
    assert not [r for r in caplog.records if r.getMessage() == "storage unavailable"]


async def test_an_outage_met_after_the_client_left_is_still_an_outage(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL refusing connections is a storage outage (503, logged) even when the
    client has gone by the time it is met: only a body read cut by the client is a 499."""
    closed = asyncio.Event()

    async def unreachable(request: Any) -> Any:
        await closed.wait()
        await asyncio.sleep(0.1)  # the server has seen the connection close
        raise ConnectionRefusedError("database unreachable")

    monkeypatch.setattr(ws, "_tenant_and_policy", unreachable)
    outages, gone = _requests(503), _requests(499)
    url = urlsplit(offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"))
    _, writer = await asyncio.open_connection(url.hostname, url.port)
    body = b'{"id": "m1", "text": "hi"}'
    writer.write(
        f"POST {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nOrigin: {ORIGIN}\r\n"
        f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    closed.set()
    await until(lambda: _requests(503) == outages + 1)
    assert _requests(499) == gone


async def test_fallback_records_one_page_view_per_session_not_per_message(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    """The fallback sends its hello with every message: only the hello that starts the
    session records the page view (docs/protocol.md), not each message."""
    token = None
    for i in range(3):
        h: dict[str, Any] = {"consent": {"analytics": True}, "context": {"page": "/pricing"}}
        if token:
            h["session_token"] = token
        _, _, body = await post(
            offline_gateway, tenant.site_key, {"id": f"m{i}", "text": "hi", "hello": h}
        )
        welcome = parse_sse(body)[0]
        assert welcome["type"] == "welcome" and welcome["resumed"] is (i > 0), welcome
        token = welcome["session_token"]
    paths = await owner_pool.fetch(
        "SELECT page_path FROM analytics_events WHERE tenant_id = $1", tenant.tenant_id
    )
    assert [r["page_path"] for r in paths] == ["/pricing"]
