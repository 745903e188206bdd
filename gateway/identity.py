"""Identity verification: a site vouches for its own user id with an HMAC the gateway checks.

The site holds a per-tenant secret (rotated through the admin API, stored sealed
under a master key) and puts `user: {id, hash}` in the widget's hello, where
`hash` is hex HMAC-SHA256(secret, id). A verified id links the visitor to one
subject across devices; the id itself is never stored, only a keyed hash of it.
Anything that does not verify is ignored and counted, never trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any
from uuid import UUID

import asyncpg

from gateway import metrics, store
from gateway.crypto import CryptoError, KeyRing, keyed_hash
from gateway.hashkeys import HashKeys

PURPOSE = "identity"
MAX_USER_ID = 256


def user_hash(secret: str, user_id: str) -> str:
    """The hex HMAC-SHA256 a site computes for one of its user ids."""
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def new_secret() -> str:
    """A fresh identity secret (256 random bits), shown to the site owner once."""
    return "is_" + secrets.token_urlsafe(32)


def external_ref(hash_key: bytes, tenant_id: UUID, user_id: str) -> bytes:
    """The stored reference of a verified user id: a keyed hash under the tenant's hash key
    (gateway/hashkeys.py, unchanged by a master-key rotation), bound to the tenant."""
    return keyed_hash(hash_key, tenant_id.bytes, user_id.encode())


def verify(secret: str | None, user: Any) -> str | None:
    """The user id when `user` is `{id, hash}` with a matching HMAC, else None."""
    if secret is None or not isinstance(user, dict):
        return None
    uid, given = user.get("id"), user.get("hash")
    if not isinstance(uid, str) or not isinstance(given, str):
        return None
    if not 0 < len(uid) <= MAX_USER_ID or len(given) > 128:
        return None
    if not hmac.compare_digest(user_hash(secret, uid).encode(), given.lower().encode()):
        return None
    return uid


async def load_secret(conn: asyncpg.Connection, keyring: KeyRing, tenant_id: UUID) -> str | None:
    """The tenant's identity secret (inside its tenant_tx), or None when never set."""
    sealed = await conn.fetchval(
        "SELECT identity_secret_sealed FROM tenants WHERE tenant_id = $1", tenant_id
    )
    if sealed is None:
        return None
    try:
        return keyring.open_secret(tenant_id, PURPOSE, sealed).decode()
    except CryptoError:
        return None


async def store_secret(
    conn: asyncpg.Connection, keyring: KeyRing, tenant_id: UUID, secret: str
) -> None:
    """Replace the tenant's identity secret (sealed; the old one stops verifying at once)."""
    await conn.execute(
        "UPDATE tenants SET identity_secret_sealed = $2 WHERE tenant_id = $1",
        tenant_id,
        keyring.seal_secret(tenant_id, PURPOSE, secret.encode()),
    )


async def verified_ref(
    conn: asyncpg.Connection, keyring: KeyRing, hash_keys: HashKeys, tenant_id: UUID, user: Any
) -> bytes | None:
    """The external_ref of hello's `user` when it verifies (inside the tenant's
    transaction); counts every failure."""
    if user is None:
        return None
    uid = verify(await load_secret(conn, keyring, tenant_id), user)
    if uid is None:
        metrics.IDENTITY_UNVERIFIED.inc()
        return None
    return external_ref(await hash_keys.key(tenant_id, conn), tenant_id, uid)


async def subject_for_ref(
    conn: asyncpg.Connection, keyring: KeyRing, tenant_id: UUID, ref: bytes | None
) -> tuple[UUID, bytes | None]:
    """The subject linked to `ref`, or a new one; returns (subject_id, new data key or None)."""
    if ref is not None:
        found = await store.subject_by_ref(conn, tenant_id, ref)
        if found is not None:
            return found, None
        # a savepoint: two first sockets of one user race on UNIQUE (tenant, external_ref)
        await conn.execute("SAVEPOINT new_subject")
        try:
            return await store.create_subject(conn, keyring, tenant_id, ref)
        except asyncpg.UniqueViolationError:
            await conn.execute("ROLLBACK TO SAVEPOINT new_subject")
            found = await store.subject_by_ref(conn, tenant_id, ref)
            assert found is not None
            return found, None
    return await store.create_subject(conn, keyring, tenant_id)
