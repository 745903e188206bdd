"""`python -m bench`: baseline vs WebSocket vs HTTP/SSE through omnigate, idle sockets, slow jobs.

One run creates its own database, fake upstream and gateway(s), measures, prints
the table and writes bench/results/<timestamp>.json and .png. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psutil

from bench import report, stages
from bench.args import DEFAULT_SERVER_URL, at_least, milliseconds, redis_url, server_url
from bench.db import BenchDatabase, Tenant
from bench.idle import IdleResult, run_idle, run_idle_http
from bench.load import (
    PHONES,
    RunStats,
    heavy_text,
    pct,
    run_baseline,
    run_sse,
    run_ws,
    run_ws_beside,
    use_phone,
)
from bench.procs import Child, free_port, start_fake, start_gateway
from bench.slow import run_export_job, run_retention_job

SCENARIOS = ("baseline", "ws", "sse", "idle", "slow-jobs", "scale", "heavy")
RESULTS = Path(__file__).resolve().parent / "results"
QUICK = {
    "sessions": 10,
    "messages": 5,
    "idle": 200,
    "retention_rows": 20_000,
    "export_messages": 500,
}
FULL = {"sessions": 50, "messages": 20, "idle": 2000, "retention_rows": 1_000_000,
        "export_messages": 10_000}  # fmt: skip
# The one-session runs (baseline, ws, sse) take turns in rounds, so drift on a shared
# machine hits each alike, and send at least this many messages in all: the added TTFT
# is a difference of two p50s, too noisy from one 20-message run each.
ONE_SESSION_ROUNDS = 5
ONE_SESSION_MESSAGES = 200
# The heavy-neighbour runs: gateways with and without the redaction helper take turns.
HEAVY_ROUNDS = 3
# The scale runs: one worker and two take turns.
SCALE_ROUNDS = 3

K = TypeVar("K")  # what names the gateways that take turns


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--database-url",
        type=server_url,
        default=DEFAULT_SERVER_URL,
        help="owner/superuser URL; a throwaway omnigate_bench_<rand> DB is made on it",
    )
    p.add_argument(
        "--redis-url",
        type=redis_url,
        default="redis://127.0.0.1:6379/0",
        help="used when the gateway runs more than one worker",
    )
    p.add_argument("--sessions", type=at_least(1), help="concurrent sessions N (default 50)")
    p.add_argument("--messages", type=at_least(1), help="messages per session M (default 20)")
    p.add_argument("--chunks", type=at_least(1), default=16, help="fake upstream reply chunks")
    p.add_argument(
        "--phone",
        choices=sorted(PHONES),
        default="international",
        help="how each message writes its phone number (national costs more to find)",
    )
    p.add_argument(
        "--delay-ms", type=milliseconds, default=0.0, help="fake upstream delay between chunks"
    )
    p.add_argument("--workers", type=at_least(1), default=1, help="gateway worker processes")
    p.add_argument(
        "--idle",
        type=at_least(1),
        help="idle connections K of each kind (default 2000; try 10000)",
    )
    p.add_argument(
        "--retention-rows", type=at_least(1), help="backdated messages (default 1,000,000)"
    )
    p.add_argument(
        "--export-messages", type=at_least(1), help="messages of the exported visitor (10,000)"
    )
    p.add_argument(
        "--only", choices=SCENARIOS, action="append", help="run only this scenario (repeatable)"
    )
    p.add_argument("--quick", action="store_true", help="small numbers: a smoke run of ~30 s")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateway during the ws and sse runs at N sessions "
        "(bench/results/<timestamp>-<run>.collapsed)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    return p  # fmt: skip


def _cfg(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    cfg.update(chunks=args.chunks, delay_ms=args.delay_ms, workers=args.workers, quick=args.quick,
               phone=args.phone)  # fmt: skip
    return cfg


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _stats_json(s: RunStats) -> dict[str, Any]:
    return {
        "sessions": s.sessions,
        "messages_per_session": s.messages,
        "ok": s.ok,
        "errors": s.errors,
        "error_kinds": s.error_kinds,
        "wall_s": round(s.wall, 3),
        "setup_s": round(s.setup, 3),
        "msgs_per_s": round(s.rate, 2),
        "ttft_p50_ms": pct(s.ttft, 50),
        "ttft_p99_ms": pct(s.ttft, 99),
        "ttft_mean_ms": 1000 * sum(s.ttft) / len(s.ttft) if s.ttft else None,
        "total_p50_ms": pct(s.total, 50),
        "total_p99_ms": pct(s.total, 99),
        "frames_per_msg": round(s.frames / s.ok, 2) if s.frames and s.ok else None,
    }


class Usage:
    """CPU seconds each party spent while one or more load runs ran."""

    def __init__(self) -> None:
        self.gateway = self.fake = self.client = self.postgres = 0.0
        self.idle = self.total = 0.0  # all cores, from psutil.cpu_times()
        self.metered_gateway = False

    async def measure(
        self, gw: Child | None, fake: Child | None, fn: Callable[[], Awaitable[RunStats]]
    ) -> RunStats:
        """Run `fn` and add what every party spent meanwhile."""
        me = psutil.Process()
        g0 = gw.cpu_seconds() if gw else 0.0
        f0 = fake.cpu_seconds() if fake else 0.0
        c0 = sum(me.cpu_times()[:2])
        p0, m0 = postgres_cpu(), psutil.cpu_times()
        stats = await fn()
        m1, p1 = psutil.cpu_times(), postgres_cpu()
        self.metered_gateway |= gw is not None
        self.gateway += (gw.cpu_seconds() - g0) if gw else 0.0
        self.fake += (fake.cpu_seconds() - f0) if fake else 0.0
        self.client += sum(me.cpu_times()[:2]) - c0
        # backends started during the run count from zero; ones that exited are lost
        self.postgres += sum(t - p0.get(pid, 0.0) for pid, t in p1.items())
        self.idle += (m1.idle - m0.idle) + (m1.iowait - m0.iowait)
        self.total += sum(m1) - sum(m0)
        return stats


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every PostgreSQL process on this machine, by pid."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if (proc.info["name"] or "").startswith("postgres") and times is not None:
            out[proc.pid] = times.user + times.system
    return out


class Runner:
    """Holds the children of a run and measures each load run's CPU."""

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any]) -> None:
        self.args = args
        self.cfg = cfg
        self.only = set(args.only or SCENARIOS)
        self.logdir = Path(tempfile.mkdtemp(prefix="omnigate-bench-"))
        self.children: list[Child] = []
        self.db: BenchDatabase | None = None
        self.tenant: Tenant | None = None
        self.fake: Child | None = None
        self.fake_url = ""
        key = os.urandom(32)
        self.master = ("bench", key)
        self.master_spec = "bench:" + base64.b64encode(key).decode()
        self.results: dict[str, Any] = {
            "timestamp": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "config": cfg,
            "machine": machine(),
            "runs": {},
        }

    def say(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def gateway_env(self, workers: int) -> dict[str, str]:
        assert self.db is not None
        env = {
            "OMNIGATE_DATABASE_URL": self.db.app_url,
            "OMNIGATE_MASTER_KEYS": self.master_spec,
            "OPENAI_API_KEY": "sk-bench",
            "OMNIGATE_UPSTREAM_URL": self.fake_url or "http://127.0.0.1:9/v1",
            "OMNIGATE_COOKIE_SECURE": "false",
            # the load comes from one address; per-IP socket caps would measure the cap
            "OMNIGATE_MAX_CONNECTIONS_PER_IP": "1000000",
            "OMNIGATE_RETENTION_INTERVAL": "86000",
        }
        if workers > 1:
            env["OMNIGATE_REDIS_URL"] = self.args.redis_url
        return env

    def start_gateway(
        self, workers: int, name: str = "gateway", env: dict[str, str] | None = None
    ) -> tuple[Child, str]:
        port = free_port()
        env = {**self.gateway_env(workers), **(env or {})}
        child = start_gateway(port, workers, env, self.logdir, name)
        self.children.append(child)
        return child, f"http://127.0.0.1:{port}"

    async def measured(
        self, key: str, gw: Child | None, fn: Callable[[], Awaitable[RunStats]]
    ) -> RunStats:
        """Run a load function and record its stats with gateway/fake/client CPU per message."""
        usage = Usage()
        stats = await usage.measure(gw, self.fake, fn)
        self.record(key, stats, usage)
        return stats

    def record(self, key: str, stats: RunStats, usage: Usage) -> None:
        out = _stats_json(stats)
        # other work on the machine skews every number: keep the load next to them
        out["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        per = max(stats.ok, 1)
        if usage.metered_gateway:
            out["gateway_cpu_s"] = round(usage.gateway, 3)
            out["gateway_cpu_ms_per_msg"] = usage.gateway * 1000 / per
        out["fake_cpu_ms_per_msg"] = usage.fake * 1000 / per
        out["client_cpu_ms_per_msg"] = usage.client * 1000 / per
        out["postgres_cpu_ms_per_msg"] = usage.postgres * 1000 / per
        # is the machine the limit? the share of all cores busy (not idle, not waiting on I/O)
        out["machine_busy_pct"] = (
            round(100 * (1 - usage.idle / usage.total), 1) if usage.total > 0 else None
        )
        self.results["runs"][key] = out
        self.say(
            f"{key:<12} {stats.ok:>6} ok {stats.errors:>4} err  {stats.rate:8.1f} msg/s  "
            f"TTFT p50 {_ms(out['ttft_p50_ms'])} p99 {_ms(out['ttft_p99_ms'])}"
            + (
                f"  gw CPU {out['gateway_cpu_ms_per_msg']:.2f} ms/msg"
                if usage.metered_gateway
                else ""
            )
            + (f"  errors {stats.error_kinds}" if stats.errors else "")
        )

    async def one_session(
        self,
        runs: list[tuple[str, Child | None, Callable[[int], Awaitable[RunStats]]]],
        gateway_url: str,
    ) -> None:
        """The one-session runs, taking turns in rounds; each key records all its rounds.

        Around each gateway run its `/metrics` is read, so each key also records where
        its time to first delta went (bench/stages.py).
        """
        total = (
            self.cfg["messages"]
            if self.cfg["quick"]
            else max(self.cfg["messages"], ONE_SESSION_MESSAGES)
        )
        per_round = math.ceil(total / ONE_SESSION_ROUNDS)
        acc = {key: (RunStats(key, 1, 0), Usage()) for key, _, _ in runs}
        spent: dict[str, stages.Sums] = {key: {} for key, _, _ in runs}
        for _ in range(ONE_SESSION_ROUNDS):
            for key, gw, fn in runs:
                stats, usage = acc[key]
                before = await stages.scrape(gateway_url) if gw else {}
                stats.absorb(await usage.measure(gw, self.fake, lambda fn=fn: fn(per_round)))
                if gw:
                    stages.add_delta(spent[key], before, await stages.scrape(gateway_url))
        for key, (stats, usage) in acc.items():
            self.record(key, stats, usage)
            if spent[key]:
                self.results["runs"][key]["stages"] = stages.means_ms(spent[key], stats.ok)

    async def run(self) -> None:
        cfg = self.cfg
        n, m = cfg["sessions"], cfg["messages"]
        self.say(f"logs in {self.logdir}")
        load1 = os.getloadavg()[0]
        if load1 > 0.5 * (os.cpu_count() or 1):
            self.say(f"WARNING: load average {load1:.2f} before starting: numbers will be noisy")
        self.db = await BenchDatabase.create(self.args.database_url)
        self.results["database"] = {"name": self.db.name, "embedded": self.db.embedded}
        self.say(f"database {self.db.name}{' (embedded server)' if self.db.embedded else ''}")
        self.tenant = await self.db.tenant("bench")
        needs_fake = self.only & {"baseline", "ws", "sse", "idle", "scale", "heavy"}
        if needs_fake:
            port = free_port()
            self.fake = start_fake(port, cfg["delay_ms"], cfg["chunks"], self.logdir)
            self.children.append(self.fake)
            self.fake_url = f"http://127.0.0.1:{port}/v1"
        if "baseline" in self.only:
            await run_baseline(self.fake_url, 2, 2)  # warm-up
            await self.measured("baseline", None, lambda: run_baseline(self.fake_url, n, m))
        gw_needed = self.only & {"ws", "sse", "slow-jobs"}
        gw: Child | None = None
        url = ""
        if gw_needed:
            gw, url = self.start_gateway(cfg["workers"])
            self.say(f"gateway pid {gw.pid} on {url} ({cfg['workers']} worker(s))")
        site = self.tenant.site_key
        singles: list[tuple[str, Child | None, Callable[[int], Awaitable[RunStats]]]] = []
        if "baseline" in self.only:
            singles.append(("baseline_1", None, lambda k: run_baseline(self.fake_url, 1, k)))
        for transport, fn in (("ws", run_ws), ("sse", run_sse)):
            if transport not in self.only:
                continue
            assert gw is not None
            await fn(url, site, n, 2)  # warm-up: policy compiled, pools filled, code paths hot
            prof = self.start_profile(gw, transport) if self.args.profile else None
            await self.measured(transport, gw, lambda fn=fn: fn(url, site, n, m))
            if prof:
                self.stop_profile(*prof)
            singles.append((transport + "_1", gw, lambda k, fn=fn: fn(url, site, 1, k)))
        if singles:
            await self.one_session(singles, url)
        if "idle" in self.only:
            await self.run_idle()
        if "slow-jobs" in self.only:
            await self.run_slow(gw, url)
        if gw is not None:
            gw.stop()
        if "scale" in self.only:
            await self.run_scale()
        if "heavy" in self.only:
            await self.run_heavy()

    async def run_idle(self) -> None:
        # each kind in a gateway of its own, just started: memory freed by the load runs
        # (or by the other kind's connections) would be reused and hide what they cost
        for key, what, run in (
            ("idle", "WebSockets", run_idle),
            ("idle_sse", "fallback keep-alives", run_idle_http),
        ):
            gw, url = self.start_gateway(1, f"gateway-{key}")
            try:
                await self.run_idle_kind(gw, url, key, what, run)
            finally:
                gw.stop()

    async def run_idle_kind(
        self,
        gw: Child,
        url: str,
        key: str,
        what: str,
        run: Callable[[str, str, Child, int], Awaitable[IdleResult]],
    ) -> None:
        assert self.tenant is not None
        k = self.cfg["idle"]
        self.say(f"{key}: opening {k} {what} (gateway pid {gw.pid}, just started)")
        r = await run(url, self.tenant.site_key, gw, k)
        per = r.rss_per_conn
        self.results[key] = {
            "requested": r.requested,
            "held": r.held,
            "failed": r.failed,
            "first_error": r.first_error,
            "rss_before_mb": r.rss_before / 2**20,
            "rss_after_mb": r.rss_after / 2**20,
            "rss_per_conn_kb": None if per is None else per / 1024,
            "open_seconds": r.open_seconds,
            "server_fds": r.fds_after,
            "client_nofile": r.client_nofile,
            "server_nofile": "raised to the hard limit by preexec_fn (ulimit -n)",
        }
        self.say(
            f"{key}: {r.held}/{k} held, {r.failed} failed, "
            f"{'—' if per is None else f'{per / 1024:.1f}'} KB/conn, "
            f"opened in {r.open_seconds:.1f} s"
            + (f"; first error {r.first_error}" if r.first_error else "")
        )

    async def run_slow(self, gw: Child | None, url: str) -> None:
        assert self.db is not None and self.tenant is not None
        rows = self.cfg["retention_rows"]
        self.say(f"slow jobs: retention over {rows:,} backdated messages")
        # A database of its own: the gateways of this run take their first retention pass
        # a minute after they start, and one that took the lease then would skip (or do)
        # the pass being timed.
        own = await BenchDatabase.create(self.db.server_url)
        try:
            env = {**self.gateway_env(1), "OMNIGATE_DATABASE_URL": own.app_url}
            ret = await run_retention_job(own, env, rows)
        finally:
            await own.drop()
        self.say(f"retention: {_brief(ret)}")
        exp: dict[str, Any]
        if gw is None:
            exp = {"available": False, "reason": "no gateway running"}
        else:
            self.say(
                f"slow jobs: export of a visitor with {self.cfg['export_messages']:,} messages"
            )
            exp = await run_export_job(
                self.db, url, self.tenant.site_key, gw, self.master, self.cfg["export_messages"]
            )
        self.say(f"export: {_brief(exp)}")
        self.results["slow_jobs"] = {"retention": ret, "export": exp}

    async def run_scale(self) -> None:
        """ws throughput at N sessions, one worker against two, both sharing Redis.

        The two gateways differ only in their worker count: both are started for this
        run with `OMNIGATE_REDIS_URL` (a gateway of one worker needs none, and one without
        Redis would be measured against one paying a round trip per message), both are
        warmed up as the ws run's gateway is (N sessions, two messages each, so every
        worker's database pool has grown), and they take turns in SCALE_ROUNDS rounds,
        so drift on a shared machine hits both alike.
        """
        n = self.cfg["sessions"]
        if not _redis_up(self.args.redis_url):
            self.results["scale"] = {"ratio": None, "reason": "Redis unreachable"}
            self.say("scale: skipped, Redis unreachable")
            return
        assert self.tenant is not None
        site = self.tenant.site_key
        shared = {"OMNIGATE_REDIS_URL": self.args.redis_url}
        gws = {w: self.start_gateway(w, f"gateway_w{w}", shared) for w in (1, 2)}
        try:
            for _gw, url in gws.values():
                await run_ws(url, site, n, 2)
            names = {w: f"ws_workers{w}" for w in gws}
            rates = await self.take_turns(gws, names, SCALE_ROUNDS, run_ws)
        finally:
            for gw, _url in gws.values():
                gw.stop()
        w1, w2 = rates[1].rate, rates[2].rate
        self.results["scale"] = {"w1": w1, "w2": w2, "ratio": w2 / w1 if w1 else None,
                                 "rounds": SCALE_ROUNDS, "redis": True}  # fmt: skip

    async def take_turns(
        self,
        gws: dict[K, tuple[Child, str]],
        names: dict[K, str],
        rounds: int,
        load: Callable[[str, str, int, int], Awaitable[RunStats]],
    ) -> dict[K, RunStats]:
        """The same load at N sessions on each gateway in turn, `rounds` times (M messages
        in all per session), so drift on a shared machine hits each alike; each
        gateway's rounds are recorded together under its name."""
        assert self.tenant is not None
        site, n = self.tenant.site_key, self.cfg["sessions"]
        per_round = math.ceil(self.cfg["messages"] / rounds)
        acc = {k: (RunStats(names[k], n, 0), Usage()) for k in gws}
        for _ in range(rounds):
            for k, (gw, url) in gws.items():
                stats, usage = acc[k]
                run = partial(load, url, site, n, per_round)
                stats.absorb(await usage.measure(gw, self.fake, run))
        for k, (stats, usage) in acc.items():
            self.record(names[k], stats, usage)
        return {k: stats for k, (stats, _usage) in acc.items()}

    async def run_heavy(self) -> None:
        """ws at N sessions beside a visitor sending order lists: searched inline vs in a helper."""
        assert self.tenant is not None
        n = self.cfg["sessions"]
        site = self.tenant.site_key
        modes = {"inline": "0", "helper": "1"}
        gws = {
            mode: self.start_gateway(1, f"gateway_{mode}", {"OMNIGATE_REDACTION_HELPERS": h})
            for mode, h in modes.items()
        }
        try:
            for _gw, url in gws.values():
                await run_ws(url, site, n, 2)
                await run_ws_beside(url, site, 2, 2)  # the helper has started
            names = {mode: f"ws_beside_{mode}" for mode in gws}
            done = await self.take_turns(gws, names, HEAVY_ROUNDS, run_ws_beside)
            for mode, stats in done.items():
                self.results["runs"][names[mode]]["neighbour_answered"] = stats.neighbour
            self.results["heavy"] = {"message_chars": len(heavy_text(1)), "rounds": HEAVY_ROUNDS}
        finally:
            for gw, _url in gws.values():
                gw.stop()

    def start_profile(self, gw: Child, name: str) -> tuple[subprocess.Popen[bytes], Path] | None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.say("profile: py-spy not installed (.venv/bin/pip install py-spy)")
            return None
        out = self.args.out / f"{self.results['timestamp']}-{name}.collapsed"
        out.parent.mkdir(parents=True, exist_ok=True)
        pid = gw.serving_pids()[0]
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
             "--nonblocking", "-o", str(out), "--duration", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)
        return proc, out

    def stop_profile(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        self.results.setdefault("profiles", []).append(str(out))
        self.say(f"profile: {out}")

    async def close(self) -> None:
        for c in reversed(self.children):
            try:
                c.stop()
            except Exception as exc:  # keep tearing down
                self.say(f"stopping {c.name}: {exc}")
        if self.db is not None:
            try:
                await self.db.drop()
            except Exception as exc:
                self.say(f"could not drop {self.db.name}: {exc}")


def _redis_up(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1).close()
        return True
    except OSError:
        return False


def _ms(v: float | None) -> str:
    return "    —" if v is None else f"{v:7.2f}ms"


def _brief(d: dict[str, Any]) -> str:
    if not d.get("available"):
        return f"not available ({d.get('reason')})"
    keep = (
        "seconds",
        "peak_rss_mb",
        "server_peak_delta_mb",
        "bytes",
        "messages_in_export",
        "after",
    )
    return ", ".join(f"{k}={d[k]:.2f}" if isinstance(d[k], float) else f"{k}={d[k]}"
                     for k in keep if k in d)  # fmt: skip


async def _main(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    use_phone(cfg["phone"])
    # SIGTERM (`timeout`, a CI job cancelled) ends the run as Ctrl-C does: through the
    # cleanup below, so no child process or throwaway database outlives it
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    runner = Runner(args, cfg)
    t0 = time.perf_counter()
    try:
        await runner.run()
    finally:
        await runner.close()
    res = runner.results
    res["duration_s"] = round(time.perf_counter() - t0, 1)
    res["targets"] = report.targets(res)
    stem = args.out / res["timestamp"]
    report.write(res, stem.with_suffix(".json"))
    try:
        report.chart(res, stem.with_suffix(".png"))
        chart_note = f", {stem.with_suffix('.png')}"
    except Exception as exc:  # a missing matplotlib must not lose the numbers
        chart_note = f" (no chart: {exc})"
    print()
    print(report.table(res))
    print()
    print(report.targets_table(res["targets"]))
    if any(r.get("stages") for r in res["runs"].values()):
        print()
        print(report.stages_table(res))
    if "heavy" in res:
        print()
        print(report.heavy_table(res))
    print(f"\nwrote {stem.with_suffix('.json')}{chart_note} in {res['duration_s']} s")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        sys.exit(asyncio.run(_main(args)))
    except KeyboardInterrupt:
        sys.exit(130)
    except asyncio.CancelledError:  # SIGTERM, after the cleanup
        sys.exit(143)
