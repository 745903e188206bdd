"""Several workers as real processes: shared limits, policy events, Redis outages, shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from gateway import store
from gateway.bus import BUS_CHANNEL, POLICY_CHANGED
from gateway.config import Settings
from gateway.db import tenant_tx
from gateway.provision import NewTenant, create_tenant
from policies import parse_policy, policy_to_doc
from tests.conftest import ORIGIN, Database, start_gateway
from tests.test_ratelimit import PrivateRedis, free_port, private_redis  # noqa: F401

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent


# --- which worker holds which socket (from /proc, nothing exposed by the gateway) ------


def _tcp_table() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        rows.append((int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16), f[3], int(f[9])))
    return rows


def _inodes_of(pid: int) -> set[int]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


@dataclass
class Server:
    """`omnigate serve --workers N` running as a subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def workers(self) -> list[int]:
        """Pids of the workers currently listening on the port."""
        listening = {i for lp, _, st, i in _tcp_table() if lp == self.port and st == "0A"}
        return sorted(p for p in _children(self.proc.pid) if _inodes_of(p) & listening)

    def worker_of(self, ws: aiohttp.ClientWebSocketResponse) -> int:
        """The worker holding the server end of a client socket."""
        client_port = ws.get_extra_info("sockname")[1]
        inodes = {i for lp, rp, _, i in _tcp_table() if lp == self.port and rp == client_port and i}
        for pid in _children(self.proc.pid):
            if _inodes_of(pid) & inodes:
                return pid
        raise AssertionError("no worker holds this socket")

    def wait_ready(self, workers: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.workers()) < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)


def start_server(
    database: Database, redis_url: str, tmp: Path, workers: int = 2, **env: str
) -> Server:
    """Start the gateway CLI; the caller must `stop_server`."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OMNIGATE_", "OPENAI_"))}
    full.pop("PROMETHEUS_MULTIPROC_DIR", None)
    full.update(
        PYTHONPATH=str(ROOT),
        OMNIGATE_DATABASE_URL=database.app_url,
        OMNIGATE_MASTER_KEYS="test1:" + base64.b64encode(b"k" * 32).decode(),
        OMNIGATE_REDIS_URL=redis_url,
        OMNIGATE_PORT=str(port),
        OMNIGATE_COOKIE_SECURE="false",
        OMNIGATE_STATE_DIR=str(tmp / "state"),
        OMNIGATE_FIRST_FRAME_TIMEOUT="20",
        **env,
    )
    log = tmp / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--workers", str(workers)],
            cwd=tmp,  # no stray .env
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, port, log)
    try:
        server.wait_ready(workers)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    """SIGTERM, then SIGKILL whatever is left (workers included)."""
    kids = _children(server.proc.pid)
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)
    for pid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(
    database: Database, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Two workers on the shared test Redis, offline model."""
    s = start_server(database, redis_url, tmp_path_factory.mktemp("workers"))
    yield s
    stop_server(s)


# --- widget helpers ------------------------------------------------------------


async def open_ws(
    session: aiohttp.ClientSession, server: Server, tenant: NewTenant
) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(
        server.url(f"/v1/widget/ws?site={tenant.site_key}"), headers={"Origin": ORIGIN}
    )
    await ws.send_json({"type": "hello", "v": 1})
    while (await ws.receive_json(timeout=10))["type"] != "welcome":
        pass
    return ws


async def spread(
    session: aiohttp.ClientSession, server: Server, tenant: NewTenant, per_worker: int
) -> dict[int, list[aiohttp.ClientWebSocketResponse]]:
    """Open sockets until every worker holds `per_worker` of them (SO_REUSEPORT spreads them)."""
    by_worker: dict[int, list[aiohttp.ClientWebSocketResponse]] = {p: [] for p in server.workers()}
    for _ in range(60):
        if all(len(v) >= per_worker for v in by_worker.values()):
            break
        ws = await open_ws(session, server, tenant)
        socks = by_worker.setdefault(server.worker_of(ws), [])
        if len(socks) < per_worker:
            socks.append(ws)
        else:
            await ws.close()
    assert len(by_worker) == 2 and all(len(v) == per_worker for v in by_worker.values())
    return by_worker


async def send(ws: aiohttp.ClientWebSocketResponse, text: str) -> dict[str, Any]:
    """Send a message; return its `done` or `error` frame."""
    await ws.send_json({"type": "message", "id": uuid.uuid4().hex, "text": text})
    while True:
        frame: dict[str, Any] = await ws.receive_json(timeout=10)
        if frame["type"] in ("done", "error"):
            return frame


async def tenant_with(pool: asyncpg.Pool, **policy: Any) -> NewTenant:
    """A fresh tenant whose current policy (version 2) sets `policy`."""
    t = await create_tenant(pool, f"w-{uuid.uuid4().hex[:8]}", [ORIGIN])
    await set_policy(pool, t, 2, **policy)
    return t


async def set_policy(pool: asyncpg.Pool, t: NewTenant, version: int, **policy: Any) -> None:
    doc = policy_to_doc(parse_policy({"allowed_origins": [ORIGIN], **policy}))
    async with tenant_tx(pool, t.tenant_id) as conn:
        await store.insert_policy(conn, t.tenant_id, version, doc, {}, "test")


async def metric(session: aiohttp.ClientSession, server: Server, name: str) -> float:
    async with session.get(server.url("/metrics")) as resp:
        body = await resp.text()
    values = [float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return values[0]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- tests ---------------------------------------------------------------------


async def test_rate_limit_is_shared_by_workers(
    server: Server, app_pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    t = await tenant_with(app_pool, rate_limit={"per_ip_per_minute": 4})
    by_worker = await spread(session, server, t, per_worker=4)
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
    t = await tenant_with(app_pool)
    by_worker = await spread(session, server, t, per_worker=1)
    for socks in by_worker.values():
        assert (await send(socks[0], "still here"))["type"] == "done"


async def test_redis_outage_falls_back_and_recovers(
    database: Database,
    private_redis: PrivateRedis,  # noqa: F811
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


def slow_upstream(port: int, delay_ms: int = 200) -> subprocess.Popen[bytes]:
    """The fake OpenAI server standalone, `delay_ms` between streamed words."""
    args = ["-m", "gateway.fake_upstream", "--port", str(port), "--delay-ms", str(delay_ms)]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("fake upstream did not start")


async def test_sigterm_finishes_the_reply_then_closes_1001(
    database: Database,
    redis_url: str,
    app_pool: asyncpg.Pool,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    up_port = free_port()
    upstream = await asyncio.to_thread(slow_upstream, up_port)
    s: Server | None = None
    try:
        s = await asyncio.to_thread(
            start_server,
            database,
            redis_url,
            tmp_path,
            OPENAI_API_KEY="sk-test",
            OMNIGATE_UPSTREAM_URL=f"http://127.0.0.1:{up_port}/v1",
            OMNIGATE_SHUTDOWN_GRACE="10",
        )
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
    finally:
        if s is not None:
            await asyncio.to_thread(stop_server, s)
        upstream.terminate()
        upstream.wait(10)


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
