"""Digit-laden messages are searched for PII in a helper process (gateway/redactpool.py).

The helper is a real child process speaking over pipes; the gateway tests run a real
gateway on the fake upstream and check what reached the model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from gateway.appkeys import SERVICES
from gateway.fake_upstream import FakeUpstream
from gateway.redactpool import HEAVY_COST, HelperFailed, RedactionPool
from policies import ENTITIES, PlaceholderMap, Redactor, TooCostly
from policies.detect import digit_count
from tests.conftest import Gateway, chat, hello, recv_until
from tests.support import tenant_with

REDACTOR = Redactor(ENTITIES)


def numbers_text(n: int, seed: int = 1) -> str:
    """A message of `n` short lines of orders, dates, amounts and a few real contacts."""
    rnd = random.Random(seed)
    lines = []
    for i in range(n):
        lines.append(
            f"order {rnd.randint(10**6, 10**7)} on 2026-{rnd.randint(1, 12):02d}-"
            f"{rnd.randint(1, 28):02d} paid ${rnd.randint(1, 9999)}.{rnd.randint(0, 99):02d}"
        )
        if i % 7 == 3:
            lines.append("call (415) 555-2671 or +44 20 7946 0958, mail ann@example.org")
    return "\n".join(lines)


def slow_text(chars: int) -> str:
    """Digits one space apart: one long run the phone matcher reads candidate by candidate."""
    rnd = random.Random(7)
    return " ".join(str(rnd.randint(0, 9)) for _ in range(chars // 2))[:chars]


TEXTS = [
    numbers_text(40),
    "Ruf mich an: 030 123456789 oder 0171 2345678, IBAN DE89 3704 0044 0532 0130 00.",
    "Carte 4111 1111 1111 1111, tél. 01 23 45 67 89, ip 203.0.113.9, ssn 123-45-6789 " + "1" * 40,
    # fullwidth digits are digits to the phone matcher, and to the heaviness count
    "call \uff14\uff11\uff15 \uff15\uff15\uff15 \uff12\uff16\uff17\uff11 " * 6,
    "typed <PHONE_1> and <EMAIL_2> then 020 7946 0958 " + "0" * 40,
]


@pytest.fixture
async def pool() -> AsyncIterator[RedactionPool]:
    p = RedactionPool(1)
    yield p
    await p.aclose()


async def test_the_helper_finds_exactly_what_the_inline_search_finds(pool: RedactionPool) -> None:
    for text in TEXTS:
        assert costly(REDACTOR, text), text[:40]
        assert await pool.find(REDACTOR, text) == REDACTOR.find(text)
    # another policy's entities and regions travel with the request
    narrow = Redactor({"phone"}, ("DE",))
    text = TEXTS[1]
    found = await pool.find(narrow, text)
    assert found == narrow.find(text)
    assert {m.entity for m in found} == {"phone"}
    assert found != REDACTOR.find(text)


def costly(redactor: Redactor, text: str) -> bool:
    """Whether the gateway's budget sends ``text`` to the helper."""
    try:
        redactor.find(text, HEAVY_COST)
    except TooCostly:
        return True
    return False


def test_only_messages_costly_to_search_are_heavy() -> None:
    bench_like = (
        "Hello, this is visitor 3 writing about order 1007, which never arrived. Please "
        "email me at jane.doe3@example.com or call +1 415 555 2671 any time today."
    )
    # one number written "+…": one matcher pass, cheaper than the round trip; searched
    # under the budget exactly as without one
    assert not costly(REDACTOR, bench_like)
    assert REDACTOR.find(bench_like, HEAVY_COST) == REDACTOR.find(bench_like) != []
    assert not costly(REDACTOR, "words " * 1000)
    assert not costly(REDACTOR, "Where is order 1007?")
    # one national number (or an order number that could be one): a pass per region
    assert costly(REDACTOR, bench_like.replace("+1 415 555 2671", "(415) 555-2671"))
    assert costly(REDACTOR, "Ruf mich an: 030 12345678")
    assert costly(REDACTOR, numbers_text(5))
    # many short windows behind one long number: each short one costs passes too
    assert costly(REDACTOR, "+1 415 555 2671 " + "12345 | " * 300)
    # a pass over a long window costs by its length, even written "+…"
    one_region = Redactor({"phone"}, ("DE",))
    assert not costly(one_region, "Ruf mich an: 030 12345678")  # one short pass
    assert costly(one_region, "+" + slow_text(4000))
    assert costly(REDACTOR, "+" + slow_text(4000))
    # a run of 32 characters or more written "+…" is counted at every region's pass:
    # whether the first pass settles it is known only after searching (here it does,
    # and the estimate errs towards the helper: 0.25 ms inline, the round trip's cost)
    assert costly(REDACTOR, "+1 415 555 2671 +44 20 7946 0958 +33 1 23 45 67 89")
    assert digit_count("\uff11\uff12 3 \u0664") == 4
    # cards alone: only when the digits would cost the card detector about 1 ms
    cards = Redactor({"credit_card"})
    assert not costly(cards, numbers_text(2))
    assert costly(cards, numbers_text(40))
    # neither phone numbers nor cards to find: every detector is a cheap regex, inline
    assert not costly(Redactor({"email", "iban", "ip", "us_ssn"}), numbers_text(40))
    # no helpers configured: no budget, everything inline
    assert RedactionPool(0).budget == 0 and RedactionPool(1).budget == HEAVY_COST


async def test_a_killed_helper_fails_its_searches_and_is_replaced(pool: RedactionPool) -> None:
    await pool.find(REDACTOR, TEXTS[0])
    (pid,) = pool.pids()
    # three searches of ~1 s each here: the last is still waiting, however fast the machine
    waiting = [asyncio.create_task(pool.find(REDACTOR, slow_text(20_000))) for _ in range(3)]
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(outcomes[-1], HelperFailed), outcomes[-1]
    assert all(isinstance(o, HelperFailed | list) for o in outcomes), outcomes
    assert await pool.find(REDACTOR, TEXTS[1]) == REDACTOR.find(TEXTS[1])
    assert pool.pids() and pool.pids() != [pid]


async def test_a_stuck_helper_is_stopped_after_its_deadline(pool: RedactionPool) -> None:
    await pool.find(REDACTOR, TEXTS[0])
    (pid,) = pool.pids()
    pool.timeout = 0.05
    with pytest.raises(HelperFailed):
        await pool.find(REDACTOR, slow_text(32_000))
    pool.timeout = 30.0
    # the late answer of the stopped helper can never be taken for the next one's
    assert await pool.find(REDACTOR, TEXTS[2]) == REDACTOR.find(TEXTS[2])
    assert pool.pids() != [pid]


async def test_answers_stay_in_order_when_a_caller_goes_away(pool: RedactionPool) -> None:
    await pool.find(REDACTOR, TEXTS[0])
    first = asyncio.create_task(pool.find(REDACTOR, TEXTS[0]))
    second = asyncio.create_task(pool.find(REDACTOR, TEXTS[1]))
    await asyncio.sleep(0)  # both asked
    first.cancel()
    assert await second == REDACTOR.find(TEXTS[1])
    assert await pool.find(REDACTOR, TEXTS[2]) == REDACTOR.find(TEXTS[2])


def _helped() -> float:
    return REGISTRY.get_sample_value("omnigate_redaction_helper_total") or 0.0


async def test_a_digit_laden_message_is_redacted_by_the_helper_end_to_end(
    gateway: Gateway, app_pool: asyncpg.Pool, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    t = await tenant_with(app_pool, max_message_chars=32000)
    text = numbers_text(60)
    before = _helped()
    ws = await gateway.ws(t.site_key)
    await hello(ws, consent={"ai_processing": True, "conversation_storage": True})
    frames = await chat(ws, "m1", text)
    assert frames[0]["type"] == "ack" and frames[-1]["type"] == "done", frames[-1]
    assert _helped() == before + 1
    sent = upstream.requests[-1]["body"]["messages"][-1]["content"]
    assert sent == REDACTOR.redact(text, PlaceholderMap()).text
    assert "(415) 555-2671" not in sent and "<PHONE_1>" in sent and "<EMAIL_1>" in sent
    await ws.close()


async def test_other_visitors_are_answered_while_a_heavy_message_is_searched(
    gateway: Gateway, app_pool: asyncpg.Pool
) -> None:
    t = await tenant_with(app_pool, max_message_chars=32000)
    heavy_ws = await gateway.ws(t.site_key)
    other_ws = await gateway.ws(t.site_key)
    await hello(heavy_ws)
    await hello(other_ws)
    await chat(heavy_ws, "warm", numbers_text(5))  # the helper is running
    loop = asyncio.get_running_loop()

    async def first_frame() -> tuple[dict[str, Any], float]:
        frame = await heavy_ws.receive_json(timeout=30)
        return frame, loop.time()

    heavy_ack = asyncio.create_task(first_frame())
    # ~1 s of phone matching: inline it would hold the loop, and nobody would be served
    await heavy_ws.send_json({"type": "message", "id": "h", "text": slow_text(20_000)})
    await asyncio.sleep(0.05)
    other = await chat(other_ws, "o", "hello, is anyone there?")
    other_done_at = loop.time()
    assert other[-1]["type"] == "done", other
    ack, ack_at = await heavy_ack
    assert ack["type"] == "ack" and ack["id"] == "h", ack
    assert other_done_at < ack_at
    rest = await recv_until(heavy_ws, "done", timeout=30)
    assert rest[-1]["type"] == "done", rest[-1]
    await heavy_ws.close()
    await other_ws.close()


async def test_a_failed_helper_forwards_and_stores_nothing(
    gateway: Gateway,
    app_pool: asyncpg.Pool,
    owner_pool: asyncpg.Pool,
    fake: tuple[FakeUpstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream, _ = fake
    t = await tenant_with(app_pool, max_message_chars=32000)
    ws = await gateway.ws(t.site_key)
    welcome = await hello(ws, consent={"ai_processing": True, "conversation_storage": True})
    svc = gateway.server.app[SERVICES]
    svc.redaction.timeout = 0.05  # the helper cannot finish this one in time
    text = slow_text(31_900) + " write to zed.quill@example.org"
    with caplog.at_level(logging.DEBUG):
        frames = await chat(ws, "h", text)
    assert frames == [
        {"type": "error", "id": "h", "code": "internal", "message": frames[-1]["message"]}
    ]
    # logged raw (before the gateway's own log filter) as a helper failure with its
    # fixed reason, no traceback: an operational condition, not a bug; nothing of the
    # message in it
    [record] = [r for r in caplog.records if r.name == "omnigate.chat"]
    assert record.getMessage() == "redaction helper failed"
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.reason == "the redaction helper took too long"  # type: ignore[attr-defined]
    assert "zed.quill" not in caplog.text and text[:40] not in caplog.text
    assert upstream.requests == []
    stored = await owner_pool.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1::uuid", welcome["conversation_id"]
    )
    assert stored == 0
    svc.redaction.timeout = 30.0
    frames = await chat(ws, "n", numbers_text(10))  # a new helper takes over
    assert frames[-1]["type"] == "done", frames[-1]
    assert len(upstream.requests) == 1
    await ws.close()


async def test_the_helper_outlives_a_terminal_ctrl_c_and_ends_with_its_stdin(
    pool: RedactionPool,
) -> None:
    await pool.find(REDACTOR, TEXTS[0])
    (pid,) = pool.pids()
    os.kill(pid, signal.SIGINT)  # what Ctrl-C sends the whole process group
    await asyncio.sleep(0.2)
    assert await pool.find(REDACTOR, TEXTS[1]) == REDACTOR.find(TEXTS[1])
    assert pool.pids() == [pid]
    helper = pool._helpers[0]
    assert helper is not None and helper.proc.stdin is not None
    helper.proc.stdin.close()  # the gateway went away
    # the reader ends only at the end of the helper's stdout: the helper has exited
    await asyncio.wait_for(asyncio.shield(helper.reader), 10)
    await asyncio.wait_for(helper.proc.wait(), 10)


async def test_a_busy_helper_is_not_taken_for_a_stuck_one(pool: RedactionPool) -> None:
    text = numbers_text(150)
    await pool.find(REDACTOR, text)
    (pid,) = pool.pids()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await pool.find(REDACTOR, text)
    one = loop.time() - began  # one search, as the helper runs it on this machine
    # ten queued searches, each allowed three times one: the last ones time out
    # waiting their turn while the helper keeps answering the ones before them
    pool.timeout = 3 * one
    outcomes = await asyncio.gather(
        *(pool.find(REDACTOR, text) for _ in range(10)), return_exceptions=True
    )
    pool.timeout = 30.0
    expected = REDACTOR.find(text)
    assert outcomes[0] == expected
    assert isinstance(outcomes[-1], HelperFailed), outcomes[-1]
    assert all(o == expected or isinstance(o, HelperFailed) for o in outcomes)
    assert pool.pids() == [pid]  # busy, not stuck: kept
    # the answers owed to the callers who gave up are dropped, not handed to the next
    assert await pool.find(REDACTOR, TEXTS[1]) == REDACTOR.find(TEXTS[1])


async def test_a_helper_that_cannot_start_fails_the_search_and_is_tried_again(
    pool: RedactionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(HelperFailed):
        await pool.find(REDACTOR, TEXTS[0])
    assert pool.pids() == []
    monkeypatch.undo()
    assert await pool.find(REDACTOR, TEXTS[0]) == REDACTOR.find(TEXTS[0])


async def test_a_saturated_helper_refuses_at_once_and_answers_what_it_took() -> None:
    pool = RedactionPool(1, max_owed=10_000)
    try:
        await pool.find(REDACTOR, TEXTS[0])  # started
        text = slow_text(4_000)
        taken = [asyncio.create_task(pool.find(REDACTOR, text)) for _ in range(2)]
        await asyncio.sleep(0)  # both asked: 8,000 characters owed
        with pytest.raises(HelperFailed, match="saturated"):
            await pool.find(REDACTOR, text)  # 12,000 would be owed
        # refused without waiting its turn: the two before it are still being searched
        assert not any(t.done() for t in taken)
        expected = REDACTOR.find(text)
        assert await asyncio.gather(*taken) == [expected, expected]
        # answered, they are owed no more; and an idle helper takes any one message
        assert await pool.find(REDACTOR, slow_text(12_000)) == REDACTOR.find(slow_text(12_000))
    finally:
        await pool.aclose()
