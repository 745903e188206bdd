"""Envelope encryption: AES-256-GCM data keys per subject, wrapped by master keys.

A message ciphertext is `b"\\x01" + nonce(12) + AESGCM(ct||tag)`, with AAD binding
tenant, conversation, message and role, so a ciphertext moved to another row,
conversation or tenant fails to decrypt. A wrapped data key is
`nonce(12) + AESGCM(dek)` under the master key named by `kek_id`, with AAD
binding tenant and subject.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sys
from collections import OrderedDict
from pathlib import Path
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = b"\x01"
NONCE = 12


class CryptoError(Exception):
    """A ciphertext or wrapped key does not open: wrong key, wrong binding or destroyed key."""


class KeyDestroyed(CryptoError):
    """The subject's data key is gone: the subject was erased."""


def message_aad(tenant_id: UUID, conversation_id: UUID, message_id: UUID, role: str) -> bytes:
    """The associated data binding a message ciphertext to its place."""
    return b"msg|" + tenant_id.bytes + conversation_id.bytes + message_id.bytes + role.encode()


def seal(key: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt with a fresh random nonce."""
    nonce = os.urandom(NONCE)
    return VERSION + nonce + key.encrypt(nonce, plaintext, aad)


def open_sealed(key: AESGCM, blob: bytes, aad: bytes) -> bytes:
    """Decrypt a blob made by `seal`; raises CryptoError when it does not authenticate."""
    if len(blob) < 1 + NONCE + 16 or blob[:1] != VERSION:
        raise CryptoError("malformed ciphertext")
    try:
        return key.decrypt(blob[1 : 1 + NONCE], blob[1 + NONCE :], aad)
    except InvalidTag:
        raise CryptoError("ciphertext does not authenticate") from None


class KeyRing:
    """Master keys (key-encryption keys); the first is primary and wraps new data keys."""

    def __init__(self, keys: tuple[tuple[str, bytes], ...]) -> None:
        if not keys:
            raise ValueError("at least one master key is required")
        self._keys = {kid: AESGCM(k) for kid, k in keys}
        self.primary_id = keys[0][0]
        # derived from the primary, never stored: what a tenant's hash key starts as the
        # first time it is sealed (gateway/hashkeys.py), so hashes made before tenants kept
        # their own stay valid. A hash made with it directly would change with a rotation.
        self.hash_key = hashlib.sha256(b"omnigate-hash|" + keys[0][1]).digest()

    @property
    def ids(self) -> tuple[str, ...]:
        """Every configured key id, primary first."""
        return tuple(self._keys)

    def _aad(self, tenant_id: UUID, subject_id: UUID, kek_id: str) -> bytes:
        return b"dek|" + tenant_id.bytes + subject_id.bytes + kek_id.encode()

    def wrap(self, tenant_id: UUID, subject_id: UUID, dek: bytes) -> tuple[str, bytes]:
        """Wrap a data key under the primary master key."""
        nonce = os.urandom(NONCE)
        aad = self._aad(tenant_id, subject_id, self.primary_id)
        return self.primary_id, nonce + self._keys[self.primary_id].encrypt(nonce, dek, aad)

    def unwrap(self, tenant_id: UUID, subject_id: UUID, kek_id: str, wrapped: bytes) -> bytes:
        """Unwrap a data key; raises CryptoError for an unknown master key or a bad binding."""
        kek = self._keys.get(kek_id)
        if kek is None:
            raise CryptoError(f"master key {kek_id!r} is not configured")
        try:
            return kek.decrypt(
                wrapped[:NONCE], wrapped[NONCE:], self._aad(tenant_id, subject_id, kek_id)
            )
        except InvalidTag:
            raise CryptoError("data key does not unwrap") from None

    def seal_secret(self, tenant_id: UUID, purpose: str, plaintext: bytes) -> bytes:
        """Seal a tenant secret (upstream key, identity secret) under the primary master key."""
        kid = self.primary_id.encode()
        aad = b"secret|" + tenant_id.bytes + purpose.encode()
        return len(kid).to_bytes(1, "big") + kid + seal(self._keys[self.primary_id], plaintext, aad)

    def open_secret(self, tenant_id: UUID, purpose: str, blob: bytes) -> bytes:
        """Open a blob made by `seal_secret`."""
        n = blob[0]
        kid = blob[1 : 1 + n].decode()
        kek = self._keys.get(kid)
        if kek is None:
            raise CryptoError(f"master key {kid!r} is not configured")
        return open_sealed(kek, blob[1 + n :], b"secret|" + tenant_id.bytes + purpose.encode())


def keyed_hash(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 (truncated to 16 bytes) for references that must not be reversible."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        mac.update(len(p).to_bytes(4, "big"))
        mac.update(p)
    return mac.digest()[:16]


class DataKeyCache:
    """Bounded LRU of unwrapped data keys, so the hot path does no unwrap per message."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._items: OrderedDict[tuple[UUID, UUID], AESGCM] = OrderedDict()
        self.capacity = capacity
        # recently erased subjects: a load that read the wrapped key just before the
        # erasure committed must not put the key back into memory after `forget`
        self._erased: OrderedDict[tuple[UUID, UUID], None] = OrderedDict()

    def get(self, tenant_id: UUID, subject_id: UUID) -> AESGCM | None:
        """Return the cached cipher for a subject, refreshing its recency."""
        k = (tenant_id, subject_id)
        item = self._items.get(k)
        if item is not None:
            self._items.move_to_end(k)
        return item

    def put(self, tenant_id: UUID, subject_id: UUID, dek: bytes) -> AESGCM:
        """Cache a data key and return its cipher."""
        cipher = AESGCM(dek)
        if (tenant_id, subject_id) in self._erased:
            return cipher  # usable by the caller already holding it, never cached
        self._items[(tenant_id, subject_id)] = cipher
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return cipher

    def erased(self, tenant_id: UUID, subject_id: UUID) -> bool:
        """Whether this process was told, recently, that the subject was erased."""
        return (tenant_id, subject_id) in self._erased

    def forget(self, tenant_id: UUID, subject_id: UUID) -> None:
        """Drop a subject's key (erasure) so no later read can succeed from memory."""
        self._items.pop((tenant_id, subject_id), None)
        self._erased[(tenant_id, subject_id)] = None
        if len(self._erased) > self.capacity:
            self._erased.popitem(last=False)

    def clear(self) -> None:
        """Drop every cached key (after a master key rotation, for instance)."""
        self._items.clear()


def new_data_key() -> bytes:
    """A fresh random 256-bit data key."""
    return AESGCM.generate_key(bit_length=256)


def token_hash(token: str) -> bytes:
    """SHA-256 of an opaque high-entropy token; a slow hash adds nothing at 256 bits.

    Total over str: a presented credential may hold lone surrogates (aiohttp hands a
    header byte 0xFF over as '\\udcff'); "surrogatepass" encodes them, so such a
    credential hashes to something no issued (ASCII) token does, and is refused like
    any wrong one instead of raising. Every other str hashes as its plain UTF-8 bytes.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_token(prefix: str = "") -> str:
    """An opaque random token of 256 bits, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def dev_master_keys(state_dir: Path) -> tuple[tuple[str, bytes], ...]:
    """Load or create the development master key under state_dir, warning loudly."""
    path = state_dir / "master.key"
    state_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("dev1:" + base64.b64encode(AESGCM.generate_key(bit_length=256)).decode() + "\n")
    line = path.read_text().strip()
    kid, _, enc = line.partition(":")
    sys.stderr.write(
        "WARNING: OMNIGATE_MASTER_KEYS is not set; using the development master key in "
        f"{path}. Anyone with that file can read stored conversations. Set "
        "OMNIGATE_MASTER_KEYS in production.\n"
    )
    return ((kid, base64.b64decode(enc)),)
