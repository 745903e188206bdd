"""Several workers as real processes: shared limits, policy events, Redis outages, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from gateway.bus import BUS_CHANNEL, POLICY_CHANGED
from gateway.config import Settings
from gateway.db import tenant_tx
from gateway.provision import NewTenant
from tests.conftest import Database, start_gateway
from tests.support import (
    PrivateRedis,
    Server,
    free_port,
    metric,
    open_ws,
    send,
    serving_slow_upstream,
    set_policy,
    spread,
    start_server,
    stop_server,
    tenant_with,
)

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(
    database: Database, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Two workers on the shared test Redis, offline model."""
    s = start_server(database, redis_url, tmp_path_factory.mktemp("workers"))
    yield s
    stop_server(s)


# --- tests ---------------------------------------------------------------------


async def test_rate_limit_is_shared_by_workers(
    server: Server, app_pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    t = await tenant_with(app_pool, rate_limit={"per_ip_per_minute": 4})
    by_worker = await spread(session, server, t, per_worker=4)
    results = [await send(ws, "hi") for socks in by_worker.values() for ws in socks]
    assert [r["type"] for r in results].count("done") == 4  # not 4 per worker
    assert {r["code"] for r in results if r["type"] == "error"} == {"rate_limited"}


async def _hashed_ips(pool: asyncpg.Pool, t: NewTenant) -> set[str]:
    async with tenant_tx(pool, t.tenant_id) as conn:
        rows = await conn.fetch("SELECT ip_anon FROM sessions WHERE tenant_id = $1", t.tenant_id)
    return {r["ip_anon"] for r in rows}


async def test_hashed_ips_and_their_limit_are_shared_by_workers(
    server: Server, app_pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    # ip_mode hash: every worker derives the same daily salt from the supervisor's chain,
    # so one address is one key everywhere (stored, and counted by the shared limit)
    t = await tenant_with(app_pool, ip_mode="hash", rate_limit={"per_ip_per_minute": 4})
    by_worker = await spread(session, server, t, per_worker=4)
    [hashed] = await _hashed_ips(app_pool, t)
    assert hashed.startswith("h:") and "127.0.0.1" not in hashed
    results = [await send(ws, "hi") for socks in by_worker.values() for ws in socks]
    assert [r["type"] for r in results].count("done") == 4  # not 4 per worker
    assert {r["code"] for r in results if r["type"] == "error"} == {"rate_limited"}


async def test_policy_change_reaches_the_other_worker(
    server: Server, app_pool: asyncpg.Pool, redis_url: str, session: aiohttp.ClientSession
) -> None:
    t = await tenant_with(app_pool, max_message_chars=4000)
    by_worker = await spread(session, server, t, per_worker=1)
    socks = [v[0] for v in by_worker.values()]
    long = "x" * 50
    for ws in socks:
        assert (await send(ws, long))["type"] == "done"  # policy cached in both workers
    await set_policy(app_pool, t, 3, max_message_chars=10)
    assert (await send(socks[0], long))["type"] == "done"  # cached until told
    r = Redis.from_url(redis_url)
    try:
        event = {"kind": POLICY_CHANGED, "payload": {"tenant_id": str(t.tenant_id)}}
        await r.publish(BUS_CHANNEL, orjson.dumps({**event, "origin": "test"}))
    finally:
        await r.aclose()
    # DESIGN: a change reaches every process within a second; poll each socket up to 2 s
    for ws in socks:
        deadline = asyncio.get_running_loop().time() + 2.0
        while True:
            frame = await send(ws, long)
            if frame.get("code") == "too_large" or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert frame["type"] == "error" and frame["code"] == "too_large", frame


async def test_a_killed_worker_is_replaced(
    server: Server, app_pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    before = server.workers()
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (now := server.workers()) == before or len(now) < 2:
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        await asyncio.sleep(0.1)
    assert before[0] not in now and before[1] in now
    t = await tenant_with(app_pool, ip_mode="hash")
    by_worker = await spread(session, server, t, per_worker=1)
    for socks in by_worker.values():
        assert (await send(socks[0], "still here"))["type"] == "done"
    # the replacement was handed the chain as it stands today: same salt as its sibling
    assert len(await _hashed_ips(app_pool, t)) == 1


async def test_redis_outage_falls_back_and_recovers(
    database: Database,
    private_redis: PrivateRedis,
    app_pool: asyncpg.Pool,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    s = await asyncio.to_thread(start_server, database, private_redis.url, tmp_path)
    try:
        async with session.get(s.url("/readyz")) as resp:
            assert (await resp.json())["checks"]["redis"] == "ok"
        private_redis.stop()
        t = await tenant_with(app_pool, rate_limit={"per_ip_per_minute": 3})
        by_worker = await spread(session, s, t, per_worker=4)
        for socks in by_worker.values():
            results = [(await send(ws, "hi"))["type"] for ws in socks]
            assert results.count("done") == 3  # each process still limits, on its own
        async with session.get(s.url("/readyz")) as resp:
            assert resp.status == 200  # degraded, still serving
            body = await resp.json()
            assert body["status"] == "degraded" and body["checks"]["redis"] == "unreachable"
        assert await metric(session, s, "omnigate_ratelimit_fallback_total") >= 8
        assert await metric(session, s, "omnigate_redis_up") == 0

        private_redis.start()
        await asyncio.sleep(1.5)  # the limiter's back-off and the bus's reconnect delay
        t2 = await tenant_with(app_pool, rate_limit={"per_ip_per_minute": 3})
        by_worker = await spread(session, s, t2, per_worker=2)
        results = [(await send(ws, "hi"))["type"] for v in by_worker.values() for ws in v]
        assert results.count("done") == 3  # shared again
        assert await metric(session, s, "omnigate_redis_up") == 1
        async with session.get(s.url("/readyz")) as resp:
            assert (await resp.json())["status"] == "ok"
    finally:
        await asyncio.to_thread(stop_server, s)
    assert b"unavailable" in s.log.read_bytes()  # logged, and without the URL
    assert private_redis.url.encode() not in s.log.read_bytes()


async def test_sigterm_finishes_the_reply_then_closes_1001(
    database: Database,
    redis_url: str,
    app_pool: asyncpg.Pool,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serving_slow_upstream(
        database, redis_url, tmp_path, 200, OMNIGATE_SHUTDOWN_GRACE="10"
    ) as s:
        t = await tenant_with(app_pool)
        ws = await open_ws(session, s, t)
        text = "one two three four five six"
        await ws.send_json({"type": "message", "id": "m1", "text": text})
        frames = [await ws.receive_json(timeout=10)]
        assert frames[0]["type"] == "ack", frames
        s.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
            await open_ws(session, s, t)
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(await ws.receive_json(timeout=10))
        assert frames[-1]["type"] == "done", frames
        assert "".join(f["text"] for f in frames if f["type"] == "delta") == text
        closing = await ws.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
        assert await asyncio.to_thread(s.proc.wait, 30) == 0


async def test_readyz_reports_redis(settings: Settings, redis_url: str) -> None:
    async for g in start_gateway(replace(settings, redis_url=redis_url)):
        async with g.session.get(g.url("/readyz")) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["checks"]["redis"] == "ok", body
    dead = f"redis://:pw@127.0.0.1:{free_port()}/0"
    async for g in start_gateway(replace(settings, redis_url=dead)):
        async with g.session.get(g.url("/readyz")) as resp:
            body = await resp.json()
        assert resp.status == 200 and body == {
            "status": "degraded",
            "checks": {"database": "ok", "redis": "unreachable"},
            "upstream": "offline",
        }


def test_the_supervisor_hands_out_todays_chain_and_forgets_expired_days(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import server
    from policies import SaltChain, day_of

    day = day_of(time.time())
    clock = [day * 86_400 + 3_600.0]
    monkeypatch.setattr(server.time, "time", lambda: clock[0])
    sup = server._Supervisor(settings, 2)
    _, _, state = sup.worker_args()
    first = SaltChain(*state)  # a worker started today
    assert first.day == day - 1  # yesterday's salt is still kept by the rings
    clock[0] += 2 * 86_400  # two days later a worker is replaced
    _, _, state = sup.worker_args()
    later = SaltChain(*state)
    assert later.day == day + 1
    # the replacement hashes as the first worker does today...
    assert later.salt_for(day + 2) == first.salt_for(day + 2)
    # ...and nothing the supervisor holds rebuilds the salt destroyed since
    with pytest.raises(ValueError, match="no longer derivable"):
        later.salt_for(day)
    clock[0] += 86_400  # its loop moves on even when no worker is started
    sup.advance_salts()
    assert sup.salts.day == day + 2
