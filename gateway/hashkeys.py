"""Each tenant's key for keyed hashes, sealed in its row so a key rotation keeps every hash.

The gateway stores keyed hashes where it must recognise a value without keeping it:
a verified site user's id (`identity.external_ref`, which links the user's devices to
one subject and lets the site owner erase them by user id) and a message's client id
(`client_ref`, which makes a re-send idempotent). The key of those hashes must outlive
the master key: derived from the primary, it changed with every rotation, and a
verified user then got a new subject that erase-by-user could not reach.

A tenant's hash key is sealed with `KeyRing.seal_secret` in `tenants.hash_key_sealed`
(migrations/0011), re-sealed by `omnigate keys rotate` like the tenant's other secrets.
It starts as `KeyRing.hash_key`, the key every hash was made with before, so nothing
made earlier changes. The gateway seals it for every tenant at start
(`seal_missing`), while the master key those hashes were made with is still the
primary: upgrade, start once, and only then rotate.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from gateway.crypto import CryptoError, KeyRing, keyed_hash
from gateway.db import Pool, tenant_tx

PURPOSE = "hash"
_SELECT = "SELECT hash_key_sealed FROM tenants WHERE tenant_id = $1"
# only where none is sealed yet: two processes sealing at once keep the first one's
_SEAL = "UPDATE tenants SET hash_key_sealed = $2 WHERE tenant_id = $1 AND hash_key_sealed IS NULL"


async def tenant_hash_key(conn: asyncpg.Connection, keyring: KeyRing, tenant_id: UUID) -> bytes:
    """The tenant's hash key, inside its tenant transaction; sealed on first use."""
    sealed = await conn.fetchval(_SELECT, tenant_id)
    if sealed is None:
        first = keyring.seal_secret(tenant_id, PURPOSE, keyring.hash_key)
        await conn.execute(_SEAL, tenant_id, first)
        sealed = await conn.fetchval(_SELECT, tenant_id)
        if sealed is None:
            raise CryptoError("no such tenant")
    return keyring.open_secret(tenant_id, PURPOSE, sealed)


class HashKeys:
    """Every tenant's opened hash key, kept for the process's life (32 bytes each)."""

    def __init__(self, pool: Pool, keyring: KeyRing) -> None:
        self._pool = pool
        self._keyring = keyring
        self._keys: dict[UUID, bytes] = {}

    async def key(self, tenant_id: UUID, conn: asyncpg.Connection | None = None) -> bytes:
        """The tenant's key; `conn`, when given, is a transaction of this tenant to read it in."""
        key = self._keys.get(tenant_id)
        if key is None:
            if conn is not None:
                key = await tenant_hash_key(conn, self._keyring, tenant_id)
            else:
                async with tenant_tx(self._pool, tenant_id) as own:
                    key = await tenant_hash_key(own, self._keyring, tenant_id)
            self._keys[tenant_id] = key
        return key

    async def hash(self, tenant_id: UUID, *parts: bytes) -> bytes:
        """A keyed hash of `parts` under the tenant's key."""
        # every message comes here: the opened key without a coroutine when it is cached
        key = self._keys.get(tenant_id) or await self.key(tenant_id)
        return keyed_hash(key, *parts)

    def forget(self, tenant_id: UUID) -> None:
        """Drop a deleted tenant's key from memory."""
        self._keys.pop(tenant_id, None)

    async def seal_missing(self) -> int:
        """Seal the hash key of every tenant that has none yet; how many were sealed."""
        ids = [r[0] for r in await self._pool.fetch("SELECT omnigate_tenants_without_hash_key()")]
        for tenant_id in ids:
            await self.key(tenant_id)
        return len(ids)
