"""Message encryption on the hot path: data keys from cache, unwrapped once per subject."""

from __future__ import annotations

from uuid import UUID

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import store
from gateway.crypto import (
    CryptoError,
    DataKeyCache,
    KeyDestroyed,
    KeyRing,
    message_aad,
    open_sealed,
    seal,
)
from gateway.db import Pool, tenant_tx


class Vault:
    """Seals and opens message text under each subject's data key."""

    def __init__(self, keyring: KeyRing, cache: DataKeyCache | None = None) -> None:
        self.keyring = keyring
        self.cache = cache or DataKeyCache()

    async def cipher(self, conn: asyncpg.Connection, tenant_id: UUID, subject_id: UUID) -> AESGCM:
        """The subject's data key; raises CryptoError once the subject is erased."""
        cached = self.cache.get(tenant_id, subject_id)
        if cached is not None:
            return cached
        return self.unwrapped(
            tenant_id, subject_id, await store.wrapped_key(conn, tenant_id, subject_id)
        )

    def unwrapped(
        self, tenant_id: UUID, subject_id: UUID, wrapped: tuple[str, bytes] | None
    ) -> AESGCM:
        """The subject's data key from the cache, else unwrapped from `wrapped` (kek id and
        wrapped key, as the caller's own query read them); CryptoError once erased."""
        cached = self.cache.get(tenant_id, subject_id)
        if cached is not None:
            return cached
        if wrapped is None:
            # erased, perhaps by a process whose event this one missed: remember it, so
            # the subject's connections here end (Connection._answer_in_order)
            self.cache.forget(tenant_id, subject_id)
            raise KeyDestroyed("the subject's data key is destroyed")
        dek = self.keyring.unwrap(tenant_id, subject_id, *wrapped)
        return self.cache.put(tenant_id, subject_id, dek)

    async def cipher_for(self, pool: Pool, tenant_id: UUID, subject_id: UUID) -> AESGCM:
        """The subject's data key from the cache, or unwrapped in a short tenant transaction."""
        cached = self.cache.get(tenant_id, subject_id)
        if cached is not None:
            return cached
        async with tenant_tx(pool, tenant_id) as conn:
            return await self.cipher(conn, tenant_id, subject_id)

    async def destroyed(self, pool: Pool, tenant_id: UUID, subject_id: UUID) -> bool:
        """Whether the subject's key is gone, read past the cache (forgotten here if so):
        an erasure whose event this process missed leaves the key cached."""
        async with tenant_tx(pool, tenant_id) as conn:
            wrapped = await store.wrapped_key(conn, tenant_id, subject_id)
        if wrapped is None:
            self.cache.forget(tenant_id, subject_id)
        return wrapped is None

    def remember(self, tenant_id: UUID, subject_id: UUID, dek: bytes) -> AESGCM:
        """Cache a data key just created, so the first message needs no unwrap."""
        return self.cache.put(tenant_id, subject_id, dek)

    @staticmethod
    def seal_text(
        cipher: AESGCM,
        tenant_id: UUID,
        conversation_id: UUID,
        message_id: UUID,
        role: str,
        text: str,
    ) -> bytes:
        """Encrypt a message body bound to its tenant, conversation, message and role."""
        return seal(
            cipher, text.encode(), message_aad(tenant_id, conversation_id, message_id, role)
        )

    @staticmethod
    def open_text(
        cipher: AESGCM,
        tenant_id: UUID,
        conversation_id: UUID,
        message_id: UUID,
        role: str,
        blob: bytes,
    ) -> str:
        """Decrypt a message body; raises CryptoError when anything does not match."""
        return open_sealed(
            cipher, blob, message_aad(tenant_id, conversation_id, message_id, role)
        ).decode()

    @staticmethod
    def seal_blob(
        cipher: AESGCM, tenant_id: UUID, conversation_id: UUID, purpose: str, data: bytes
    ) -> bytes:
        """Encrypt conversation-level state (the redaction map) under the subject's key."""
        return seal(
            cipher, data, b"conv|" + tenant_id.bytes + conversation_id.bytes + purpose.encode()
        )

    @staticmethod
    def open_blob(
        cipher: AESGCM, tenant_id: UUID, conversation_id: UUID, purpose: str, blob: bytes
    ) -> bytes:
        """Decrypt conversation-level state."""
        return open_sealed(
            cipher, blob, b"conv|" + tenant_id.bytes + conversation_id.bytes + purpose.encode()
        )


__all__ = ["CryptoError", "Vault"]
