"""Tenant provisioning: a tenant with its first site key, admin key and policy."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID, uuid4

from gateway import audit, store
from gateway.crypto import new_token, token_hash
from gateway.db import Pool, lookup_tx, tenant_tx
from policies import Policy, normalize_origin, parse_policy, policy_to_doc


@dataclass(frozen=True)
class NewTenant:
    """Secrets are shown once, here; only their hashes are stored."""

    tenant_id: UUID
    site_key: str
    admin_key: str

    def as_json(self) -> dict[str, str]:
        """The JSON printed by `omnigate tenant create`."""
        return {
            "tenant_id": str(self.tenant_id),
            "site_key": self.site_key,
            "admin_key": self.admin_key,
        }


# the audit actor of what the gateway's operator does from the command line
OPERATOR = "operator"


async def create_tenant(
    pool: Pool, name: str, origins: list[str], site_key: str | None = None
) -> NewTenant:
    """Create a tenant whose widget may be embedded on `origins`."""
    policy = parse_policy({"allowed_origins": origins})
    tenant_id = uuid4()
    site_key = site_key or new_token("pk_")
    admin_key = new_token("ak_")
    site_key_id, admin_key_id = uuid4(), uuid4()
    async with tenant_tx(pool, tenant_id) as conn:
        await conn.execute("INSERT INTO tenants (tenant_id, name) VALUES ($1, $2)", tenant_id, name)
        await conn.execute(
            "INSERT INTO site_keys (tenant_id, site_key_id, key_hash, key_prefix)"
            " VALUES ($1, $2, $3, $4)",
            tenant_id,
            site_key_id,
            token_hash(site_key),
            site_key[:7],
        )
        await conn.execute(
            "INSERT INTO admin_keys (tenant_id, admin_key_id, key_hash, label, last4) "
            "VALUES ($1, $2, $3, 'initial', $4)",
            tenant_id,
            admin_key_id,
            token_hash(admin_key),
            admin_key[-4:],
        )
        await store.insert_policy(conn, tenant_id, 1, policy_to_doc(policy), {}, "cli")
        # the chain's first entry, in the same transaction: what was created and by whom
        # (the operator, from `omnigate tenant create` or `serve --demo`); ids, never keys
        await audit.append(
            conn,
            tenant_id,
            OPERATOR,
            "tenant.create",
            f"tenant:{tenant_id}",
            {
                "name": name,
                "admin_key": f"admin_key:{admin_key_id}",
                "site_key": f"site_key:{site_key_id}",
                "policy": "policy:1",
            },
        )
    return NewTenant(tenant_id, site_key, admin_key)


DEMO_SITE_KEY = "pk_demo"


async def ensure_demo_tenant(pool: Pool, origins: list[str]) -> NewTenant | None:
    """Create the `demo` tenant once; returns it when created (its admin key shown once).

    An existing one is given the origins it lacks (the gateway now listens on another
    port or host), so its demo page is not refused.
    """
    h = token_hash(DEMO_SITE_KEY)
    async with lookup_tx(pool, h) as conn:
        existing = await store.tenant_for_site_key(conn, h)
    if existing is not None:
        await allow_origins(pool, existing, origins)
        return None
    return await create_tenant(pool, "demo", origins, site_key=DEMO_SITE_KEY)


def _normalized(origin: str) -> str:
    # one that cannot be normalized is left as given: parse_policy refuses it by name
    try:
        return normalize_origin(origin)
    except ValueError:
        return origin


async def allow_origins(pool: Pool, tenant_id: UUID, origins: list[str]) -> None:
    """Add the origins a tenant's policy lacks, as a new policy version."""
    async with tenant_tx(pool, tenant_id) as conn:
        row = await store.latest_policy(conn, tenant_id)
        version, current = (row[0], parse_policy(row[1])) if row else (0, Policy())
        # stored origins are normalized (`http://h:80` is kept as `http://h`): compare
        # alike, or every start on such an address would add a policy version
        missing = [
            o for o in dict.fromkeys(map(_normalized, origins)) if o not in current.allowed_origins
        ]
        if missing:
            new = parse_policy(
                {"allowed_origins": [*current.allowed_origins, *missing]}, base=current
            )
            await store.append_policy_version(conn, tenant_id, version, current, new, OPERATOR)
