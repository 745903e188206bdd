"""Process model: one event loop per process; `--workers N` forks N sharing the port."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import tempfile

from aiohttp import web

from gateway.config import ConfigError, Settings


def _run_one(settings: Settings, reuse_port: bool) -> None:
    from gateway.app import create_app
    from gateway.logs import setup_logging

    setup_logging()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port or None,
        print=None,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace,
        loop=loop,
        handle_signals=True,
    )


def serve(settings: Settings, workers: int = 1) -> None:
    """Serve until SIGINT/SIGTERM; several workers need Redis to agree with each other."""
    if workers > 1 and not settings.redis_url:
        raise ConfigError(
            "--workers > 1 needs OMNIGATE_REDIS_URL (shared rate limits, "
            "policy invalidation and erasure)"
        )
    sys.stderr.write(
        f"omnigate listening on http://{settings.host}:{settings.port}"
        f" ({workers} worker{'s' if workers > 1 else ''})\n"
    )
    if workers == 1:
        _run_one(settings, reuse_port=False)
        return
    # prometheus_client reads this at import: set before any worker imports gateway.metrics
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="omnigate-metrics-"))
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_run_one, args=(settings, True), daemon=False) for _ in range(workers)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.pid and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
