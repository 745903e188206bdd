"""A worker killed with SIGKILL mid-reply: the visitor resumes elsewhere and loses nothing.

Real processes: `omnigate serve --workers 2` and a slow standalone fake upstream. The
worker holding the visitor's socket is found through /proc and killed while the reply
streams. The visitor reconnects (SO_REUSEPORT hands it to the surviving or the restarted
worker) and resumes: history holds every user message exactly once and the reply that
never completed as an `interrupted` marker; re-sending the same client id answers it
afresh under the original `seq`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.claims import REDIS_LEASE
from tests.conftest import ORIGIN, Database, recv_until
from tests.support import Server, serving_slow_upstream, tenant_with

pytestmark = pytest.mark.timeout(120)

WAIT = 15.0  # bound on every single frame wait


async def connect(
    session: aiohttp.ClientSession, server: Server, site_key: str, **hello: Any
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """Open a socket and say hello; returns it with the welcome."""
    ws = await session.ws_connect(
        server.url(f"/v1/widget/ws?site={site_key}"), headers={"Origin": ORIGIN}
    )
    await ws.send_json({"type": "hello", "v": 1, **hello})
    while (frame := await ws.receive_json(timeout=WAIT))["type"] != "welcome":
        assert frame["type"] != "error", frame
    return ws, frame


async def history(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    await ws.send_json({"type": "history", "limit": 100})
    frames = await recv_until(ws, "history", WAIT)
    assert frames[-1]["type"] == "history", frames
    messages: list[dict[str, Any]] = frames[-1]["messages"]
    return messages


def shape(messages: list[dict[str, Any]]) -> list[tuple[str, str, str, int | None]]:
    return [(m["role"], m["text"], m["status"], m["reply_to"]) for m in messages]


async def test_sigkill_mid_reply_resumes_without_loss(
    database: Database,
    redis_url: str,
    app_pool: asyncpg.Pool,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async with serving_slow_upstream(database, redis_url, tmp_path, 300) as s:
        t = await tenant_with(app_pool)
        ws, welcome = await connect(session, s, t.site_key)
        token, conversation = welcome["session_token"], welcome["conversation_id"]

        a_text = "alpha beta gamma"
        await ws.send_json({"type": "message", "id": "a", "text": a_text})
        frames = await recv_until(ws, "done", WAIT)
        assert frames[0]["type"] == "ack" and frames[-1]["type"] == "done", frames
        a_seq = frames[0]["seq"]

        # B streams one word every 300 ms: about 6 s, long enough to kill it midway
        b_text = " ".join(f"w{i}" for i in range(20))
        await ws.send_json({"type": "message", "id": "b", "text": b_text})
        frames = await recv_until(ws, "delta", WAIT)
        assert [f["type"] for f in frames] == ["ack", "delta"], frames
        b_seq = frames[0]["seq"]
        victim = s.worker_of(ws)
        os.kill(victim, signal.SIGKILL)

        # the socket drops: no done for B ever arrives on it
        dropped_by = time.monotonic() + WAIT
        while True:
            assert time.monotonic() < dropped_by, "socket survived its worker"
            msg = await ws.receive(timeout=WAIT)
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                break
            assert msg.type == aiohttp.WSMsgType.TEXT and msg.json()["type"] == "delta", msg
        await ws.close()

        ws2, welcome2 = await connect(session, s, t.site_key, session_token=token)
        assert welcome2["resumed"] is True and welcome2["conversation_id"] == conversation
        worker2 = s.worker_of(ws2)
        assert worker2 != victim

        before = await history(ws2)
        assert shape(before) == [
            ("user", a_text, "complete", None),
            ("assistant", a_text, "complete", a_seq),
            ("user", b_text, "complete", None),
            ("assistant", "", "interrupted", b_seq),
        ], before
        assert [m["seq"] for m in before if m["role"] == "user"] == [a_seq, b_seq]

        # the widget re-sends its pending message: answered afresh, under its original seq,
        # once the dead worker's claim on the reply has run out (REDIS_LEASE); until then
        # it is told rate_limited and sends again after retry_after, as the widget does
        refused_until = time.monotonic() + REDIS_LEASE + WAIT
        while True:
            await ws2.send_json({"type": "message", "id": "b", "text": b_text})
            frames = await recv_until(ws2, "done", WAIT)
            if frames[-1].get("code") != "rate_limited":
                break
            assert time.monotonic() < refused_until, "the dead worker's claim never ran out"
            await asyncio.sleep(frames[-1]["retry_after"])
        assert frames[0] == {"type": "ack", "id": "b", "seq": b_seq}, frames
        assert frames[-1]["type"] == "done", frames
        assert "".join(f["text"] for f in frames if f["type"] == "delta") == b_text
        b_reply_seq = frames[-1]["seq"]

        # a second resume adds no second marker
        ws3, welcome3 = await connect(session, s, t.site_key, session_token=token)
        assert welcome3["resumed"] is True
        after = await history(ws3)
        assert shape(after) == [
            ("user", a_text, "complete", None),
            ("assistant", a_text, "complete", a_seq),
            ("user", b_text, "complete", None),
            ("assistant", "", "interrupted", b_seq),
            ("assistant", b_text, "complete", b_seq),
        ], after
        assert after[-1]["seq"] == b_reply_seq

        # and a re-send now answers from storage, still without a duplicate
        await ws3.send_json({"type": "message", "id": "b", "text": b_text})
        frames = await recv_until(ws3, "done", WAIT)
        assert frames[0]["seq"] == b_seq and frames[-1]["seq"] == b_reply_seq, frames
        assert len(await history(ws3)) == 5
        for sock in (ws2, ws3):
            await sock.close()
