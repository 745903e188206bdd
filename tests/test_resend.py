"""Re-sent message ids: one reply per stored message, however the re-send arrives."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from gateway import claims as claims_module
from gateway.claims import ReplyClaims
from gateway.config import Settings
from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant
from gateway.ratelimit import RATE_KEY_PREFIX, RedisRateLimiter
from gateway.redisconn import connect
from tests.conftest import Gateway, chat, hello, on_fake, recv_until, reply_text, start_gateway
from tests.support import parse_sse, post, until

STORY = {"type": "message", "id": "dup", "text": "tell me a story please"}


async def complete_replies(pool: asyncpg.Pool, conversation_id: str, user_seq: int) -> int:
    """The complete assistant rows stored as replies to one visitor message."""
    n: int = await pool.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1 AND reply_to = $2"
        " AND role = 'assistant' AND status = 'complete'",
        uuid.UUID(conversation_id),
        user_seq,
    )
    return n


def busy(frame: dict[str, object], msg_id: str) -> bool:
    """The answer to a re-send whose reply is streaming elsewhere: retry after a wait."""
    return (
        frame["type"] == "error"
        and frame["code"] == "rate_limited"
        and frame.get("reason") == "busy"  # not the visitor's own rate: the widget says so
        and frame["id"] == msg_id
        and isinstance(frame["retry_after"], float)
        and frame["retry_after"] > 0
    )


async def resend_while_streaming(
    first: Gateway, second: Gateway, tenant: NewTenant, upstream: FakeUpstream
) -> tuple[str, int]:
    """Send STORY on a socket of `first`, re-send it on `second` while the reply streams:
    the re-send is told to wait, and its retry is answered from storage."""
    upstream.script("slow", delay_ms=60)
    a = await first.ws(tenant.site_key)
    welcome = await hello(a)
    # the widget reconnected while the server has not yet seen the old socket drop
    b = await second.ws(tenant.site_key)
    await hello(b, session_token=welcome["session_token"])
    await a.send_json(STORY)
    ack = (await recv_until(a, "ack"))[-1]
    await b.send_json(STORY)
    assert busy((await recv_until(b, "done"))[-1], "dup")
    answered = await recv_until(a, "done")
    assert answered[-1]["type"] == "done", answered
    again = await chat(b, "dup", STORY["text"])  # the widget's retry, after the wait
    assert again[0] == ack and again[-1] == answered[-1]
    assert reply_text(again) == reply_text(answered)
    assert len(upstream.requests) == 1
    for ws in (a, b):
        await ws.close()
    return welcome["conversation_id"], ack["seq"]


async def test_a_message_resent_on_another_socket_while_its_reply_streams_is_answered_once(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
) -> None:
    conversation, seq = await resend_while_streaming(gateway, gateway, tenant, fake[0])
    assert await complete_replies(owner_pool, conversation, seq) == 1


@pytest.fixture
async def two_processes(
    settings: Settings, fake: tuple[FakeUpstream, str], redis_url: str
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways (each its own services, as two worker processes) sharing Redis."""
    s = on_fake(replace(settings, redis_url=redis_url), fake[1])
    async for a in start_gateway(s):
        async for b in start_gateway(s):
            yield a, b


async def test_the_claim_on_a_reply_holds_across_processes(
    two_processes: tuple[Gateway, Gateway],
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
) -> None:
    first, second = two_processes
    conversation, seq = await resend_while_streaming(first, second, tenant, fake[0])
    assert await complete_replies(owner_pool, conversation, seq) == 1


async def test_two_overlapping_posts_with_one_id_get_one_reply(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
) -> None:
    upstream, _ = fake
    _, _, body = await post(gateway, tenant.site_key, {"id": "p0", "text": "start"})
    welcome = parse_sse(body)[0]
    upstream.script("slow", delay_ms=60)
    message = {
        "id": "same",
        "text": "tell me more",
        "hello": {"session_token": welcome["session_token"]},
    }
    streaming = asyncio.create_task(post(gateway, tenant.site_key, message))
    await until(lambda: len(upstream.requests) == 2)  # the first POST's reply is streaming
    _, _, overlapping = await post(gateway, tenant.site_key, message)
    assert busy(parse_sse(overlapping)[-1], "same")
    events = parse_sse((await streaming)[2])
    ack, done = events[1], events[-1]
    assert (ack["type"], done["type"]) == ("ack", "done"), events
    _, _, retried = await post(gateway, tenant.site_key, message)
    assert parse_sse(retried)[-1] == done  # answered from storage
    assert len(upstream.requests) == 2
    assert await complete_replies(owner_pool, welcome["conversation_id"], ack["seq"]) == 1


async def test_an_id_resent_with_another_text_is_refused(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    assert (await chat(ws, "m", "first text"))[-1]["type"] == "done"
    frames = await chat(ws, "m", "a completely different question")
    assert [f["type"] for f in frames] == ["error"]
    assert (frames[0]["code"], frames[0]["id"]) == ("bad_request", "m")
    assert "another message" in frames[0]["message"]
    count = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1",
        uuid.UUID(welcome["conversation_id"]),
    )
    assert count == 2
    await ws.close()


async def test_an_invalid_message_id_is_echoed_when_short_enough(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_json({"type": "message", "id": "", "text": "hi"})
    empty = await ws.receive_json(timeout=5)
    assert (empty["code"], empty["id"]) == ("bad_request", "")
    # an id over the limit is not echoed back
    await ws.send_json({"type": "message", "id": "x" * 129, "text": "hi"})
    long = await ws.receive_json(timeout=5)
    assert long["code"] == "bad_request" and "id" not in long
    await ws.send_json({"type": "message", "id": "x" * 129, "text": 5})
    assert "id" not in await ws.receive_json(timeout=5)
    await ws.close()


async def test_a_reply_cut_off_by_a_closed_socket_gives_its_claim_back(
    two_processes: tuple[Gateway, Gateway],
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
) -> None:
    first, second = two_processes
    upstream, _ = fake
    upstream.script("slow", delay_ms=200)
    a = await first.ws(tenant.site_key)
    welcome = await hello(a)
    await a.send_json(STORY)
    ack = (await recv_until(a, "ack"))[-1]
    await recv_until(a, "delta")
    await a.close()  # the visitor went away mid-reply: the claim ends with it
    upstream.script("slow", delay_ms=1)
    b = await second.ws(tenant.site_key)
    await hello(b, session_token=welcome["session_token"])
    deadline = asyncio.get_running_loop().time() + 5
    while busy((frames := await chat(b, "dup", STORY["text"]))[-1], "dup"):
        assert asyncio.get_running_loop().time() < deadline, "the claim was never released"
        await asyncio.sleep(0.1)  # the server may not have seen the close yet
    assert frames[0]["seq"] == ack["seq"] and frames[-1]["type"] == "done"
    assert await complete_replies(owner_pool, welcome["conversation_id"], ack["seq"]) == 1
    await b.close()


async def test_a_claim_is_taken_with_the_tokens_and_is_exclusive(redis_url: str) -> None:
    client = connect(redis_url)
    limiter, claims = RedisRateLimiter(client), ReplyClaims(client)
    tag = f"{{{uuid.uuid4()}}}"
    buckets = [(f"{tag}:s", 100)]
    first, second, third = (claims.new(f"{tag}:c") for _ in range(3))
    try:
        assert await limiter.hit(buckets, first) is None and first.taken is True
        assert await limiter.hit(buckets, second) is None and second.taken is False
        assert await claims.settle(first, 60.0) and not await claims.settle(second, 60.0)
        claims.release(second)  # not the holder: gives nothing back
        claims.release(first)  # failed, not answered: given back
        await until(lambda: not claims._background)
        assert await limiter.hit(buckets, third) is None and third.taken is True
        # a refused message takes no claim
        assert await limiter.hit([(f"{tag}:full", 1)]) is None
        refused = claims.new(f"{tag}:other")
        assert await limiter.hit([(f"{tag}:full", 1)], refused) is not None
        assert refused.taken is None and await client.exists(refused.redis_key) == 0
        answered = third
        answered.answered = True
        await claims.settle(answered, 60.0)
        claims.release(answered)  # stored: left to run out, no round trip
        assert not claims._background and await client.exists(answered.redis_key) == 1
    finally:
        await client.delete(first.redis_key, RATE_KEY_PREFIX + f"{tag}:s")
        await client.delete(RATE_KEY_PREFIX + f"{tag}:full")
        await client.aclose()


async def test_a_claim_in_this_process_is_exclusive_until_released() -> None:
    claims = ReplyClaims(None)
    first, second = claims.new("k"), claims.new("k")
    assert await claims.settle(first, 60.0) and not await claims.settle(second, 60.0)
    claims.release(second)
    assert not await claims.settle(claims.new("k"), 60.0)
    claims.release(first)
    assert await claims.settle(claims.new("k"), 60.0)


async def test_a_claim_in_redis_is_renewed_while_held_and_ends_soon_after_its_holder(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claims_module, "REDIS_LEASE", 0.3)
    client = connect(redis_url)
    limiter, claims = RedisRateLimiter(client), ReplyClaims(client)
    tag = f"{{{uuid.uuid4()}}}"
    buckets = [(f"{tag}:s", 100)]
    holder = claims.new(f"{tag}:c")
    try:
        assert await limiter.hit(buckets, holder) is None and await claims.settle(holder, 60.0)
        await asyncio.sleep(0.8)  # well past one lease: the holder renewed it
        other = claims.new(f"{tag}:c")
        assert await limiter.hit(buckets, other) is None and other.taken is False
        assert holder.renewal is not None
        holder.renewal.cancel()  # the holder's process dies: no release, no renewal
        await asyncio.sleep(0.4)
        last = claims.new(f"{tag}:c")
        assert await limiter.hit(buckets, last) is None and last.taken is True
    finally:
        await client.delete(holder.redis_key, RATE_KEY_PREFIX + f"{tag}:s")
        await client.aclose()


async def test_a_claim_taken_with_the_tokens_is_given_back_even_before_it_is_settled(
    redis_url: str,
) -> None:
    # the message failed between its rate-limit call and its write (the visitor left
    # while the redaction helper searched it): a re-send must not wait out the lease
    client = connect(redis_url)
    limiter, claims = RedisRateLimiter(client), ReplyClaims(client)
    tag = f"{{{uuid.uuid4()}}}"
    claim = claims.new(f"{tag}:c")
    try:
        assert await limiter.hit([(f"{tag}:s", 100)], claim) is None and claim.taken
        claims.release(claim)
        await until(lambda: not claims._background)
        assert await client.exists(claim.redis_key) == 0
    finally:
        await client.delete(claim.redis_key, RATE_KEY_PREFIX + f"{tag}:s")
        await client.aclose()


async def test_a_claim_whose_lease_ran_out_before_it_was_settled_is_not_held(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a message searched for longer than the lease in the redaction helper: another
    # sender took the claim meanwhile, and this one must not answer as well
    monkeypatch.setattr(claims_module, "REDIS_LEASE", 0.3)
    client = connect(redis_url)
    limiter, claims = RedisRateLimiter(client), ReplyClaims(client)
    tag = f"{{{uuid.uuid4()}}}"
    buckets = [(f"{tag}:s", 100)]
    slow, other = claims.new(f"{tag}:c"), claims.new(f"{tag}:c")
    try:
        assert await limiter.hit(buckets, slow) is None and slow.taken
        await asyncio.sleep(0.4)
        assert await limiter.hit(buckets, other) is None and other.taken
        assert await claims.settle(other, 60.0)
        assert not await claims.settle(slow, 60.0)
        claims.release(slow)  # not the holder: the other's claim stays
        await until(lambda: not claims._background)
        assert await client.get(other.redis_key) == other.token.encode()
    finally:
        for c in (slow, other):
            if c.renewal is not None:
                c.renewal.cancel()
        await client.delete(slow.redis_key, RATE_KEY_PREFIX + f"{tag}:s")
        await client.aclose()
