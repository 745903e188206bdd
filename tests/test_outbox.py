"""The per-socket writer: order kept, waiting deltas merged, no task while idle."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import orjson
from aiohttp import web

from gateway import protocol
from gateway.ws import Outbox


class SlowSocket:
    """Stands in for the transport only: each write waits until the test releases it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.closed = False

    async def send_str(self, data: str) -> None:
        await self.gate.wait()
        self.sent.append(orjson.loads(data))


async def test_deltas_waiting_behind_a_write_are_merged_in_order() -> None:
    sock = SlowSocket()
    out = Outbox(cast(web.WebSocketResponse, sock), limit=64)
    assert out.task is None
    await out.send(protocol.ack("m", 1))
    for piece in ("a", "b", "c"):
        await out.send(protocol.delta("m", piece))
    await out.send(protocol.delta("other", "x"))
    await out.send(protocol.done("m", 2, "stop"))
    sock.gate.set()
    await out.flush(2.0)
    assert sock.sent == [
        protocol.ack("m", 1),
        protocol.delta("m", "abc"),
        protocol.delta("other", "x"),
        protocol.done("m", 2, "stop"),
    ]
    assert out.task is None  # idle again: no task held for a quiet socket


async def test_full_outbox_makes_the_sender_wait() -> None:
    sock = SlowSocket()
    out = Outbox(cast(web.WebSocketResponse, sock), limit=2)
    await out.send(protocol.ack("m", 1))
    await asyncio.sleep(0)  # the writer takes the first frame and blocks on the gate
    await out.send(protocol.done("m", 2, "stop"))
    await out.send(protocol.ack("n", 3))
    third = asyncio.create_task(out.send(protocol.done("n", 4, "stop")))
    await asyncio.sleep(0.05)
    assert not third.done()
    sock.gate.set()
    await asyncio.wait_for(third, 2.0)
    await out.flush(2.0)
    assert [f["type"] for f in sock.sent] == ["ack", "done", "ack", "done"]
