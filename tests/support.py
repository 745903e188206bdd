"""Helpers shared by several test modules: ports, a private Redis, gateway processes,
the admin API and database dumps. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import orjson

from gateway import store
from gateway.db import tenant_tx
from gateway.provision import NewTenant, create_tenant
from policies import parse_policy, policy_to_doc

if TYPE_CHECKING:
    from tests.conftest import Database, Gateway

ORIGIN = "http://widget.test"
ROOT = Path(__file__).resolve().parent.parent


async def until(cond: Callable[[], object], timeout: float = 2.0) -> None:
    """Wait for `cond()` to be true, polling: for counters that have no event to await."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# --- ports and a private Redis -------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, to stop and restart on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="omnigate-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(
            [binary, *args, "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


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


@contextlib.asynccontextmanager
async def serving_slow_upstream(
    database: Database, redis_url: str, tmp: Path, delay_ms: int, **env: str
) -> AsyncIterator[Server]:
    """Two workers in front of the standalone fake (`delay_ms` per word); both stopped after."""
    up_port = free_port()
    upstream = await asyncio.to_thread(slow_upstream, up_port, delay_ms)
    s: Server | None = None
    try:
        s = await asyncio.to_thread(
            start_server,
            database,
            redis_url,
            tmp,
            OPENAI_API_KEY="sk-test",
            OMNIGATE_UPSTREAM_URL=f"http://127.0.0.1:{up_port}/v1",
            **env,
        )
        yield s
    finally:
        if s is not None:
            await asyncio.to_thread(stop_server, s)
        upstream.terminate()
        try:
            upstream.wait(10)
        except subprocess.TimeoutExpired:
            upstream.kill()
            upstream.wait(5)


# --- the admin API and the database ----------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    gw: Gateway, method: str, path: str, key: str | None, json: Any = None, **kw: Any
) -> tuple[int, Any]:
    headers = {**(bearer(key) if key else {}), **kw.pop("headers", {})}
    async with gw.session.request(method, gw.url(path), json=json, headers=headers, **kw) as r:
        return r.status, await r.json()


async def dump_database(owner_pool: asyncpg.Pool) -> str:
    """Every row of every table as text: what a stolen backup would show."""
    tables = await owner_pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    parts = []
    for t in tables:
        rows = await owner_pool.fetch(f'SELECT t::text AS row FROM "{t["tablename"]}" t')
        parts.extend(r["row"] for r in rows)
    return "\n".join(parts)


CORRUPT_FIRST_MESSAGE = (
    "UPDATE messages SET ciphertext = set_byte(ciphertext, length(ciphertext) - 1,"
    " (get_byte(ciphertext, length(ciphertext) - 1) + 1) % 256)"
    " WHERE conversation_id = $1::uuid AND seq = (SELECT min(seq) FROM messages"
    " WHERE conversation_id = $1::uuid)"
)


# --- the HTTP/SSE fallback -------------------------------------------------------------


def parse_sse(body: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body."""
    events = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                events.append(orjson.loads(line[6:]))
    return events


async def post(
    g: Gateway, site: str, body: Any, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """POST a message to the SSE fallback; status, headers and the raw body."""
    async with g.session.post(
        g.url(f"/v1/widget/chat?site={site}"),
        data=orjson.dumps(body),
        headers={"Origin": ORIGIN, "Content-Type": "application/json", **headers},
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def bench_databases(owner_url: str) -> set[str]:
    """The throwaway databases of bench runs present on the server (each run drops its own)."""
    conn = await asyncpg.connect(owner_url)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'omnigate_bench_%'"
        )
    finally:
        await conn.close()
    return {r["datname"] for r in rows}
