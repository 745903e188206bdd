"""Slow jobs: retention over many backdated messages, export of a visitor with many messages.

Both jobs are being built by others; each part reports "not available" until its
code exists (`gateway.retention.run_retention`, `GET /api/privacy/export`).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.db import ORIGIN, BenchDatabase
from bench.load import CONSENT, message_text
from bench.procs import REPO, Child, base_env, omnigate_argv
from gateway.crypto import KeyRing
from gateway.vault import Vault


def retention_available() -> str | None:
    """None when gateway.retention.run_retention exists, else why not."""
    try:
        mod = importlib.import_module("gateway.retention")
    except ImportError as exc:
        return f"gateway.retention not importable ({exc.__class__.__name__})"
    if not callable(getattr(mod, "run_retention", None)):
        return "gateway.retention has no run_retention"
    return None


PAGE_VIEWS = 10  # per backdated visitor


async def seed_backdated(db: BenchDatabase, tenant_id: uuid.UUID, rows: int) -> dict[str, Any]:
    """Insert `rows` messages 200 days old (100 per conversation) with generate_series,
    and 10 page views per visitor as old: retention deletes the visitors too, once their
    conversations are anonymized, and folds their page views into the daily rollup."""
    convs = max(1, rows // 100)
    t0 = time.perf_counter()
    conn = await asyncpg.connect(db.owner_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
            await conn.execute(
                "CREATE TEMP TABLE bench_conv ON COMMIT DROP AS SELECT g AS n, "
                "gen_random_uuid() AS subject_id, gen_random_uuid() AS conversation_id "
                "FROM generate_series(0, $1::int - 1) g".replace("$1::int", str(convs))
            )
            await conn.execute("CREATE INDEX ON bench_conv (n)")
            old = "now() - interval '200 days'"
            await conn.execute(
                f"INSERT INTO subjects (tenant_id, subject_id, created_at) "
                f"SELECT $1, subject_id, {old} FROM bench_conv",
                tenant_id,
            )
            # random bytes: retention never needs to open these
            await conn.execute(
                "INSERT INTO subject_keys (tenant_id, subject_id, kek_id, wrapped_key) "
                "SELECT $1, subject_id, 'bench', "
                "decode(md5(random()::text) || md5(random()::text) || md5(random()::text), 'hex') "
                "FROM bench_conv",
                tenant_id,
            )
            await conn.execute(
                f"INSERT INTO conversations (tenant_id, conversation_id, subject_id, started_at, "
                f"last_message_at, message_count, next_seq) SELECT $1, conversation_id, "
                f"subject_id, {old}, {old} + interval '1 hour', 100, "
                f"{-(-rows // convs) + 1} FROM bench_conv",
                tenant_id,
            )
            await conn.execute(
                f"""
                INSERT INTO messages (tenant_id, conversation_id, seq, message_id, role,
                                      ciphertext, created_at)
                SELECT $1, c.conversation_id, g / {convs} + 1, gen_random_uuid(),
                       CASE WHEN g % 2 = 0 THEN 'user' ELSE 'assistant' END,
                       '\\x01'::bytea || decode(md5(g::text) || md5((g + 1)::text)
                                              || md5((g + 2)::text), 'hex'),
                       {old} + (g / {convs}) * interval '1 second'
                FROM generate_series(0, $2::int - 1) g JOIN bench_conv c ON c.n = g % {convs}
                """,
                tenant_id,
                rows,
            )
            await conn.execute(
                f"INSERT INTO analytics_events (tenant_id, subject_id, occurred_at, page_path, "
                f"browser_family, device_class) SELECT $1, c.subject_id, {old}, "
                f"'/page/' || (g % 7), 'firefox', 'desktop' "
                f"FROM bench_conv c CROSS JOIN generate_series(1, {PAGE_VIEWS}) g",
                tenant_id,
            )
        await conn.execute(
            "ANALYZE messages; ANALYZE conversations; ANALYZE subjects; ANALYZE analytics_events"
        )
    finally:
        await conn.close()
    return {
        "rows": rows,
        "conversations": convs,
        "page_views": convs * PAGE_VIEWS,
        "seed_seconds": time.perf_counter() - t0,
    }


def _run_timed(argv: list[str], env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    """Run a child to completion; wall time and its own peak RSS (wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=dict(env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = b"", b""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        # read before wait4 so a chatty child cannot block on a full pipe
        out = proc.stdout.read() if proc.stdout else b""
        err = proc.stderr.read() if proc.stderr else b""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
    return {
        "exit": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "stdout": out.decode(errors="replace")[-2000:],
        "stderr": err.decode(errors="replace")[-2000:],
    }


async def _retention_state(db: BenchDatabase, tenant_id: uuid.UUID) -> dict[str, int]:
    conn = await asyncpg.connect(db.owner_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
            msgs = await conn.fetchval(
                "SELECT count(*) FROM messages WHERE tenant_id = $1", tenant_id
            )
            anon = await conn.fetchval(
                "SELECT count(*) FROM conversations WHERE tenant_id = $1 "
                "AND (anonymized_at IS NOT NULL OR subject_id IS NULL)",
                tenant_id,
            )
            subjects = await conn.fetchval(
                "SELECT count(*) FROM subjects WHERE tenant_id = $1", tenant_id
            )
        return {
            "messages": int(msgs),
            "conversations_anonymized": int(anon),
            "subjects_left": int(subjects),
        }
    finally:
        await conn.close()


async def run_retention_job(
    db: BenchDatabase, env: Mapping[str, str], rows: int, limit_s: float = 1800
) -> dict[str, Any]:
    """Seed backdated rows, then time one retention pass (`omnigate retention run`)."""
    why = retention_available()
    if why is not None:
        return {"available": False, "reason": why}
    tenant = await db.tenant(f"bench-retention-{uuid.uuid4().hex[:6]}", retention_days=90)
    seed = await seed_backdated(db, tenant.tenant_id, rows)
    child_env = {**base_env(), **env, "OMNIGATE_ADMIN_DATABASE_URL": db.owner_url}
    result = await asyncio.to_thread(
        _run_timed, [*omnigate_argv(), "retention", "run"], child_env, limit_s
    )
    via = "omnigate retention run"
    if result["exit"] == 2 and "invalid choice" in result["stderr"]:
        # the function exists but the CLI is not wired yet: call it directly in a child
        via = "gateway.retention.run_retention (bench/_retention_child.py)"
        result = await asyncio.to_thread(
            _run_timed, [sys.executable, "-m", "bench._retention_child"], child_env, limit_s
        )
    after = await _retention_state(db, tenant.tenant_id)
    reason = None
    if result["exit"] != 0:
        reason = f"exit {result['exit']}: {result['stderr'][-300:]}"
    elif after["messages"]:
        # the timed pass must be the one that deleted them all, or the time means nothing
        reason = f"{after['messages']} backdated messages left: {result['stdout'][-300:]}"
    elif after["subjects_left"]:
        reason = f"{after['subjects_left']} backdated visitors left: {result['stdout'][-300:]}"
    return {
        "available": reason is None,
        "reason": reason,
        "via": via,
        **seed,
        **{k: v for k, v in result.items() if k not in ("stderr",)},
        "after": after,
    }


async def _hello_token(http: aiohttp.ClientSession, gateway: str, site_key: str) -> str:
    url = f"{gateway}/v1/widget/ws?site={site_key}"
    async with http.ws_connect(url, headers={"Origin": ORIGIN}) as ws:
        await ws.send_str(orjson.dumps({"type": "hello", "v": 1, "consent": CONSENT}).decode())
        frame = orjson.loads((await ws.receive(timeout=30)).data)
        token: str = frame["session_token"]
        return token


async def seed_visitor(
    db: BenchDatabase, master: tuple[str, bytes], token: str, n: int
) -> dict[str, Any]:
    """Seal `n` messages under the visitor's own data key and COPY them in."""
    t0 = time.perf_counter()
    conn = await asyncpg.connect(db.owner_url)
    try:
        row = await conn.fetchrow(
            "SELECT s.tenant_id, s.subject_id, s.conversation_id, k.kek_id, k.wrapped_key "
            "FROM sessions s JOIN subject_keys k USING (tenant_id, subject_id) "
            "WHERE s.token_hash = $1",
            hashlib.sha256(token.encode()).digest(),
        )
        assert row is not None, "the visitor's session was not found"
        tid, sid, cid = row["tenant_id"], row["subject_id"], row["conversation_id"]
        dek = KeyRing((master,)).unwrap(tid, sid, row["kek_id"], row["wrapped_key"])
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        cipher = AESGCM(dek)
        start = datetime.now(UTC) - timedelta(days=10)
        records = []
        for i in range(n):
            mid = uuid.uuid4()
            role = "user" if i % 2 == 0 else "assistant"
            blob = Vault.seal_text(cipher, tid, cid, mid, role, message_text(0, i))
            records.append((tid, cid, mid, role, blob, start + timedelta(seconds=i), "complete"))
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tid))
            await conn.copy_records_to_table(
                "messages",
                records=records,
                columns=["tenant_id", "conversation_id", "message_id", "role", "ciphertext",
                         "created_at", "status"],
            )  # fmt: skip
            await conn.execute(
                "UPDATE conversations SET message_count = message_count + $3, "
                "last_message_at = now() WHERE tenant_id = $1 AND conversation_id = $2",
                tid,
                cid,
                n,
            )
    finally:
        await conn.close()
    return {"messages": n, "seed_seconds": time.perf_counter() - t0}


class _RssSampler:
    """Samples a process tree's RSS every 10 ms in a thread; keeps the peak."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.peak = child.rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.child.rss())

    def __enter__(self) -> _RssSampler:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join()


async def run_export_job(
    db: BenchDatabase,
    gateway: str,
    site_key: str,
    server: Child,
    master: tuple[str, bytes],
    n: int,
) -> dict[str, Any]:
    """Time `GET /api/privacy/export` for a visitor holding `n` messages, with peak RSS."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        token = await _hello_token(http, gateway, site_key)
        url = f"{gateway}/api/privacy/export"
        headers = {"Authorization": f"Session {token}", "Origin": ORIGIN}
        async with http.get(url, headers=headers) as probe:
            await probe.read()
            if probe.status in (404, 405):
                return {"available": False, "reason": f"GET /api/privacy/export -> {probe.status}"}
        seed = await seed_visitor(db, master, token, n)
        rss_before = server.rss()
        t0 = time.perf_counter()
        with _RssSampler(server) as sampler:
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(600)) as r:
                body = await r.read()
                status = r.status
        seconds = time.perf_counter() - t0
    exported = None
    if status == 200:
        try:
            exported = _count_messages(orjson.loads(body))
        except orjson.JSONDecodeError:
            exported = None
    return {
        "available": status == 200,
        "reason": None
        if status == 200
        else f"status {status}: {body[:200].decode(errors='replace')}",
        **seed,
        "status": status,
        "seconds": seconds,
        "bytes": len(body),
        "messages_in_export": exported,
        "server_rss_before_mb": rss_before / 2**20,
        "server_peak_rss_mb": sampler.peak / 2**20,
        "server_peak_delta_mb": (sampler.peak - rss_before) / 2**20,
    }


def _count_messages(doc: Any) -> int:
    """Messages anywhere in the export document (lists of dicts with a role and a text)."""
    if isinstance(doc, dict):
        if "role" in doc and ("text" in doc or "content" in doc):
            return 1
        return sum(_count_messages(v) for v in doc.values())
    if isinstance(doc, list):
        return sum(_count_messages(v) for v in doc)
    return 0


__all__ = ["Path", "run_export_job", "run_retention_job"]
