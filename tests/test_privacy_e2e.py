"""Inline enforcement end to end: what leaves for the model, what is stored, what is logged."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import asyncpg
import pytest

from gateway.config import Settings
from gateway.fake_upstream import FakeUpstream
from gateway.logs import make_handler
from gateway.provision import NewTenant
from tests.conftest import Gateway, chat, hello, on_fake, reply_text, start_gateway
from tests.support import dump_database

CLIENT_IP = "203.0.113.77"
PII = {
    "email": "jane.doe@example.org",
    "phone": "+44 20 7946 0958",
    "card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ip": "198.51.100.23",
    "ssn": "123-45-6789",
    "secret": "sk-proj-abcdefghijklmnopqrstuvwx1234",
}
TEXT = (
    "Hi, I am Jane. Mail {email}, call {phone}, card {card}, IBAN {iban}, "
    "my server {ip}, SSN {ssn}, key {secret}. Thanks!"
).format(**PII)


def ip_bucket_hash(settings: Settings, address: str) -> str:
    """What per-IP limits count an address by under ip_mode hash and full, worked out
    here apart from the gateway: HMAC-SHA256 (first 16 bytes, hex) of the IPv4 address
    or the IPv6 /64, under the hash key derived from the primary master key."""
    import hashlib
    import hmac
    from ipaddress import ip_address, ip_network

    ip = ip_address(address)
    net = ip_network(f"{ip}/{64 if ip.version == 6 else 32}", strict=False)
    key = hashlib.sha256(b"omnigate-hash|" + settings.master_keys[0][1]).digest()
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (b"ip", net.network_address.packed):
        mac.update(len(part).to_bytes(4, "big") + part)
    return mac.digest()[:16].hex()


async def per_ip_buckets(redis_url: str, tenant: NewTenant) -> dict[str, set[str]]:
    """The tenant's per-IP rate-limit keys in Redis: kind (`i` messages, `n` new
    sessions) to what follows it in the key."""
    import redis.asyncio as aioredis

    prefix = f"og:rl:{{{tenant.tenant_id}}}:"
    found: dict[str, set[str]] = {}
    client = aioredis.from_url(redis_url)
    try:
        async for k in client.scan_iter(match=f"{prefix}*", count=1000):
            kind, _, rest = k.decode()[len(prefix) :].partition(":")
            if kind in ("i", "n"):
                found.setdefault(kind, set()).add(rest)
    finally:
        await client.aclose()
    return found


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line the gateway writes during the test, through the production handler."""
    stream = io.StringIO()
    handler = make_handler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.fixture
async def proxied_gateway(
    settings: Settings, fake: tuple[FakeUpstream, str]
) -> AsyncIterator[Gateway]:
    """The gateway behind a trusted proxy (loopback), talking to the fake upstream."""
    from gateway.config import parse_networks

    s = on_fake(
        settings, fake[1], upstream_retries=0, trusted_proxies=parse_networks("127.0.0.0/8")
    )
    async for g in start_gateway(s):
        yield g


async def test_pii_never_leaves_and_reply_is_restored(
    proxied_gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
    captured_logs: io.StringIO,
) -> None:
    upstream, _ = fake
    headers = {"X-Forwarded-For": f"10.9.9.9, {CLIENT_IP}", "DNT": "1", "Sec-GPC": "1"}
    ws = await proxied_gateway.ws(tenant.site_key, headers=headers)
    welcome = await hello(
        ws,
        consent={"analytics": True, "marketing": True},
        context={"page": "/pricing?email=jane.doe@example.org"},
    )
    assert welcome["policy"]["tracking"] == "off"  # DNT/GPC win over the grant
    frames = await chat(ws, "m1", TEXT)
    assert frames[-1]["type"] == "done", frames
    assert reply_text(frames) == TEXT  # the echo comes back with placeholders restored

    forwarded = upstream.requests[-1]["body"]["messages"][-1]["content"]
    for value in PII.values():
        assert value not in forwarded
    for placeholder in (
        "<EMAIL_1>",
        "<PHONE_1>",
        "<CREDIT_CARD_1>",
        "<IBAN_1>",
        "<IP_1>",
        "<US_SSN_1>",
        "<SECRET_1>",
    ):
        assert placeholder in forwarded

    # the same value keeps its placeholder across messages
    frames = await chat(ws, "m2", f"again: {PII['email']}")
    assert upstream.requests[-1]["body"]["messages"][-1]["content"] == "again: <EMAIL_1>"
    assert reply_text(frames) == f"again: {PII['email']}"

    # an upstream failure that logs a traceback
    upstream.queue("error", status=500)
    frames = await chat(ws, "m3", f"{PII['email']} once more")
    assert frames[-1]["code"] == "upstream_unavailable"
    await ws.close()

    # the whole of every request the model got, not only its last message: the context
    # replayed on the second and third turns (the earlier replies included) holds
    # placeholders, never a value restored for the visitor
    assert len(upstream.requests) == 3, upstream.requests
    assert all(len(r["body"]["messages"]) > 2 for r in upstream.requests[1:])
    sent = repr(upstream.requests)
    for value in PII.values():
        assert value not in sent, value

    row = await owner_pool.fetchrow(
        "SELECT ip_anon, dnt, gpc FROM sessions WHERE conversation_id = $1::uuid",
        welcome["conversation_id"],
    )
    assert dict(row) == {"ip_anon": "203.0.113.0", "dnt": True, "gpc": True}
    events = await owner_pool.fetchval(
        "SELECT count(*) FROM analytics_events WHERE tenant_id = $1", tenant.tenant_id
    )
    assert events == 0  # analytics consent granted, but DNT/GPC switch it off

    dump = await dump_database(owner_pool)
    logs = captured_logs.getvalue()
    assert "upstream failed" in logs and "Traceback" in logs  # the failure was logged
    for where, text in (("database", dump), ("logs", logs)):
        assert CLIENT_IP not in text, where
        assert welcome["session_token"] not in text, where
        for value in PII.values():
            assert value not in text, (where, value)
        for word in ("Jane", "Thanks", "once more"):
            assert word not in text, (where, word)


async def test_analytics_event_kept_only_with_consent(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
) -> None:
    ua = (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36"
    )
    ctx = {"page": "/pricing?email=a@b.c#x", "referrer": "https://search.example/q?x=jane"}
    ws = await offline_gateway.ws(tenant.site_key, headers={"User-Agent": ua})
    await hello(ws, context=ctx)  # no analytics consent
    await ws.close()
    ws = await offline_gateway.ws(tenant.site_key, headers={"User-Agent": ua})
    await hello(ws, consent={"analytics": True}, context=ctx)
    await ws.close()
    rows = await owner_pool.fetch(
        "SELECT page_path, referrer_origin, browser_family, browser_major, device_class"
        " FROM analytics_events WHERE tenant_id = $1",
        tenant.tenant_id,
    )
    assert [dict(r) for r in rows] == [
        {
            "page_path": "/pricing",
            "referrer_origin": "https://search.example",
            "browser_family": "chrome",
            "browser_major": 124,
            "device_class": "desktop",
        }
    ]


async def test_redaction_failure_fails_closed(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from policies import Redactor

    def broken(self: Redactor, text: str) -> None:
        raise RuntimeError("detector crashed")

    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    monkeypatch.setattr(Redactor, "find", broken)
    # searched inline (a card's digit groups would go to the redaction helper, another
    # process; tests/test_redaction_helper.py breaks that path)
    frames = await chat(ws, "m", f"my email is {PII['email']}")
    assert frames == [
        {"type": "error", "id": "m", "code": "internal", "message": frames[-1]["message"]}
    ]
    assert upstream.requests == []  # nothing left for the model
    stored = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1::uuid", welcome["conversation_id"]
    )
    assert stored == 0
    monkeypatch.undo()
    assert (await chat(ws, "n", "fine again"))[-1]["type"] == "done"
    await ws.close()


async def test_rate_limit_keys_in_redis_hold_no_raw_ip(
    settings: Settings, tenant: NewTenant, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    from gateway.config import parse_networks

    s = replace(settings, redis_url=redis_url, trusted_proxies=parse_networks("127.0.0.0/8"))
    async for g in start_gateway(s):
        ws = await g.ws(tenant.site_key, headers={"X-Forwarded-For": CLIENT_IP})
        await hello(ws)
        assert (await chat(ws, "m", "hello"))[-1]["type"] == "done"
        await ws.close()
    r = aioredis.from_url(redis_url)
    try:
        keys = [k.decode() async for k in r.scan_iter(match="og:rl:*")]
    finally:
        await r.aclose()
    mine = [k for k in keys if str(tenant.tenant_id) in k]
    assert any(":i:" in k and "203.0.113.0" in k for k in mine), mine  # the /24, not the IP
    assert not any(CLIENT_IP in k for k in keys)


async def test_a_whole_ip_is_stored_sealed_and_counted_by_a_keyed_hash(
    settings: Settings,
    fake: tuple[FakeUpstream, str],
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    redis_url: str,
    captured_logs: io.StringIO,
) -> None:
    """ip_mode full keeps the address, as the tenant chose, but never in clear at rest:
    sealed in its column, a keyed hash in Redis's rate-limit keys, opened for the export."""
    import redis.asyncio as aioredis

    from gateway.config import parse_networks
    from tests.support import call

    s = on_fake(
        settings,
        fake[1],
        upstream_retries=0,
        trusted_proxies=parse_networks("127.0.0.0/8"),
        redis_url=redis_url,
    )
    async for g in start_gateway(s):
        status, _ = await call(
            g,
            "PUT",
            "/api/admin/policy",
            tenant.admin_key,
            json={"ip_mode": "full", "rate_limit": {"per_ip_per_minute": 2}},
        )
        assert status == 200
        ws = await g.ws(tenant.site_key, headers={"X-Forwarded-For": CLIENT_IP})
        welcome = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
        assert (await chat(ws, "m1", "one"))[-1]["type"] == "done"
        assert (await chat(ws, "m2", "two"))[-1]["type"] == "done"
        # the third in the minute: the address is counted, under a key that is not it
        assert (await chat(ws, "m3", "three"))[-1]["code"] == "rate_limited"
        await ws.close()

        stored = await owner_pool.fetchval(
            "SELECT ip_anon FROM sessions WHERE conversation_id = $1::uuid",
            welcome["conversation_id"],
        )
        assert stored.startswith("s:") and CLIENT_IP not in stored
        client = aioredis.from_url(redis_url)
        try:
            keys = [k async for k in client.scan_iter(match="*", count=1000)]
        finally:
            await client.aclose()
        assert keys and not [k for k in keys if CLIENT_IP.encode() in k]
        # counted by exactly the keyed hash of the whole address (not of its /24, nor a
        # plain digest): the one key each limit used
        expected = "k:" + ip_bucket_hash(s, CLIENT_IP)
        assert await per_ip_buckets(redis_url, tenant) == {"i": {expected}, "n": {expected}}
        headers = {"Authorization": f"Session {welcome['session_token']}"}
        async with g.session.get(g.url("/api/privacy/export"), headers=headers) as r:
            assert r.status == 200
            doc = await r.json(content_type=None)
        assert [x["ip_anon"] for x in doc["sessions"]] == [CLIENT_IP]  # theirs, opened

    dump = await dump_database(owner_pool)
    assert CLIENT_IP not in dump
    assert CLIENT_IP not in captured_logs.getvalue()


@pytest.mark.parametrize("ip_mode", ["hash", "full"])
async def test_per_ip_limits_count_an_ipv6_clients_whole_64(
    settings: Settings, tenant: NewTenant, redis_url: str, ip_mode: str
) -> None:
    """An IPv6 client may use any address of its /64: under hash and full, which name one
    address, a new address must not be a new allowance."""
    from gateway.config import parse_networks
    from tests.support import call

    s = replace(settings, redis_url=redis_url, trusted_proxies=parse_networks("127.0.0.0/8"))
    async for g in start_gateway(s):
        status, _ = await call(
            g,
            "PUT",
            "/api/admin/policy",
            tenant.admin_key,
            json={"ip_mode": ip_mode, "rate_limit": {"per_ip_per_minute": 2}},
        )
        assert status == 200
        outcomes = []
        for n in (1, 2, 3):  # a new socket and session each time: only the IP is shared
            ws = await g.ws(tenant.site_key, headers={"X-Forwarded-For": f"2001:db8:7:9::{n}"})
            await ws.send_json({"type": "hello", "v": 1})
            first = await ws.receive_json(timeout=3)  # new sessions count per IP too
            if first["type"] == "welcome":
                first = (await chat(ws, f"m{n}", "hi"))[-1]
            outcomes.append(first.get("code", first["type"]))
            await ws.close()
        assert outcomes == ["done", "done", "rate_limited"]
        # another /64 is another client
        ws = await g.ws(tenant.site_key, headers={"X-Forwarded-For": "2001:db8:7:a::1"})
        await hello(ws)
        assert (await chat(ws, "m4", "hi"))[-1]["type"] == "done"
        await ws.close()
    # each /64 counted by exactly its keyed hash (no daily salt: it lasts the minute)
    expected = {"k:" + ip_bucket_hash(s, a) for a in ("2001:db8:7:9::1", "2001:db8:7:a::1")}
    assert await per_ip_buckets(redis_url, tenant) == {"i": expected, "n": expected}
