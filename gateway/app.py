"""The aiohttp application factory: services in cleanup_ctx, routes, middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg
from aiohttp import web

from gateway import admin, bus, connection, metrics, privacy, widget, ws
from gateway.appkeys import CONNECTIONS, SALT_CHAIN, SERVICES, SETTINGS
from gateway.chat import STORAGE_ERRORS
from gateway.config import Settings
from gateway.crypto import DataKeyCache, KeyRing, dev_master_keys
from gateway.db import check_app_role, create_pool, migrations_current
from gateway.groupcommit import GroupCommitter
from gateway.httpctx import add_cors_headers
from gateway.redactpool import RedactionPool
from gateway.retention import retention_loop
from gateway.services import Services
from gateway.tenants import TenantRegistry
from gateway.upstream import ChatModel, OfflineModel, UpstreamClient, UpstreamConfig
from gateway.vault import Vault
from gateway.visitor import today
from policies import Policy, SaltChain, SaltRing

log = logging.getLogger("omnigate.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The widget and demo page need no inline script or eval (issue 7).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": CSP,
    "Cross-Origin-Resource-Policy": "cross-origin",
}


# replaces aiohttp's "Python/3.x aiohttp/3.y", which names versions to look up flaws for
SERVER_HEADER = "omnigate"


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp sets its default Server before on_response_prepare runs (error responses
    # and the 101 included), so this assignment is what goes out
    response.headers["Server"] = SERVER_HEADER
    if request.path.startswith("/api/"):
        # consent, requests, conversation lists: personal data, and a visitor may be
        # authenticated by cookie alone, so no shared cache may keep a copy
        response.headers.setdefault("Cache-Control", "no-store")
    if response.status == 101:
        # a WebSocket upgrade has no body for them to govern, and its response lives as
        # long as the socket: four headers less per idle socket
        return
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


_HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "rate_limited",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer unexpected failures with a JSON 500 and count every response by route template."""
    route = request.match_info.route.resource
    template = route.canonical if route is not None else None
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        metrics.count_http_request(template, exc.status)
        _log_refusal(template, exc.status)
        if (
            exc.status >= 400
            and request.path.startswith("/api/")
            and (exc.content_type != "application/json")
        ):
            # the router's own 404/405 speak plain text; API clients get the JSON shape
            code = _HTTP_CODES.get(exc.status, "bad_request")
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
            return web.json_response(
                {"error": {"code": code, "message": exc.reason}},
                status=exc.status,
                headers=headers,
            )
        raise
    except web.RequestPayloadError:
        # a body that cannot be read (one not in the Content-Encoding it declares, say):
        # the client's error, not a bug. The exception may quote the body: not logged.
        metrics.count_http_request(template, 400)
        _log_refusal(template, 400)
        return web.json_response(
            {"error": {"code": "bad_request", "message": "the body could not be read"}},
            status=400,
        )
    except STORAGE_ERRORS as exc:
        if isinstance(exc, ConnectionError) and request.content.exception() is exc:
            # the client went away mid-upload: aiohttp fails the body's read with the
            # ConnectionResetError it set on the body when the connection was lost. Not a
            # storage outage, and nobody is left to answer; counted as 499 (client closed
            # request). A database connection failing (ConnectionRefusedError from asyncpg
            # during an outage), whether or not the client is still there, reaches the 503.
            log.debug("client went away", extra={"route": template})
            metrics.count_http_request(template, 499)
            return web.Response(status=499)
        if isinstance(exc, asyncpg.DataError):
            # a value PostgreSQL refuses (SQLSTATE class 22: a NUL in text, a timestamp
            # out of range; asyncpg's own argument encoding errors are this class too) is
            # the client's error, not an outage to retry; connection failures (class 08),
            # InterfaceError and OSError are not DataError. The message may quote the
            # value: neither logged nor echoed.
            log.info(
                "value refused by storage",
                extra={"route": template, "kind": type(exc).__name__, "code": exc.sqlstate},
            )
            metrics.count_http_request(template, 422)
            return web.json_response(
                {"error": {"code": "invalid_request", "message": "a value could not be stored"}},
                status=422,
            )
        # PostgreSQL unreachable is an outage, not a bug: 503, no traceback
        log.warning("storage unavailable", extra={"route": template, "kind": type(exc).__name__})
        metrics.count_http_request(template, 503)
        return web.json_response(
            {"error": {"code": "storage_unavailable", "message": "storage is unavailable"}},
            status=503,
            headers={"Retry-After": "1"},
        )
    except Exception:
        log.exception("unhandled error", extra={"route": template})
        metrics.count_http_request(template, 500)
        return web.json_response(
            {"error": {"code": "internal", "message": "internal error"}}, status=500
        )
    metrics.count_http_request(template, response.status)
    _log_refusal(template, response.status)
    return response


def _log_refusal(route: str | None, status: int) -> None:
    """One line per refused request: the route template and status, never the path,
    query or body (they may carry a token or personal data)."""
    if 400 <= status < 500:
        log.info("request refused", extra={"route": route, "status": status})


def build_services(
    settings: Settings,
    pool: object,
    model: ChatModel,
    upstream: UpstreamConfig | None,
    salt_chain: SaltChain | None = None,
) -> Services:
    """Assemble the per-process services around an open pool.

    `salt_chain`: the supervisor's, so that workers hash IPs alike; a process alone
    makes its own salts.
    """
    keys = settings.master_keys or dev_master_keys(settings.state_dir)
    keyring = KeyRing(keys)
    shared: dict[str, Any] = {}
    if settings.redis_url:  # shared limits and events across processes (docs/scaling.md)
        from gateway.bus import RedisBus
        from gateway.ratelimit import FallbackRateLimiter, LocalRateLimiter, RedisRateLimiter
        from gateway.redisconn import connect, connect_subscriber

        r = connect(settings.redis_url)
        limiter = FallbackRateLimiter(RedisRateLimiter(r), LocalRateLimiter())
        # the bus subscribes on a client of its own that never retries (it sees every
        # drop and catches up), and closes it in `bus.close()`
        events = RedisBus(r, subscriber=connect_subscriber(settings.redis_url))
        shared = {"redis": r, "bus": events, "limiter": limiter}
    return Services(
        settings=settings,
        pool=pool,
        keyring=keyring,
        vault=Vault(keyring, DataKeyCache()),
        tenants=TenantRegistry(pool),
        model=model,
        upstream=upstream,
        salts=SaltRing(os.urandom, chain=salt_chain),
        **shared,
    )


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not settings.database_url:
        raise RuntimeError("create_app needs settings.database_url (the CLI fills it)")
    pool = await create_pool(settings.database_url)
    client: UpstreamClient | None = None
    redis_client = None
    writer: GroupCommitter | None = None
    try:
        await check_app_role(pool)
        upstream = None
        model: ChatModel = OfflineModel()
        if not settings.offline:
            assert settings.openai_api_key is not None
            upstream = UpstreamConfig(
                base_url=settings.upstream_url,
                api_key=settings.openai_api_key,
                # every chat names the model its tenant's policy sets (upstream_for)
                model=Policy.model,
                first_token_timeout=settings.first_token_timeout,
                idle_timeout=settings.idle_timeout,
                retries=settings.upstream_retries,
            )
            client = UpstreamClient(upstream)
            await client.start()
            model = client
        svc = build_services(settings, pool, model, upstream, app.get(SALT_CHAIN))
        # before any rotation: the hashes tenants already hold were made under the primary
        await svc.hash_keys.seal_missing()
        svc.writer = writer = GroupCommitter(pool)
        svc.redaction = RedactionPool(settings.redaction_helpers)
        redis_client = svc.redis
        _subscribe(svc)
        await svc.bus.start()
        app[SERVICES] = svc
        retention = asyncio.create_task(_retention(svc, settings.retention_interval))
        salts = asyncio.create_task(_expire_salts(svc.salts)) if svc.salts else None
        yield
        for task in (retention, salts):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await svc.bus.close()
        await svc.redaction.aclose()
        await svc.aclose()
    finally:
        await ws.close_all(app[CONNECTIONS])
        if client is not None:
            await client.close()
        if redis_client is not None:
            await redis_client.aclose()
        if writer is not None:
            await writer.aclose()  # it keeps a connection the pool must get back to close
        await pool.close()


async def _retention(svc: Services, interval: float) -> None:
    # first pass a minute after start, not during it: a restart storm must not stampede
    await asyncio.sleep(min(60.0, interval))
    await retention_loop(svc, interval)


# how often a process destroys the IP salts (and moves its salt chain) that have expired
SALT_EXPIRY_CHECK = 60.0


async def _expire_salts(salts: SaltRing) -> None:
    """A day's IP salt is destroyed on time even when no visitor of a hash tenant comes by."""
    while True:
        salts.expire(today())
        await asyncio.sleep(SALT_EXPIRY_CHECK)


def _subscribe(svc: Services) -> None:
    """How every process reacts to policy and consent changes, erasure, restriction, rotation."""
    # re-reads of consent that tell sockets what changed, held until done
    refreshing: set[asyncio.Task[None]] = set()

    async def policy_changed(payload: dict[str, Any]) -> None:
        # tenant_id None: every tenant (the Redis bus reconnected and may have missed events)
        tid = payload.get("tenant_id")
        tenant = UUID(tid) if tid is not None else None
        svc.tenants.invalidate(tenant)
        svc.forget_upstream(tenant)

    async def subject_erased(payload: dict[str, Any]) -> None:
        key = (UUID(payload["tenant_id"]), UUID(payload["subject_id"]))
        svc.vault.cache.forget(*key)
        for conn in list(svc.live.get(key, ())):
            conn.terminate("erased")  # never awaits a peer: a stalled one cannot hold the bus

    async def subject_restricted(payload: dict[str, Any]) -> None:
        key = (UUID(payload["tenant_id"]), UUID(payload["subject_id"]))
        # a hello loading this subject's session now joins `live` after this: it reads
        # restriction and consent again before its first message (connection.hello)
        connection.ConsentChanges.count += 1
        for conn in list(svc.live.get(key, ())):
            if conn.visitor is not None:
                conn.visitor.restricted = True
                # a re-read of the record already under way may predate it: read again
                conn.visitor.consent_epoch += 1

    async def consent_changed(payload: dict[str, Any]) -> None:
        # tenant_id None: every subject (the Redis bus reconnected and may have missed events)
        tid, sid = payload.get("tenant_id"), payload.get("subject_id")
        tenant = UUID(tid) if tid is not None else None
        subject = UUID(sid) if tenant is not None and sid is not None else None
        revoke = [p for p in payload.get("revoke") or () if isinstance(p, str)]
        # revocations hold before this returns; grants are read from the database
        for conn, before in connection.consent_changed_elsewhere(svc.live, tenant, subject, revoke):
            # not awaited here: a slow socket must not hold up the bus
            task = asyncio.create_task(conn.refresh_consent(before))
            refreshing.add(task)
            task.add_done_callback(refreshing.discard)

    async def keys_rotated(payload: dict[str, Any]) -> None:
        svc.vault.cache.clear()

    svc.bus.subscribe(bus.POLICY_CHANGED, policy_changed)
    svc.bus.subscribe(bus.SUBJECT_ERASED, subject_erased)
    svc.bus.subscribe(bus.KEYS_ROTATED, keys_rotated)
    svc.bus.subscribe(bus.SUBJECT_RESTRICTED, subject_restricted)
    svc.bus.subscribe(bus.CONSENT_CHANGED, consent_changed)


async def healthz(request: web.Request) -> web.Response:
    """The process answers."""
    return web.json_response({"status": "ok"})


# A hung database must not hang the probe: it answers 503 instead.
READINESS_TIMEOUT = 5.0


async def readiness(
    pool: Any, redis: Any = None, upstream: UpstreamConfig | None = None
) -> tuple[int, dict[str, Any]]:
    """`(status code, body)` of `/readyz`: database reachable, migrations current, Redis.

    `upstream` is reported as "offline" (built-in model) or "configured"; there
    is no circuit breaker whose state could make us unready, and an upstream
    outage is the model's, not this instance's (taking every instance out of
    rotation would not help).
    """
    checks: dict[str, str] = {}
    try:
        current = await asyncio.wait_for(migrations_current(pool), READINESS_TIMEOUT)
        checks["database"] = "ok" if current else "migrations_pending"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    ok = all(v == "ok" for v in checks.values())
    status = "ok" if ok else "unavailable"
    if redis is not None:
        from gateway.redisconn import ping

        # Redis down degrades (per-process limits) but does not make us unready:
        # failing every instance's readiness at once would turn it into an outage.
        checks["redis"] = "ok" if await ping(redis) else "unreachable"
        status = "degraded" if ok and checks["redis"] != "ok" else status
    body = {
        "status": status,
        "checks": checks,
        "upstream": "offline" if upstream is None else "configured",
    }
    return (200 if ok else 503), body


async def readyz(request: web.Request) -> web.Response:
    """Database reachable and migrations current, Redis when configured, upstream mode."""
    svc = request.app[SERVICES]
    code, body = await readiness(svc.pool, svc.redis, svc.upstream)
    return web.json_response(body, status=code)


# headers a reverse proxy adds: the peer is then the proxy, not the one who asked
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def metrics_access_allowed(
    remote: str | None, auth_header: str | None, token: str | None, proxied: bool = False
) -> bool:
    """Whether a `/metrics` request may be answered (pure: table-tested).

    With a token configured, only `Authorization: Bearer <token>` (compared in
    constant time) is accepted, from anywhere; without one, only loopback peers, and
    not a request that came through a proxy: behind a reverse proxy on the same host
    every request's peer is loopback, whoever sent it.
    """
    if token:
        import hmac

        given = (auth_header or "").encode()
        return hmac.compare_digest(given, f"Bearer {token}".encode())
    if not remote or proxied:
        return False
    import ipaddress

    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:  # a unix socket path, or nothing usable
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text; bearer token when configured, else loopback peers only."""
    token = request.app[SETTINGS].metrics_token
    proxied = any(h in request.headers for h in PROXY_HEADERS)
    auth = request.headers.get("Authorization")
    if not metrics_access_allowed(request.remote, auth, token, proxied):
        if token:
            raise web.HTTPUnauthorized(text="metrics need a bearer token")
        raise web.HTTPForbidden(
            text="metrics are served to loopback only, not through a proxy; set a token"
        )
    svc = request.app.get(SERVICES)
    if svc is not None:  # this process's pool, as of this scrape
        metrics.set_db_pool(svc.pool.get_size(), svc.pool.get_idle_size())
    body, content_type = metrics.render_metrics()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


def setup_routes(app: web.Application) -> None:
    """Bind every route group."""
    app.router.add_get("/v1/widget/ws", ws.widget_ws)
    app.router.add_post("/v1/widget/chat", ws.widget_chat)
    app.router.add_route("OPTIONS", "/v1/widget/chat", ws.widget_chat_preflight)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    admin.setup_routes(app)
    privacy.setup_routes(app)
    widget.setup_routes(app)


def create_app(settings: Settings, *, salt_chain: SaltChain | None = None) -> web.Application:
    """The gateway application for these settings (a worker's: with its supervisor's chain)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=1024 * 1024)
    app[SETTINGS] = settings
    if salt_chain is not None:
        app[SALT_CHAIN] = salt_chain
    app[CONNECTIONS] = weakref.WeakSet()
    app.cleanup_ctx.append(_services_ctx)
    app.on_response_prepare.append(_security_headers)
    app.on_response_prepare.append(add_cors_headers)
    setup_routes(app)
    metrics.register_routes(r.canonical for r in app.router.resources())
    return app
