"""Upstream failures reach the visitor as typed errors; the stored message stays intact."""

from __future__ import annotations

import asyncio

import pytest

from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant
from tests.conftest import Gateway, chat, hello, recv_until

CASES = [
    ("429", ("rate_limit", {"retry_after": 1}), "upstream_unavailable"),
    ("500", ("error", {"status": 500}), "upstream_unavailable"),
    ("400", ("error", {"status": 400}), "upstream_rejected"),
    ("hang", ("hang_before_first", {}), "upstream_timeout"),
    ("cut", ("cut", {"after": 2}), "upstream_unavailable"),
]


@pytest.mark.parametrize(
    ("mode", "code"), [(m, c) for _, m, c in CASES], ids=[i for i, _, _ in CASES]
)
async def test_upstream_failure_is_typed(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    mode: tuple[str, dict[str, object]],
    code: str,
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    await hello(ws)
    # retries=1 in the fixture: queue the failure for every attempt
    for _ in range(2):
        upstream.queue(mode[0], **mode[1])
    frames = await chat(ws, "m", "will this work")
    assert frames[0]["type"] == "ack" and isinstance(frames[0]["seq"], int)
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == code, frames
    assert frames[-1]["id"] == "m"
    upstream.reset()
    # the user message is stored; the socket keeps serving
    await ws.send_json({"type": "history"})
    page = (await recv_until(ws, "history"))[-1]["messages"]
    assert [m["text"] for m in page if m["role"] == "user"] == ["will this work"]
    frames = await chat(ws, "m2", "and now")
    assert frames[-1]["type"] == "done"
    await ws.close()


async def test_rate_limited_upstream_carries_retry_after(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    await hello(ws)
    upstream.queue("rate_limit", retry_after=30)
    frames = await chat(ws, "m", "hello")
    assert frames[-1]["code"] == "upstream_unavailable"
    # past the client's cap, so no retry: the upstream's own Retry-After is passed on
    assert frames[-1]["retry_after"] == 30
    await ws.close()


async def test_visitor_disconnect_cancels_upstream(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    upstream.queue("slow", delay_ms=300)
    ws = await gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_json({"type": "message", "id": "m", "text": "a b c d e f g h i j"})
    await recv_until(ws, "delta")
    await ws.close()
    await __import__("asyncio").wait_for(upstream.disconnected.wait(), 5)


async def test_resume_marks_only_the_messages_left_without_a_reply(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    w = await hello(ws, consent={"conversation_storage": True})
    assert (await chat(ws, "a", "first"))[-1]["type"] == "done"
    upstream.queue("error", status=400)  # not retried: "second" is left without a reply
    assert (await chat(ws, "b", "second"))[-1]["code"] == "upstream_rejected"
    assert (await chat(ws, "c", "third"))[-1]["type"] == "done"
    await ws.close()

    def shape(page: list[dict[str, object]]) -> list[tuple[object, ...]]:
        return [(m["role"], m["text"], m["status"], m["reply_to"]) for m in page]

    for _ in range(2):  # a second resume adds nothing
        ws = await gateway.ws(tenant.site_key)
        assert (await hello(ws, session_token=w["session_token"]))["resumed"] is True
        await ws.send_json({"type": "history"})
        page = (await recv_until(ws, "history"))[-1]["messages"]
        seq = {m["text"]: m["seq"] for m in page if m["role"] == "user"}
        assert shape(page) == [
            ("user", "first", "complete", None),
            ("assistant", "first", "complete", seq["first"]),
            ("user", "second", "complete", None),
            ("user", "third", "complete", None),
            ("assistant", "third", "complete", seq["third"]),
            ("assistant", "", "interrupted", seq["second"]),
        ]
        await ws.close()


async def test_two_resumes_at_once_mark_an_unanswered_message_once(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    w = await hello(ws, consent={"conversation_storage": True})
    upstream.queue("error", status=400)
    assert (await chat(ws, "a", "left unanswered"))[-1]["code"] == "upstream_rejected"
    await ws.close()
    sockets = [await gateway.ws(tenant.site_key) for _ in range(4)]
    welcomes = await asyncio.gather(*(hello(s, session_token=w["session_token"]) for s in sockets))
    assert all(x["resumed"] for x in welcomes)
    await sockets[0].send_json({"type": "history"})
    page = (await recv_until(sockets[0], "history"))[-1]["messages"]
    assert [(m["role"], m["status"]) for m in page] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
    ]
    for s in sockets:
        await s.close()


async def test_a_reply_cut_at_its_bound_is_stored_cut_and_counted(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    from dataclasses import replace

    from gateway import metrics
    from gateway.appkeys import SERVICES

    upstream, _ = fake
    svc = gateway.server.app[SERVICES]
    assert svc.upstream is not None
    svc.upstream = replace(svc.upstream, max_reply_chars=12)
    cut_before = metrics.MESSAGES.labels(outcome="cut")._value.get()
    upstream.queue("reply", text="a reply far longer than twelve characters")
    ws = await gateway.ws(tenant.site_key)
    await hello(ws)
    frames = await chat(ws, "m", "say a lot")
    assert "".join(f["text"] for f in frames if f["type"] == "delta") == "a reply far "
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "length"
    assert metrics.MESSAGES.labels(outcome="cut")._value.get() == cut_before + 1
    await ws.close()
