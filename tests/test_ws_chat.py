"""End to end over a real socket: hello, chat, resume, duplicates, history."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant, create_tenant
from tests.conftest import ORIGIN, Gateway, chat, hello, recv_until, reply_text


async def test_full_chat_streams_and_stores(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    # paced chunks: deltas that queue behind a slow write are merged, so pace them
    upstream.queue("slow", delay_ms=20)
    ws = await gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    assert welcome["resumed"] is False
    assert len(welcome["session_token"]) >= 22
    frames = await chat(ws, "m1", "hello there friend")
    types = [f["type"] for f in frames]
    assert types[0] == "ack" and types[-1] == "done", frames
    assert types.count("delta") >= 2  # streamed, not one blob
    assert reply_text(frames) == "hello there friend"
    ack, done = frames[0], frames[-1]
    assert isinstance(ack["seq"], int) and done["seq"] > ack["seq"]
    assert done["finish_reason"] == "stop"
    assert upstream.requests[-1]["body"]["messages"][-1] == {
        "role": "user",
        "content": "hello there friend",
    }
    await ws.close()


async def test_resume_with_token_keeps_conversation(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    first = await hello(ws)
    await chat(ws, "a", "first message")
    await ws.close()
    ws2 = await offline_gateway.ws(tenant.site_key)
    second = await hello(ws2, session_token=first["session_token"])
    assert second["resumed"] is True
    assert second["conversation_id"] == first["conversation_id"]
    await ws2.send_json({"type": "history"})
    page = await recv_until(ws2, "history")
    texts = [(m["role"], m["text"]) for m in page[-1]["messages"]]
    assert texts == [("user", "first message"), ("assistant", "first message")]
    await ws2.close()


async def test_a_resume_writes_the_session_only_when_something_changed(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    async def seen(cid: str) -> asyncpg.Record:
        row = await owner_pool.fetchrow(
            "SELECT last_seen_at, expires_at, gpc, xmin::text::bigint AS version"
            " FROM sessions WHERE conversation_id = $1::uuid",
            cid,
        )
        assert row is not None
        return row

    async def resume(token: str, **fields: object) -> None:
        ws = await offline_gateway.ws(tenant.site_key)
        assert (await hello(ws, session_token=token, **fields))["resumed"] is True
        await ws.close()

    ws = await offline_gateway.ws(tenant.site_key)
    first = await hello(ws)
    await ws.close()
    token, cid = first["session_token"], first["conversation_id"]
    created = await seen(cid)
    await resume(token)  # within the minute, nothing changed: no write at all
    assert await seen(cid) == created
    await resume(token, signals={"gpc": True})  # a changed signal is written at once
    after_gpc = await seen(cid)
    assert after_gpc["gpc"] is True and after_gpc["version"] != created["version"]
    assert after_gpc["expires_at"] > created["expires_at"]  # the write slid the expiry
    # a touch over a minute old is refreshed: last seen now, expiry slid again
    await owner_pool.execute(
        "UPDATE sessions SET last_seen_at = now() - interval '2 minutes'"
        " WHERE conversation_id = $1::uuid",
        cid,
    )
    await resume(token, signals={"gpc": True})
    refreshed = await seen(cid)
    assert refreshed["last_seen_at"] > after_gpc["last_seen_at"] - timedelta(seconds=1)
    assert refreshed["expires_at"] > after_gpc["expires_at"]


async def test_consent_in_a_resuming_hello_is_recorded_only_when_it_changes(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    async def decisions(cid: str) -> list[tuple[str, bool]]:
        rows = await owner_pool.fetch(
            "SELECT purpose, granted FROM consents WHERE subject_id ="
            " (SELECT subject_id FROM sessions WHERE conversation_id = $1::uuid)"
            " ORDER BY consent_id",
            cid,
        )
        return [(r["purpose"], r["granted"]) for r in rows]

    async def resume(token: str, **fields: object) -> dict[str, object]:
        ws = await offline_gateway.ws(tenant.site_key)
        welcome = await hello(ws, session_token=token, **fields)
        await ws.close()
        assert welcome["resumed"] is True
        return welcome

    ws = await offline_gateway.ws(tenant.site_key)
    first = await hello(ws, consent={"analytics": True})
    await ws.close()
    token, cid = first["session_token"], first["conversation_id"]
    assert "analytics" in first["policy"]["granted"]
    assert await decisions(cid) == [("analytics", True)]
    # the same consent again (the SSE fallback sends its hello with every message)
    again = await resume(token, consent={"analytics": True})
    assert "analytics" in again["policy"]["granted"]  # type: ignore[index]
    assert await decisions(cid) == [("analytics", True)]
    revoked = await resume(token, consent={"analytics": False})
    assert "analytics" not in revoked["policy"]["granted"]  # type: ignore[index]
    assert await decisions(cid) == [("analytics", True), ("analytics", False)]
    # a resume without consent reads the latest decision back from storage
    plain = await resume(token)
    assert "analytics" not in plain["policy"]["granted"]  # type: ignore[index]


async def test_a_refused_hello_creates_no_session(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    async def sessions() -> int:
        n: int = await owner_pool.fetchval(
            "SELECT count(*) FROM sessions WHERE tenant_id = $1", tenant.tenant_id
        )
        return n

    before = await sessions()
    ws = await offline_gateway.ws(tenant.site_key)
    await ws.send_json({"type": "hello", "v": 1, "consent": {"telepathy": True}})
    frame = await ws.receive_json()
    assert frame["type"] == "error" and frame["code"] == "bad_request", frame
    await ws.close()
    assert await sessions() == before


async def test_unknown_token_starts_new_session(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws, session_token="forged-token-that-does-not-exist")
    assert welcome["resumed"] is False
    assert welcome["session_token"] != "forged-token-that-does-not-exist"
    await ws.close()


async def test_duplicate_client_id_is_answered_from_storage(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    first = await chat(ws, "same-id", "tell me once")
    calls = len(upstream.requests)
    again = await chat(ws, "same-id", "tell me once")
    assert len(upstream.requests) == calls  # not forwarded twice
    assert reply_text(again) == reply_text(first)
    assert again[0]["seq"] == first[0]["seq"] and again[-1]["seq"] == first[-1]["seq"]
    count = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1::uuid", welcome["conversation_id"]
    )
    assert count == 2
    await ws.close()


async def test_ping_pong_and_history_paging(offline_gateway: Gateway, tenant: NewTenant) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_json({"type": "ping"})
    assert (await ws.receive_json(timeout=5))["type"] == "pong"
    for i in range(3):
        await chat(ws, f"m{i}", f"message number {i}")
    await ws.send_json({"type": "history", "limit": 2})
    page = (await recv_until(ws, "history"))[-1]["messages"]
    assert [m["text"] for m in page] == ["message number 2", "message number 2"]
    await ws.send_json({"type": "history", "before": page[0]["seq"], "limit": 2})
    older = (await recv_until(ws, "history"))[-1]["messages"]
    assert [m["role"] for m in older] == ["user", "assistant"]
    assert older[0]["text"] == "message number 1"
    await ws.close()


async def test_resent_unanswered_message_reaches_the_model_once(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    for _ in range(2):  # every attempt fails: stored, never answered
        upstream.queue("error", status=500)
    assert (await chat(ws, "b", "unanswered question"))[-1]["type"] == "error"
    await ws.close()
    ws = await gateway.ws(tenant.site_key)
    await hello(ws, session_token=welcome["session_token"])
    frames = await chat(ws, "b", "unanswered question")
    assert frames[-1]["type"] == "done"
    sent = upstream.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent].count("unanswered question") == 1
    await ws.close()


async def test_a_resumed_session_gives_the_model_its_earlier_turns_redacted(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    assert (await chat(ws, "a", "mail me at jane@example.com"))[-1]["type"] == "done"
    for _ in range(2):  # every attempt fails: stored, never answered
        upstream.queue("error", status=500)
    assert (await chat(ws, "b", "second question"))[-1]["type"] == "error"
    await ws.close()
    expected = [
        ("user", "mail me at <EMAIL_1>"),
        ("assistant", "mail me at <EMAIL_1>"),
        ("user", "second question"),
    ]
    # a resume rebuilds the context from storage: the placeholder map and the stored
    # turns redacted again; the first resume also marks "b" interrupted, and the second
    # finds that (empty) marker among the recent rows and leaves it out
    for turn in ("third", "fourth"):
        ws = await gateway.ws(tenant.site_key)
        await hello(ws, session_token=welcome["session_token"])
        assert (await chat(ws, turn, turn))[-1]["type"] == "done"
        await ws.close()
        sent = upstream.requests[-1]["body"]["messages"]
        assert [(m["role"], m["content"]) for m in sent[1:]] == [*expected, ("user", turn)]
        expected += [("user", turn), ("assistant", turn)]


async def test_a_process_without_the_key_cached_resumes_with_the_key_the_resume_read(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    from gateway.appkeys import SERVICES

    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    assert (await chat(ws, "a", "mail me at jane@example.com"))[-1]["type"] == "done"
    await ws.close()
    # as after a restart, or on another worker: no data key in this process's cache
    gateway.server.app[SERVICES].vault.cache.clear()
    ws = await gateway.ws(tenant.site_key)
    assert (await hello(ws, session_token=welcome["session_token"]))["resumed"] is True
    assert (await chat(ws, "b", "again"))[-1]["type"] == "done"
    await ws.close()
    sent = upstream.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent[1:]] == [
        "mail me at <EMAIL_1>",
        "mail me at <EMAIL_1>",
        "again",
    ]


async def test_a_session_whose_key_is_destroyed_cannot_be_resumed(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    from gateway.appkeys import SERVICES

    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    await chat(ws, "a", "something to keep")
    await ws.close()
    await owner_pool.execute(
        "DELETE FROM subject_keys WHERE subject_id ="
        " (SELECT subject_id FROM sessions WHERE conversation_id = $1::uuid)",
        welcome["conversation_id"],
    )
    offline_gateway.server.app[SERVICES].vault.cache.clear()
    ws = await offline_gateway.ws(tenant.site_key)
    await ws.send_json({"type": "hello", "v": 1, "session_token": welcome["session_token"]})
    frame = await ws.receive_json()
    assert frame["type"] == "error" and frame["code"] == "session_invalid", frame
    await ws.close()


async def test_welcome_says_whether_messages_are_kept(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws, consent={"ai_processing": True})
    assert welcome["policy"]["storage"] == "on"  # this policy keeps transcripts by default
    await ws.send_json({"type": "consent", "revoke": ["conversation_storage"]})
    welcome = (await recv_until(ws, "welcome"))[-1]
    assert welcome["policy"]["storage"] == "off"
    frames = await chat(ws, "m", "not to be kept")
    assert frames[0] == {"type": "ack", "id": "m", "seq": None}
    stored = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1::uuid",
        welcome["conversation_id"],
    )
    assert stored == 0


async def test_new_sessions_are_rate_limited_per_ip(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    # each tokenless hello writes a subject, a key, a session and a conversation
    from tests.support import call

    status, _ = await call(
        offline_gateway,
        "PUT",
        "/api/admin/policy",
        tenant.admin_key,
        json={"rate_limit": {"new_sessions_per_ip_per_minute": 2}},
    )
    assert status == 200
    tokens = []
    for _ in range(2):
        ws = await offline_gateway.ws(tenant.site_key)
        tokens.append((await hello(ws))["session_token"])
        await ws.close()
    ws = await offline_gateway.ws(tenant.site_key)
    await ws.send_json({"type": "hello", "v": 1})
    frame = await ws.receive_json(timeout=3)
    assert (frame["type"], frame["code"]) == ("error", "rate_limited") and frame["retry_after"] > 0
    # resuming is not a new session: still allowed
    assert (await hello(ws, session_token=tokens[0]))["resumed"] is True
    await ws.close()
    sessions = await owner_pool.fetchval(
        "SELECT count(*) FROM sessions WHERE tenant_id = $1", tenant.tenant_id
    )
    assert sessions == 2


async def test_message_numbers_count_this_conversation_only(
    offline_gateway: Gateway, tenant: NewTenant, app_pool: asyncpg.Pool
) -> None:
    """A visitor's seq numbers are positions in its own conversation: the traffic of
    another conversation, of another tenant, between two of its messages leaves no gap
    (a number shared by every tenant told each how much the others stored)."""
    other = await create_tenant(app_pool, "seq-other", [ORIGIN])
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    first = await chat(ws, "a", "first")
    busy = await offline_gateway.ws(other.site_key)
    await hello(busy)
    for i in range(5):
        await chat(busy, f"o{i}", "another site's visitor")
    second = await chat(ws, "b", "second")
    await busy.close()
    assert [(f["type"], f["seq"]) for f in first + second if f["type"] in ("ack", "done")] == [
        ("ack", 1),
        ("done", 2),
        ("ack", 3),
        ("done", 4),
    ]
    # a re-send of a stored message takes no number of its own
    again = await chat(ws, "b", "second")
    assert [f["seq"] for f in again if f["type"] in ("ack", "done")] == [3, 4]
    third = await chat(ws, "c", "third")
    assert [f["seq"] for f in third if f["type"] in ("ack", "done")] == [5, 6]
    await ws.send_json({"type": "history"})
    page = (await recv_until(ws, "history"))[-1]["messages"]
    assert [m["seq"] for m in page] == [1, 2, 3, 4, 5, 6]
    await ws.close()
