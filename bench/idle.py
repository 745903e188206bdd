"""Idle sockets: open K WebSockets, say hello on each, and weigh the server's RSS per socket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench.db import ORIGIN
from bench.load import CONSENT
from bench.procs import Child, raise_nofile

WARM = 20  # sockets opened first so one-off allocations are not charged to the K sockets


@dataclass
class IdleResult:
    requested: int
    held: int
    failed: int
    rss_before: int
    rss_after: int
    open_seconds: float
    fds_after: int | None
    client_nofile: int
    first_error: str | None

    @property
    def rss_per_conn(self) -> float | None:
        return (self.rss_after - self.rss_before) / self.held if self.held else None


async def _open(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(url, headers={"Origin": ORIGIN}, autoping=True, heartbeat=None)
    await ws.send_str(orjson.dumps({"type": "hello", "v": 1, "consent": CONSENT}).decode())
    msg = await ws.receive(timeout=60)
    frame: dict[str, Any] = orjson.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else {}
    if frame.get("type") != "welcome":
        await ws.close()
        raise ConnectionError(f"no welcome: {frame.get('code') or msg.type.name}")
    return ws


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    # reading is what answers the server's heartbeat pings
    with contextlib.suppress(Exception):
        while not ws.closed:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return


def _settled_rss(server: Child, seconds: float = 1.5) -> int:
    time.sleep(seconds)
    return server.rss()


async def run_idle(
    gateway: str, site_key: str, server: Child, k: int, concurrency: int = 64
) -> IdleResult:
    """Open `k` idle, welcomed sockets; RSS after minus RSS before, over the sockets held."""
    nofile = raise_nofile(k + 1024)
    url = f"{gateway}/v1/widget/ws?site={site_key}"
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    drains: list[asyncio.Task[None]] = []
    failed = 0
    first_error: str | None = None
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        for _ in range(WARM):
            ws = await _open(http, url)
            sockets.append(ws)
            drains.append(asyncio.create_task(_drain(ws)))
        gc.collect()
        before = await asyncio.to_thread(_settled_rss, server)
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            nonlocal failed, first_error
            async with sem:
                try:
                    ws = await _open(http, url)
                except Exception as exc:
                    failed += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:200]
                    return
                sockets.append(ws)
                drains.append(asyncio.create_task(_drain(ws)))

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(k)))
        opened = time.perf_counter() - t0
        after = await asyncio.to_thread(_settled_rss, server, 3.0)
        still_open = sum(1 for ws in sockets[WARM:] if not ws.closed)
        fds = None
        with contextlib.suppress(Exception):
            fds = sum(p.num_fds() for p in server.tree())
        for t in drains:
            t.cancel()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return IdleResult(k, still_open, failed, before, after, opened, fds, nofile, first_error)
