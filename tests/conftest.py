"""Shared fixtures: a real PostgreSQL database and Redis, the fake upstream, a running gateway.

The database comes from OMNIGATE_TEST_DATABASE_URL (an owner/superuser URL) or an
embedded server; each test session gets a fresh database, migrated, with a
separate app role. Tests isolate themselves by creating their own tenants.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientSession, ClientWebSocketResponse
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Settings
from gateway.db import create_pool, migrate
from gateway.embedded import start_embedded, with_user
from gateway.fake_upstream import FakeUpstream, start_fake_upstream
from gateway.provision import NewTenant, create_tenant
from tests.support import ORIGIN, PrivateRedis, free_port

TEST_APP_ROLE = "omnigate_test_app"
MASTER_KEY = ("test1", base64.b64decode(base64.b64encode(b"k" * 32)))


@dataclass(frozen=True)
class Database:
    """Owner and app URLs of the session's database."""

    owner_url: str
    app_url: str


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """A fresh, migrated database on real PostgreSQL for this test session."""
    base = os.environ.get("OMNIGATE_TEST_DATABASE_URL")
    if not base:
        # not under pytest's 0700 tmp root: the server runs as its own system user
        root = Path(tempfile.mkdtemp(prefix="omnigate-pg-"))
        root.chmod(0o755)
        base = start_embedded(root / "data")
    name = f"omnigate_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def setup() -> Database:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        owner = with_user(base, _user_of(base), name)
        app = with_user(base, TEST_APP_ROLE, name)
        await migrate(owner, app)
        return Database(owner, app)

    db = asyncio.run(setup())
    yield db

    async def teardown() -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(teardown())


def _user_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).username or "postgres"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """Real Redis: OMNIGATE_TEST_REDIS_URL, or a redis-server started for the session."""
    url = os.environ.get("OMNIGATE_TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("no OMNIGATE_TEST_REDIS_URL and no redis-server on PATH to start")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="omnigate-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the redis-server started for the tests did not answer within 10 s")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def settings(database: Database, tmp_path: Path) -> Settings:
    """Gateway settings on the test database, offline model, fixed master key."""
    return Settings(
        database_url=database.app_url,
        master_keys=(MASTER_KEY,),
        state_dir=tmp_path / "state",
        first_frame_timeout=5.0,
    )


@pytest.fixture
async def owner_pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    """A pool as the table owner, for tests that inspect the raw database."""
    pool = await create_pool(database.owner_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
async def app_pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    """A pool as the app role (RLS applies)."""
    pool = await create_pool(database.app_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def tenant(app_pool: asyncpg.Pool) -> NewTenant:
    """A fresh tenant allowing ORIGIN."""
    return await create_tenant(app_pool, f"t-{uuid.uuid4().hex[:8]}", [ORIGIN])


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeUpstream, str]]:
    """The fake OpenAI server on a real socket: (fake, base_url)."""
    fake, url, cleanup = await start_fake_upstream()
    yield fake, url
    await cleanup()


@dataclass
class Gateway:
    """A running gateway and what tests need to talk to it."""

    server: TestServer
    session: ClientSession

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def ws(self, site_key: str, origin: str = ORIGIN, **kw: Any) -> ClientWebSocketResponse:
        headers = {"Origin": origin, **kw.pop("headers", {})}
        return await self.session.ws_connect(
            self.url(f"/v1/widget/ws?site={site_key}"), headers=headers, **kw
        )


async def start_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """Serve create_app(settings) on a real port."""
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    # as `omnigate serve` (web.run_app): a client that goes away does not cancel its
    # handler; aiohttp's test server would, and hide what the gateway does about it
    assert server.runner is not None and server.runner.server is not None
    server.runner.server.handler_cancellation = False
    session = ClientSession()
    try:
        yield Gateway(server, session)
    finally:
        await session.close()
        await server.close()


def on_fake(settings: Settings, url: str, **changes: Any) -> Settings:
    """Settings for a gateway whose model is the fake upstream at `url` (short deadlines)."""
    base: dict[str, Any] = {
        "openai_api_key": "sk-test",
        "upstream_url": url,
        "first_token_timeout": 2.0,
        "idle_timeout": 2.0,
        "upstream_retries": 1,
    }
    return replace(settings, **{**base, **changes})


@pytest.fixture
async def gateway(settings: Settings, fake: tuple[FakeUpstream, str]) -> AsyncIterator[Gateway]:
    """The gateway talking to the fake upstream (a real HTTP model)."""
    async for g in start_gateway(on_fake(settings, fake[1])):
        yield g


@pytest.fixture
async def offline_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The gateway on the built-in offline model."""
    async for g in start_gateway(settings):
        yield g


async def recv_until(
    ws: ClientWebSocketResponse, ftype: str, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Collect frames up to and including the first of type `ftype` (or an error)."""
    frames: list[dict[str, Any]] = []
    while True:
        frame = await ws.receive_json(timeout=timeout)
        frames.append(frame)
        if frame["type"] in (ftype, "error"):
            return frames


async def hello(ws: ClientWebSocketResponse, **fields: Any) -> dict[str, Any]:
    """Send hello and return the welcome."""
    await ws.send_json({"type": "hello", "v": 1, **fields})
    frames = await recv_until(ws, "welcome")
    assert frames[-1]["type"] == "welcome", frames
    return frames[-1]


async def chat(ws: ClientWebSocketResponse, msg_id: str, text: str) -> list[dict[str, Any]]:
    """Send a message and collect frames to its done or error."""
    await ws.send_json({"type": "message", "id": msg_id, "text": text})
    return await recv_until(ws, "done")


def reply_text(frames: list[dict[str, Any]]) -> str:
    """The streamed reply assembled from delta frames."""
    return "".join(f["text"] for f in frames if f["type"] == "delta")


@pytest.fixture
def no_tracebacks() -> Iterator[None]:
    """Fail the test if the gateway logged any traceback (a bug, not a typed refusal)."""
    import io
    import logging

    from gateway.logs import make_handler

    stream = io.StringIO()
    handler = make_handler(stream)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    yield
    root.removeHandler(handler)
    logged = stream.getvalue()
    assert "Traceback" not in logged, logged[-3000:]


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A running private redis-server, stopped at the end."""
    r = PrivateRedis()
    r.start()
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    """A plain HTTP client, for gateways started as processes."""
    async with ClientSession() as s:
        yield s
