"""`/healthz` and `/readyz` over a real socket, and the readiness checks on real databases.

The 503 cases call `gateway.app.readiness` directly with a real pool: on a
fresh database no migration has run (`migrations_pending`), and on a database
dropped under an open pool every reconnect fails (`unreachable`). A gateway
cannot be started against either (it checks its role at start), which is why
readiness is a function of (pool, redis, upstream).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlsplit

import asyncpg
import pytest

from gateway.app import readiness
from gateway.config import Settings
from gateway.db import applied_migrations, create_pool, migrate, migration_files
from gateway.embedded import with_user
from gateway.fake_upstream import FakeUpstream
from gateway.redisconn import connect
from tests.conftest import Database, Gateway, _user_of, start_gateway
from tests.support import free_port

pytestmark = pytest.mark.timeout(60)


async def get_json(g: Gateway, path: str) -> tuple[int, str, dict[str, object]]:
    async with g.session.get(g.url(path)) as resp:
        return resp.status, resp.content_type, await resp.json()


async def test_healthz(offline_gateway: Gateway) -> None:
    status, ctype, body = await get_json(offline_gateway, "/healthz")
    assert (status, ctype, body) == (200, "application/json", {"status": "ok"})


async def test_readyz_offline(offline_gateway: Gateway) -> None:
    status, ctype, body = await get_json(offline_gateway, "/readyz")
    assert status == 200 and ctype == "application/json"
    assert body == {"status": "ok", "checks": {"database": "ok"}, "upstream": "offline"}


async def test_readyz_with_upstream_and_redis(
    settings: Settings, fake: tuple[FakeUpstream, str], redis_url: str
) -> None:
    _, url = fake
    s = replace(settings, openai_api_key="sk-test", upstream_url=url, redis_url=redis_url)
    async for g in start_gateway(s):
        status, _, body = await get_json(g, "/readyz")
        assert status == 200
        assert body == {
            "status": "ok",
            "checks": {"database": "ok", "redis": "ok"},
            "upstream": "configured",
        }


async def test_readyz_does_not_leak_the_api_key(
    settings: Settings, fake: tuple[FakeUpstream, str]
) -> None:
    _, url = fake
    async for g in start_gateway(
        replace(settings, openai_api_key="sk-secret-xyz", upstream_url=url)
    ):
        async with g.session.get(g.url("/readyz")) as resp:
            text = await resp.text()
        assert "sk-secret-xyz" not in text and url not in text


# --- readiness() on real databases in a bad state --------------------------------------


@pytest.fixture
async def empty_database(database: Database) -> AsyncIterator[str]:
    """A fresh database on the same server, never migrated; dropped afterwards."""
    name = f"omnigate_empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database.owner_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_user(database.owner_url, _user_of(database.owner_url), name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_ready_on_the_migrated_database(owner_pool: asyncpg.Pool) -> None:
    code, body = await readiness(owner_pool)
    assert (code, body) == (
        200,
        {"status": "ok", "checks": {"database": "ok"}, "upstream": "offline"},
    )


async def test_ready_when_the_database_is_ahead_of_this_code(empty_database: str) -> None:
    """A rolling deploy: a newer release has migrated; the older instances stay in rotation."""
    await migrate(empty_database, None)
    pool = await create_pool(empty_database, min_size=1, max_size=2)
    try:
        await pool.execute(
            "INSERT INTO omnigate_migrations (name, checksum) VALUES ('9999_future.sql', 'x')"
        )
        code, body = await readiness(pool)
    finally:
        await pool.close()
    assert (code, body["checks"]) == (200, {"database": "ok"})


async def test_unready_when_migrations_are_pending(empty_database: str) -> None:
    pool = await create_pool(empty_database, min_size=1, max_size=2)
    try:
        assert await applied_migrations(pool) == [] and migration_files()
        code, body = await readiness(pool)
    finally:
        await pool.close()
    assert code == 503
    assert body["status"] == "unavailable"
    assert body["checks"] == {"database": "migrations_pending"}


async def test_unready_when_partly_migrated(empty_database: str) -> None:
    """One migration recorded out of several is still pending."""
    pool = await create_pool(empty_database, min_size=1, max_size=2)
    try:
        await pool.execute(
            "CREATE TABLE omnigate_migrations (name text PRIMARY KEY, checksum text NOT NULL)"
        )
        first = migration_files()[0].name
        await pool.execute("INSERT INTO omnigate_migrations VALUES ($1, 'x')", first)
        code, body = await readiness(pool)
    finally:
        await pool.close()
    assert (code, body["checks"]) == (503, {"database": "migrations_pending"})


async def test_unready_when_the_database_is_gone(database: Database, empty_database: str) -> None:
    pool = await create_pool(empty_database, min_size=1, max_size=2)
    try:
        name = urlsplit(empty_database).path.lstrip("/")
        admin = await asyncpg.connect(database.owner_url)
        try:
            # terminates the pool's connections; every reconnect then fails
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        code, body = await readiness(pool)
    finally:
        pool.terminate()
    assert code == 503
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("unreachable ("), body
    assert empty_database not in str(body) and name not in str(body)


async def test_redis_down_degrades_but_stays_ready(owner_pool: asyncpg.Pool) -> None:
    dead = connect(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        code, body = await readiness(owner_pool, dead)
    finally:
        await dead.aclose()
    assert (code, body) == (
        200,
        {
            "status": "degraded",
            "checks": {"database": "ok", "redis": "unreachable"},
            "upstream": "offline",
        },
    )


async def test_database_down_and_redis_down_is_unavailable(
    empty_database: str,
) -> None:
    dead = connect(f"redis://127.0.0.1:{free_port()}/0")
    pool = await create_pool(empty_database, min_size=1, max_size=2)
    try:
        code, body = await readiness(pool, dead)
    finally:
        await pool.close()
        await dead.aclose()
    assert code == 503
    assert body["status"] == "unavailable"  # not "degraded": the database decides
    assert body["checks"] == {"database": "migrations_pending", "redis": "unreachable"}
