"""Ed25519 deletion certificates, signed with a key derived from the master keys.

The signing key is HKDF-SHA256(master key, info="omnigate deletion certificate
ed25519 v1"): every process and instance holding the same OMNIGATE_MASTER_KEYS
derives the same key, nothing new has to be stored or distributed, and the
public key can be published. Certificates are signed with the key derived from
the primary master key; the public keys of every configured master key are
published (by `key_id`, the first 16 hex digits of SHA-256 of the raw public
key), so certificates issued before a rotation still verify while the old
master key is configured. Archive the public key if you need to verify after
retiring a master key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config import Settings
from gateway.crypto import dev_master_keys

ALGORITHM = "Ed25519"
INFO = b"omnigate deletion certificate ed25519 v1"


@dataclass(frozen=True)
class SigningKey:
    """One derived key pair, named by the fingerprint of its public key."""

    key_id: str
    master_key_id: str
    private: Ed25519PrivateKey
    public_raw: bytes

    def public_json(self, primary: bool) -> dict[str, Any]:
        """The public half as published: raw base64 and PEM."""
        pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "public_key": base64.b64encode(self.public_raw).decode(),
            "pem": pem.decode(),
            "primary": primary,
        }


def derive(master_key_id: str, master_key: bytes) -> SigningKey:
    """The Ed25519 key derived from one master key."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(master_key)
    private = Ed25519PrivateKey.from_private_bytes(seed)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return SigningKey(hashlib.sha256(raw).hexdigest()[:16], master_key_id, private, raw)


_cache: dict[tuple[tuple[str, bytes], ...], tuple[SigningKey, ...]] = {}


def signing_keys(settings: Settings) -> tuple[SigningKey, ...]:
    """Derived keys for every configured master key, primary first (cached per process)."""
    masters = settings.master_keys
    if not masters:
        # the development key file; its loud warning was already printed at start
        with contextlib.redirect_stderr(io.StringIO()):
            masters = dev_master_keys(settings.state_dir)
    keys = _cache.get(masters)
    if keys is None:
        keys = tuple(derive(kid, k) for kid, k in masters)
        _cache[masters] = keys
    return keys


def canonical(body: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: compact JSON with sorted keys."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sign(key: SigningKey, body: dict[str, Any]) -> dict[str, Any]:
    """A signed certificate document: the body, the algorithm, the key id and the signature."""
    body = {**body, "key_id": key.key_id}
    signature = key.private.sign(canonical(body))
    return {
        "certificate": body,
        "algorithm": ALGORITHM,
        "key_id": key.key_id,
        "signature": base64.b64encode(signature).decode(),
    }


def verify(document: dict[str, Any], public_key_b64: str) -> bool:
    """True when `document` (as returned by `sign`) verifies under the raw base64 public key."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        public.verify(base64.b64decode(document["signature"]), canonical(document["certificate"]))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False
    return True
