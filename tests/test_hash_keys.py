"""A tenant's keyed hashes survive a master-key rotation (gateway/hashkeys.py, migration 0011).

The hashes recognise a verified site user (one subject across devices, erase-by-user)
and a re-sent message (client_ref). They used to be keyed by the primary master key,
so a rotation gave known users new subjects and left erase-by-user unable to find them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from uuid import UUID

import asyncpg

from gateway import identity
from gateway.config import Settings
from gateway.crypto import KeyRing, keyed_hash
from gateway.keys import rotate_keys
from gateway.provision import NewTenant
from tests.conftest import Gateway, chat, hello, recv_until, start_gateway
from tests.support import call

NEW = ("new1", b"n" * 32)
OLD = ("old1", b"o" * 32)
CONSENT = {"conversation_storage": True, "ai_processing": True}


@asynccontextmanager
async def gateway(settings: Settings, *keys: tuple[str, bytes]) -> AsyncIterator[Gateway]:
    async for g in start_gateway(replace(settings, master_keys=keys)):
        yield g


async def subject_of(owner_pool: asyncpg.Pool, conversation_id: str) -> UUID:
    sid: UUID = await owner_pool.fetchval(
        "SELECT subject_id FROM conversations WHERE conversation_id = $1::uuid", conversation_id
    )
    return sid


async def verified_hello(g: Gateway, t: NewTenant, user: dict[str, str]) -> dict[str, Any]:
    ws = await g.ws(t.site_key)
    try:
        return await hello(ws, user=user, consent=CONSENT)
    finally:
        await ws.close()


async def test_a_verified_user_keeps_their_subject_and_messages_their_refs_across_a_rotation(
    settings: Settings, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    tid = tenant.tenant_id
    async with gateway(settings, OLD) as g:
        _, body = await call(g, "POST", "/api/admin/identity-secret", tenant.admin_key)
        user = {
            "id": "customer-9",
            "hash": identity.user_hash(body["identity_secret"], "customer-9"),
        }
        ws = await g.ws(tenant.site_key)
        first = await hello(ws, user=user, consent=CONSENT)
        sent = await chat(ws, "m1", "where is my order?")
        await ws.close()
    subject = await subject_of(owner_pool, first["conversation_id"])
    ack = next(f for f in sent if f["type"] == "ack")
    # the tenant's hash key is the one its hashes were always made with, now sealed
    sealed = await owner_pool.fetchval(
        "SELECT hash_key_sealed FROM tenants WHERE tenant_id = $1", tid
    )
    assert KeyRing((OLD,)).open_secret(tid, "hash", sealed) == KeyRing((OLD,)).hash_key

    # the rotation: restart with the new primary first, re-wrap and re-seal, retire old1
    async with gateway(settings, NEW, OLD) as g:
        assert (
            await subject_of(owner_pool, (await verified_hello(g, tenant, user))["conversation_id"])
        ) == subject
    summary = await rotate_keys(app_pool, KeyRing((NEW, OLD)))
    assert "old1" in summary["retirable"], summary

    async with gateway(settings, NEW) as g:
        # the same user on a new device: the same subject, under the new key only
        again = await verified_hello(g, tenant, user)
        assert again["conversation_id"] != first["conversation_id"]
        assert await subject_of(owner_pool, again["conversation_id"]) == subject
        # a re-send of m1 in its session is recognised: the stored reply, no new row
        ws = await g.ws(tenant.site_key)
        resumed = await hello(ws, session_token=first["session_token"], user=user)
        assert resumed["resumed"] is True
        await ws.send_json({"type": "message", "id": "m1", "text": "where is my order?"})
        frames = await recv_until(ws, "done")
        await ws.close()
        assert frames[0]["type"] == "ack" and frames[0]["seq"] == ack["seq"]
        count = await owner_pool.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1::uuid",
            first["conversation_id"],
        )
        assert count == 2  # m1 and its reply, once
        # the site owner can still erase the user by their id
        status, erased = await call(
            g,
            "POST",
            "/api/admin/subjects/erase-by-user",
            tenant.admin_key,
            json={"user_id": "customer-9"},
        )
        assert status == 200 and erased["subject_id"] == str(subject)
    assert (
        await owner_pool.fetchval("SELECT count(*) FROM subjects WHERE subject_id = $1", subject)
        == 0
    )


async def test_hashes_made_before_tenants_kept_their_key_stay_valid(
    settings: Settings, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    """An upgrade: the tenant has no sealed key yet; its start seals the one its hashes used."""
    tid = tenant.tenant_id
    async with gateway(settings, OLD) as g:
        _, body = await call(g, "POST", "/api/admin/identity-secret", tenant.admin_key)
        user = {"id": "u-1", "hash": identity.user_hash(body["identity_secret"], "u-1")}
        subject = await subject_of(
            owner_pool, (await verified_hello(g, tenant, user))["conversation_id"]
        )
    ref = await owner_pool.fetchval(
        "SELECT external_ref FROM subjects WHERE subject_id = $1", subject
    )
    # what every hash was before migration 0011: keyed by the primary's derived key
    assert ref == keyed_hash(KeyRing((OLD,)).hash_key, tid.bytes, b"u-1")
    await owner_pool.execute("UPDATE tenants SET hash_key_sealed = NULL WHERE tenant_id = $1", tid)

    async with gateway(settings, OLD) as g:
        # sealed at start, before any visitor came
        assert await owner_pool.fetchval(
            "SELECT hash_key_sealed IS NOT NULL FROM tenants WHERE tenant_id = $1", tid
        )
        again = await verified_hello(g, tenant, user)
        assert await subject_of(owner_pool, again["conversation_id"]) == subject


async def test_tenants_get_hash_keys_of_their_own_once(
    settings: Settings, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    """Two processes sealing at once keep one key: the first sealed is the one used."""
    from gateway.hashkeys import HashKeys

    tid = tenant.tenant_id
    await owner_pool.execute("UPDATE tenants SET hash_key_sealed = NULL WHERE tenant_id = $1", tid)
    a, b = HashKeys(app_pool, KeyRing((OLD,))), HashKeys(app_pool, KeyRing((NEW, OLD)))
    key_a = await a.key(tid)
    key_b = await b.key(tid)  # another primary: it reads the sealed key, does not seal its own
    assert key_a == key_b == KeyRing((OLD,)).hash_key
    assert await a.seal_missing() == 0
