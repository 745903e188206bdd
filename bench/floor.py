"""The floor under the time to first delta: each leg the gateway puts in series, alone.

Run: ``.venv/bin/python -m bench.floor`` (about 30 s). Against a throwaway database
and the fake upstream, sequential calls of:

* ``SELECT 1``: one PostgreSQL round trip;
* ``INSERT, commit``: one row in an autocommit statement, with ``synchronous_commit``
  on (the WAL flush every acknowledged message pays) and off (the flush alone is the
  difference);
* ``durable insert``: a visitor message written as the gateway writes it (the group
  committer on the connection it keeps, ``omnigate_insert_message``, row-level
  security), and the same statement through a pool checkout of its own, as before
  round 8 (the difference is what keeping the connection saves);
* ``redaction``: ``Redactor.find`` and ``apply`` on the bench's message;
* ``upstream, aiohttp`` and ``upstream, gateway client``: a streamed reply from the
  fake, to its first content chunk, by bare aiohttp (the baseline's way) and by the
  gateway's ``UpstreamClient``.

Each leg runs back to back and again with ``--idle-ms`` (1 ms) of sleep before every
call: in the one-session run PostgreSQL and the fake sit idle while the other legs
work, and a process woken from idle answers later on this VM. This process's CPU per
call is kept for the back-to-back calls: what the gateway's own code spends on each
leg, PostgreSQL's and the fake's share left out. Rounds alternate so
drift hits every leg alike; p50s over all rounds. DESIGN §4 puts redaction and the
durable insert in series before forwarding, so their sum is time the gateway adds
to the baseline's whole time to first chunk whatever else it does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import uvloop

from bench.args import DEFAULT_SERVER_URL, at_least, milliseconds, server_url
from bench.db import APP_ROLE, BenchDatabase
from bench.load import SYSTEM_PROMPT, message_text
from bench.procs import free_port, start_fake
from gateway.db import create_pool
from gateway.groupcommit import GroupCommitter
from gateway.store import NewMessage
from gateway.store import insert_message as insert_message_via
from gateway.upstream import UpstreamClient, UpstreamConfig
from policies import ENTITIES, PlaceholderMap, Redactor

Leg = Callable[[], Awaitable[object]]

LEGS = (
    "SELECT 1",
    "INSERT, commit (synchronous_commit on)",
    "INSERT, commit (synchronous_commit off)",
    "durable insert (as the gateway)",
    "durable insert, a pool checkout per statement",
    "redaction (bench message)",
    "upstream first chunk, aiohttp",
    "upstream first chunk, gateway client",
)
# the legs in series before a message is forwarded (DESIGN §4)
AHEAD_OF_FORWARDING = ("redaction (bench message)", "durable insert (as the gateway)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.floor", description="the legs of the time to first delta, alone"
    )
    p.add_argument("--rounds", type=at_least(1), default=5, help="alternating rounds (5)")
    p.add_argument("--calls", type=at_least(1), default=300, help="calls per leg per round (300)")
    p.add_argument(
        "--idle-ms", type=milliseconds, default=1.0, help="sleep before each idle call (1)"
    )
    p.add_argument(
        "--database-url",
        type=server_url,
        default=DEFAULT_SERVER_URL,
        help="an owner/superuser URL; a throwaway database is created there",
    )
    return p.parse_args(argv)


async def timed_calls(fn: Leg, calls: int, idle_s: float) -> tuple[list[float], float]:
    """Seconds per call of `calls` sequential calls, each after `idle_s` of sleep, and
    this process's CPU seconds per call over them."""
    out: list[float] = []
    cpu0 = time.process_time()
    for _ in range(calls):
        if idle_s:
            await asyncio.sleep(idle_s)
        t0 = time.perf_counter()
        own = await fn()
        # a leg that times itself (the first chunk of a reply read to its end) says so
        out.append(own if isinstance(own, float) else time.perf_counter() - t0)
    return out, (time.process_time() - cpu0) / calls


async def _seed(db: BenchDatabase, tenant_id: uuid.UUID, conversations: int) -> list[uuid.UUID]:
    """Conversations to write into, and a probe table the app role may insert into."""
    convs = [uuid.uuid4() for _ in range(conversations)]
    conn = await asyncpg.connect(db.owner_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
            for conv in convs:
                subject = uuid.uuid4()
                await conn.execute(
                    "INSERT INTO subjects (tenant_id, subject_id) VALUES ($1, $2)",
                    tenant_id,
                    subject,
                )
                await conn.execute(
                    "INSERT INTO conversations (tenant_id, conversation_id, subject_id) "
                    "VALUES ($1, $2, $3)",
                    tenant_id,
                    conv,
                    subject,
                )
            await conn.execute("CREATE TABLE floor_probe (v bytea NOT NULL)")
            await conn.execute(f'GRANT INSERT ON floor_probe TO "{APP_ROLE}"')
    finally:
        await conn.close()
    return convs


def _first_content(line: bytes) -> bool:
    """A data line carrying reply text: the baseline's first delta (bench/load.py).

    Not the role chunk the stream opens with, whose content is empty.
    """
    if not line.startswith(b"data: ") or b'"content"' not in line:
        return False
    choices = orjson.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def _first_or_fail(first: float | None) -> float:
    if first is None:
        raise RuntimeError("the fake upstream answered no content")
    return first


async def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """p50 and mean in ms of every leg, back to back and after idle; CPU µs per call."""
    # SIGTERM ends the run through the cleanup below, as Ctrl-C does (bench/cli.py)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    db = await BenchDatabase.create(args.database_url)
    logdir = Path(tempfile.mkdtemp(prefix="omnigate-floor-"))
    fake = None
    closers: list[Callable[[], Awaitable[object]]] = []
    try:
        tenant = await db.tenant("floor")
        convs = await _seed(db, tenant.tenant_id, 50)
        port = free_port()
        fake = start_fake(port, 0.0, 16, logdir)
        base_url = f"http://127.0.0.1:{port}/v1"

        on = await asyncpg.connect(db.app_url)
        off = await asyncpg.connect(db.app_url, server_settings={"synchronous_commit": "off"})
        pool = await create_pool(db.app_url)
        writer = GroupCommitter(pool)
        http = aiohttp.ClientSession()
        upstream = UpstreamClient(UpstreamConfig(base_url=base_url, api_key="sk-floor", model="m"))
        await upstream.start()
        closers += [on.close, off.close, pool.close, writer.aclose, http.close, upstream.close]

        blob = os.urandom(300)  # a sealed message of the bench's size
        text = message_text(3, 7)
        redactor = Redactor(ENTITIES)
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        body = orjson.dumps({"model": "m", "stream": True, "messages": prompt})
        headers = {"Authorization": "Bearer sk-floor", "Content-Type": "application/json"}
        n = 0

        def visitor_message() -> NewMessage:
            nonlocal n
            n += 1
            conv = convs[n % len(convs)]
            return NewMessage(
                tenant.tenant_id,
                conv,
                uuid.uuid4(),
                "user",
                blob,
                client_ref=os.urandom(16),
                check_map=True,  # as a visitor's message: only onto the map it expects
            )

        async def insert_message() -> object:
            return await writer.insert(visitor_message())

        async def insert_checked_out() -> object:
            return await insert_message_via(pool, visitor_message())

        async def redaction() -> object:
            return redactor.apply(text, redactor.find(text), PlaceholderMap())

        # the reply is read to its end (a connection left mid-body is not reused), but
        # only the time to its first content chunk counts
        async def bare_upstream() -> float:
            t0, first = time.perf_counter(), None
            async with http.post(base_url + "/chat/completions", data=body, headers=headers) as r:
                async for line in r.content:
                    if first is None and _first_content(line):
                        first = time.perf_counter() - t0
            return _first_or_fail(first)

        async def gateway_upstream() -> float:
            t0, first = time.perf_counter(), None
            async with upstream.stream_chat(prompt) as stream:
                async for _ in stream:
                    if first is None:
                        first = time.perf_counter() - t0
            return _first_or_fail(first)

        legs: dict[str, Leg] = {
            LEGS[0]: lambda: on.fetchval("SELECT 1"),
            LEGS[1]: lambda: on.execute("INSERT INTO floor_probe VALUES ($1)", blob),
            LEGS[2]: lambda: off.execute("INSERT INTO floor_probe VALUES ($1)", blob),
            LEGS[3]: insert_message,
            LEGS[4]: insert_checked_out,
            LEGS[5]: redaction,
            LEGS[6]: bare_upstream,
            LEGS[7]: gateway_upstream,
        }
        for fn in legs.values():  # warm caches, prepared statements, pooled connections
            await timed_calls(fn, 20, 0.0)
        samples: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for mode, idle in (("back_to_back", 0.0), ("after_idle", args.idle_ms / 1000)):
                for name, fn in legs.items():
                    walls, per_call = await timed_calls(fn, args.calls, idle)
                    samples.setdefault(f"{name}|{mode}", []).extend(walls)
                    cpu.setdefault(f"{name}|{mode}", []).append(per_call)
            print(f"[floor] round {r + 1}/{args.rounds}", file=sys.stderr)
        results = {
            key: {
                "p50_ms": statistics.median(v) * 1e3,
                "mean_ms": statistics.fmean(v) * 1e3,
                "cpu_us": statistics.median(cpu[key]) * 1e6,
            }
            for key, v in samples.items()
        }
    finally:
        for close in reversed(closers):
            await close()
        if fake is not None:
            fake.stop()
        await db.drop()
    shutil.rmtree(logdir, ignore_errors=True)  # the fake's log, kept only when a run fails
    return results


def report(results: dict[str, dict[str, float]], idle_ms: float) -> str:
    """The table: p50 (mean) ms per leg, back to back and after idle, and this
    process's CPU per call back to back; then the sum of the legs ahead of forwarding."""
    head = (
        f"| leg | back to back, p50 (mean) ms | after {idle_ms:g} ms idle, p50 (mean) ms "
        "| our CPU per call, µs |"
    )
    lines = [head, "|---|---|---|---|"]
    for name in LEGS:
        cells = [
            "{p50_ms:.3f} ({mean_ms:.3f})".format(**results[f"{name}|{mode}"])
            for mode in ("back_to_back", "after_idle")
        ]
        cpu_us = results[f"{name}|back_to_back"]["cpu_us"]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cpu_us:.1f} |")
    ahead = [
        sum(results[f"{name}|{mode}"]["p50_ms"] for name in AHEAD_OF_FORWARDING)
        for mode in ("back_to_back", "after_idle")
    ]
    ahead_cpu = sum(results[f"{name}|back_to_back"]["cpu_us"] for name in AHEAD_OF_FORWARDING)
    lines.append(
        f"| in series before forwarding (redaction + durable insert) "
        f"| {ahead[0]:.3f} | {ahead[1]:.3f} | {ahead_cpu:.1f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = uvloop.run(measure(args))
    except KeyboardInterrupt:
        sys.exit(130)
    except asyncio.CancelledError:  # SIGTERM, after the cleanup
        sys.exit(143)
    print(report(results, args.idle_ms))


if __name__ == "__main__":
    main()
