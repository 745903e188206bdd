"""The demo tenant follows the address the gateway serves it on (`serve --demo`)."""

from __future__ import annotations

import asyncpg

from gateway import store
from gateway.db import tenant_tx
from gateway.provision import DEMO_SITE_KEY, ensure_demo_tenant


async def test_the_demo_tenant_gains_the_origins_of_a_new_port_once(
    app_pool: asyncpg.Pool,
) -> None:
    first = await ensure_demo_tenant(app_pool, ["http://127.0.0.1:8080", "http://localhost:8080"])
    assert first is not None and first.site_key == DEMO_SITE_KEY

    async def policy() -> tuple[int, list[str]]:
        async with tenant_tx(app_pool, first.tenant_id) as conn:
            row = await store.latest_policy(conn, first.tenant_id)
        assert row is not None
        return row[0], list(row[1]["allowed_origins"])  # type: ignore[call-overload]

    assert await policy() == (1, ["http://127.0.0.1:8080", "http://localhost:8080"])
    # started again on another port: the same tenant, its page allowed there too
    again = await ensure_demo_tenant(app_pool, ["http://127.0.0.1:9000", "http://localhost:9000"])
    assert again is None  # not created: no new admin key to show
    version, origins = await policy()
    assert version == 2 and sorted(origins) == [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:9000",
        "http://localhost:8080",
        "http://localhost:9000",
    ]
    # the same port once more changes nothing
    await ensure_demo_tenant(app_pool, ["http://127.0.0.1:9000"])
    assert (await policy())[0] == 2
    async with tenant_tx(app_pool, first.tenant_id) as conn:
        actions = await conn.fetch("SELECT actor, action FROM audit_log ORDER BY seq")
    assert [(r["actor"], r["action"]) for r in actions] == [("operator", "policy.update")]
