"""A whole client address (`ip_mode: full`) as it may be stored: sealed, never in clear.

DESIGN §5 allows no full IP in an unencrypted column. Under `full` the address is
kept, as the tenant chose, sealed with `KeyRing.seal_secret` under the primary master
key: stored as ``s:<kek id>:<base64 blob>``. The key id stands in clear so that `omnigate
keys rotate` finds, in SQL, the addresses still sealed under an old key, re-seals them
and counts them before it calls a key retirable (gateway/keys.py).
"""

from __future__ import annotations

import base64
import binascii
from uuid import UUID

from gateway.crypto import CryptoError, KeyRing

PREFIX = "s:"
PURPOSE = "ip"


def seal_ip(keyring: KeyRing, tenant_id: UUID, address: str) -> str:
    """The stored form of a whole address, sealed under the primary master key."""
    blob = keyring.seal_secret(tenant_id, PURPOSE, address.encode())
    return f"{PREFIX}{keyring.primary_id}:{base64.urlsafe_b64encode(blob).decode()}"


def sealed_kek_id(stored: str) -> str | None:
    """The master key a stored address is sealed under (None: not a sealed one)."""
    if not stored.startswith(PREFIX):
        return None
    return stored[len(PREFIX) :].partition(":")[0]


def open_ip(keyring: KeyRing, tenant_id: UUID, stored: str | None) -> str | None:
    """A stored IP as the visitor's export shows it: a sealed one opened, else as it is.

    Raises CryptoError when it does not open (its master key is not configured).
    """
    if stored is None or not stored.startswith(PREFIX):
        return stored
    try:
        blob = base64.urlsafe_b64decode(stored[len(PREFIX) :].partition(":")[2])
    except (binascii.Error, ValueError):
        raise CryptoError("malformed sealed address") from None
    return keyring.open_secret(tenant_id, PURPOSE, blob).decode()
