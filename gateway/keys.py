"""Master key rotation: re-wrap every data key under the primary, never touching messages.

Procedure: put the new key first in OMNIGATE_MASTER_KEYS and keep the old one
after it, on every process; restart (new subjects are wrapped under the new
key at once, old wrappings still unwrap because each row names its `kek_id`);
run `omnigate keys rotate`. It re-wraps, in short batched transactions per
tenant, every `subject_keys` row whose `kek_id` is not the primary. The data
keys themselves do not change, so message ciphertext is untouched and reads
keep working throughout. When the printed `remaining_by_key` shows no row for
the old key, remove it from OMNIGATE_MASTER_KEYS: it is retired.

The tenant secrets sealed with `KeyRing.seal_secret` (the bring-your-own
upstream, the identity-verification secret and the key of the tenant's keyed
hashes, columns of `tenants`) name their
master key in the blob's prefix; the same pass re-seals them under the primary,
and they count in `remaining_by_key`, so a key is never reported retirable while
a secret still needs it. So do the whole addresses kept under `ip_mode: full`
(`sessions.ip_anon`, gateway/sealedip.py), which name their key in clear.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

import asyncpg

from gateway import audit, bus, sealedip
from gateway.crypto import CryptoError, KeyRing
from gateway.db import Pool, tenant_tx
from gateway.directory import tenant_ids


class RotationError(Exception):
    """The keys are not set up for a rotation; the message is safe to print."""


# tenants column -> the purpose its secret is sealed for (the AAD binds it)
SEALED_SECRETS = {
    "upstream_sealed": "upstream",
    "identity_secret_sealed": "identity",
    "hash_key_sealed": "hash",
}
_SELECT_SECRETS = (
    "SELECT upstream_sealed, identity_secret_sealed, hash_key_sealed FROM tenants"
    " WHERE tenant_id = $1"
)
_UPDATE_SECRET = {
    "upstream_sealed": "UPDATE tenants SET upstream_sealed = $2 WHERE tenant_id = $1",
    "identity_secret_sealed": (
        "UPDATE tenants SET identity_secret_sealed = $2 WHERE tenant_id = $1"
    ),
    "hash_key_sealed": "UPDATE tenants SET hash_key_sealed = $2 WHERE tenant_id = $1",
}


def secret_kek_id(blob: bytes) -> str:
    """The master key id named in a `seal_secret` blob (length byte, id, sealed)."""
    n = blob[0]
    return bytes(blob[1 : 1 + n]).decode()


async def reseal_tenant_secrets(pool: Pool, keyring: KeyRing, tenant_id: UUID) -> tuple[int, int]:
    """Re-seal the tenant's sealed secrets under the primary; (re-sealed, failed to open)."""
    done = failed = 0
    async with tenant_tx(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            _SELECT_SECRETS + " FOR UPDATE",
            tenant_id,
        )
        if row is None:
            return 0, 0
        for column, purpose in SEALED_SECRETS.items():
            blob = row[column]
            if blob is None or secret_kek_id(blob) == keyring.primary_id:
                continue
            try:
                plain = keyring.open_secret(tenant_id, purpose, blob)
            except CryptoError:
                failed += 1  # its master key is not configured: left, reported as remaining
                continue
            await conn.execute(
                _UPDATE_SECRET[column],
                tenant_id,
                keyring.seal_secret(tenant_id, purpose, plain),
            )
            done += 1
    return done, failed


async def _rewrite_in_batches(
    pool: Pool,
    keyring: KeyRing,
    tenant_id: UUID,
    batch: int,
    select: str,
    key: str,
    redo: Callable[[asyncpg.Record], tuple[Any, ...]],
    update: str,
) -> tuple[int, int]:
    """Rewrite under the primary the rows `select` finds under another key, in short
    transactions; (rewritten, failed to open).

    `select` takes (tenant, primary id, ids to skip, batch) and locks its rows (FOR UPDATE
    SKIP LOCKED); `redo` gives a row's `update` arguments, or raises CryptoError when
    its master key is not configured: the row is left, and reported as remaining.
    """
    done = failed = 0
    skip: list[Any] = []
    while True:
        async with tenant_tx(pool, tenant_id) as conn:
            rows = await conn.fetch(select, tenant_id, keyring.primary_id, skip, batch)
            updates = []
            for r in rows:
                try:
                    updates.append(redo(r))
                except CryptoError:
                    skip.append(r[key])
                    failed += 1
            await conn.executemany(update, updates)
            done += len(updates)
        if len(rows) < batch:
            return done, failed


async def rewrap_tenant(
    pool: Pool, keyring: KeyRing, tenant_id: UUID, batch: int = 500
) -> tuple[int, int]:
    """Re-wrap one tenant's data keys and re-seal its secrets and sealed addresses
    (ip_mode full); (re-wrapped, failed to open)."""

    def rewrap(r: asyncpg.Record) -> tuple[Any, ...]:
        dek = keyring.unwrap(tenant_id, r["subject_id"], r["kek_id"], r["wrapped_key"])
        return (tenant_id, r["subject_id"], *keyring.wrap(tenant_id, r["subject_id"], dek))

    def reseal_ip(r: asyncpg.Record) -> tuple[Any, ...]:
        address = sealedip.open_ip(keyring, tenant_id, r["ip_anon"])
        assert address is not None
        return (tenant_id, r["session_id"], sealedip.seal_ip(keyring, tenant_id, address))

    done, failed = await _rewrite_in_batches(
        pool,
        keyring,
        tenant_id,
        batch,
        "SELECT subject_id, kek_id, wrapped_key FROM subject_keys"
        " WHERE tenant_id = $1 AND kek_id <> $2 AND NOT (subject_id = ANY($3::uuid[]))"
        " ORDER BY subject_id LIMIT $4 FOR UPDATE SKIP LOCKED",
        "subject_id",
        rewrap,
        "UPDATE subject_keys SET kek_id = $3, wrapped_key = $4, rewrapped_at = now()"
        " WHERE tenant_id = $1 AND subject_id = $2",
    )
    ips_done, ips_failed = await _rewrite_in_batches(
        pool,
        keyring,
        tenant_id,
        batch,
        "SELECT session_id, ip_anon FROM sessions WHERE tenant_id = $1"
        " AND ip_anon LIKE 's:%' AND split_part(ip_anon, ':', 2) <> $2"
        " AND NOT (session_id = ANY($3::uuid[]))"
        " ORDER BY session_id LIMIT $4 FOR UPDATE SKIP LOCKED",
        "session_id",
        reseal_ip,
        "UPDATE sessions SET ip_anon = $3 WHERE tenant_id = $1 AND session_id = $2",
    )
    done += ips_done
    failed += ips_failed
    resealed, reseal_failed = await reseal_tenant_secrets(pool, keyring, tenant_id)
    done += resealed
    failed += reseal_failed
    if done or failed:
        async with tenant_tx(pool, tenant_id) as conn:
            await audit.append(
                conn,
                tenant_id,
                "operator",
                "keys.rotate",
                f"kek:{keyring.primary_id}",
                {"rewrapped": done, "failed": failed},
            )
    return done, failed


async def remaining_by_key(pool: Pool, tenants: list[UUID]) -> dict[str, int]:
    """How many data keys and tenant secrets each master key still protects, across tenants."""
    counts: dict[str, int] = {}
    for tenant_id in tenants:
        async with tenant_tx(pool, tenant_id) as conn:
            for r in await conn.fetch(
                "SELECT kek_id, count(*) AS n FROM subject_keys WHERE tenant_id = $1"
                " GROUP BY kek_id",
                tenant_id,
            ):
                counts[r["kek_id"]] = counts.get(r["kek_id"], 0) + int(r["n"])
            row = await conn.fetchrow(
                _SELECT_SECRETS,
                tenant_id,
            )
            for column in SEALED_SECRETS:
                if row is not None and row[column] is not None:
                    kid = secret_kek_id(row[column])
                    counts[kid] = counts.get(kid, 0) + 1
            for r in await conn.fetch(
                "SELECT split_part(ip_anon, ':', 2) AS kek_id, count(*) AS n FROM sessions"
                " WHERE tenant_id = $1 AND ip_anon LIKE 's:%' GROUP BY 1",
                tenant_id,
            ):
                counts[r["kek_id"]] = counts.get(r["kek_id"], 0) + int(r["n"])
    return counts


async def rotate_keys(
    pool: Pool, keyring: KeyRing, *, publish: Any = None, batch: int = 500
) -> dict[str, Any]:
    """Re-wrap every data key not under the primary; a JSON summary for the CLI."""
    if len(keyring.ids) < 2:
        raise RotationError(
            "OMNIGATE_MASTER_KEYS must list the new primary key first and the old key(s) after it"
        )
    tenants = await tenant_ids(pool)
    rewrapped = failed = 0
    for tenant_id in tenants:
        d, f = await rewrap_tenant(pool, keyring, tenant_id, batch)
        rewrapped += d
        failed += f
    remaining = await remaining_by_key(pool, tenants)
    if publish is not None:
        await publish(bus.KEYS_ROTATED, {"primary": keyring.primary_id})
    return {
        "primary": keyring.primary_id,
        "rewrapped": rewrapped,
        "failed": failed,
        "remaining_by_key": {k: n for k, n in remaining.items() if k != keyring.primary_id},
        "retirable": [k for k in keyring.ids if k != keyring.primary_id and not remaining.get(k)],
    }
