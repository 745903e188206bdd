"""The run's own database: created on the owner URL, migrated, given a bench tenant, dropped."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg

from gateway.db import create_pool, migrate, tenant_tx
from gateway.embedded import start_embedded, with_user
from gateway.provision import create_tenant
from gateway.store import insert_policy
from policies import ENTITIES, parse_policy, policy_to_doc

ORIGIN = "http://bench.local"
APP_ROLE = "omnigate_bench_app"


def bench_policy_doc(retention_days: int = 90) -> dict[str, object]:
    """Every enforcement on; rate limits raised so the load is measured, not refused."""
    return {
        "allowed_origins": [ORIGIN],
        "ip_mode": "truncate",
        "honor_dnt": True,
        "required_consents": ["ai_processing"],
        "redact": {"entities": list(ENTITIES), "restore_in_reply": True},
        "retention_days": retention_days,
        "rate_limit": {
            "per_session_per_minute": 100_000,
            "per_ip_per_minute": 100_000,
            "per_tenant_per_minute": 10_000_000,
            "new_sessions_per_ip_per_minute": 100_000,  # the idle run opens 10,000 at once
        },
    }


@dataclass(frozen=True)
class Tenant:
    tenant_id: UUID
    site_key: str
    admin_key: str


@dataclass
class BenchDatabase:
    """A throwaway database; `owner_url` and `app_url` point into it."""

    server_url: str
    name: str
    owner_url: str
    app_url: str
    embedded: bool = False

    @classmethod
    async def create(cls, server_url: str) -> BenchDatabase:
        """Create and migrate `omnigate_bench_<rand>`; start the embedded server if unreachable."""
        embedded = False
        try:
            conn = await _connect_admin(server_url)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            server_url = await asyncio.to_thread(_start_embedded)
            embedded = True
            conn = await _connect_admin(server_url)
        name = f"omnigate_bench_{uuid.uuid4().hex[:8]}"
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        user = urlsplit(server_url).username or "postgres"
        owner = with_user(server_url, user, name)
        app = with_user(server_url, APP_ROLE, name)
        await migrate(owner, app)
        return cls(server_url, name, owner, app, embedded)

    async def drop(self) -> None:
        conn = await _connect_admin(self.server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()

    async def tenant(self, name: str, retention_days: int = 90) -> Tenant:
        """A tenant allowing ORIGIN under the all-enforcement bench policy (version 2)."""
        pool = await create_pool(self.app_url, min_size=1, max_size=2)
        try:
            t = await create_tenant(pool, name, [ORIGIN])
            doc = policy_to_doc(parse_policy(bench_policy_doc(retention_days)))
            async with tenant_tx(pool, t.tenant_id) as conn:
                await insert_policy(conn, t.tenant_id, 2, doc, {}, "bench")
        finally:
            await pool.close()
        return Tenant(t.tenant_id, t.site_key, t.admin_key)


def _start_embedded() -> str:
    root = Path(tempfile.mkdtemp(prefix="omnigate-bench-pg-"))
    root.chmod(0o755)  # the embedded server runs as its own system user
    return start_embedded(root / "data")


async def _connect_admin(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=5)
    except asyncpg.InvalidCatalogNameError:
        # the URL names a database that does not exist (e.g. /test): any will do to CREATE
        parts = urlsplit(url)
        return await asyncpg.connect(
            url.replace(parts.path, "/postgres", 1) if parts.path else url + "/postgres",
            timeout=5,
        )
