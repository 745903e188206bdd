"""The per-socket writer: order kept, no task while the socket keeps up, waiting deltas
merged, a full outbox makes the sender wait."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import orjson
from aiohttp import WSMsgType, web

from gateway import protocol
from gateway.ws import Outbox


class SlowSocket:
    """Stands in for the transport only: while paused, a write waits for the test."""

    def __init__(self, *, paused: bool) -> None:
        self.sent: list[dict[str, Any]] = []
        self.writable = asyncio.Event()
        if not paused:
            self.writable.set()
        self.closed = False

    async def send_frame(self, data: bytes, opcode: WSMsgType) -> None:
        assert opcode == WSMsgType.TEXT
        await self.writable.wait()
        self.sent.append(orjson.loads(data))


async def test_a_frame_with_nothing_ahead_is_written_by_its_sender() -> None:
    sock = SlowSocket(paused=False)
    out = Outbox(cast(web.WebSocketResponse, sock), limit=64)
    await out.send(protocol.ack("m", 1))
    await out.send(protocol.delta("m", "a"))
    # written before send returned, without a writer task
    assert sock.sent == [protocol.ack("m", 1), protocol.delta("m", "a")]
    assert out.task is None and out.frames == []


async def test_deltas_waiting_behind_a_write_are_merged_in_order() -> None:
    sock = SlowSocket(paused=True)
    out = Outbox(cast(web.WebSocketResponse, sock), limit=64)
    first = asyncio.create_task(out.send(protocol.ack("m", 1)))
    await asyncio.sleep(0)  # the ack's sender is now inside its write, waiting
    for piece in ("a", "b", "c"):
        await out.send(protocol.delta("m", piece))
    await out.send(protocol.delta("other", "x"))
    await out.send(protocol.done("m", 2, "stop"))
    assert sock.sent == [] and len(out.frames) == 5
    sock.writable.set()
    await asyncio.wait_for(first, 2.0)
    await out.flush(2.0)
    assert sock.sent == [
        protocol.ack("m", 1),
        protocol.delta("m", "abc"),
        protocol.delta("other", "x"),
        protocol.done("m", 2, "stop"),
    ]
    assert out.task is None  # idle again: no task held for a quiet socket


async def test_full_outbox_makes_the_sender_wait() -> None:
    sock = SlowSocket(paused=True)
    out = Outbox(cast(web.WebSocketResponse, sock), limit=2)
    first = asyncio.create_task(out.send(protocol.ack("m", 1)))
    await asyncio.sleep(0)
    await out.send(protocol.done("m", 2, "stop"))
    await out.send(protocol.ack("n", 3))
    third = asyncio.create_task(out.send(protocol.done("n", 4, "stop")))
    await asyncio.sleep(0.05)
    assert not third.done()
    sock.writable.set()
    await asyncio.wait_for(asyncio.gather(first, third), 2.0)
    await out.flush(2.0)
    assert [f["type"] for f in sock.sent] == ["ack", "done", "ack", "done"]


async def test_frames_queued_behind_a_cancelled_sender_are_still_written() -> None:
    sock = SlowSocket(paused=True)
    out = Outbox(cast(web.WebSocketResponse, sock), limit=64)
    reply = asyncio.create_task(out.send(protocol.delta("m", "a")))
    await asyncio.sleep(0)  # the reply's sender waits inside its write
    await out.send(protocol.ack("n", 2))  # an answer queued behind it
    reply.cancel()  # the connection closes: its reply worker is cancelled
    with contextlib.suppress(asyncio.CancelledError):
        await reply
    assert out.task is not None  # the queued frame has its own writer
    sock.writable.set()
    await out.flush(2.0)
    assert protocol.ack("n", 2) in sock.sent


async def test_a_write_to_a_gone_peer_drops_what_waits() -> None:
    class GoneSocket(SlowSocket):
        async def send_frame(self, data: bytes, opcode: WSMsgType) -> None:
            await self.writable.wait()
            raise ConnectionResetError("peer gone")

    sock = GoneSocket(paused=True)
    out = Outbox(cast(web.WebSocketResponse, sock), limit=64)
    first = asyncio.create_task(out.send(protocol.ack("m", 1)))
    await asyncio.sleep(0)
    await out.send(protocol.delta("m", "a"))
    sock.writable.set()
    await asyncio.wait_for(first, 2.0)
    await out.flush(2.0)
    assert out.broken and out.frames == [] and out.task is None
    await out.send(protocol.done("m", 2, "stop"))  # dropped, no error
    assert out.frames == []
