"""The demo tenant follows the address the gateway serves it on (`serve --demo`)."""

from __future__ import annotations

import uuid

import asyncpg
import orjson

from gateway import audit, store
from gateway.db import tenant_tx
from gateway.provision import DEMO_SITE_KEY, create_tenant, ensure_demo_tenant


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
    assert [(r["actor"], r["action"]) for r in actions] == [
        ("operator", "tenant.create"),
        ("operator", "policy.update"),
    ]


async def test_tenant_creation_is_audited_without_secrets(app_pool: asyncpg.Pool) -> None:
    name = f"audited-{uuid.uuid4().hex[:6]}"
    t = await create_tenant(app_pool, name, ["https://shop.example"])
    async with tenant_tx(app_pool, t.tenant_id) as conn:
        rows = await conn.fetch(
            "SELECT seq, actor, action, target, details::text AS details FROM audit_log"
            " WHERE tenant_id = $1 ORDER BY seq",
            t.tenant_id,
        )
        site = await conn.fetchval("SELECT site_key_id FROM site_keys")
        admin = await conn.fetchval("SELECT admin_key_id FROM admin_keys")
        chain = await audit.verify(conn, t.tenant_id)
    (entry,) = rows
    assert (entry["seq"], entry["actor"], entry["action"], entry["target"]) == (
        1,
        "operator",
        "tenant.create",
        f"tenant:{t.tenant_id}",
    )
    assert orjson.loads(entry["details"]) == {
        "name": name,
        "admin_key": f"admin_key:{admin}",
        "site_key": f"site_key:{site}",
        "policy": "policy:1",
    }
    for secret in (t.admin_key, t.site_key, t.admin_key[-4:], t.site_key[3:]):
        assert secret not in entry["details"]
    assert chain == (True, None, 1)
