"""`/metrics` after real traffic: exact deltas, access control, no visitor data, --workers 2.

Single-process tests scrape a gateway on a real socket (talking to the fake
upstream over HTTP) and compare two parsed scrapes; the counters live in this
pytest process, so every test takes its own "before" snapshot right before its
traffic. The multi-process test starts `omnigate serve --workers 2` and scrapes
whichever worker answers: the multiprocess directory must make that one
scrape account for both.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import store
from gateway.app import metrics_access_allowed
from gateway.config import Settings, parse_networks
from gateway.db import tenant_tx
from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant, create_tenant
from policies import parse_policy, policy_to_doc
from tests.conftest import (
    ORIGIN,
    Database,
    Gateway,
    chat,
    hello,
    on_fake,
    recv_until,
    start_gateway,
)
from tests.support import Server, open_ws, send, spread, start_server, stop_server

pytestmark = pytest.mark.timeout(120)

Key = tuple[str, frozenset[tuple[str, str]]]
Snapshot = dict[Key, float]

CLIENT_IP = "203.0.113.77"
EMAIL = "jane.doe@example.org"
WORDS = ("Marmalade", "Zanzibar", "quixotically")  # unlikely to appear in any metric name


# --- scraping ------------------------------------------------------------------------


def parse(body: str) -> Snapshot:
    """Every sample of a Prometheus text body, keyed by (sample name, labels)."""
    snap: Snapshot = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            snap[(s.name, frozenset(s.labels.items()))] = s.value
    return snap


def value(snap: Snapshot, name: str, **labels: str) -> float:
    """One sample's value; an absent series reads 0 (labelled series appear on first use)."""
    return snap.get((name, frozenset(labels.items())), 0.0)


async def scrape_text(session: aiohttp.ClientSession, url: str, **kw: Any) -> str:
    async with session.get(url, **kw) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
        return await resp.text()


async def scrape(g: Gateway) -> Snapshot:
    return parse(await scrape_text(g.session, g.url("/metrics")))


class Delta:
    """`after - before` for any sample, read as `d("name", label=value)`."""

    def __init__(self, before: Snapshot, after: Snapshot) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
async def gw(settings: Settings, fake: tuple[FakeUpstream, str]) -> AsyncIterator[Gateway]:
    """The gateway on the fake upstream, behind a trusted proxy (loopback), one retry."""
    s = on_fake(settings, fake[1], trusted_proxies=parse_networks("127.0.0.0/8"))
    async for g in start_gateway(s):
        yield g


async def tenant_with(pool: asyncpg.Pool, **policy: Any) -> NewTenant:
    """A fresh tenant whose current policy (version 2) sets `policy`."""
    t = await create_tenant(pool, f"m-{uuid.uuid4().hex[:8]}", [ORIGIN])
    if policy:
        doc = policy_to_doc(parse_policy({"allowed_origins": [ORIGIN], **policy}))
        async with tenant_tx(pool, t.tenant_id) as conn:
            await store.insert_policy(conn, t.tenant_id, 2, doc, {}, "test")
    return t


PROXIED = {"X-Forwarded-For": f"10.9.9.9, {CLIENT_IP}"}


# --- single process: each outcome moves exactly its series ------------------------------


async def test_answered_chat_moves_answered_ttft_and_every_stage(
    gw: Gateway, app_pool: asyncpg.Pool
) -> None:
    t = await tenant_with(app_pool)
    ws = await gw.ws(t.site_key, headers=PROXIED)
    await hello(ws)
    before = await scrape(gw)
    frames = await chat(ws, "m1", "hello there")
    assert frames[-1]["type"] == "done", frames
    await ws.close()
    d = Delta(before, await scrape(gw))

    assert d("omnigate_messages_total", outcome="answered") == 1
    for outcome in ("refused_consent", "rate_limited", "upstream_error", "storage_error"):
        assert d("omnigate_messages_total", outcome=outcome) == 0, outcome
    assert d("omnigate_upstream_ttft_seconds_count") == 1
    assert d("omnigate_upstream_duration_seconds_count") == 1
    assert d("omnigate_upstream_ttft_seconds_sum") > 0
    # once through the checks and the redactor; the visitor's message and the
    # reply are each sealed (crypto) and inserted (database)
    expected = {"policy": 1, "redaction": 1, "crypto": 2, "database": 2}
    for stage, n in expected.items():
        assert d("omnigate_stage_seconds_count", stage=stage) == n, stage
        assert d("omnigate_stage_seconds_sum", stage=stage) > 0, stage
    assert sum(d("omnigate_error_frames_total", code=c) for c in _codes(before)) == 0


def _codes(snap: Snapshot) -> set[str]:
    return {dict(labels)["code"] for name, labels in snap if name == "omnigate_error_frames_total"}


async def test_refused_for_consent(gw: Gateway, app_pool: asyncpg.Pool) -> None:
    t = await tenant_with(app_pool, required_consents=["ai_processing"])
    ws = await gw.ws(t.site_key)
    await hello(ws)
    before = await scrape(gw)
    frames = await chat(ws, "m1", "may I?")
    assert frames[-1]["code"] == "consent_required", frames
    d = Delta(before, await scrape(gw))
    assert d("omnigate_messages_total", outcome="refused_consent") == 1
    assert d("omnigate_messages_total", outcome="answered") == 0
    assert d("omnigate_error_frames_total", code="consent_required") == 1
    assert d("omnigate_stage_seconds_count", stage="policy") == 1
    assert d("omnigate_stage_seconds_count", stage="redaction") == 0  # never reached
    assert d("omnigate_upstream_ttft_seconds_count") == 0

    # granting it: one consent decision, and the next message is answered
    before = await scrape(gw)
    await ws.send_json({"type": "consent", "grant": ["ai_processing"]})
    await recv_until(ws, "welcome")
    frames = await chat(ws, "m2", "now?")
    assert frames[-1]["type"] == "done", frames
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_consent_decisions_total", purpose="ai_processing", decision="granted") == 1
    assert d("omnigate_messages_total", outcome="answered") == 1


async def test_consent_grant_and_revoke_counted_by_purpose(
    gw: Gateway, app_pool: asyncpg.Pool
) -> None:
    t = await tenant_with(app_pool)
    ws = await gw.ws(t.site_key)
    await hello(ws)
    before = await scrape(gw)
    await ws.send_json({"type": "consent", "grant": ["analytics", "marketing"]})
    await recv_until(ws, "welcome")
    await ws.send_json({"type": "consent", "revoke": ["marketing"]})
    await recv_until(ws, "welcome")
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_consent_decisions_total", purpose="analytics", decision="granted") == 1
    assert d("omnigate_consent_decisions_total", purpose="marketing", decision="granted") == 1
    assert d("omnigate_consent_decisions_total", purpose="marketing", decision="revoked") == 1
    assert d("omnigate_consent_decisions_total", purpose="analytics", decision="revoked") == 0


async def test_consent_given_in_hello_is_counted(gw: Gateway, app_pool: asyncpg.Pool) -> None:
    t = await tenant_with(app_pool)
    before = await scrape(gw)
    ws = await gw.ws(t.site_key)
    await hello(ws, consent={"preferences": True})
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_consent_decisions_total", purpose="preferences", decision="granted") == 1


async def test_redaction_counted_by_entity(gw: Gateway, app_pool: asyncpg.Pool) -> None:
    t = await tenant_with(app_pool)
    ws = await gw.ws(t.site_key)
    await hello(ws)
    before = await scrape(gw)
    frames = await chat(ws, "m1", f"mail me at {EMAIL} or {EMAIL}, call +44 20 7946 0958")
    assert frames[-1]["type"] == "done", frames
    await ws.close()
    d = Delta(before, await scrape(gw))
    # the same address twice is one placeholder, replaced twice: occurrences are counted
    assert d("omnigate_redactions_total", entity="email") == 2
    assert d("omnigate_redactions_total", entity="phone") == 1
    assert d("omnigate_redactions_total", entity="credit_card") == 0
    assert d("omnigate_redactions_total", entity="other") == 0
    assert d("omnigate_messages_total", outcome="answered") == 1


async def test_single_email_is_one_redaction(gw: Gateway, app_pool: asyncpg.Pool) -> None:
    t = await tenant_with(app_pool)
    ws = await gw.ws(t.site_key)
    await hello(ws)
    before = await scrape(gw)
    assert (await chat(ws, "m1", f"I am {EMAIL}"))[-1]["type"] == "done"
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_redactions_total", entity="email") == 1


async def test_rate_limited_and_too_large(gw: Gateway, app_pool: asyncpg.Pool) -> None:
    t = await tenant_with(app_pool, rate_limit={"per_session_per_minute": 1})
    ws = await gw.ws(t.site_key)
    await hello(ws)
    before = await scrape(gw)
    assert (await chat(ws, "m1", "first"))[-1]["type"] == "done"
    frames = await chat(ws, "m2", "second")
    assert frames[-1]["code"] == "rate_limited", frames
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_messages_total", outcome="answered") == 1
    assert d("omnigate_messages_total", outcome="rate_limited") == 1
    assert d("omnigate_error_frames_total", code="rate_limited") == 1
    # the policy stage times the consent decision, made before the rate limit (it says
    # whether the message is stored, so whether its rate-limit call takes a reply claim)
    assert d("omnigate_stage_seconds_count", stage="policy") == 2
    assert d("omnigate_stage_seconds_count", stage="redaction") == 1

    t = await tenant_with(app_pool, max_message_chars=10)
    ws = await gw.ws(t.site_key)
    await hello(ws)
    before = await scrape(gw)
    frames = await chat(ws, "m1", "x" * 11)
    assert frames[-1]["code"] == "too_large", frames
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_messages_total", outcome="too_large") == 1
    assert d("omnigate_error_frames_total", code="too_large") == 1


async def test_upstream_error_counted_once_per_message_by_kind(
    gw: Gateway, app_pool: asyncpg.Pool, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    t = await tenant_with(app_pool)
    ws = await gw.ws(t.site_key)
    await hello(ws)
    before = await scrape(gw)
    calls = len(upstream.requests)
    upstream.queue("error", status=500)  # the first attempt
    upstream.queue("error", status=500)  # and the one retry
    frames = await chat(ws, "m1", "are you there?")
    assert frames[-1]["code"] == "upstream_unavailable", frames
    assert len(upstream.requests) - calls == 2  # retried once
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_messages_total", outcome="upstream_error") == 1
    assert d("omnigate_messages_total", outcome="answered") == 0
    assert d("omnigate_error_frames_total", code="upstream_unavailable") == 1
    # one failed message, not one per attempt (the retry is not an extra error)
    assert d("omnigate_upstream_errors_total", kind="status_5xx") == 1
    assert d("omnigate_upstream_ttft_seconds_count") == 0
    assert d("omnigate_upstream_duration_seconds_count") == 0
    # stored before it was forwarded: the visitor's message only
    assert d("omnigate_stage_seconds_count", stage="crypto") == 1
    assert d("omnigate_stage_seconds_count", stage="database") == 1


async def test_dnt_and_gpc_signals_counted(gw: Gateway, app_pool: asyncpg.Pool) -> None:
    t = await tenant_with(app_pool)
    before = await scrape(gw)
    ws = await gw.ws(t.site_key, headers={"DNT": "1", "Sec-GPC": "1"})
    await hello(ws)
    await ws.close()
    ws = await gw.ws(t.site_key, headers={"Sec-GPC": "1"})
    await hello(ws)
    await ws.close()
    ws = await gw.ws(t.site_key)
    await hello(ws, signals={"dnt": True})
    await ws.close()
    ws = await gw.ws(t.site_key)  # no signal at all
    await hello(ws)
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_privacy_signals_total", signal="dnt") == 2
    assert d("omnigate_privacy_signals_total", signal="gpc") == 2

    # a tenant that does not honour DNT: GPC is still always honoured, DNT is not counted
    t = await tenant_with(app_pool, honor_dnt=False)
    before = await scrape(gw)
    ws = await gw.ws(t.site_key, headers={"DNT": "1", "Sec-GPC": "1"})
    await hello(ws)
    await ws.close()
    d = Delta(before, await scrape(gw))
    assert d("omnigate_privacy_signals_total", signal="dnt") == 0
    assert d("omnigate_privacy_signals_total", signal="gpc") == 1


async def _wait_for(g: Gateway, name: str, want: float) -> Snapshot:
    """Scrape until `name` reads `want` (socket closes are noticed asynchronously)."""
    deadline = asyncio.get_running_loop().time() + 5.0
    while True:
        snap = await scrape(g)
        if value(snap, name) == want or asyncio.get_running_loop().time() > deadline:
            return snap
        await asyncio.sleep(0.05)


async def test_connection_and_session_gauges_and_db_pool(
    gw: Gateway, app_pool: asyncpg.Pool
) -> None:
    t = await tenant_with(app_pool)
    base = await scrape(gw)
    conns0 = value(base, "omnigate_ws_connections")
    sessions0 = value(base, "omnigate_sessions_active")
    a = await gw.ws(t.site_key)
    b = await gw.ws(t.site_key)
    await hello(a)  # b has not said hello: connected, no session
    snap = await _wait_for(gw, "omnigate_ws_connections", conns0 + 2)
    assert value(snap, "omnigate_ws_connections") == conns0 + 2
    assert value(snap, "omnigate_sessions_active") == sessions0 + 1
    await a.close()
    await b.close()
    snap = await _wait_for(gw, "omnigate_ws_connections", conns0)
    assert value(snap, "omnigate_ws_connections") == conns0
    assert value(snap, "omnigate_sessions_active") == sessions0
    # the pool gauge is this process's pool as of the scrape: open, and idle <= open
    size = value(snap, "omnigate_db_pool_connections", state="size")
    idle = value(snap, "omnigate_db_pool_connections", state="idle")
    assert size >= 1 and 0 <= idle <= size, (size, idle)


# --- access ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "auth", "token", "allowed"),
    [
        ("127.0.0.1", None, None, True),
        ("127.8.9.10", None, None, True),
        ("::1", None, None, True),
        ("::ffff:127.0.0.1", None, None, True),
        ("10.0.0.5", None, None, False),
        ("203.0.113.7", None, None, False),
        ("2001:db8::1", None, None, False),
        ("::ffff:10.0.0.5", None, None, False),
        (None, None, None, False),
        ("", None, None, False),
        ("/run/omnigate.sock", None, None, False),
        ("not-an-ip", None, None, False),
        # a token makes the peer irrelevant and the header decisive
        ("203.0.113.7", "Bearer s3cret", "s3cret", True),
        ("127.0.0.1", "Bearer s3cret", "s3cret", True),
        ("127.0.0.1", None, "s3cret", False),
        ("127.0.0.1", "", "s3cret", False),
        ("127.0.0.1", "Bearer wrong", "s3cret", False),
        ("127.0.0.1", "bearer s3cret", "s3cret", False),
        ("127.0.0.1", "Bearer s3cret ", "s3cret", False),
        ("127.0.0.1", "s3cret", "s3cret", False),
        ("127.0.0.1", "Basic czNjcmV0", "s3cret", False),
        ("127.0.0.1", "Bearer s3cré", "s3cré", True),
    ],
)
def test_metrics_access_allowed(
    remote: str | None, auth: str | None, token: str | None, allowed: bool
) -> None:
    assert metrics_access_allowed(remote, auth, token) is allowed
    # through a reverse proxy on the same host the peer is loopback whoever asked:
    # only the token lets such a request in
    assert metrics_access_allowed(remote, auth, token, proxied=True) is (allowed and bool(token))


async def test_metrics_through_a_local_proxy_need_the_token(settings: Settings) -> None:
    async for g in start_gateway(settings):
        async with g.session.get(g.url("/metrics")) as resp:
            assert resp.status == 200  # loopback, asked directly
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            async with g.session.get(g.url("/metrics"), headers={header: "203.0.113.9"}) as resp:
                assert resp.status == 403, header
                assert b"omnigate_" not in await resp.read()


async def test_metrics_token_required_when_set(settings: Settings) -> None:
    async for g in start_gateway(replace(settings, metrics_token="s3cret-token")):
        async with g.session.get(g.url("/metrics")) as resp:
            assert resp.status == 401
            assert b"omnigate_" not in await resp.read()
        bad = {"Authorization": "Bearer nope"}
        async with g.session.get(g.url("/metrics"), headers=bad) as resp:
            assert resp.status == 401
        good = {"Authorization": "Bearer s3cret-token"}
        body = await scrape_text(g.session, g.url("/metrics"), headers=good)
        assert "omnigate_messages_total" in body


async def test_metrics_open_to_loopback_without_token(settings: Settings) -> None:
    async for g in start_gateway(settings):
        body = await scrape_text(g.session, g.url("/metrics"))
        snap = parse(body)
        # pre-created series read 0 rather than being absent
        assert ("omnigate_messages_total", frozenset({("outcome", "answered")})) in snap
        assert ("omnigate_error_frames_total", frozenset({("code", "internal")})) in snap


# --- labels never carry visitor data ---------------------------------------------------


async def test_metrics_never_carry_visitor_data(
    gw: Gateway, app_pool: asyncpg.Pool, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    t = await tenant_with(app_pool, rate_limit={"per_session_per_minute": 3})
    ws = await gw.ws(t.site_key, headers={**PROXIED, "DNT": "1", "Sec-GPC": "1"})
    welcome = await hello(ws, consent={"analytics": True}, context={"page": f"/p?e={EMAIL}"})
    token = welcome["session_token"]
    text = f"{WORDS[0]} {WORDS[1]} says {EMAIL} {WORDS[2]}"
    assert (await chat(ws, "m1", text))[-1]["type"] == "done"
    upstream.queue("error", status=500)
    upstream.queue("error", status=500)
    assert (await chat(ws, "m2", f"{WORDS[0]} again"))[-1]["type"] == "error"
    assert (await chat(ws, "m3", "x"))[-1]["type"] == "done"
    frames = await chat(ws, "m4", f"{WORDS[1]} rate limited")
    assert frames[-1]["code"] == "rate_limited", frames
    await ws.send_json({"type": "consent", "grant": ["marketing"]})
    await recv_until(ws, "welcome")
    # a resumed session over HTTP too (the token in a header, never in a URL)
    async with gw.session.get(
        gw.url("/api/privacy/export"), headers={"Authorization": f"Session {token}"}
    ) as resp:
        assert resp.status == 200
    # an unmatched path is a route label "unmatched", never the path itself
    async with gw.session.get(gw.url(f"/{WORDS[2]}/{EMAIL}")) as resp:
        assert resp.status == 404
    await ws.close()

    body = await scrape_text(gw.session, gw.url("/metrics"))
    forbidden = [
        *WORDS,
        EMAIL,
        EMAIL.split("@")[0],
        token,
        token[:16],
        t.site_key,
        t.admin_key,
        str(t.tenant_id),
        welcome["conversation_id"],
        CLIENT_IP,
        "203.0.113.",
        "10.9.9.9",
        "<EMAIL_1>",
    ]
    for needle in forbidden:
        assert needle not in body, needle
    # and every label value is from a closed set: no label value longer than a route template
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            for k, v in s.labels.items():
                if k == "route":
                    assert v.startswith("/") or v == "unmatched", v
                else:
                    assert len(v) <= 40 and " " not in v, (s.name, k, v)


# --- several processes -----------------------------------------------------------------


@pytest.fixture
async def served(database: Database, redis_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    s = await asyncio.to_thread(start_server, database, redis_url, tmp_path)
    try:
        yield s
    finally:
        await asyncio.to_thread(stop_server, s)


async def _scrape_server(session: aiohttp.ClientSession, server: Server) -> Snapshot:
    return parse(await scrape_text(session, server.url("/metrics")))


async def _wait_server(
    session: aiohttp.ClientSession, server: Server, name: str, want: float
) -> Snapshot:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        snap = await _scrape_server(session, server)
        if value(snap, name) == want or asyncio.get_running_loop().time() > deadline:
            return snap
        await asyncio.sleep(0.1)


async def test_two_workers_one_scrape_counts_both(served: Server, app_pool: asyncpg.Pool) -> None:
    t = await tenant_with(app_pool)
    async with aiohttp.ClientSession() as session:
        by_worker = await spread(session, served, t, per_worker=3)
        assert len(by_worker) == 2
        socks = [ws for v in by_worker.values() for ws in v]
        per_socket = 2
        for ws in socks:
            for i in range(per_socket):
                frame = await send(ws, f"message {i}")
                assert frame["type"] == "done", frame
        n = len(socks) * per_socket

        # spread() closed the sockets it did not keep: wait for those closes to land
        snap = await _wait_server(session, served, "omnigate_ws_connections", len(socks))
        assert value(snap, "omnigate_messages_total", outcome="answered") == n
        assert value(snap, "omnigate_ws_connections") == len(socks)
        assert value(snap, "omnigate_sessions_active") == len(socks)
        assert value(snap, "omnigate_upstream_ttft_seconds_count") == n
        assert value(snap, "omnigate_stage_seconds_count", stage="database") == 2 * n
        # several scrapes, whichever worker answers, agree
        for _ in range(6):
            again = await _scrape_server(session, served)
            assert value(again, "omnigate_messages_total", outcome="answered") == n
        assert value(snap, "omnigate_db_pool_connections", state="size") >= 1

        # closing sockets on one worker lowers the shared gauge
        closing = next(iter(by_worker.values()))
        for ws in closing:
            await ws.close()
        left = len(socks) - len(closing)
        snap = await _wait_server(session, served, "omnigate_ws_connections", left)
        assert value(snap, "omnigate_ws_connections") == left
        assert value(snap, "omnigate_sessions_active") == left

        # a new socket after the scrape is counted on the next one
        extra = await open_ws(session, served, t)
        snap = await _wait_server(session, served, "omnigate_ws_connections", left + 1)
        assert value(snap, "omnigate_ws_connections") == left + 1
        for ws in [*socks, extra]:
            await ws.close()
