"""Idle connections and what the server's RSS pays for each.

Two kinds, measured the same way (RSS after K of them minus RSS after a warm-up, over
the connections still open):

* ``run_idle``: WebSockets, each welcomed (`hello` with consent) and then left alone;
* ``run_idle_http``: the HTTP/SSE fallback's keep-alive connections, each having
  carried one whole chat (`POST /v1/widget/chat`: hello, a message, its reply to
  `done`) and then left open for the next one, as a browser keeps it. The server closes
  such a connection after 75 s idle (aiohttp's keep-alive default), so K must open
  within that.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
import psutil

from bench.db import ORIGIN
from bench.load import BROWSER_HEADERS, CONSENT, WS_EXTENSIONS, message_text
from bench.procs import Child, raise_nofile

WARM = 20  # connections opened first so one-off allocations are not charged to the K


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


class _Conn(Protocol):
    """One idle connection, closed at the end of the measurement."""

    async def aclose(self) -> None: ...


class _Socket:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        # reading is what answers the server's heartbeat pings
        self.reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            while not self.ws.closed:
                msg = await self.ws.receive()
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    return

    async def aclose(self) -> None:
        self.reader.cancel()
        await self.ws.close()


class _KeepAlive:
    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http  # one session, one pooled connection

    async def aclose(self) -> None:
        await self.http.close()


async def _open_ws(http: aiohttp.ClientSession, gateway: str, site_key: str) -> _Conn:
    url = f"{gateway}/v1/widget/ws?site={site_key}"
    headers = {"Origin": ORIGIN, **BROWSER_HEADERS, **WS_EXTENSIONS}
    ws = await http.ws_connect(url, headers=headers, autoping=True, heartbeat=None)
    await ws.send_str(orjson.dumps({"type": "hello", "v": 1, "consent": CONSENT}).decode())
    msg = await ws.receive(timeout=60)
    frame: dict[str, Any] = orjson.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else {}
    if frame.get("type") != "welcome":
        await ws.close()
        raise ConnectionError(f"no welcome: {frame.get('code') or msg.type.name}")
    return _Socket(ws)


async def _open_http(_shared: aiohttp.ClientSession, gateway: str, site_key: str) -> _Conn:
    # a session of its own per visitor: a shared pool would reuse one connection for many
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=3600),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    try:
        body = orjson.dumps({"id": "m0", "text": message_text(0, 0), "hello": {"consent": CONSENT}})
        headers = {"Origin": ORIGIN, "Content-Type": "application/json", **BROWSER_HEADERS}
        url = f"{gateway}/v1/widget/chat?site={site_key}"
        outcome = None
        async with http.post(url, data=body, headers=headers) as resp:
            async for line in resp.content:  # read to the end: the connection is kept
                if line.startswith(b"data: "):
                    event = orjson.loads(line[6:])
                    if event.get("type") in ("done", "error"):
                        outcome = event.get("code") or event["type"]
        if resp.status != 200 or outcome != "done":
            raise ConnectionError(f"no done: HTTP {resp.status}, {outcome}")
    except BaseException:
        await http.close()
        raise
    return _KeepAlive(http)


def _established(port: int) -> int:
    """This process's open TCP connections to the gateway's port."""
    conns = psutil.Process().net_connections(kind="tcp")
    return sum(
        1 for c in conns if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def _settled_rss(server: Child, seconds: float = 1.5) -> int:
    time.sleep(seconds)
    return server.rss()


Opener = Callable[[aiohttp.ClientSession, str, str], Awaitable[_Conn]]


async def _run(
    opener: Opener, gateway: str, site_key: str, server: Child, k: int, concurrency: int
) -> IdleResult:
    nofile = raise_nofile(k + 1024)
    port = urlsplit(gateway).port
    assert port is not None
    conns: list[_Conn] = []
    failed = 0
    first_error: str | None = None
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        try:
            for _ in range(WARM):
                conns.append(await opener(http, gateway, site_key))
            gc.collect()
            before = await asyncio.to_thread(_settled_rss, server)
            held_before = await asyncio.to_thread(_established, port)
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                nonlocal failed, first_error
                async with sem:
                    try:
                        conns.append(await opener(http, gateway, site_key))
                    except Exception as exc:
                        failed += 1
                        first_error = first_error or f"{type(exc).__name__}: {exc}"[:200]

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(k)))
            opened = time.perf_counter() - t0
            after = await asyncio.to_thread(_settled_rss, server, 3.0)
            # counted from the client's side: a connection the server dropped is not held
            held = await asyncio.to_thread(_established, port) - held_before
            fds = None
            with contextlib.suppress(Exception):
                fds = sum(p.num_fds() for p in server.tree())
        finally:
            await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
    return IdleResult(k, held, failed, before, after, opened, fds, nofile, first_error)


async def run_idle(
    gateway: str, site_key: str, server: Child, k: int, concurrency: int = 64
) -> IdleResult:
    """Open `k` idle, welcomed WebSockets; RSS after minus RSS before, over those held."""
    return await _run(_open_ws, gateway, site_key, server, k, concurrency)


async def run_idle_http(
    gateway: str, site_key: str, server: Child, k: int, concurrency: int = 64
) -> IdleResult:
    """Open `k` fallback connections, one chat each, kept alive; RSS per connection held."""
    return await _run(_open_http, gateway, site_key, server, k, concurrency)
