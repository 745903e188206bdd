"""The Redis client the gateway shares between its rate limiter and its event bus.

Redis is an accelerator, never a dependency of answering: every caller catches
`REDIS_ERRORS` and degrades. So the client fails fast (short socket timeouts,
no retries inside redis-py) and the callers decide when to try again. The event
bus subscribes through a client of its own (`connect_subscriber`) that never retries.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

# A dead or partitioned Redis costs at most this per attempt (and attempts are rationed).
SOCKET_TIMEOUT = 0.05
CONNECT_TIMEOUT = 0.1
# An idle connection is checked (PING, PONG awaited) before its next command after this
# many seconds. The bus's subscription is checked by the bus itself (`gateway.bus.RedisBus`):
# it PINGs after this long without a message and drops the subscription as a gap when
# nothing has come back after as long again. redis-py's pub/sub health check only sends
# its PING and never looks for the answer, so it would not notice a silent Redis.
HEALTH_CHECK_INTERVAL = 5

# Everything a Redis call can raise when Redis is away (builtin TimeoutError is an OSError).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


def connect(url: str, **overrides: Any) -> Redis:
    """A client for `url` with fail-fast timeouts; connects lazily on first use."""
    kwargs: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        # One immediate retry on a broken connection only: after a Redis restart
        # every pooled socket is stale and fails once. Timeouts are not retried.
        "retry": Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
        "client_name": "omnigate",
    }
    kwargs.update(overrides)
    return Redis.from_url(url, **kwargs)


def connect_subscriber(url: str, **overrides: Any) -> Redis:
    """A client for the bus's subscription: as `connect`, but never retrying.

    With a retry, redis-py answers a dropped pub/sub connection (Redis restarted, or the
    connection alone closed: `CLIENT KILL`, the pub/sub output-buffer limit, a proxy or
    failover reset) by reconnecting and re-subscribing inside the read, so the subscriber
    never learns that events published in the gap were lost. Without one, every drop
    raises to the subscriber, which re-subscribes itself and catches up
    (`gateway.bus.RedisBus`).

    redis-py's own health check is off: on a subscription it sends PING but never checks
    that PONG comes back, and it hides those PONGs from the reader. The bus pings itself
    and sees the answers (a Redis that went silent without closing the connection).
    """
    kwargs: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
    return connect(url, **{**kwargs, **overrides})


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


async def ping(client: Redis) -> bool:
    """Whether Redis answers now."""
    try:
        return bool(await client.ping())
    except REDIS_ERRORS:
        return False
