"""Group commit of message writes (gateway/groupcommit.py, migrations/0006), on real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.chat import STORAGE_ERRORS
from gateway.db import create_pool, tenant_tx
from gateway.groupcommit import GroupCommitter, _usable
from gateway.provision import NewTenant, create_tenant
from gateway.store import MapChanged, NewMessage
from tests.conftest import ORIGIN, TEST_APP_ROLE, Database, Gateway, hello

BLOB = b"x" * 40


def user_message(tenant_id: uuid.UUID, conversation_id: uuid.UUID, **kw: Any) -> NewMessage:
    return NewMessage(tenant_id, conversation_id, uuid.uuid4(), "user", BLOB, **kw)


async def flushed(gc: GroupCommitter, batches: int) -> None:
    """Yield to the loop until `batches` flushes have been sent (so the next rows queue)."""
    for _ in range(100):
        if gc.batches >= batches:
            return
        await asyncio.sleep(0)
    raise AssertionError("flush not started")


async def conversation_of(gw: Gateway, t: NewTenant) -> uuid.UUID:
    ws = await gw.ws(t.site_key)
    welcome = await hello(ws)
    await ws.close()
    return uuid.UUID(welcome["conversation_id"])


async def test_concurrent_inserts_share_round_trips_and_stay_per_tenant(
    offline_gateway: Gateway, app_pool: asyncpg.Pool
) -> None:
    tenants = [await create_tenant(app_pool, f"gc-{i}", [ORIGIN]) for i in range(3)]
    convs = [await conversation_of(offline_gateway, t) for t in tenants]
    gc = GroupCommitter(app_pool)
    seqs = await asyncio.gather(
        *(gc.insert(user_message(tenants[i % 3].tenant_id, convs[i % 3])) for i in range(50))
    )
    await gc.aclose()
    assert all(isinstance(s, int) for s in seqs)
    assert gc.rows == 50
    assert gc.batches < 50  # gathered together: the rows share round trips
    for i, t in enumerate(tenants):
        async with tenant_tx(app_pool, t.tenant_id) as conn:
            rows = await conn.fetch("SELECT seq, conversation_id FROM messages")
            count = await conn.fetchval(
                "SELECT message_count FROM conversations WHERE conversation_id = $1", convs[i]
            )
        mine = [s for j, s in enumerate(seqs) if j % 3 == i]
        assert {r["seq"] for r in rows} == set(mine)  # only this tenant's rows are visible
        assert {r["conversation_id"] for r in rows} == {convs[i]}
        # numbered within the conversation, whatever the others wrote in the same batches
        assert sorted(mine) == list(range(1, len(mine) + 1))
        assert count == len(mine)


async def test_bad_row_fails_alone_and_duplicate_is_none(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    other = await create_tenant(app_pool, "gc-other", [ORIGIN])
    conv = await conversation_of(offline_gateway, tenant)
    gc = GroupCommitter(app_pool)
    ref = b"r" * 16
    first = await gc.insert(user_message(tenant.tenant_id, conv, client_ref=ref))
    assert isinstance(first, int)

    # hold a flush in flight so the next four rows go together in one batch
    blocker = asyncio.create_task(gc.insert(user_message(tenant.tenant_id, conv)))
    await flushed(gc, 2)
    results = await asyncio.gather(
        gc.insert(user_message(tenant.tenant_id, conv)),
        # another tenant's row into this tenant's conversation: RLS hides it, the FK fails
        gc.insert(user_message(other.tenant_id, conv)),
        # a conversation that does not exist (erased)
        gc.insert(user_message(tenant.tenant_id, uuid.uuid4())),
        # a re-sent client_ref: already stored
        gc.insert(user_message(tenant.tenant_id, conv, client_ref=ref)),
        return_exceptions=True,
    )
    assert isinstance(await blocker, int)
    assert gc.batches == 3  # first, blocker, then the four together
    ok, cross, erased, dup = results
    assert isinstance(ok, int)
    # each failed row was retried alone: its caller sees the database's own error
    assert isinstance(cross, asyncpg.ForeignKeyViolationError) and isinstance(cross, STORAGE_ERRORS)
    assert isinstance(erased, asyncpg.ForeignKeyViolationError)
    assert dup is None
    async with tenant_tx(app_pool, tenant.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 3
    async with tenant_tx(app_pool, other.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 0
    # autocommit: no tenant setting survives the statement on the connection it keeps
    conn = gc._conn
    assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in (None, "")
    await gc.aclose()


async def test_a_row_expecting_a_map_that_changed_in_its_batch_is_not_written(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    # two tabs of one session in one batch, both expecting the map they read (none):
    # the first grows it, so the second must read it again before it is written
    conv = await conversation_of(offline_gateway, tenant)
    gc = GroupCommitter(app_pool)
    blocker = asyncio.create_task(gc.insert(user_message(tenant.tenant_id, conv)))
    await flushed(gc, 1)
    grows, stale, unchecked = await asyncio.gather(
        gc.insert(user_message(tenant.tenant_id, conv, redaction_sealed=b"map", check_map=True)),
        gc.insert(user_message(tenant.tenant_id, conv, check_map=True)),
        gc.insert(user_message(tenant.tenant_id, conv)),  # a reply: no map expected
        return_exceptions=True,
    )
    assert isinstance(await blocker, int)
    assert gc.batches == 2  # the blocker, then the three together
    assert isinstance(grows, int) and isinstance(unchecked, int)
    assert isinstance(stale, MapChanged)
    # alone, on the map it now expects, it goes through
    fresh = user_message(tenant.tenant_id, conv, check_map=True, map_expected=b"map")
    assert isinstance(await gc.insert(fresh), int)
    with pytest.raises(MapChanged):  # and the one-row statement checks as the batch does
        await gc.insert(user_message(tenant.tenant_id, conv, check_map=True))
    async with tenant_tx(app_pool, tenant.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 4
    await gc.aclose()


@contextlib.asynccontextmanager
async def holding_conversation(owner_pool: asyncpg.Pool, conv: uuid.UUID) -> AsyncIterator[None]:
    """Hold the conversation's row lock: every write's UPDATE of it waits until the end."""
    async with owner_pool.acquire() as owner:
        tx = owner.transaction()
        await tx.start()
        await owner.execute(
            "UPDATE conversations SET message_count = message_count WHERE conversation_id = $1",
            conv,
        )
        try:
            yield
        finally:
            await tx.rollback()


async def _kill_waiting_writer(owner: asyncpg.Pool) -> None:
    """Terminate the app backend blocked on the held row lock (mid-flush)."""
    for _ in range(500):
        pids = await owner.fetch(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'"
            " AND datname = current_database()",
            TEST_APP_ROLE,
        )
        if pids:
            for p in pids:
                await owner.execute("SELECT pg_terminate_backend($1)", p["pid"])
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no writer blocked on the lock")


@pytest.fixture
async def lone_pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection: while the committer keeps it, the pool has no other."""
    pool = await create_pool(database.app_url, min_size=1, max_size=1)
    yield pool
    pool.terminate()  # closed already by a test that closes it, or cut short


async def test_cut_connection_fails_the_batch_then_recovers(
    offline_gateway: Gateway, tenant: NewTenant, lone_pool: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> None:
    conv = await conversation_of(offline_gateway, tenant)
    pool = lone_pool
    gc = GroupCommitter(pool)

    def one() -> asyncio.Task[int | None]:
        return asyncio.create_task(gc.insert(user_message(tenant.tenant_id, conv)))

    async with holding_conversation(owner_pool, conv):
        first = one()
        await flushed(gc, 1)
        queued = [one() for _ in range(4)]
        await _kill_waiting_writer(owner_pool)  # the lone write
        with pytest.raises(STORAGE_ERRORS):
            await first
        await _kill_waiting_writer(owner_pool)  # the next flush: the four queued rows
        for task in queued:
            with pytest.raises(STORAGE_ERRORS):
                await task
    assert gc.batches == 2
    seq = await gc.insert(user_message(tenant.tenant_id, conv))
    assert isinstance(seq, int)
    await gc.aclose()  # the pool's one connection was the committer's
    async with tenant_tx(pool, tenant.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 1


async def test_rows_queued_behind_a_cancelled_lone_write_are_still_written(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    conv = await conversation_of(offline_gateway, tenant)
    gc = GroupCommitter(app_pool)
    async with holding_conversation(owner_pool, conv):
        lone = asyncio.create_task(gc.insert(user_message(tenant.tenant_id, conv)))
        await flushed(gc, 1)
        queued = [
            asyncio.create_task(gc.insert(user_message(tenant.tenant_id, conv))) for _ in range(3)
        ]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in queued)  # waiting behind the write in flight
        lone.cancel()  # its visitor went away
        with pytest.raises(asyncio.CancelledError):
            await lone
    seqs = await asyncio.wait_for(asyncio.gather(*queued), 10)
    assert all(isinstance(s, int) for s in seqs)
    assert gc.batches == 2 and gc.rows == 4  # the lone write, then the three together
    await gc.aclose()


async def test_gateway_writes_through_the_committer(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    from gateway.appkeys import SERVICES
    from tests.conftest import chat

    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    frames = await chat(ws, "m1", "hello there")
    await ws.close()
    assert frames[-1]["type"] == "done" and isinstance(frames[-1]["seq"], int)
    svc = offline_gateway.server.app[SERVICES]
    assert svc.writer is not None and svc.writer.rows >= 2


async def _kill_app_backends(owner: asyncpg.Pool) -> int:
    return int(
        await owner.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE usename = $1 AND datname = current_database()",
            TEST_APP_ROLE,
        )
    )


async def test_one_connection_is_kept_between_writes_and_given_back_on_close(
    offline_gateway: Gateway, tenant: NewTenant, database: Database
) -> None:
    conv = await conversation_of(offline_gateway, tenant)
    pool = await create_pool(database.app_url, min_size=2, max_size=2)
    try:
        gc = GroupCommitter(pool)
        assert pool.get_idle_size() == 2
        for _ in range(3):
            assert isinstance(await gc.insert(user_message(tenant.tenant_id, conv)), int)
            assert pool.get_idle_size() == 1  # kept, not checked out and back per write
        await asyncio.gather(*(gc.insert(user_message(tenant.tenant_id, conv)) for _ in range(5)))
        assert pool.get_idle_size() == 1 and pool.get_size() == 2
        await gc.aclose()
        assert pool.get_idle_size() == 2
        # a write after close checks a connection out for itself and returns it
        assert isinstance(await gc.insert(user_message(tenant.tenant_id, conv)), int)
        assert pool.get_idle_size() == 2
        await asyncio.wait_for(pool.close(), 5)  # nothing held: the pool closes at once
        pool = None
    finally:
        if pool is not None:
            pool.terminate()


async def test_a_kept_connection_that_broke_is_replaced(
    offline_gateway: Gateway, tenant: NewTenant, lone_pool: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> None:
    conv = await conversation_of(offline_gateway, tenant)
    pool = lone_pool
    gc = GroupCommitter(pool)
    assert isinstance(await gc.insert(user_message(tenant.tenant_id, conv)), int)
    assert await _kill_app_backends(owner_pool) >= 1
    for _ in range(100):  # the loop reads the server's goodbye
        await asyncio.sleep(0.01)
        if gc._conn is None or not _usable(gc._conn):
            break
    seq = await gc.insert(user_message(tenant.tenant_id, conv))
    assert isinstance(seq, int)
    await gc.aclose()
    async with tenant_tx(pool, tenant.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 2


async def test_closing_with_a_write_in_flight_gives_the_connection_back_after_it(
    offline_gateway: Gateway, tenant: NewTenant, lone_pool: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> None:
    conv = await conversation_of(offline_gateway, tenant)
    pool = lone_pool
    gc = GroupCommitter(pool)
    async with holding_conversation(owner_pool, conv):
        lone = asyncio.create_task(gc.insert(user_message(tenant.tenant_id, conv)))
        await flushed(gc, 1)
        await asyncio.sleep(0.05)
        await gc.aclose()
        assert not lone.done() and pool.get_idle_size() == 0  # still the write's
    assert isinstance(await lone, int)
    assert pool.get_idle_size() == 1
    await asyncio.wait_for(pool.close(), 5)
