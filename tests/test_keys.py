"""Master key rotation: re-wrap data keys while a reply streams; reads keep working."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import asyncpg
import orjson
import pytest

from gateway import store
from gateway.cli import main, run
from gateway.config import Settings
from gateway.crypto import KeyRing
from gateway.db import tenant_tx
from gateway.fake_upstream import FakeUpstream
from gateway.keys import RotationError, rotate_keys
from gateway.provision import NewTenant
from gateway.vault import Vault
from tests.conftest import Database, Gateway, hello, recv_until, reply_text, start_gateway

NEW = ("new1", b"n" * 32)
OLD = ("old1", b"o" * 32)


@pytest.fixture
async def rotating_gateway(
    settings: Settings, fake: tuple[FakeUpstream, str]
) -> AsyncIterator[Gateway]:
    """A gateway already configured for the rotation: new primary first, old key after it."""
    _, url = fake
    s = replace(
        settings,
        master_keys=(NEW, OLD),
        openai_api_key="sk-test",
        upstream_url=url,
        first_token_timeout=5.0,
        idle_timeout=5.0,
    )
    async for g in start_gateway(s):
        yield g


async def wrap_under_old(owner_pool: asyncpg.Pool, tenant_id: UUID, subject_id: UUID) -> None:
    """Put a subject's data key back under the old master key, as before the rotation."""
    row = await owner_pool.fetchrow(
        "SELECT kek_id, wrapped_key FROM subject_keys WHERE tenant_id = $1 AND subject_id = $2",
        tenant_id,
        subject_id,
    )
    dek = KeyRing((NEW, OLD)).unwrap(tenant_id, subject_id, row["kek_id"], row["wrapped_key"])
    kek_id, wrapped = KeyRing((OLD,)).wrap(tenant_id, subject_id, dek)
    await owner_pool.execute(
        "UPDATE subject_keys SET kek_id = $3, wrapped_key = $4 WHERE tenant_id = $1"
        " AND subject_id = $2",
        tenant_id,
        subject_id,
        kek_id,
        wrapped,
    )


async def test_rotation_while_a_reply_streams(
    rotating_gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    upstream, _ = fake
    tid = tenant.tenant_id
    ws = await rotating_gateway.ws(tenant.site_key)
    w = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
    cid = UUID(w["conversation_id"])
    sid = await owner_pool.fetchval(
        "SELECT subject_id FROM conversations WHERE conversation_id = $1", cid
    )
    await wrap_under_old(owner_pool, tid, sid)
    upstream.queue("slow", delay_ms=150)
    await ws.send_json({"type": "message", "id": "r1", "text": "rotate during this reply"})
    first = await recv_until(ws, "delta")
    assert first[-1]["type"] == "delta", first

    summary = await rotate_keys(app_pool, KeyRing((NEW, OLD)), batch=1)
    assert summary["rewrapped"] >= 1 and summary["primary"] == "new1"
    assert "old1" not in summary["remaining_by_key"] and "old1" in summary["retirable"]

    rest = await recv_until(ws, "done")
    assert rest[-1]["type"] == "done", rest
    assert reply_text(first + rest) == "rotate during this reply"
    await ws.close()

    kek_ids = {
        r["kek_id"]
        for r in await owner_pool.fetch("SELECT kek_id FROM subject_keys WHERE tenant_id = $1", tid)
    }
    assert kek_ids == {"new1"}
    # the old key is retired: a process holding only the new key reads everything
    vault = Vault(KeyRing((NEW,)))
    async with tenant_tx(app_pool, tid) as conn:
        cipher = await vault.cipher(conn, tid, sid)
        rows = await store.history(conn, tid, cid, None, 50)
    texts = [vault.open_text(cipher, tid, cid, m.message_id, m.role, m.ciphertext) for m in rows]
    assert texts == ["rotate during this reply", "rotate during this reply"]
    action = await owner_pool.fetchval(
        "SELECT action FROM audit_log WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1", tid
    )
    assert action == "keys.rotate"


async def test_rotation_needs_old_and_new_keys(app_pool: asyncpg.Pool) -> None:
    with pytest.raises(RotationError):
        await rotate_keys(app_pool, KeyRing((NEW,)))


def test_cli_keys_rotate_refuses_a_single_key(
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMNIGATE_DATABASE_URL", database.app_url)
    monkeypatch.setenv("OMNIGATE_MASTER_KEYS", "new1:" + base64.b64encode(NEW[1]).decode())
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "rotate"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("omnigate: error:") and err.count("\n") == 1


def test_cli_keys_rotate_with_redis(
    database: Database,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMNIGATE_DATABASE_URL", database.app_url)
    monkeypatch.setenv("OMNIGATE_REDIS_URL", redis_url)
    keys = ",".join(f"{k}:{base64.b64encode(v).decode()}" for k, v in (NEW, OLD))
    monkeypatch.setenv("OMNIGATE_MASTER_KEYS", keys)
    assert run(["keys", "rotate"]) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["primary"] == "new1" and "remaining_by_key" in summary


async def test_rotation_reseals_tenant_secrets(
    tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    """The BYO upstream and the identity secret move to the new key; only then is old1 retired."""
    from gateway import identity

    tid = tenant.tenant_id
    old = KeyRing((OLD,))
    upstream_cfg = orjson.dumps({"api_key": "sk-tenant-xyz1", "base_url": "https://api.example"})
    await owner_pool.execute(
        "UPDATE tenants SET upstream_sealed = $2, identity_secret_sealed = $3 WHERE tenant_id = $1",
        tid,
        old.seal_secret(tid, "upstream", upstream_cfg),
        old.seal_secret(tid, identity.PURPOSE, b"identity-secret-1"),
    )
    # a rotation that cannot open the secrets (wrong old key material) must not retire old1
    wrong_old = ("old1", b"x" * 32)
    summary = await rotate_keys(app_pool, KeyRing((NEW, wrong_old)))
    assert summary["remaining_by_key"].get("old1", 0) >= 2, summary
    assert "old1" not in summary["retirable"] and summary["failed"] >= 2

    summary = await rotate_keys(app_pool, KeyRing((NEW, OLD)))
    assert "old1" not in summary["remaining_by_key"] and "old1" in summary["retirable"], summary

    only_new = KeyRing((NEW,))
    row = await owner_pool.fetchrow("SELECT upstream_sealed FROM tenants WHERE tenant_id = $1", tid)
    assert only_new.open_secret(tid, "upstream", row["upstream_sealed"]) == upstream_cfg
    async with tenant_tx(app_pool, tid) as conn:
        assert await identity.load_secret(conn, only_new, tid) == "identity-secret-1"


async def test_rotation_reseals_whole_addresses_kept_under_ip_mode_full(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    """A sealed address names its master key; the old one is retirable only once none does."""
    from gateway import sealedip

    tid = tenant.tenant_id
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    await ws.close()
    sealed_old = sealedip.seal_ip(KeyRing((OLD,)), tid, "203.0.113.77")
    await owner_pool.execute(
        "UPDATE sessions SET ip_anon = $2 WHERE conversation_id = $1::uuid",
        welcome["conversation_id"],
        sealed_old,
    )
    # another visitor's, under a key this rotation does not know: left, and counted
    ws = await offline_gateway.ws(tenant.site_key)
    other = await hello(ws)
    await ws.close()
    await owner_pool.execute(
        "UPDATE sessions SET ip_anon = $2 WHERE conversation_id = $1::uuid",
        other["conversation_id"],
        sealedip.seal_ip(KeyRing((("gone1", b"g" * 32),)), tid, "198.51.100.1"),
    )
    summary = await rotate_keys(app_pool, KeyRing((NEW, OLD)))
    assert "old1" in summary["retirable"] and "old1" not in summary["remaining_by_key"], summary
    assert summary["remaining_by_key"]["gone1"] == 1 and summary["failed"] >= 1
    stored = await owner_pool.fetchval(
        "SELECT ip_anon FROM sessions WHERE conversation_id = $1::uuid", welcome["conversation_id"]
    )
    assert sealedip.sealed_kek_id(stored) == "new1"
    assert sealedip.open_ip(KeyRing((NEW,)), tid, stored) == "203.0.113.77"
