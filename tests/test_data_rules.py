"""Data rules of DESIGN §5: no plaintext at rest, tenants isolated by RLS, role checks."""

from __future__ import annotations

import asyncpg
import pytest

from gateway.db import DatabaseError, check_app_role, create_pool, tenant_tx
from gateway.provision import NewTenant, create_tenant
from tests.conftest import Database, Gateway, chat, hello
from tests.support import dump_database

TENANT_TABLES = [
    "tenants",
    "site_keys",
    "admin_keys",
    "policies",
    "subjects",
    "subject_keys",
    "conversations",
    "sessions",
    "messages",
    "consents",
    "privacy_requests",
    "analytics_events",
    "analytics_daily",
    "audit_log",
    "signal_records",
]


async def test_no_plaintext_message_at_rest(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    secret_words = "Flamingo pineapple zeppelin quartz"
    frames = await chat(ws, "m1", secret_words)
    assert frames[-1]["type"] == "done"
    await ws.close()
    dump = await dump_database(owner_pool)
    assert welcome["conversation_id"] in dump  # the dump did see this tenant's rows
    for word in secret_words.split():
        assert word not in dump and word.lower() not in dump
    assert welcome["session_token"] not in dump
    hex_text = secret_words.encode().hex()
    assert hex_text not in dump


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_every_tenant_table_forces_rls(owner_pool: asyncpg.Pool, table: str) -> None:
    row = await owner_pool.fetchrow(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = $1", table
    )
    assert row is not None and row["relrowsecurity"] and row["relforcerowsecurity"]
    pk = await owner_pool.fetchval(
        """SELECT a.attname FROM pg_index i JOIN pg_attribute a
           ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
           WHERE i.indrelid = $1::regclass AND i.indisprimary""",
        table,
    )
    assert pk == "tenant_id"


async def test_every_table_with_a_tenant_is_listed(owner_pool: asyncpg.Pool) -> None:
    # a table added later is checked above only if it is in the list
    tables = await owner_pool.fetch(
        "SELECT table_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name = 'tenant_id'"
    )
    assert {r["table_name"] for r in tables} == set(TENANT_TABLES)


async def test_app_role_sees_only_its_tenant(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    other = await create_tenant(app_pool, "other", ["http://other.test"])
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await chat(ws, "m", "tenant one talking")
    await ws.close()
    async with tenant_tx(app_pool, other.tenant_id) as conn:
        for table in ("messages", "sessions", "conversations", "subjects", "subject_keys"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await conn.fetchval("SELECT count(*) FROM tenants") == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO subjects (tenant_id, subject_id) VALUES ($1, gen_random_uuid())",
                tenant.tenant_id,
            )
    async with tenant_tx(app_pool, tenant.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 2


async def test_app_role_sees_nothing_without_tenant(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await chat(ws, "m", "invisible without tenant")
    await ws.close()
    for table in TENANT_TABLES:
        assert await app_pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_audit_log_is_append_only_for_app_role(
    tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    from gateway import audit

    async with tenant_tx(app_pool, tenant.tenant_id) as conn:
        await audit.append(conn, tenant.tenant_id, "test", "probe")
    for sql in ("UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_tx(app_pool, tenant.tenant_id) as conn:
                await conn.execute(sql)


async def test_refuses_superuser_role(database: Database) -> None:
    pool = await create_pool(database.owner_url, min_size=1, max_size=1)
    try:
        with pytest.raises(DatabaseError, match="it is superuser and would bypass"):
            await check_app_role(pool)
    finally:
        await pool.close()


async def test_refuses_a_table_owner_that_is_no_superuser(
    database: Database, owner_pool: asyncpg.Pool
) -> None:
    """A plain role that owns the tables it would use (its own schema first on its
    search_path) bypasses row-level security unless it is forced: refused all the same.
    A member of the owner role is refused too (tests/test_cli.py)."""
    import uuid

    from gateway.embedded import with_user

    role = f"omnigate_test_owner_{uuid.uuid4().hex[:8]}"
    await owner_pool.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOBYPASSRLS')
    try:
        await owner_pool.execute(f'CREATE SCHEMA "{role}" AUTHORIZATION "{role}"')
        await owner_pool.execute(f'CREATE TABLE "{role}".messages (x int)')
        await owner_pool.execute(f'ALTER TABLE "{role}".messages OWNER TO "{role}"')
        await owner_pool.execute(f'ALTER ROLE "{role}" SET search_path = "{role}"')
        pool = await create_pool(with_user(database.app_url, role), min_size=1, max_size=1)
        try:
            row = await pool.fetchrow(
                "SELECT r.rolsuper, r.rolbypassrls, current_schema() AS schema"
                " FROM pg_roles r WHERE r.rolname = current_user"
            )
            assert dict(row) == {"rolsuper": False, "rolbypassrls": False, "schema": role}
            with pytest.raises(DatabaseError, match="it is the table owner"):
                await check_app_role(pool)
        finally:
            await pool.close()
    finally:
        await owner_pool.execute(f'DROP SCHEMA IF EXISTS "{role}" CASCADE')
        await owner_pool.execute(f'DROP ROLE IF EXISTS "{role}"')


async def test_refuses_bypassrls_role(database: Database, owner_pool: asyncpg.Pool) -> None:
    from gateway.embedded import with_user

    await owner_pool.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'omnigate_test_bypass')"
        " THEN CREATE ROLE omnigate_test_bypass LOGIN BYPASSRLS; END IF; END $$"
    )
    pool = await create_pool(
        with_user(database.app_url, "omnigate_test_bypass"), min_size=1, max_size=1
    )
    try:
        with pytest.raises(DatabaseError, match="BYPASSRLS"):
            await check_app_role(pool)
    finally:
        await pool.close()


async def test_app_role_passes_check(app_pool: asyncpg.Pool) -> None:
    await check_app_role(app_pool)


async def test_tenant_tx_rolls_back_and_leaves_no_state(
    tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with tenant_tx(app_pool, tenant.tenant_id) as conn:
            await conn.execute(
                "UPDATE tenants SET name = 'changed' WHERE tenant_id = $1", tenant.tenant_id
            )
            raise Boom
    async with tenant_tx(app_pool, tenant.tenant_id) as conn:
        assert await conn.fetchval("SELECT name FROM tenants") != "changed"
    # a connection back in the pool carries neither a transaction nor a tenant
    async with app_pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in (None, "")
        assert await conn.fetchval("SELECT count(*) FROM tenants") == 0


async def test_insert_function_is_one_tenant_transaction(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    import uuid

    other = await create_tenant(app_pool, "other", ["http://other.test"])
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    await ws.close()
    conversation = uuid.UUID(welcome["conversation_id"])
    sql = (
        "SELECT omnigate_insert_message($1, $2, $3, 'user', NULL, NULL, 'complete', NULL, $4, NULL)"
    )
    async with app_pool.acquire() as conn:
        # the other tenant cannot write into this tenant's conversation (FK unseen under RLS)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.fetchval(sql, other.tenant_id, conversation, uuid.uuid4(), b"x" * 40)
        seq = await conn.fetchval(sql, tenant.tenant_id, conversation, uuid.uuid4(), b"x" * 40)
        assert isinstance(seq, int)
        # autocommit: the tenant setting ended with the statement
        assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in (None, "")
        assert await conn.fetchval("SELECT count(*) FROM messages") == 0


async def test_resume_function_sees_only_the_tenant_it_is_given(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    from gateway.crypto import token_hash

    other = await create_tenant(app_pool, "other", ["http://other.test"])
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws, consent={"analytics": True})
    await chat(ws, "m1", "hello")
    await ws.close()
    token = token_hash(welcome["session_token"])
    sql = "SELECT * FROM omnigate_resume($1, $2, NULL, false, false, 30, 20, NULL)"
    async with app_pool.acquire() as conn:
        # another tenant's id with this tenant's token hash: nothing, not even under RLS
        assert await conn.fetch(sql, other.tenant_id, token) == []
        row = await conn.fetchrow(sql, tenant.tenant_id, token)
        assert row is not None and str(row["conversation_id"]) == welcome["conversation_id"]
        assert [(c["purpose"], c["granted"]) for c in row["consents"]] == [("analytics", True)]
        assert [m["role"] for m in row["recent"]] == ["user", "assistant"]
        assert row["unanswered"] == []
        # autocommit: the tenant setting ended with the statement
        assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in (None, "")
        assert await conn.fetchval("SELECT count(*) FROM sessions") == 0


def test_an_erased_subjects_key_is_never_cached_again() -> None:
    import uuid

    from gateway.crypto import DataKeyCache, new_data_key

    cache = DataKeyCache(capacity=4)
    t, s = uuid.uuid4(), uuid.uuid4()
    cache.put(t, s, new_data_key())
    cache.forget(t, s)
    # a load that raced the erasure hands its key to its caller but not to the cache
    assert cache.put(t, s, new_data_key()) is not None
    assert cache.get(t, s) is None


async def test_tenant_ids_function_pins_search_path(owner_pool: asyncpg.Pool) -> None:
    """SECURITY DEFINER with pg_temp last: a caller's temp table cannot shadow `tenants`."""
    config = await owner_pool.fetchval(
        "SELECT proconfig FROM pg_proc WHERE proname = 'omnigate_tenant_ids'"
    )
    assert "search_path=public, pg_temp" in config
    body = await owner_pool.fetchval(
        "SELECT prosrc FROM pg_proc WHERE proname = 'omnigate_tenant_ids'"
    )
    assert "public.tenants" in body


async def test_privacy_requests_check_constraints(
    owner_pool: asyncpg.Pool, tenant: NewTenant
) -> None:
    from gateway import dsr

    defs = " ".join(
        r["d"]
        for r in await owner_pool.fetch(
            "SELECT pg_get_constraintdef(oid) AS d FROM pg_constraint"
            " WHERE conrelid = 'privacy_requests'::regclass AND contype = 'c'"
        )
    )
    for value in (*dsr.GDPR_KINDS, *dsr.CCPA_KINDS, *dsr.STATUSES):
        assert f"'{value}'" in defs, value
    for regime, kind, status in (("gdpr", "opt_out", "received"), ("ccpa", "know", "done")):
        with pytest.raises(asyncpg.CheckViolationError):
            await owner_pool.execute(
                "INSERT INTO privacy_requests (tenant_id, request_id, regime, kind, status,"
                " ack_due_at, due_at) VALUES ($1, gen_random_uuid(), $2, $3, $4, now(), now())",
                tenant.tenant_id,
                regime,
                kind,
                status,
            )


async def test_app_role_cannot_rewrite_history(
    app_pool: asyncpg.Pool, tenant: NewTenant, offline_gateway: Gateway
) -> None:
    """Consent decisions and policy versions are append-only for the app; tenants stay."""
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws, consent={"analytics": True})
    await ws.close()
    for sql in (
        "UPDATE consents SET granted = NOT granted",
        "DELETE FROM consents",
        "UPDATE policies SET doc = doc",
        "DELETE FROM policies",
        "DELETE FROM tenants",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_tx(app_pool, tenant.tenant_id) as conn:
                await conn.execute(sql)
    async with tenant_tx(app_pool, tenant.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM consents") == 1


def _recomputed(verifier: str, password: str) -> str:
    """Our verifier of `password` with the salt and iterations `verifier` names."""
    import base64

    from gateway.db import scram_verifier

    iterations, salt = verifier.split("$")[1].split(":")
    return scram_verifier(password, salt=base64.b64decode(salt), iterations=int(iterations))


async def test_role_passwords_reach_the_server_only_as_scram_verifiers(
    owner_pool: asyncpg.Pool, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """migrate() sends the app role's password as the verifier PostgreSQL would make."""
    import uuid

    from gateway import db
    from gateway.db import migrate
    from gateway.embedded import with_user

    role = f"omnigate_scram_{uuid.uuid4().hex[:8]}"
    async with owner_pool.acquire() as conn:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute(f"CREATE ROLE {role} PASSWORD 'pa55:word'")
        theirs = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
        await conn.execute(f"DROP ROLE {role}")
    assert _recomputed(theirs, "pa55:word") == theirs  # PostgreSQL's own, exactly

    # an iteration count PostgreSQL never picks: the stored verifier can only be ours,
    # so the server never saw the password itself
    monkeypatch.setattr(db, "SCRAM_ITERATIONS", 4099)
    app = with_user(database.app_url, f"{role}:s3cret-pw")
    await migrate(database.owner_url, app)
    dbname = await owner_pool.fetchval("SELECT current_database()")
    try:
        stored = await owner_pool.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role
        )
        assert stored.startswith("SCRAM-SHA-256$4099:") and "s3cret-pw" not in stored
        assert _recomputed(stored, "s3cret-pw") == stored
    finally:
        await owner_pool.execute(f'REVOKE CONNECT ON DATABASE "{dbname}" FROM {role}')
        await owner_pool.execute(f"REVOKE omnigate_app FROM {role}")
        await owner_pool.execute(f"DROP ROLE {role}")


async def test_message_numbers_go_on_per_conversation_after_the_upgrade(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0019 numbers messages per conversation. On a database the previous
    release wrote (seqs from one shared counter), each conversation goes on from its own
    highest seq, and the backfill sees every tenant's rows although its owner is no
    superuser, so row-level security, forced, would hide them all."""
    import uuid

    from gateway import db
    from gateway.embedded import with_user

    name = f"omnigate_upgrade_{uuid.uuid4().hex[:8]}"
    owner_role = f"omnigate_owner_{uuid.uuid4().hex[:8]}"
    files = db.migration_files()
    upgrade = [f.name for f in files].index("0019_conversation_seq.sql")
    admin = await asyncpg.connect(database.owner_url)
    try:
        await admin.execute(f'CREATE ROLE "{owner_role}" LOGIN CREATEROLE')
        await admin.execute(f'CREATE DATABASE "{name}" OWNER "{owner_role}"')
        owner_url = with_user(database.owner_url, owner_role, name)
        monkeypatch.setattr(db, "migration_files", lambda: files[:upgrade])
        await db.migrate(owner_url, None)
        pool = await create_pool(owner_url, min_size=1, max_size=2)
        try:
            t = await create_tenant(pool, "upgrade", ["https://shop.example"])
            # d: a conversation whose three messages retention has already deleted
            a, b, d = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            async with tenant_tx(pool, t.tenant_id) as conn:
                subject = uuid.uuid4()
                await conn.execute(
                    "INSERT INTO subjects (tenant_id, subject_id) VALUES ($1, $2)",
                    t.tenant_id,
                    subject,
                )
                for conv, count in ((a, 3), (b, 2), (d, 3)):
                    await conn.execute(
                        "INSERT INTO conversations (tenant_id, conversation_id, subject_id,"
                        " message_count) VALUES ($1, $2, $3, $4)",
                        t.tenant_id,
                        conv,
                        subject,
                        count,
                    )
                for conv in (a, b, a, b, a):  # a: 1, 3, 5; b: 2, 4
                    await conn.execute(
                        "INSERT INTO messages (tenant_id, conversation_id, message_id, role,"
                        " ciphertext) VALUES ($1, $2, $3, 'user', '\\x00')",
                        t.tenant_id,
                        conv,
                        uuid.uuid4(),
                    )
            monkeypatch.setattr(db, "migration_files", lambda: files)
            assert (await db.migrate(owner_url, None))[0] == "0019_conversation_seq.sql"
            c = uuid.uuid4()
            async with tenant_tx(pool, t.tenant_id) as conn:
                await conn.execute(
                    "INSERT INTO conversations (tenant_id, conversation_id, subject_id) "
                    "VALUES ($1, $2, $3)",
                    t.tenant_id,
                    c,
                    subject,
                )
            new = (
                "SELECT omnigate_insert_message($1, $2, $3, 'user', NULL, NULL, 'complete',"
                " NULL, '\\x00', NULL, false, NULL)"
            )
            # the function of releases before 0014, still defined: it names no seq
            old = (
                "SELECT omnigate_insert_message($1, $2, $3, 'user', NULL, NULL, 'complete',"
                " NULL, '\\x00', NULL)"
            )
            got = [
                await pool.fetchval(sql, t.tenant_id, conv, uuid.uuid4())
                for sql, conv in (
                    (new, a),
                    (new, b),
                    (new, c),
                    (old, a),
                    (new, a),
                    (old, c),
                    (new, d),
                )
            ]
            # d goes on past every number the shared counter gave (5): a widget that
            # showed its deleted messages orders the new one after them
            assert got == [6, 5, 1, 7, 8, 2, 6]
            forced = await pool.fetch(
                "SELECT relname FROM pg_class WHERE relforcerowsecurity"
                " AND relname IN ('messages', 'conversations')"
            )
            assert len(forced) == 2  # forced again by the migration that lifted it
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{owner_role}"')
        await admin.close()
