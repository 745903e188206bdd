"""Process model: one event loop per process; `--workers N` spawns N sharing the port.

Before any worker starts, `serve` checks once what every worker would refuse at
start (the database role, the connection, the migrations): a mistake there is one
clear line and a non-zero exit, not N workers restarted forever. The parent of N
workers then only supervises: it prepares the metrics directory, restarts a worker
that dies unexpectedly, forgets its metrics, and forwards SIGTERM/SIGINT for a
graceful shutdown (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from aiohttp import web

from gateway.config import ConfigError, Settings
from policies import SaltChain, SaltRing, day_of

log = logging.getLogger("omnigate.server")

# A worker dying sooner than this after its start is crash-looping: back off.
MIN_UPTIME = 5.0
MAX_RESTART_DELAY = 10.0
# Frames queued by the last replies reach their sockets before the 1001 close.
FLUSH_DELAY = 0.2


async def drain_connections(app: web.Application) -> None:
    """on_shutdown: the listener is closed; finish in-flight replies, then close with 1001."""
    from gateway import ws
    from gateway.appkeys import CONNECTIONS, SERVICES

    svc = app.get(SERVICES)
    if svc is not None:
        conns = [c for live in list(svc.live.values()) for c in list(live)]
        grace = svc.settings.shutdown_grace
        if conns:
            log.info("draining connections", extra={"connections": len(conns)})
            await asyncio.gather(*(c.drain(grace) for c in conns), return_exceptions=True)
            await asyncio.sleep(FLUSH_DELAY)
    await ws.close_all(app[CONNECTIONS])


async def _orphan_watch(app: web.Application) -> AsyncIterator[None]:
    """A supervised worker shuts down gracefully if its supervisor disappears."""
    parent = os.getppid()

    async def watch() -> None:
        while os.getppid() == parent:  # noqa: ASYNC110 - no event to wait on for this
            await asyncio.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    task = asyncio.create_task(watch())
    yield
    task.cancel()


def _run_one(
    settings: Settings, reuse_port: bool, salt_state: tuple[int, bytes] | None = None
) -> None:
    from gateway.app import create_app
    from gateway.logs import setup_logging

    setup_logging()
    if reuse_port:
        # Supervised: signals come from the supervisor only, once (a terminal's
        # Ctrl-C would otherwise reach the worker twice and cut the drain short).
        os.setpgrp()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings, salt_chain=SaltChain(*salt_state) if salt_state else None)
    # aiohttp runs on_shutdown after its sites stop accepting and before it
    # waits (shutdown_timeout) for handlers and runs cleanup_ctx.
    app.on_shutdown.append(drain_connections)
    if reuse_port:
        app.cleanup_ctx.append(_orphan_watch)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port or None,
        print=None,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace,
        loop=loop,
        handle_signals=True,
    )


def _run_supervised(
    settings: Settings, reuse_port: bool, salt_state: tuple[int, bytes] | None = None
) -> None:
    """A supervised worker: a crash is one scrubbed log line, not multiprocessing's raw
    traceback (whose text can quote a secret); the supervisor restarts it."""
    try:
        _run_one(settings, reuse_port, salt_state)
    except Exception as exc:
        from gateway.db import DatabaseError

        # these messages are safe to print; any other's is withheld, its type kept
        safe = isinstance(exc, ConfigError | DatabaseError)
        log.error(f"worker failed: {exc}" if safe else "worker failed", extra={"error": exc})
        sys.exit(1)


def check_listen(host: str, port: int) -> None:
    """Fail early, as one clear line (ConfigError), if ``host:port`` cannot be bound.

    Binds and closes a socket per address the host resolves to, before any database
    work or worker starts: N workers would otherwise each fail to bind and be
    restarted forever. (The port can still be taken in between; `omnigate` then
    reports aiohttp's OSError.) The probe never sets SO_REUSEPORT, even for the
    workers that do: with it, the bind would succeed beside another process's
    SO_REUSEPORT listener and the workers would share the port with it.
    """
    if port == 0:
        return
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {_reason(exc)}") from None
    except ValueError:  # UnicodeError: a name IDNA cannot encode (an empty label: "a..b")
        raise ConfigError(f"cannot listen on {where}: not a valid host name") from None
    for family, kind, proto, _, addr in dict.fromkeys(infos):
        try:
            probe_socket = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this host cannot open (no IPv6): asyncio skips it too
        with probe_socket as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {where}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _check_workers(settings: Settings, workers: int) -> None:
    if workers > 1 and not settings.redis_url:
        raise ConfigError(
            "--workers > 1 needs OMNIGATE_REDIS_URL (shared rate limits, "
            "policy invalidation and erasure)"
        )


def preflight(settings: Settings, workers: int = 1) -> None:
    """What `serve` would refuse, checked before any database work (raises ConfigError)."""
    _check_workers(settings, workers)
    check_listen(settings.host, settings.port)


def http_address(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 host in brackets (``http://[::1]:8080``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _check_database(url: str) -> None:
    from gateway.db import check_app_role, create_pool, require_migrations

    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        await check_app_role(pool)
        await require_migrations(
            pool, " (or set OMNIGATE_ADMIN_DATABASE_URL and serve migrates at start)"
        )
    finally:
        await pool.close()


def check_database(settings: Settings) -> None:
    """What a worker checks first, checked once: connect, the app role, the migrations.

    Raises DatabaseError (or asyncpg's own error), which `omnigate` prints as one
    line. Without it a supervisor would restart every worker forever on a mistake
    no restart can fix: an owner or superuser URL, an unreachable or unmigrated
    database.
    """
    if settings.database_url:  # the CLI always fills it (create_app refuses without)
        asyncio.run(_check_database(settings.database_url))


def serve(settings: Settings, workers: int = 1) -> None:
    """Serve until SIGINT/SIGTERM; several workers need Redis to agree with each other."""
    _check_workers(settings, workers)
    check_database(settings)
    sys.stderr.write(
        f"omnigate listening on {http_address(settings.host, settings.port)}"
        f" ({workers} worker{'s' if workers > 1 else ''})\n"
    )
    if workers == 1:
        _run_one(settings, reuse_port=False)
        return
    metrics_dir, created = _metrics_dir()
    try:
        _Supervisor(settings, workers).run()
    finally:
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _metrics_dir() -> tuple[str, bool]:
    """A fresh PROMETHEUS_MULTIPROC_DIR, set before any worker imports prometheus_client."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    created = not path
    if not path:
        path = tempfile.mkdtemp(prefix="omnigate-metrics-")
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):  # counters must not carry over runs
        os.remove(stale)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path, created


def _forget_metrics(pid: int) -> None:
    """`metrics.mark_process_dead` without importing gateway.metrics here: that would
    give the supervisor, which serves nothing, its own live gauges (redis_up = 0)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, os.environ["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]


class _Supervisor:
    """Keeps N workers alive until told to stop.

    It also holds the chain of daily IP salts (policies.SaltChain) its workers derive
    theirs from, so an address hashes alike in every worker (`ip_mode: hash`). It moves
    the chain past each day as that day's salt expires, like the workers' rings do, so
    it never holds what could rebuild a destroyed salt; a worker it starts later gets
    the chain as it stands then.
    """

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.stopping = False
        self.restart_delay = 0.0
        self.salts = SaltChain.new(self._salt_floor(), os.urandom)

    @staticmethod
    def _salt_floor() -> int:
        # the earliest day whose salt a worker's SaltRing still keeps
        return day_of(time.time()) - SaltRing.KEEP_DAYS + 1

    def advance_salts(self) -> None:
        """Forget the days whose salts the workers' rings have destroyed by now."""
        self.salts.advance_to(self._salt_floor())

    def worker_args(self) -> tuple[Settings, bool, tuple[int, bytes]]:
        """`_run_supervised`'s arguments for a worker started now: the chain as it stands today.

        The spawn context pickles them down a pipe to the child: no file holds them.
        """
        self.advance_salts()
        return self.settings, True, self.salts.state()

    def _spawn(self) -> BaseProcess:
        p = self.ctx.Process(target=_run_supervised, args=self.worker_args(), daemon=False)
        p.start()
        p._omnigate_started = time.monotonic()  # type: ignore[attr-defined]
        return p

    def _forward(self, signum: int, _frame: object) -> None:
        # first signal: graceful (SIGTERM to each worker); a second one: immediate
        sig = signal.SIGKILL if self.stopping else signal.SIGTERM
        self.stopping = True
        for p in self.procs:
            if p.pid and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        self.procs = [self._spawn() for _ in range(self.workers)]
        while not self.stopping:
            wait([p.sentinel for p in self.procs], timeout=0.5)
            self.advance_salts()
            for i, p in enumerate(self.procs):
                if p.is_alive() or self.stopping:
                    continue
                assert p.pid is not None
                _forget_metrics(p.pid)
                uptime = time.monotonic() - p._omnigate_started  # type: ignore[attr-defined]
                self.restart_delay = (
                    min(MAX_RESTART_DELAY, max(0.5, self.restart_delay * 2))
                    if uptime < MIN_UPTIME
                    else 0.0
                )
                sys.stderr.write(
                    f"omnigate: worker {p.pid} exited ({p.exitcode}); restarting"
                    f"{f' in {self.restart_delay:.1f}s' if self.restart_delay else ''}\n"
                )
                self._sleep(self.restart_delay)
                if not self.stopping:
                    self.procs[i] = self._spawn()
        self._join()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _join(self) -> None:
        # drain (grace) + aiohttp's handler wait (grace) + slack, then no mercy
        deadline = time.monotonic() + 2 * self.settings.shutdown_grace + 5.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5.0)
            if p.pid is not None:
                _forget_metrics(p.pid)
