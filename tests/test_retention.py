"""Retention over backdated rows: deletion, anonymization, IP clearing, analytics rollup."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID, uuid4

import asyncpg
import orjson
import pytest

from gateway import retention
from gateway.cli import run
from gateway.crypto import KeyRing
from gateway.db import tenant_tx
from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant, create_tenant
from gateway.retention import KINDS, LEASE, run_retention
from gateway.vault import Vault
from policies import PlaceholderMap
from tests.conftest import (
    MASTER_KEY,
    ORIGIN,
    Database,
    Gateway,
    chat,
    hello,
    recv_until,
    reply_text,
)

CONSENT = {"conversation_storage": True, "ai_processing": True}


async def chatted(g: Gateway, t: NewTenant, text: str) -> dict[str, str]:
    ws = await g.ws(t.site_key)
    w = await hello(ws, consent=CONSENT)
    assert (await chat(ws, "m", text))[-1]["type"] == "done"
    await ws.close()
    return w


async def test_retention_pass(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    old = await chatted(offline_gateway, tenant, "old words")
    idle = await chatted(offline_gateway, tenant, "idle visitor")
    fresh = await chatted(offline_gateway, tenant, "fresh words")
    tid = tenant.tenant_id
    old_c, idle_c, fresh_c = (UUID(w["conversation_id"]) for w in (old, idle, fresh))
    ago = "now() - interval '100 days'"
    await owner_pool.execute(
        f"UPDATE messages SET created_at = {ago} WHERE conversation_id = $1", old_c
    )
    await owner_pool.execute(
        f"UPDATE conversations SET started_at = {ago}, last_message_at = {ago}"
        " WHERE conversation_id = $1",
        old_c,
    )
    await owner_pool.execute(
        f"UPDATE sessions SET last_seen_at = {ago}, expires_at = now() - interval '1 day'"
        " WHERE conversation_id = $1",
        old_c,
    )
    # a session still valid but last seen long ago: its anonymized IP goes, it stays
    await owner_pool.execute(
        f"UPDATE sessions SET last_seen_at = {ago}, ip_anon = '192.0.2.0'"
        " WHERE conversation_id = $1",
        idle_c,
    )
    subject = await owner_pool.fetchval(
        "SELECT subject_id FROM conversations WHERE conversation_id = $1", fresh_c
    )
    await owner_pool.executemany(
        "INSERT INTO analytics_events (tenant_id, subject_id, occurred_at, page_path,"
        " browser_family, device_class)"
        " VALUES ($1, $2, $3::text::timestamptz, '/p', 'firefox', 'desktop')",
        [
            (tid, subject, "2020-03-01T10:00:00Z"),
            (tid, subject, "2020-03-01T18:00:00Z"),
            (tid, subject, "2020-03-02T09:00:00Z"),
        ],
    )
    await owner_pool.execute(
        "INSERT INTO analytics_events (tenant_id, subject_id) VALUES ($1, $2)", tid, subject
    )

    summary = await run_retention(app_pool, batch=2)
    assert summary["leader"] is True
    assert summary["messages_deleted"] >= 2
    assert summary["analytics_events_aggregated"] >= 3

    conv = await owner_pool.fetchrow(
        "SELECT * FROM conversations WHERE conversation_id = $1", old_c
    )
    assert conv is not None, "the anonymized conversation remains"
    assert conv["subject_id"] is None and conv["redaction_sealed"] is None
    assert conv["anonymized_at"] is not None and conv["message_count"] == 2
    # kept to the day only: the subject, its key and first consents were created in the
    # same transaction as the conversation, and an exact start would name them again
    for column in ("started_at", "last_message_at"):
        at = conv[column]
        assert (at.hour, at.minute, at.second, at.microsecond) == (0, 0, 0, 0), column
    count = "SELECT count(*) FROM {} WHERE conversation_id = $1"
    assert await owner_pool.fetchval(count.format("messages"), old_c) == 0
    assert await owner_pool.fetchval(count.format("sessions"), old_c) == 0
    assert await owner_pool.fetchval(count.format("messages"), fresh_c) == 2
    assert await owner_pool.fetchval(count.format("messages"), idle_c) == 2
    idle_s = await owner_pool.fetchrow("SELECT * FROM sessions WHERE conversation_id = $1", idle_c)
    assert idle_s is not None and idle_s["ip_anon"] is None
    fresh_s = await owner_pool.fetchrow(
        "SELECT * FROM sessions WHERE conversation_id = $1", fresh_c
    )
    assert fresh_s is not None
    daily = {
        (str(r["day"]), r["events"])
        for r in await owner_pool.fetch(
            "SELECT day, events FROM analytics_daily WHERE tenant_id = $1", tid
        )
    }
    assert daily == {("2020-03-01", 2), ("2020-03-02", 1)}
    assert (
        await owner_pool.fetchval("SELECT count(*) FROM analytics_events WHERE tenant_id = $1", tid)
        == 1
    )

    again = await run_retention(app_pool)
    assert all(again[k] == 0 for k in KINDS), again
    assert (
        await owner_pool.fetchval(
            "SELECT sum(events) FROM analytics_daily WHERE tenant_id = $1", tid
        )
        == 3
    )


async def test_one_leader_at_a_time(app_pool: asyncpg.Pool, owner_pool: asyncpg.Pool) -> None:
    # another process holds the lease
    await owner_pool.execute(
        "INSERT INTO omnigate_leases (name, holder, expires_at)"
        " VALUES ($1, gen_random_uuid(), now() + interval '1 minute')",
        LEASE,
    )
    try:
        assert (await run_retention(app_pool))["leader"] is False
        # that process crashed: once its lease runs out, the next pass leads
        await owner_pool.execute(
            "UPDATE omnigate_leases SET expires_at = now() - interval '1 second' WHERE name = $1",
            LEASE,
        )
        assert (await run_retention(app_pool))["leader"] is True
        # a finished pass gives the lease back
        assert await owner_pool.fetchval("SELECT count(*) FROM omnigate_leases") == 0
    finally:
        await owner_pool.execute("DELETE FROM omnigate_leases WHERE name = $1", LEASE)


def test_cli_retention_run_prints_a_summary(
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMNIGATE_DATABASE_URL", database.app_url)
    monkeypatch.delenv("OMNIGATE_ADMIN_DATABASE_URL", raising=False)
    assert run(["retention", "run"]) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["leader"] is True and set(KINDS) <= set(summary)


async def test_a_broken_tenant_does_not_stop_the_others(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = await create_tenant(app_pool, f"t-{uuid4().hex[:8]}", [ORIGIN])
    old = await chatted(offline_gateway, tenant, "old words")
    old_c = UUID(old["conversation_id"])
    await owner_pool.execute(
        "UPDATE messages SET created_at = now() - interval '100 days' WHERE conversation_id = $1",
        old_c,
    )
    latest = await owner_pool.fetchval(
        "SELECT max(version) FROM policies WHERE tenant_id = $1", broken.tenant_id
    )
    saved = await owner_pool.fetchval(
        "SELECT doc FROM policies WHERE tenant_id = $1 AND version = $2",
        broken.tenant_id,
        latest,
    )
    await owner_pool.execute(
        """UPDATE policies SET doc = '{"retention_days": "x"}' WHERE tenant_id = $1"""
        " AND version = $2",
        broken.tenant_id,
        latest,
    )
    try:
        with caplog.at_level("WARNING", logger="omnigate.retention"):
            summary = await run_retention(app_pool)
    finally:
        await owner_pool.execute(
            "UPDATE policies SET doc = $3 WHERE tenant_id = $1 AND version = $2",
            broken.tenant_id,
            latest,
            saved,
        )
    assert summary["leader"] is True and summary["failed_tenants"] == 1, summary
    assert summary["messages_deleted"] >= 2
    assert (
        await owner_pool.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", old_c)
        == 0
    )
    failure = [r for r in caplog.records if "failed" in r.getMessage()]
    assert failure and getattr(failure[0], "tenant_id", None) == str(broken.tenant_id)
    assert getattr(failure[0], "error", None) == "PolicyError"
    # the lease is given back
    assert await owner_pool.fetchval("SELECT count(*) FROM omnigate_leases") == 0


async def test_retention_loop_survives_any_exception(
    monkeypatch: pytest.MonkeyPatch, app_pool: asyncpg.Pool
) -> None:
    calls = 0

    async def boom(pool: object, vault: object) -> dict[str, object]:
        nonlocal calls
        calls += 1
        if calls >= 3:
            raise asyncio.CancelledError
        raise RuntimeError("unexpected")

    monkeypatch.setattr(retention, "run_retention", boom)
    svc = SimpleNamespace(pool=app_pool, vault=None)
    with pytest.raises(asyncio.CancelledError):
        await retention.retention_loop(svc, 0)
    assert calls == 3


async def test_a_kept_session_does_not_keep_the_redaction_map_past_retention(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    upstream, _ = fake
    old = await chatted(gateway, tenant, "mail jane@example.org")
    recent = await chatted(gateway, tenant, "mail max@example.org")
    old_c, recent_c = UUID(old["conversation_id"]), UUID(recent["conversation_id"])
    sealed = "SELECT redaction_sealed FROM conversations WHERE conversation_id = $1"
    assert await owner_pool.fetchval(sealed, old_c) is not None
    ago = "now() - interval '100 days'"
    await owner_pool.execute(
        f"UPDATE messages SET created_at = {ago} WHERE conversation_id = $1", old_c
    )
    await owner_pool.execute(
        f"UPDATE conversations SET started_at = {ago}, last_message_at = {ago}"
        " WHERE conversation_id = $1",
        old_c,
    )
    # the visitor came back last week without chatting: the session was renewed, it
    # still points at the conversation (so the conversation is not anonymized)
    await owner_pool.execute(
        "UPDATE sessions SET last_seen_at = now() - interval '7 days',"
        " expires_at = now() + interval '23 days' WHERE conversation_id = $1",
        old_c,
    )

    summary = await run_retention(app_pool, batch=1)
    assert summary["leader"] is True
    conv = await owner_pool.fetchrow(
        "SELECT * FROM conversations WHERE conversation_id = $1", old_c
    )
    assert conv is not None and conv["redaction_sealed"] is None
    assert summary["redaction_maps_cleared"] >= 1, summary
    # still the visitor's, kept for the live session: not anonymized
    assert conv["subject_id"] is not None and conv["anonymized_at"] is None
    count = "SELECT count(*) FROM {} WHERE conversation_id = $1"
    assert await owner_pool.fetchval(count.format("messages"), old_c) == 0
    assert await owner_pool.fetchval(count.format("sessions"), old_c) == 1
    # a conversation with messages left keeps its map: its stored turns need it
    assert await owner_pool.fetchval(sealed, recent_c) is not None
    assert await owner_pool.fetchval(count.format("messages"), recent_c) == 2
    again = await run_retention(app_pool)
    assert all(again[k] == 0 for k in KINDS), again

    # the same visitor resumes: an empty map, no earlier turns, and chats again
    ws = await gateway.ws(tenant.site_key)
    resumed = await hello(ws, session_token=old["session_token"])
    assert resumed["resumed"] is True and resumed["conversation_id"] == old["conversation_id"]
    await ws.send_json({"type": "history"})
    assert (await recv_until(ws, "history"))[-1]["messages"] == []
    upstream.queue("reply", text="noted <EMAIL_1>")
    frames = await chat(ws, "n", "write to bob@example.net")
    await ws.close()
    assert frames[-1]["type"] == "done", frames
    assert reply_text(frames) == "noted bob@example.net"
    sent = upstream.requests[-1]["body"]["messages"]
    assert [(m["role"], m["content"]) for m in sent[1:]] == [("user", "write to <EMAIL_1>")]
    assert "jane" not in str(sent)
    assert await owner_pool.fetchval(sealed, old_c) is not None
    assert await owner_pool.fetchval(count.format("messages"), old_c) == 2


async def test_a_message_written_during_anonymization_keeps_its_conversation(
    offline_gateway: Gateway,
    tenant: NewTenant,
    app_pool: asyncpg.Pool,
    owner_pool: asyncpg.Pool,
) -> None:
    # The conversation qualifies when the pass looks (old, no message, no session), then
    # a message is written before the pass's update takes the row: it must stay linked.
    from gateway.store import NewMessage, insert_message

    w = await chatted(offline_gateway, tenant, "hello")
    conv = UUID(w["conversation_id"])
    async with owner_pool.acquire() as conn:
        await conn.execute("DELETE FROM messages WHERE conversation_id = $1", conv)
        await conn.execute("DELETE FROM sessions WHERE conversation_id = $1", conv)
        await conn.execute(
            "UPDATE conversations SET last_message_at = now() - interval '100 days' "
            "WHERE conversation_id = $1",
            conv,
        )
    now = datetime.now(UTC)
    writer = await app_pool.acquire()
    tx = writer.transaction()
    await tx.start()
    try:
        await insert_message(
            writer, NewMessage(tenant.tenant_id, conv, uuid4(), "user", b"x" * 40)
        )  # holds the conversation's row until it commits

        async def anonymize() -> int:
            async with tenant_tx(app_pool, tenant.tenant_id) as conn:
                return int(
                    await conn.fetchval(
                        retention._ANONYMIZE_CONVERSATIONS,
                        tenant.tenant_id,
                        now - timedelta(days=90),
                        now,
                        100,
                    )
                )

        task = asyncio.create_task(anonymize())
        await asyncio.sleep(0.3)  # the update now waits for the writer's row lock
        assert not task.done()
        await tx.commit()
    except BaseException:
        await tx.rollback()
        raise
    finally:
        await app_pool.release(writer)
    assert await task == 0
    row = await owner_pool.fetchrow(
        "SELECT subject_id, anonymized_at FROM conversations WHERE conversation_id = $1", conv
    )
    assert row["subject_id"] is not None and row["anonymized_at"] is None


async def test_a_subject_left_with_nothing_is_deleted(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    # Three visitors whose conversations all went 100 days ago. The subject row, its
    # key, its consents and its closed requests would otherwise stay for ever, out of
    # reach of the visitor's own (expired) token and of the owner's erasure.
    gone, chose_lately, asked, restricted = [
        await chatted(offline_gateway, tenant, text) for text in ("a", "b", "c", "d")
    ]
    tid = tenant.tenant_id
    subjects = {}
    visitors = {
        "gone": gone,
        "chose_lately": chose_lately,
        "asked": asked,
        "restricted": restricted,
    }
    for name, w in visitors.items():
        cid = UUID(w["conversation_id"])
        sid = await owner_pool.fetchval(
            "SELECT subject_id FROM conversations WHERE conversation_id = $1", cid
        )
        subjects[name] = sid
        ago = "now() - interval '100 days'"
        for sql in (
            f"UPDATE messages SET created_at = {ago} WHERE conversation_id = $1",
            f"UPDATE conversations SET started_at = {ago}, last_message_at = {ago}"
            " WHERE conversation_id = $1",
            f"UPDATE sessions SET last_seen_at = {ago}, expires_at = now() - interval '60 days'"
            " WHERE conversation_id = $1",
        ):
            await owner_pool.execute(sql, cid)
        for sql in (
            f"UPDATE subjects SET created_at = {ago} WHERE subject_id = $1",
            f"UPDATE consents SET created_at = {ago} WHERE subject_id = $1",
        ):
            await owner_pool.execute(sql, sid)
        # a request closed long ago, and an old page view
        await owner_pool.execute(
            "INSERT INTO privacy_requests (tenant_id, request_id, subject_id, regime, kind,"
            " status, created_at, ack_due_at, due_at, closed_at, details, resolution)"
            f" VALUES ($1, $2, $3, 'gdpr', 'access', 'completed', {ago}, {ago}, {ago}, {ago},"
            " 'sealed details', 'sent')",
            tid,
            uuid4(),
            sid,
        )
        await owner_pool.execute(
            "INSERT INTO analytics_events (tenant_id, subject_id, occurred_at, page_path,"
            f" browser_family, device_class) VALUES ($1, $2, {ago}, '/pricing', 'firefox',"
            " 'desktop')",
            tid,
            sid,
        )
    await owner_pool.execute(  # a decision ten days ago: still a visitor of the site
        "INSERT INTO consents (tenant_id, subject_id, purpose, granted, policy_version,"
        " consent_version, source, created_at) VALUES ($1, $2, 'analytics', false, 1, 1,"
        " 'api', now() - interval '10 days')",
        tid,
        subjects["chose_lately"],
    )
    await owner_pool.execute(  # a request still open: the subject must stay to answer it
        "INSERT INTO privacy_requests (tenant_id, request_id, subject_id, regime, kind,"
        " ack_due_at, due_at) VALUES ($1, $2, $3, 'gdpr', 'access', now(), now())",
        tid,
        uuid4(),
        subjects["asked"],
    )

    await owner_pool.execute(  # a signed-in user who restricted processing comes back to it
        "UPDATE subjects SET external_ref = '\\x01', restricted = true WHERE subject_id = $1",
        subjects["restricted"],
    )

    summary = await run_retention(app_pool, batch=1)
    assert summary["subjects_deleted"] == 1, summary
    left = {
        r["subject_id"]
        for r in await owner_pool.fetch("SELECT subject_id FROM subjects WHERE tenant_id = $1", tid)
    }
    assert subjects["gone"] not in left
    assert {subjects["chose_lately"], subjects["asked"], subjects["restricted"]} <= left
    for table in ("subject_keys", "consents", "analytics_events"):
        n = await owner_pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE subject_id = $1", subjects["gone"]
        )
        assert n == 0, table
    # the closed request stays as the record, with neither the link nor the free text
    detached = await owner_pool.fetch(
        "SELECT details, resolution FROM privacy_requests WHERE tenant_id = $1"
        " AND subject_id IS NULL",
        tid,
    )
    assert [(r["details"], r["resolution"]) for r in detached] == [(None, None)]
    # the page view is counted in the daily rollup, not lost with its subject
    assert (
        await owner_pool.fetchval(
            "SELECT sum(events) FROM analytics_daily"
            " WHERE tenant_id = $1 AND page_path = '/pricing'",
            tid,
        )
        == 1
    )
    again = await run_retention(app_pool)
    assert all(again[k] == 0 for k in KINDS), again


async def _open_map(owner_pool: asyncpg.Pool, tid: UUID, cid: UUID) -> PlaceholderMap:
    vault = Vault(KeyRing((MASTER_KEY,)))
    async with owner_pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT subject_id, redaction_sealed FROM conversations WHERE conversation_id = $1",
            cid,
        )
        assert row is not None and row["redaction_sealed"] is not None
        cipher = await vault.cipher(conn, tid, row["subject_id"])
    raw = vault.open_blob(cipher, tid, cid, "redaction", row["redaction_sealed"])
    return PlaceholderMap.from_dict(orjson.loads(raw))


async def test_values_only_deleted_messages_held_leave_the_redaction_map(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    # A visitor who keeps coming back keeps the conversation, and its map kept the
    # originals of every value they ever typed, long after the messages were deleted.
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    w = await hello(ws, consent=CONSENT)
    assert (await chat(ws, "m1", "mail jane@example.org"))[-1]["type"] == "done"
    assert (await chat(ws, "m2", "or max@example.net"))[-1]["type"] == "done"
    await ws.close()
    tid, cid = tenant.tenant_id, UUID(w["conversation_id"])
    first_two = "SELECT seq FROM messages WHERE conversation_id = $1 ORDER BY seq LIMIT 2"
    await owner_pool.execute(
        "UPDATE messages SET created_at = now() - interval '100 days'"
        f" WHERE conversation_id = $1 AND seq IN ({first_two})",
        cid,
    )
    vault = Vault(KeyRing((MASTER_KEY,)))

    without_keys = await run_retention(app_pool)  # marks it, cannot open it
    assert without_keys["messages_deleted"] == 2
    assert without_keys["redaction_entries_pruned"] == 0
    # a pass under another master key cannot open it either, and leaves the mark
    wrong = Vault(KeyRing((("other", b"o" * 32),)))
    assert (await run_retention(app_pool, wrong))["redaction_entries_pruned"] == 0
    due = "SELECT map_prune_due FROM conversations WHERE conversation_id = $1"
    assert await owner_pool.fetchval(due, cid) is True
    assert (await _open_map(owner_pool, tid, cid)).value_of("<EMAIL_1>") == "jane@example.org"
    summary = await run_retention(app_pool, vault)
    assert summary["redaction_entries_pruned"] == 1, summary
    mapping = await _open_map(owner_pool, tid, cid)
    assert mapping.value_of("<EMAIL_1>") is None
    assert mapping.value_of("<EMAIL_2>") == "max@example.net"
    assert await owner_pool.fetchval(due, cid) is False
    assert (await run_retention(app_pool, vault))["redaction_entries_pruned"] == 0

    # the visitor comes back: the message left is redacted as before, and the pruned
    # value, typed again, gets a number never issued before
    ws = await gateway.ws(tenant.site_key)
    assert (await hello(ws, session_token=w["session_token"]))["resumed"] is True
    assert (await chat(ws, "m3", "jane@example.org again"))[-1]["type"] == "done"
    await ws.close()
    sent = str(upstream.requests[-1]["body"]["messages"])
    assert "<EMAIL_2>" in sent and "<EMAIL_3> again" in sent
    assert "max@" not in sent and "jane@" not in sent


async def test_a_reply_restoring_a_pruned_value_writes_it_back_to_the_map(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    # Retention prunes the map while a reply that restores the pruned value streams:
    # stored without it, the reply would reach the model in clear after a resume.
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    w = await hello(ws, consent=CONSENT)
    assert (await chat(ws, "m1", "mail jane@example.org"))[-1]["type"] == "done"
    tid, cid = tenant.tenant_id, UUID(w["conversation_id"])
    upstream.queue("reply", text="I will write to <EMAIL_1> today", chunks=4, delay_ms=300)
    await ws.send_json({"type": "message", "id": "m2", "text": "please confirm"})
    assert (await recv_until(ws, "delta"))[-1]["type"] == "delta"
    # what retention does: the first turn deleted, the map marked and pruned
    await owner_pool.execute(
        "DELETE FROM messages WHERE conversation_id = $1 AND seq IN "
        "(SELECT seq FROM messages WHERE conversation_id = $1 ORDER BY seq LIMIT 2)",
        cid,
    )
    await owner_pool.execute(
        "UPDATE conversations SET map_prune_due = true WHERE conversation_id = $1", cid
    )
    assert await retention.prune_maps(app_pool, Vault(KeyRing((MASTER_KEY,))), tid) == 1
    frames = await recv_until(ws, "done")
    await ws.close()
    assert frames[-1]["type"] == "done" and frames[-1]["seq"] is not None
    assert reply_text(frames).endswith("jane@example.org today")
    mapping = await _open_map(owner_pool, tid, cid)
    assert mapping.value_of("<EMAIL_2>") == "jane@example.org"  # issued again, a new number
    ws = await gateway.ws(tenant.site_key)
    assert (await hello(ws, session_token=w["session_token"]))["resumed"] is True
    assert (await chat(ws, "m3", "thanks"))[-1]["type"] == "done"
    await ws.close()
    sent = str(upstream.requests[-1]["body"]["messages"])
    assert "I will write to <EMAIL_2> today" in sent and "jane@" not in sent


async def test_a_subject_locked_for_deletion_is_checked_again_before_it_goes(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    # The lock's statement may have read the subject as abandoned just before a new
    # session of it committed; the delete must look again, under a later snapshot.
    w = await chatted(offline_gateway, tenant, "hello")
    tid, cid = tenant.tenant_id, UUID(w["conversation_id"])
    sid = await owner_pool.fetchval(
        "SELECT subject_id FROM conversations WHERE conversation_id = $1", cid
    )
    await owner_pool.execute(
        "UPDATE subjects SET created_at = now() - interval '100 days' WHERE subject_id = $1", sid
    )
    cutoff = datetime.now(UTC) - timedelta(days=90)
    async with tenant_tx(app_pool, tid) as conn:
        # as if locked by a statement that saw no session: it has one, committed
        deleted, _ = await conn.fetchrow(retention._DELETE_SUBJECTS, tid, cutoff, [sid])
    assert deleted == 0
    assert (
        await owner_pool.fetchval("SELECT count(*) FROM sessions WHERE subject_id = $1", sid) == 1
    )


async def test_a_map_that_does_not_open_stays_marked_and_the_others_are_pruned(
    gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    # A sealed map that fails to open (damaged, or another master key) must neither
    # stop the pass nor be retried for ever within it, nor lose its mark.
    ws = await gateway.ws(tenant.site_key)
    good = await hello(ws, consent=CONSENT)
    assert (await chat(ws, "m1", "mail jane@example.org"))[-1]["type"] == "done"
    await ws.close()
    ws = await gateway.ws(tenant.site_key)
    bad = await hello(ws, consent=CONSENT)
    assert (await chat(ws, "m1", "mail max@example.net"))[-1]["type"] == "done"
    await ws.close()
    good_c, bad_c = UUID(good["conversation_id"]), UUID(bad["conversation_id"])
    await owner_pool.execute(
        "DELETE FROM messages WHERE conversation_id = ANY($1::uuid[])", [good_c, bad_c]
    )
    await owner_pool.execute(
        "UPDATE conversations SET map_prune_due = true,"
        " redaction_sealed = CASE WHEN conversation_id = $2 THEN '\\x0102'::bytea"
        " ELSE redaction_sealed END WHERE conversation_id = ANY($1::uuid[])",
        [good_c, bad_c],
        bad_c,
    )
    vault = Vault(KeyRing((MASTER_KEY,)))
    pruned = await asyncio.wait_for(retention.prune_maps(app_pool, vault, tenant.tenant_id), 10)
    assert pruned == 1  # jane's entry; max's map could not be opened
    due = "SELECT map_prune_due FROM conversations WHERE conversation_id = $1"
    assert await owner_pool.fetchval(due, good_c) is False
    assert await owner_pool.fetchval(due, bad_c) is True


async def test_a_busy_conversation_is_skipped_and_the_pass_goes_on(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    app_pool: asyncpg.Pool,
) -> None:
    # A conversation locked by a writer (an erasure, a message being stored) is not
    # waited for; the pass deletes every other conversation's old messages and leaves
    # that one to the next pass. It used to stop at the first batch it could not lock.
    busy = await chatted(offline_gateway, tenant, "busy one")
    other = await chatted(offline_gateway, tenant, "the other")
    tid = tenant.tenant_id
    busy_id, other_id = UUID(busy["conversation_id"]), UUID(other["conversation_id"])
    await owner_pool.execute(
        "UPDATE messages SET created_at = now() - interval '100 days'"
        " WHERE conversation_id = ANY($1::uuid[])",
        [busy_id, other_id],
    )
    count = "SELECT count(*) FROM messages WHERE conversation_id = $1"
    async with tenant_tx(app_pool, tid) as conn:
        await conn.execute(
            "SELECT 1 FROM conversations WHERE tenant_id = $1 AND conversation_id = $2 FOR UPDATE",
            tid,
            busy_id,
        )
        # a batch of one message: the busy conversation's come first, in insertion order
        summary = await asyncio.wait_for(run_retention(app_pool, batch=1), 10)
    assert summary["messages_deleted"] == 2
    assert await owner_pool.fetchval(count, other_id) == 0
    assert await owner_pool.fetchval(count, busy_id) == 2
    again = await run_retention(app_pool, batch=1)  # the lock is gone: the next pass
    assert again["messages_deleted"] == 2
    assert await owner_pool.fetchval(count, busy_id) == 0
