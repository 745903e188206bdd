"""The list of tenants for cross-tenant jobs, through the one function that may list them."""

from __future__ import annotations

from uuid import UUID

import asyncpg


async def tenant_ids(pool: asyncpg.Pool | asyncpg.Connection) -> list[UUID]:
    """Every tenant id (migration 0003's SECURITY DEFINER function; works for the app role)."""
    return [r[0] for r in await pool.fetch("SELECT * FROM omnigate_tenant_ids()")]
