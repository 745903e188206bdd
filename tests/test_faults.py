"""PostgreSQL becoming unreachable mid-traffic, through a TCP proxy the test controls.

The gateway's pool points at the proxy; `cut()` resets every proxied connection in
both directions (so asyncpg sees a reset at once rather than waiting out its 30 s
command timeout) and refuses new ones until `restore()`. The visitor must get a
typed `storage_unavailable` without an `ack`, and the gateway must recover without
a restart: the same client id sent again is stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import ClientWebSocketResponse

from gateway.config import Settings
from gateway.fake_upstream import FakeUpstream
from gateway.provision import NewTenant
from tests.conftest import Database, chat, hello, recv_until, reply_text, start_gateway
from tests.support import parse_sse, post

# A storage failure must be answered quickly: a cut connection is reset, not silent.
FAST = 8.0


class PgProxy:
    """A tiny TCP forwarder with a kill switch."""

    def __init__(self, host: str, port: int, unix_dir: str | None = None) -> None:
        self.host = host
        self.port = port
        # the embedded server listens on a unix socket only
        self.unix_path = f"{unix_dir}/.s.PGSQL.{port}" if unix_dir else None
        self.listen_port = 0
        self.refusing = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            writer.transport.abort()
            return
        try:
            if self.unix_path:
                up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._live.add(pair)
        tasks = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._live.discard(pair)
            for t in tasks:
                t.cancel()
                self._tasks.discard(t)
            for w in pair:
                w.transport.abort()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

    def cut(self) -> None:
        """Reset every live connection (both sides) and refuse new ones."""
        self.refusing = True
        for client, upstream in list(self._live):
            client.transport.abort()
            upstream.transport.abort()
        self._live.clear()

    def restore(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    hostport = f"127.0.0.1:{port}"
    new = f"{netloc[0]}@{hostport}" if len(netloc) == 2 else hostport
    # drop a unix-socket `host=` query: the proxy is reached over TCP
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("host="))
    return urlunsplit(parts._replace(netloc=new, query=query))


@pytest.fixture
async def proxy(database: Database) -> AsyncIterator[PgProxy]:
    parts = urlsplit(database.app_url)
    unix_dir = next((q[5:] for q in parts.query.split("&") if q.startswith("host=")), None)
    p = PgProxy(parts.hostname or "127.0.0.1", parts.port or 5432, unix_dir)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def proxied(settings: Settings, proxy: PgProxy) -> Settings:
    return replace(settings, database_url=_via(settings.database_url, proxy.listen_port))


async def _frames_to(ws: ClientWebSocketResponse, what: str, ftype: str) -> list[dict[str, Any]]:
    try:
        return await recv_until(ws, ftype, timeout=FAST)
    except TimeoutError:
        raise AssertionError(
            f"GATEWAY HUNG: no answer within {FAST}s to {what} while PostgreSQL was unreachable "
            "(expected a prompt storage_unavailable error)"
        ) from None


async def _history(ws: ClientWebSocketResponse) -> list[dict[str, Any]]:
    await ws.send_json({"type": "history"})
    frames = await recv_until(ws, "history", timeout=FAST)
    assert frames[-1]["type"] == "history", frames
    return frames[-1]["messages"]


async def _send_again_after_restore(
    ws: ClientWebSocketResponse, msg_id: str, text: str
) -> list[dict[str, Any]]:
    """Re-send until storage answers (the pool reconnects lazily); bounded."""
    frames: list[dict[str, Any]] = []
    for _ in range(10):
        frames = await chat(ws, msg_id, text)
        if frames[-1]["type"] == "done":
            return frames
        assert frames[-1].get("code") == "storage_unavailable", frames
        await asyncio.sleep(0.5)
    raise AssertionError(f"no recovery after restore: {frames}")


async def test_storage_cut_then_recover(
    proxied: Settings, proxy: PgProxy, tenant: NewTenant
) -> None:
    async for gw in start_gateway(proxied):
        ws = await gw.ws(tenant.site_key)
        await hello(ws)
        ok = await chat(ws, "m1", "before the cut")
        assert ok[0]["type"] == "ack" and ok[-1]["type"] == "done", ok
        assert proxy.accepted > 0, "the gateway did not go through the proxy"

        proxy.cut()
        await ws.send_json({"type": "message", "id": "m2", "text": "during the cut"})
        frames = await _frames_to(ws, "a message", "done")
        assert [f["type"] for f in frames] == ["error"], f"expected only an error: {frames}"
        assert frames[0]["code"] == "storage_unavailable", frames
        assert frames[0]["id"] == "m2" and frames[0].get("retry_after"), frames

        # the socket is still usable while storage is down
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=FAST))["type"] == "pong"

        proxy.restore()
        again = await _send_again_after_restore(ws, "m2", "during the cut")
        types = [f["type"] for f in again]
        assert types[0] == "ack" and types[-1] == "done", again
        assert isinstance(again[0]["seq"], int) and isinstance(again[-1]["seq"], int), again
        assert reply_text(again) == "during the cut"

        messages = await _history(ws)
        users = [m["text"] for m in messages if m["role"] == "user"]
        assert users.count("during the cut") == 1, messages
        assert users.count("before the cut") == 1, messages
        await ws.close()

        # a fresh socket (new session) works without a restart
        ws = await gw.ws(tenant.site_key)
        await hello(ws)
        assert reply_text(await chat(ws, "x", "after recovery")) == "after recovery"
        await ws.close()


async def test_storage_cut_while_streaming(
    proxied: Settings,
    proxy: PgProxy,
    tenant: NewTenant,
    fake: tuple[FakeUpstream, str],
) -> None:
    upstream, url = fake
    s = replace(
        proxied,
        openai_api_key="sk-test",
        upstream_url=url,
        first_token_timeout=5.0,
        idle_timeout=5.0,
        upstream_retries=1,
    )
    async for gw in start_gateway(s):
        ws = await gw.ws(tenant.site_key)
        await hello(ws)
        ok = await chat(ws, "m1", "warm up")
        assert ok[-1]["type"] == "done", ok

        upstream.queue("slow", delay_ms=150)
        text = "one two three four five six seven eight"
        await ws.send_json({"type": "message", "id": "s1", "text": text})
        first = await ws.receive_json(timeout=FAST)
        assert first["type"] == "ack" and isinstance(first["seq"], int), first
        user_seq = first["seq"]
        nxt = await ws.receive_json(timeout=FAST)
        assert nxt["type"] == "delta", nxt
        proxy.cut()  # the reply is mid-stream: its INSERT will find no database
        rest = await _frames_to(ws, "the end of a streamed reply", "done")
        last = rest[-1]
        for f in rest[:-1]:
            assert f["type"] == "delta", rest
        # every connection is cut and new ones are refused before the reply ends, so its
        # write cannot succeed: a `done` here (stored or not) would tell the visitor the
        # reply was kept when it was not; nothing is acknowledged that is not stored
        assert last["type"] == "error", f"expected storage_unavailable, not {rest}"
        assert last["code"] == "storage_unavailable", rest
        assert last["id"] == "s1", rest

        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=FAST))["type"] == "pong"

        proxy.restore()
        # the user message stored before the cut is intact; re-sending answers it once
        again = await _send_again_after_restore(ws, "s1", text)
        assert again[0]["type"] == "ack" and again[0]["seq"] == user_seq, again
        assert again[-1]["type"] == "done", again
        assert reply_text(again) == text

        messages = await _history(ws)
        users = [m for m in messages if m["role"] == "user"]
        assert [m["text"] for m in users].count(text) == 1, messages
        stored = next(m for m in users if m["text"] == text)
        assert stored["seq"] == user_seq, messages
        replies = [m for m in messages if m["role"] == "assistant" and m["reply_to"] == user_seq]
        assert len(replies) == 1 and replies[0]["text"] == text, messages
        await ws.close()


async def test_storage_cut_on_the_http_fallback(
    proxied: Settings, proxy: PgProxy, tenant: NewTenant
) -> None:
    async for gw in start_gateway(proxied):
        status, _, body = await post(gw, tenant.site_key, {"id": "h1", "text": "first"})
        events = parse_sse(body)
        assert status == 200 and events[-1]["type"] == "done"
        # every later POST resumes this session: the resume itself meets the cut
        hello = {"session_token": events[0]["session_token"]}
        proxy.cut()
        status, headers, body = await post(
            gw, tenant.site_key, {"id": "h2", "text": "cut", "hello": hello}
        )
        events = parse_sse(body)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        assert [e["type"] for e in events] == ["error"], events
        assert events[0]["code"] == "storage_unavailable"
        proxy.restore()
        for _ in range(40):
            status, _, body = await post(
                gw, tenant.site_key, {"id": "h3", "text": "back", "hello": hello}
            )
            events = parse_sse(body)
            if events and events[-1]["type"] == "done":
                break
            await asyncio.sleep(0.1)
        assert events[-1]["type"] == "done", events
        # the same conversation, resumed: the message refused during the cut is not in it
        assert events[0]["type"] == "welcome" and events[0]["resumed"] is True, events
        ws = await gw.ws(tenant.site_key)
        await ws.send_json({"type": "hello", "v": 1, **hello})
        await ws.receive_json(timeout=FAST)
        users = [m["text"] for m in await _history(ws) if m["role"] == "user"]
        assert users == ["first", "back"], users
        await ws.close()


async def test_storage_cut_on_an_api_call_is_503(
    proxied: Settings, proxy: PgProxy, tenant: NewTenant
) -> None:
    async for gw in start_gateway(proxied):
        url = gw.url("/api/admin/policy")
        headers = {"Authorization": f"Bearer {tenant.admin_key}"}
        async with gw.session.get(url, headers=headers) as resp:
            assert resp.status == 200
        proxy.cut()
        async with gw.session.get(url, headers=headers) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "storage_unavailable"
            assert resp.headers["Retry-After"] == "1"
        proxy.restore()
        for _ in range(40):
            async with gw.session.get(url, headers=headers) as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.1)
        assert resp.status == 200


async def test_consent_owed_a_reread_while_storage_is_down_forwards_nothing(
    proxied: Settings,
    proxy: PgProxy,
    fake: tuple[FakeUpstream, str],
    app_pool: asyncpg.Pool,
) -> None:
    """A socket told its consent may have changed (a missed bus event) must read it before
    its next message; when it cannot, the message is refused and nothing reaches the model."""
    from gateway import bus
    from gateway.appkeys import SERVICES
    from tests.conftest import on_fake
    from tests.support import tenant_with

    upstream = fake[0]
    t = await tenant_with(app_pool, required_consents=["ai_processing"])
    async for gw in start_gateway(on_fake(proxied, fake[1], upstream_retries=0)):
        ws = await gw.ws(t.site_key)
        # conversation_storage refused: nothing is stored, so a message needs no database
        # to be forwarded, except for the consent read it owes
        await hello(ws, consent={"ai_processing": True, "conversation_storage": False})
        done = (await chat(ws, "m1", "before"))[-1]
        assert done["type"] == "done" and done["seq"] is None
        # what the Redis bus delivers after a gap: every socket owes a re-read
        await gw.server.app[SERVICES].bus.deliver(bus.CONSENT_CHANGED, {"tenant_id": None})
        proxy.cut()
        upstream.reset()
        await ws.send_json({"type": "message", "id": "m2", "text": "during the cut"})
        frames = await _frames_to(ws, "a message owing a consent read", "done")
        assert [f["type"] for f in frames] == ["error"], frames
        assert frames[0]["code"] == "storage_unavailable" and frames[0]["id"] == "m2"
        assert upstream.requests == []  # nothing forwarded on consent that was not read
        proxy.restore()
        again = await _send_again_after_restore(ws, "m2", "during the cut")
        assert again[-1]["type"] == "done"
        assert [r["body"]["messages"][-1]["content"] for r in upstream.requests] == [
            "during the cut"
        ]
        await ws.close()


async def test_storage_down_at_the_cookie_check_keeps_the_cookie_and_upgrades(
    proxied: Settings, proxy: PgProxy, tenant: NewTenant
) -> None:
    """The check before the upgrade cannot tell a dead session from a store that does not
    answer: it keeps the cookie (no Set-Cookie) and leaves the decision to the hello."""
    async for gw in start_gateway(proxied):
        ws = await gw.ws(tenant.site_key)  # the site key and its policy are now cached
        token = (await hello(ws))["session_token"]
        await ws.close()
        proxy.cut()
        ws = await gw.ws(tenant.site_key, headers={"Cookie": f"__Host-omnigate_session={token}"})
        assert "Set-Cookie" not in ws._response.headers
        await ws.send_json({"type": "hello", "v": 1})
        frames = await _frames_to(ws, "a hello", "welcome")
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "storage_unavailable"
        await ws.close()
        proxy.restore()
