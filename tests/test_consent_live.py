"""Consent changed over HTTP reaches the visitor's open sockets: here, on another instance
sharing Redis, and on another worker process; a bus gap makes every socket read it again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway import bus, connection, store
from gateway.appkeys import SERVICES
from gateway.config import Settings
from gateway.db import tenant_tx
from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant
from tests.conftest import Database, Gateway, chat, hello, on_fake, start_gateway
from tests.support import (
    ORIGIN,
    PrivateRedis,
    Server,
    parse_sse,
    post,
    start_server,
    stop_server,
    tenant_with,
    until,
)

pytestmark = pytest.mark.timeout(90)

Frames = list[dict[str, Any]]
REQUIRED = {"required_consents": ["ai_processing"]}


def session(token: str) -> dict[str, str]:
    return {"Authorization": f"Session {token}"}


async def set_consent(
    http: aiohttp.ClientSession, url: str, token: str, **change: list[str]
) -> dict[str, Any]:
    """POST /api/privacy/consent with the socket's own session; the answered document."""
    async with http.post(url, json=change, headers=session(token)) as resp:
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
    return doc


async def frames_until(
    ws: aiohttp.ClientWebSocketResponse, done: Callable[[Frames], bool], timeout: float = 5.0
) -> Frames:
    """Collect frames until `done(frames)` holds."""
    frames: Frames = []
    while not done(frames):
        frames.append(await ws.receive_json(timeout=timeout))
    return frames


def pushed(granted: bool) -> Callable[[Frames], bool]:
    """The welcome pushed after a change, with ai_processing granted or not."""
    return lambda frames: any(
        f["type"] == "welcome" and ("ai_processing" in f["policy"]["granted"]) is granted
        for f in frames
    )


def refused(msg_id: str, frames: Frames) -> bool:
    """The message was refused for consent: consent_required, then the typed error."""
    error = {"type": "error", "id": msg_id, "code": "consent_required"}
    return (
        any(f.items() >= error.items() for f in frames)
        and {"type": "consent_required", "purposes": ["ai_processing"]} in frames
        and not any(f["type"] in ("ack", "delta", "done") for f in frames)
    )


async def consenting_visitor(g: Gateway, t: NewTenant) -> tuple[Any, str]:
    """An open socket whose visitor granted ai_processing and chatted once."""
    ws = await g.ws(t.site_key)
    welcome = await hello(ws, consent={"ai_processing": True})
    assert (await chat(ws, "first", "before"))[-1]["type"] == "done"
    return ws, str(welcome["session_token"])


async def test_revocation_over_http_refuses_the_next_message_on_the_open_socket(
    gateway: Gateway, fake: tuple[FakeUpstream, str], app_pool: asyncpg.Pool
) -> None:
    upstream = fake[0]
    t = await tenant_with(app_pool, **REQUIRED)
    ws, token = await consenting_visitor(gateway, t)
    upstream.reset()
    doc = await set_consent(
        gateway.session, gateway.url("/api/privacy/consent"), token, revoke=["ai_processing"]
    )
    assert doc["purposes"]["ai_processing"]["granted"] is False
    # sent at once: nothing the socket was told is awaited first
    await ws.send_json({"type": "message", "id": "after", "text": "after"})
    frames = await frames_until(
        ws, lambda fs: any(f["type"] in ("error", "done") and f.get("id") == "after" for f in fs)
    )
    assert refused("after", frames), frames
    assert upstream.requests == []  # nothing reached the model
    # the widget is told too: a fresh welcome without the purpose, and consent_required
    frames += await frames_until(ws, lambda fs: pushed(False)(frames + fs))
    assert frames.count({"type": "consent_required", "purposes": ["ai_processing"]}) == 2
    await asyncio.sleep(0.2)
    assert upstream.requests == []
    await ws.close()


async def test_granting_again_over_http_lets_messages_through(
    gateway: Gateway, fake: tuple[FakeUpstream, str], app_pool: asyncpg.Pool
) -> None:
    upstream = fake[0]
    t = await tenant_with(app_pool, **REQUIRED)
    ws, token = await consenting_visitor(gateway, t)
    url = gateway.url("/api/privacy/consent")
    await set_consent(gateway.session, url, token, revoke=["ai_processing"])
    assert refused("no", await chat(ws, "no", "refused"))
    upstream.reset()
    doc = await set_consent(gateway.session, url, token, grant=["ai_processing"])
    assert doc["purposes"]["ai_processing"]["granted"] is True
    # sent at once again: the grant is read from the record before this message is checked
    frames = await chat(ws, "yes", "let through")
    assert frames[-1]["type"] == "done", frames
    assert [r["body"]["messages"][-1]["content"] for r in upstream.requests] == ["let through"]
    await ws.close()


async def test_a_revocation_in_one_tab_refuses_the_next_message_in_another(
    gateway: Gateway, fake: tuple[FakeUpstream, str], app_pool: asyncpg.Pool
) -> None:
    """The widget's own consent frame reaches the visitor's other sockets too."""
    upstream = fake[0]
    t = await tenant_with(app_pool, **REQUIRED)
    tab_a, token = await consenting_visitor(gateway, t)
    tab_b = await gateway.ws(t.site_key)
    assert (await hello(tab_b, session_token=token))["resumed"] is True
    await tab_a.send_json({"type": "consent", "revoke": ["ai_processing"]})
    assert pushed(False)(await frames_until(tab_a, pushed(False)))
    upstream.reset()
    await tab_b.send_json({"type": "message", "id": "b1", "text": "from the other tab"})
    frames = await frames_until(
        tab_b, lambda fs: any(f["type"] in ("error", "done") and f.get("id") == "b1" for f in fs)
    )
    assert refused("b1", frames), frames
    assert upstream.requests == []
    # granted again in tab B: tab A chats again
    await tab_b.send_json({"type": "consent", "grant": ["ai_processing"]})
    await frames_until(tab_b, pushed(True))
    frames = await chat(tab_a, "a2", "back in tab A")
    assert frames[-1]["type"] == "done", frames
    assert [r["body"]["messages"][-1]["content"] for r in upstream.requests] == ["back in tab A"]
    for ws in (tab_a, tab_b):
        await ws.close()


@pytest.fixture
async def two_instances(
    settings: Settings, fake: tuple[FakeUpstream, str], redis_url: str
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways (two apps, each its own Redis bus and registry) sharing Redis."""
    s = on_fake(replace(settings, redis_url=redis_url), fake[1])
    async for a in start_gateway(s):
        async for b in start_gateway(s):
            yield a, b


async def test_consent_changed_on_one_instance_reaches_a_socket_on_another(
    two_instances: tuple[Gateway, Gateway],
    fake: tuple[FakeUpstream, str],
    app_pool: asyncpg.Pool,
) -> None:
    a, b = two_instances
    upstream = fake[0]
    t = await tenant_with(app_pool, **REQUIRED)
    ws, token = await consenting_visitor(a, t)  # the socket is held by instance a
    upstream.reset()
    await set_consent(b.session, b.url("/api/privacy/consent"), token, revoke=["ai_processing"])
    # across instances the change travels through Redis: the pushed welcome says it arrived
    await frames_until(ws, pushed(False))
    assert refused("after", await chat(ws, "after", "refused")), "not refused on instance a"
    assert upstream.requests == []
    await set_consent(b.session, b.url("/api/privacy/consent"), token, grant=["ai_processing"])
    await frames_until(ws, pushed(True))
    assert (await chat(ws, "again", "let through"))[-1]["type"] == "done"
    assert len(upstream.requests) == 1
    await ws.close()


@pytest.mark.parametrize("change", ["revoke", "restrict", "erase"])
async def test_with_redis_away_a_change_on_another_instance_holds_on_this_socket(
    settings: Settings,
    fake: tuple[FakeUpstream, str],
    private_redis: PrivateRedis,
    app_pool: asyncpg.Pool,
    change: str,
) -> None:
    # instance a cannot hear instance b's event: the socket on a reads the record before
    # each message while its bus is down, and refuses what the record no longer allows
    upstream = fake[0]
    s = on_fake(replace(settings, redis_url=private_redis.url), fake[1])
    async for a in start_gateway(s):
        async for b in start_gateway(s):
            t = await tenant_with(app_pool, **REQUIRED)
            ws = await a.ws(t.site_key)
            w = await hello(ws, consent={"ai_processing": True, "conversation_storage": False})
            token = w["session_token"]
            assert (await chat(ws, "m1", "before"))[-1]["type"] == "done"
            private_redis.stop()
            for g in (a, b):
                bus_of = g.server.app[SERVICES].bus
                await until(lambda bus_of=bus_of: not bus_of.hears_all(), timeout=5)
            path, body, status = {
                "revoke": ("/api/privacy/consent", {"revoke": ["ai_processing"]}, 200),
                "restrict": ("/api/gdpr/request", {"kind": "restriction"}, 201),
                "erase": ("/api/privacy/delete", None, 200),
            }[change]
            async with b.session.post(b.url(path), json=body, headers=session(token)) as resp:
                assert resp.status == status, await resp.text()
            upstream.reset()
            frames = await chat(ws, "m2", "after the change on b")
            assert upstream.requests == []
            assert frames[-1]["type"] == "error", frames
            expected = "session_invalid" if change == "erase" else "consent_required"
            assert frames[-1]["code"] == expected
            await ws.close()


async def test_a_bus_gap_makes_open_sockets_read_consent_again(
    gateway: Gateway, fake: tuple[FakeUpstream, str], app_pool: asyncpg.Pool
) -> None:
    upstream = fake[0]
    t = await tenant_with(app_pool, **REQUIRED)
    ws, token = await consenting_visitor(gateway, t)
    svc = gateway.server.app[SERVICES]
    [v] = [c.visitor for conns in svc.live.values() for c in conns if c.visitor.token == token]
    # a revocation whose event this process never saw (recorded behind its back)
    async with tenant_tx(app_pool, t.tenant_id) as conn:
        await store.record_consents(
            conn, t.tenant_id, v.subject_id, v.session_id, [("ai_processing", False)], 2, 1, "api"
        )
    upstream.reset()
    # what the Redis bus delivers locally after reconnecting (it may have missed events)
    for kind, payload in bus._invalidate_everything():
        await svc.bus.deliver(kind, payload)
    assert refused("after", await chat(ws, "after", "refused"))
    assert upstream.requests == []
    await ws.close()


async def test_an_objection_over_http_reaches_the_open_socket(
    gateway: Gateway, fake: tuple[FakeUpstream, str], app_pool: asyncpg.Pool
) -> None:
    upstream = fake[0]
    t = await tenant_with(app_pool, required_consents=["ai_processing", "marketing"])
    ws = await gateway.ws(t.site_key)
    w = await hello(ws, consent={"ai_processing": True, "marketing": True})
    async with gateway.session.post(
        gateway.url("/api/gdpr/request"),
        json={"kind": "objection"},
        headers=session(w["session_token"]),
    ) as resp:
        assert resp.status == 201
    upstream.reset()
    # sent at once: the intake published the objection's revocations after its commit
    frames = await chat(ws, "after", "refused")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "consent_required", frames
    assert {"type": "consent_required", "purposes": ["marketing"]} in frames
    assert upstream.requests == []
    await ws.close()


# --- two real worker processes ------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    database: Database, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`omnigate serve --workers 2` on the shared test Redis, offline model."""
    s = start_server(database, redis_url, tmp_path_factory.mktemp("consent-workers"))
    yield s
    stop_server(s)


async def _socket(
    http: aiohttp.ClientSession, server: Server, t: NewTenant, token: str | None
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await http.ws_connect(
        server.url(f"/v1/widget/ws?site={t.site_key}"), headers={"Origin": ORIGIN}
    )
    hello_frame: dict[str, Any] = {"type": "hello", "v": 1, "consent": {"ai_processing": True}}
    if token:
        hello_frame["session_token"] = token
    await ws.send_json(hello_frame)
    while (frame := await ws.receive_json(timeout=10))["type"] != "welcome":
        pass
    return ws, str(frame["session_token"])


async def test_revocation_reaches_the_sessions_sockets_on_both_workers(
    server: Server, app_pool: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> None:
    t = await tenant_with(app_pool, **REQUIRED)
    async with aiohttp.ClientSession() as http:
        first, token = await _socket(http, server, t, None)
        by_worker = {server.worker_of(first): first}
        # one session, a socket on each worker: whichever answers the POST, one is elsewhere
        for _ in range(60):
            if len(by_worker) == 2:
                break
            ws, _ = await _socket(http, server, t, token)
            if server.worker_of(ws) in by_worker:
                await ws.close()
            else:
                by_worker[server.worker_of(ws)] = ws
        assert len(by_worker) == 2
        url = server.url("/api/privacy/consent")
        await set_consent(http, url, token, revoke=["ai_processing"])
        for ws in by_worker.values():
            await frames_until(ws, pushed(False))  # the change arrived
            msg_id = uuid.uuid4().hex
            await ws.send_json({"type": "message", "id": msg_id, "text": "refused"})
            frames = await frames_until(ws, lambda fs, i=msg_id: refused(i, fs), timeout=10)
            assert refused(msg_id, frames), frames
        stored = await owner_pool.fetchval(
            "SELECT count(*) FROM messages WHERE tenant_id = $1", t.tenant_id
        )
        assert stored == 0  # nothing was stored, nothing was forwarded
        await set_consent(http, url, token, grant=["ai_processing"])
        for ws in by_worker.values():
            await frames_until(ws, pushed(True))
            await ws.send_json({"type": "message", "id": uuid.uuid4().hex, "text": "through"})
            frames = await frames_until(
                ws, lambda fs: fs[-1:] != [] and fs[-1]["type"] in ("done", "error")
            )
            assert frames[-1]["type"] == "done", frames
            await ws.close()


@pytest.mark.parametrize(
    ("while_", "stored"),
    [("rate-limit", False), ("write", True)],
    ids=["during-its-rate-limit-call", "during-its-write"],
)
async def test_a_revocation_while_a_message_waits_holds_before_it_is_stored_or_forwarded(
    gateway: Gateway,
    app_pool: asyncpg.Pool,
    owner_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    while_: str,
    stored: bool,
) -> None:
    # the message passed its consent check, then waited; the visitor revoked meanwhile
    # and the API answered 200: during its rate-limit call nothing is stored or
    # forwarded; during its write it is stored (and acknowledged), never forwarded
    t = await tenant_with(app_pool, **REQUIRED)
    svc = gateway.server.app[SERVICES]
    ws, token = await consenting_visitor(gateway, t)
    url = gateway.url("/api/privacy/consent")
    revoked = []

    async def revoking(real: Callable[..., Any], *args: Any) -> Any:
        if not revoked:
            revoked.append(await set_consent(gateway.session, url, token, revoke=["ai_processing"]))
        return await real(*args)

    if while_ == "rate-limit":
        real_hit = svc.limiter.hit
        monkeypatch.setattr(svc.limiter, "hit", lambda *a: revoking(real_hit, *a))
    else:
        real_cipher = svc.vault.cipher_for
        monkeypatch.setattr(svc.vault, "cipher_for", lambda *a: revoking(real_cipher, *a))
    await ws.send_json({"type": "message", "id": "m", "text": "sent as consent was withdrawn"})
    frames = await frames_until(ws, lambda fs: any(f["type"] == "error" for f in fs))
    assert revoked, "the revocation never ran: the test proves nothing"
    assert not any(f["type"] in ("delta", "done") for f in frames), frames
    assert any(f["type"] == "ack" for f in frames) is stored, frames
    assert frames[-1]["code"] == "consent_required" and frames[-1]["id"] == "m"
    rows = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE tenant_id = $1", t.tenant_id
    )
    assert rows == (3 if stored else 2)  # the first exchange, and this message if stored
    await ws.close()


async def test_the_fallback_reads_a_change_announced_while_its_session_loaded(
    gateway: Gateway, app_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = await tenant_with(app_pool, **REQUIRED)
    first = {"id": "a", "text": "hi", "hello": {"consent": {"ai_processing": True}}}
    _, _, body = await post(gateway, t.site_key, first)
    token = parse_sse(body)[0]["session_token"]
    real = connection.open_session

    async def revoked_meanwhile(*args: Any) -> Any:
        v = await real(*args)  # the session's consent is read
        await set_consent(
            gateway.session, gateway.url("/api/privacy/consent"), token, revoke=["ai_processing"]
        )
        return v

    monkeypatch.setattr(connection, "open_session", revoked_meanwhile)
    second = {"id": "b", "text": "after the revocation", "hello": {"session_token": token}}
    _, _, body = await post(gateway, t.site_key, second)
    events = parse_sse(body)
    assert not any(e["type"] in ("ack", "delta", "done") for e in events), events
    assert events[-1]["code"] == "consent_required"


async def test_a_restriction_announced_while_a_session_loads_holds_on_that_socket(
    gateway: Gateway,
    fake: tuple[FakeUpstream, str],
    app_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the restriction's event finds no connection to mark (the hello has not joined the
    # live registry yet): the hello must read restriction again before forwarding
    upstream, _ = fake
    t = await tenant_with(app_pool, **REQUIRED)
    ws = await gateway.ws(t.site_key)
    token = (await hello(ws, consent={"ai_processing": True}))["session_token"]
    await ws.close()
    real = connection.open_session

    async def restricted_meanwhile(*args: Any) -> Any:
        v = await real(*args)  # the session is loaded: not restricted
        async with gateway.session.post(
            gateway.url("/api/gdpr/request"), json={"kind": "restriction"}, headers=session(token)
        ) as resp:
            assert resp.status == 201
        return v

    monkeypatch.setattr(connection, "open_session", restricted_meanwhile)
    ws = await gateway.ws(t.site_key)
    await hello(ws, session_token=token)
    monkeypatch.setattr(connection, "open_session", real)
    upstream.reset()
    frames = await chat(ws, "m", "after the restriction")
    await ws.close()
    assert upstream.requests == []
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "consent_required"


async def test_storage_revoked_during_a_write_keeps_the_reply_out_of_storage(
    gateway: Gateway,
    app_pool: asyncpg.Pool,
    owner_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ai_processing stays granted, so the reply is forwarded; conversation_storage was
    # revoked while the message was written, so the reply is not kept
    t = await tenant_with(app_pool, **REQUIRED)
    svc = gateway.server.app[SERVICES]
    ws, token = await consenting_visitor(gateway, t)
    url = gateway.url("/api/privacy/consent")
    real_cipher, revoked = svc.vault.cipher_for, []

    async def revoking(*args: Any) -> Any:
        if not revoked:
            revoked.append(
                await set_consent(gateway.session, url, token, revoke=["conversation_storage"])
            )
        return await real_cipher(*args)

    monkeypatch.setattr(svc.vault, "cipher_for", revoking)
    await ws.send_json({"type": "message", "id": "m", "text": "written as storage went off"})
    frames = await frames_until(ws, lambda fs: any(f["type"] in ("done", "error") for f in fs))
    assert revoked and frames[-1]["type"] == "done", frames
    assert frames[-1]["seq"] is None  # the reply was not stored
    rows = await owner_pool.fetch(
        "SELECT role FROM messages WHERE tenant_id = $1 ORDER BY seq", t.tenant_id
    )
    assert [r["role"] for r in rows] == ["user", "assistant", "user"]
    await ws.close()
