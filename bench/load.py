"""Load clients: N concurrent sessions x M sequential messages, over the three transports.

Each session first connects (and says hello where there is one), then waits at a
barrier so that the timed window holds only message traffic. TTFT is measured
from just before the request (frame or POST) is written to the first piece of
reply text: a content chunk from the upstream, a `delta` from the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.db import ORIGIN

CONSENT = {"ai_processing": True, "conversation_storage": True}
SYSTEM_PROMPT = "You are a helpful customer-service assistant."
# What a desktop Chrome sends besides what aiohttp's client writes itself (Host,
# Connection, Upgrade, the WebSocket key and version): an idle socket keeps its parsed
# upgrade request for as long as it lives, so a bench with bare requests would weigh
# sockets lighter than visitors' are. The extension is offered, as browsers do, and
# refused by the gateway (no compression context per socket).
BROWSER_HEADERS = {
    "User-Agent": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36"
    ),
    "Accept-Language": "en-GB,en-US;q=0.9,en;q=0.8,de;q=0.7",
    "Accept-Encoding": "gzip, deflate, br, zstd",
    "Cache-Control": "no-cache",
    "Pragma": "no-cache",
}
WS_EXTENSIONS = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


# The phone number of every message: "+1 415 555 2671" (the default) reads the same in
# every region, so one matcher pass finds it; a national "(415) 555-2671" costs one
# pass per phone region of the policy (`--phone national`, docs/performance.md).
PHONES = {"international": "+1 415 555 2671", "national": "(415) 555-2671"}
_phone = PHONES["international"]


def use_phone(kind: str) -> None:
    """Write the phone number of every message in this form from now on."""
    global _phone
    _phone = PHONES[kind]


def message_text(session: int, n: int) -> str:
    """A ~35-word visitor message with one email and one phone number to redact."""
    return (
        f"Hello, this is visitor {session} writing about order {1000 + n}, which never arrived. "
        f"Please email me at jane.doe{session}@example.com or call {_phone} any time "
        "today; I would also like to know how returns work for items bought on sale last week."
    )


def heavy_text(n: int) -> str:
    """~4,000 characters of pasted orders (numbers, dates, amounts, one phone number).

    The costliest kind of message to search for PII: the phone matcher reads every
    group of digits (about 100 ms of CPU on the bench machine).
    """
    lines = [f"My orders, please check them all ({n}):"]
    i = 0
    while sum(map(len, lines)) < 3900:
        lines.append(
            f"#{4_100_000 + 37 * i + n} of 2026-{1 + i % 12:02d}-{1 + i % 28:02d}, "
            f"{1 + i % 9} items, ${(i * 7919) % 10_000}.{i % 100:02d}"
        )
        i += 1
    lines.append("Reach me at (415) 555-2671.")
    return "\n".join(lines)[:4000]


@dataclass
class RunStats:
    """What one load run measured."""

    name: str
    sessions: int
    messages: int
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    wall: float = 0.0
    setup: float = 0.0
    frames: int = 0  # frames or events received in answer to messages (ack, deltas, done)
    neighbour: int = 0  # messages of the heavy neighbour answered meanwhile (run_ws_beside)

    def absorb(self, other: RunStats) -> None:
        """Add another run of the same kind (one round of an interleaved measurement)."""
        self.messages += other.messages
        self.ok += other.ok
        for kind, n in other.error_kinds.items():
            self.errors += n
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + n
        self.ttft += other.ttft
        self.total += other.total
        self.wall += other.wall
        self.setup += other.setup
        self.frames += other.frames
        self.neighbour += other.neighbour

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall > 0 else 0.0


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) in milliseconds, or None."""
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))
    return s[k] * 1000.0


Session = Callable[[int, asyncio.Event, asyncio.Event], Awaitable[None]]


async def drive(stats: RunStats, session: Session) -> RunStats:
    """Run `stats.sessions` sessions; time from the barrier to the last reply."""
    ready = 0
    all_ready = asyncio.Event()
    go = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal ready
        done_setup = asyncio.Event()
        task = asyncio.ensure_future(session(i, done_setup, go))
        waiter = asyncio.ensure_future(done_setup.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        ready += 1
        if ready == stats.sessions:
            all_ready.set()
        try:
            await task
        finally:
            waiter.cancel()

    t_setup = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(stats.sessions)]
    await all_ready.wait()
    stats.setup = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    stats.wall = time.perf_counter() - t0
    for r in results:
        if isinstance(r, BaseException):
            stats.error(type(r).__name__)
    return stats


def _connector(limit: int = 0) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=limit, force_close=False, enable_cleanup_closed=True)


async def run_baseline(upstream: str, sessions: int, messages: int) -> RunStats:
    """Straight to the fake upstream: POST /v1/chat/completions stream=true, read to [DONE]."""
    stats = RunStats("baseline", sessions, messages)
    url = upstream.rstrip("/") + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=_connector(), timeout=_timeout()) as http:

        async def session(i: int, ready: asyncio.Event, go: asyncio.Event) -> None:
            ready.set()
            await go.wait()
            for n in range(messages):
                body = orjson.dumps(
                    {
                        "model": "gpt-4o-mini",
                        "stream": True,
                        "messages": [
                            {"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": message_text(i, n)},
                        ],
                    }
                )
                t0 = time.perf_counter()
                first: float | None = None
                done = False
                try:
                    async with http.post(url, data=body, headers=headers) as resp:
                        if resp.status != 200:
                            stats.error(f"http_{resp.status}")
                            continue
                        async for line in resp.content:
                            if not line.startswith(b"data: "):
                                continue
                            data = line[6:].strip()
                            stats.frames += 1
                            if data == b"[DONE]":
                                done = True
                                break
                            chunk = orjson.loads(data)
                            if first is None:
                                choices = chunk.get("choices") or [{}]
                                if (choices[0].get("delta") or {}).get("content"):
                                    first = time.perf_counter()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    stats.error(type(exc).__name__)
                    continue
                if done and first is not None:
                    stats.ok += 1
                    stats.ttft.append(first - t0)
                    stats.total.append(time.perf_counter() - t0)
                else:
                    stats.error("incomplete")

        return await drive(stats, session)


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)


async def run_ws(gateway: str, site_key: str, sessions: int, messages: int) -> RunStats:
    """N WebSocket sessions: hello (consent granted), then M messages each awaited to `done`."""
    stats = RunStats("ws", sessions, messages)
    url = f"{gateway}/v1/widget/ws?site={site_key}"
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(
        connector=_connector(), timeout=_timeout(), cookie_jar=jar
    ) as http:

        async def session(i: int, ready: asyncio.Event, go: asyncio.Event) -> None:
            async with http.ws_connect(url, headers={"Origin": ORIGIN}, autoping=True) as ws:
                await ws.send_str(
                    orjson.dumps({"type": "hello", "v": 1, "consent": CONSENT}).decode()
                )
                welcome = await _next_frame(ws)
                if welcome.get("type") != "welcome":
                    stats.error(f"hello_{welcome.get('code') or welcome.get('type')}")
                    ready.set()
                    return
                ready.set()
                await go.wait()
                for n in range(messages):
                    mid = f"m{n}"
                    frame = {"type": "message", "id": mid, "text": message_text(i, n)}
                    data = orjson.dumps(frame).decode()
                    t0 = time.perf_counter()
                    await ws.send_str(data)
                    first: float | None = None
                    while True:
                        f = await _next_frame(ws)
                        stats.frames += 1
                        t = f.get("type")
                        if t == "delta" and first is None:
                            first = time.perf_counter()
                        elif t == "done":
                            if first is None:
                                stats.error("no_delta")
                            else:
                                stats.ok += 1
                                stats.ttft.append(first - t0)
                                stats.total.append(time.perf_counter() - t0)
                            break
                        elif t == "error":
                            stats.error(str(f.get("code")))
                            break

        return await drive(stats, session)


async def run_ws_beside(gateway: str, site_key: str, sessions: int, messages: int) -> RunStats:
    """`run_ws` while one more visitor sends `heavy_text` messages back to back."""
    url = f"{gateway}/v1/widget/ws?site={site_key}"
    stop = asyncio.Event()
    answered = 0

    async def neighbour(http: aiohttp.ClientSession) -> None:
        nonlocal answered
        async with http.ws_connect(url, headers={"Origin": ORIGIN}) as ws:
            await ws.send_str(orjson.dumps({"type": "hello", "v": 1, "consent": CONSENT}).decode())
            await _next_frame(ws)
            n = 0
            while not stop.is_set():
                n += 1
                frame = {"type": "message", "id": f"h{n}", "text": heavy_text(n)}
                await ws.send_str(orjson.dumps(frame).decode())
                while (f := await _next_frame(ws)).get("type") not in ("done", "error"):
                    pass
                answered += f.get("type") == "done"

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        task = asyncio.create_task(neighbour(http))
        stats = await run_ws(gateway, site_key, sessions, messages)
        stop.set()
        await task
    stats.name = "ws_beside"
    stats.neighbour = answered
    return stats


async def _next_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=60)
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise ConnectionError(f"socket closed ({msg.type.name}, {msg.data!r})")
    frame: dict[str, Any] = orjson.loads(msg.data)
    return frame


async def run_sse(gateway: str, site_key: str, sessions: int, messages: int) -> RunStats:
    """N sessions on the HTTP/SSE fallback: each POST carries hello with the kept session token."""
    stats = RunStats("sse", sessions, messages)
    url = f"{gateway}/v1/widget/chat?site={site_key}"
    headers = {"Origin": ORIGIN, "Content-Type": "application/json"}
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(
        connector=_connector(), timeout=_timeout(), cookie_jar=jar
    ) as http:

        async def session(i: int, ready: asyncio.Event, go: asyncio.Event) -> None:
            ready.set()
            await go.wait()
            token: str | None = None
            for n in range(messages):
                hello: dict[str, Any] = {"consent": CONSENT}
                if token:
                    hello["session_token"] = token
                body = orjson.dumps({"id": f"m{n}", "text": message_text(i, n), "hello": hello})
                t0 = time.perf_counter()
                first: float | None = None
                outcome: str | None = None
                try:
                    async with http.post(url, data=body, headers=headers) as resp:
                        if resp.status != 200:
                            stats.error(f"http_{resp.status}")
                            continue
                        async for line in resp.content:
                            if not line.startswith(b"data: "):
                                continue
                            ev = orjson.loads(line[6:])
                            stats.frames += 1
                            t = ev.get("type")
                            if t == "delta":
                                if first is None:
                                    first = time.perf_counter()
                            elif t == "welcome":
                                token = ev.get("session_token") or token
                            elif t == "done":
                                outcome = "done"
                            elif t == "error":
                                outcome = str(ev.get("code"))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    stats.error(type(exc).__name__)
                    continue
                if outcome == "done" and first is not None:
                    stats.ok += 1
                    stats.ttft.append(first - t0)
                    stats.total.append(time.perf_counter() - t0)
                else:
                    stats.error(outcome or "incomplete")

        return await drive(stats, session)
