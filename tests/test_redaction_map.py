"""The conversation's redaction map stays whole when more than one connection writes it.

A resume redacts the stored turns again with the stored map; a value missing from that
map would reach the model in clear. Two tabs of one session each issue placeholders, and
retention may clear the map under an open tab: every visitor message is written only
onto the map its connection expects (migrations/0014), else it reads the map again.
"""

from __future__ import annotations

import asyncpg

from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant
from tests.conftest import Gateway, chat, hello, recv_until, reply_text

EMAILS = ("ann@example.org", "bob@example.net", "cyd@example.com")


def sent_to_model(upstream: FakeUpstream) -> str:
    return repr([r["body"]["messages"] for r in upstream.requests])


async def test_two_tabs_of_one_session_keep_one_map(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    tab1 = await gateway.ws(tenant.site_key)
    token = (await hello(tab1))["session_token"]
    tab2 = await gateway.ws(tenant.site_key)
    assert (await hello(tab2, session_token=token))["resumed"] is True
    # both loaded the same (empty) map; each now issues <EMAIL_1> for its own value
    assert (await chat(tab1, "a", f"mail {EMAILS[0]}"))[-1]["type"] == "done"
    frames = await chat(tab2, "b", f"or {EMAILS[1]}")
    assert reply_text(frames) == f"or {EMAILS[1]}"  # restored from the merged map
    assert upstream.requests[-1]["body"]["messages"][-1]["content"] == "or <EMAIL_2>"
    frames = await chat(tab1, "c", f"and {EMAILS[1]} too")  # tab 1 learns tab 2's value
    assert upstream.requests[-1]["body"]["messages"][-1]["content"] == "and <EMAIL_2> too"
    for ws in (tab1, tab2):
        await ws.close()
    # a later visit rebuilds the context from storage: every stored value is in the map
    ws = await gateway.ws(tenant.site_key)
    await hello(ws, session_token=token)
    assert (await chat(ws, "d", "anything new?"))[-1]["type"] == "done"
    context = [m["content"] for m in upstream.requests[-1]["body"]["messages"][1:]]
    assert "mail <EMAIL_1>" in context and "or <EMAIL_2>" in context, context
    leaked = [e for e in EMAILS if e in sent_to_model(upstream)]
    assert leaked == []


async def test_a_map_cleared_under_an_open_tab_is_written_again(
    gateway: Gateway,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
    owner_pool: asyncpg.Pool,
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    w = await hello(ws)
    assert (await chat(ws, "a", f"mail {EMAILS[2]}"))[-1]["type"] == "done"
    # retention, while the tab stays open: the messages go, then the map
    async with owner_pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM messages WHERE conversation_id = $1::uuid", w["conversation_id"]
        )
        await conn.execute(
            "UPDATE conversations SET redaction_sealed = NULL WHERE conversation_id = $1::uuid",
            w["conversation_id"],
        )
    # the tab still knows the value: the message must not be stored without it in a map
    assert (await chat(ws, "b", f"still {EMAILS[2]}"))[-1]["type"] == "done"
    sent = upstream.requests[-1]["body"]["messages"]
    # the turns retention deleted left the context with the map they spoke of
    assert [m["content"] for m in sent[1:]] == ["still <EMAIL_1>"]
    await ws.close()
    ws = await gateway.ws(tenant.site_key)
    await hello(ws, session_token=w["session_token"])
    assert (await chat(ws, "c", "and now?"))[-1]["type"] == "done"
    assert EMAILS[2] not in sent_to_model(upstream)


async def test_placeholders_issued_while_nothing_was_kept_are_sealed_when_keeping_resumes(
    gateway: Gateway, tenant: NewTenant, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, _ = fake
    ws = await gateway.ws(tenant.site_key)
    token = (await hello(ws, consent={"ai_processing": True}))["session_token"]
    await ws.send_json({"type": "consent", "revoke": ["conversation_storage"]})
    await recv_until(ws, "welcome")
    assert (await chat(ws, "a", f"mail {EMAILS[0]}"))[-1]["type"] == "done"  # not kept
    await ws.send_json({"type": "consent", "grant": ["conversation_storage"]})
    await recv_until(ws, "welcome")
    # kept now, and it adds no placeholder: the map this connection holds must be sealed
    assert (await chat(ws, "b", f"again {EMAILS[0]}"))[-1]["type"] == "done"
    await ws.close()
    ws = await gateway.ws(tenant.site_key)
    await hello(ws, session_token=token)
    assert (await chat(ws, "c", "and now?"))[-1]["type"] == "done"
    context = [m["content"] for m in upstream.requests[-1]["body"]["messages"][1:]]
    assert "again <EMAIL_1>" in context, context
    assert EMAILS[0] not in sent_to_model(upstream)
