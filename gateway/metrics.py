"""Prometheus metrics for omnigate: one module-level object per metric, closed label sets.

Privacy rule (DESIGN §5): no label ever carries a visitor, session, IP, tenant
or free text. Every label value below comes from a documented closed set, and
the helpers pass values through :func:`label_guard`, which maps anything else
to ``"other"`` -- so a bug can add at most one series, never leak text or blow
up cardinality. The tenant is deliberately not a label (cardinality).

Multiprocess mode (``omnigate serve --workers N``)
-------------------------------------------------
prometheus_client picks its value storage when *it* is first imported: with
``PROMETHEUS_MULTIPROC_DIR`` set, every process writes its samples to mmap
files in that directory and any worker answering ``/metrics`` aggregates all
of them. The variable must therefore be set before anything imports
``prometheus_client`` (this module included), and before workers are started,
so they inherit it. The CLI does, in ``serve`` and before importing the app::

    if workers > 1:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="omnigate-metrics-")
        for stale in glob.glob(os.path.join(path, "*.db")):  # wipe between runs
            os.remove(stale)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    from gateway import metrics  # only now

and calls :func:`mark_process_dead` with the pid of every worker that exits,
so the ``live*`` gauges forget it. (Setting the variable from a start-up shell
script works too.) Limits in that mode: no custom collectors, no
``set_function``, no Info/Enum, gauges need ``multiprocess_mode``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

OTHER = "other"

# The ``*_created`` series double the output and do not exist in multiprocess
# mode; dropping them keeps one shape of output whatever the worker count.
disable_created_metrics()  # type: ignore[no-untyped-call]

# --- closed label sets ---------------------------------------------------------

#: ``omnigate_messages_total{outcome}``: what became of each visitor message.
OUTCOMES = frozenset(
    {
        "answered",
        "cut",  # answered, but the gateway cut the reply at its size or time bound
        "refused_consent",
        "rate_limited",
        "too_large",
        "upstream_error",
        "storage_error",
        "redaction_failed",
        "restricted",
    }
)

#: ``omnigate_error_frames_total{code}``: the protocol's closed error-code set (DESIGN §3).
ERROR_CODES = frozenset(
    {
        "bad_request",
        "unknown_type",
        "too_large",
        "rate_limited",
        "consent_required",
        "session_invalid",
        "upstream_unavailable",
        "upstream_timeout",
        "upstream_rejected",
        "storage_unavailable",
        "internal",
    }
)

#: ``omnigate_upstream_errors_total{kind}``: why a call to the model failed. Mirrors
#: ``gateway.upstream.ERROR_KINDS`` (a test keeps them equal); not imported from there
#: so that this module stays importable before anything else.
UPSTREAM_ERROR_KINDS = frozenset(
    {
        "status_429",
        "status_5xx",
        "status_4xx",
        "auth",  # 401/403: our key
        "quota",  # 429 insufficient_quota: not retried
        "connect",  # connection refused/reset, DNS, TLS
        "first_token_timeout",
        "idle_timeout",
        "cut",  # stream ended before completion
        "malformed",
        "stream_error",
        "redirect",  # 3xx: never followed (it would re-send the conversation elsewhere)
    }
)

#: ``omnigate_stage_seconds{stage}``: the gateway's own overhead per message.
STAGES = frozenset({"policy", "redaction", "crypto", "database"})

#: ``omnigate_redactions_total{entity}``: the policy's redactable entities (DESIGN §4).
ENTITIES = frozenset({"email", "phone", "credit_card", "iban", "ip", "us_ssn", "secret"})

#: ``omnigate_consent_decisions_total{purpose}`` (DESIGN §4).
PURPOSES = frozenset(
    {"necessary", "ai_processing", "conversation_storage", "analytics", "marketing", "preferences"}
)
#: ``omnigate_consent_decisions_total{decision}``.
DECISIONS = frozenset({"granted", "revoked"})

#: ``omnigate_privacy_signals_total{signal}``: Do Not Track, Global Privacy Control.
SIGNALS = frozenset({"dnt", "gpc"})

#: ``omnigate_privacy_requests_total{kind}``: GDPR and CCPA kinds plus the
#: immediate self-service export/erase endpoints (DESIGN §6).
PRIVACY_REQUEST_KINDS = frozenset(
    {
        "access",
        "rectification",
        "erasure",
        "portability",
        "restriction",
        "objection",
        "know",
        "delete",
        "opt_out",
        "export",
        "automated_decision",
    }
)
#: ``omnigate_privacy_requests_total{status}``: lifecycle transitions.
PRIVACY_REQUEST_STATUSES = frozenset(
    {"received", "acknowledged", "completed", "rejected", "failed"}
)

#: ``omnigate_retention_purged_total{kind}``: what a retention pass removed or anonymized.
RETENTION_KINDS = frozenset(
    {
        "messages",
        "conversations",
        "sessions",
        "subjects",
        "session_ips",
        "redaction_maps",
        "redaction_entries",
        "analytics_events",
    }
)


#: ``omnigate_http_requests_total{route}``: aiohttp route *templates* (never raw
#: paths). Extended at start-up by :func:`register_routes`; unmatched requests
#: (404s on arbitrary paths) are ``"unmatched"``.
_ROUTES: set[str] = {
    "/v1/widget/ws",
    "/v1/widget/chat",
    "/api/privacy/consent",
    "/api/privacy/export",
    "/api/privacy/delete",
    "/api/gdpr/request",
    "/api/gdpr/request/{id}",
    "/api/privacy/ccpa/request",
    "/.well-known/gpc.json",
    "/api/admin/policy",
    "/api/admin/policy/history",
    "/metrics",
    "/healthz",
    "/readyz",
    "/demo",
}
UNMATCHED_ROUTE = "unmatched"


def label_guard(value: str, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is in the closed set ``allowed``, else ``"other"``."""
    return value if value in allowed else OTHER


# --- metric objects ------------------------------------------------------------

# Sub-millisecond to one second: policy and redaction are microseconds, crypto
# tens of microseconds, a database round trip milliseconds.
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)

WS_CONNECTIONS = Gauge(
    "omnigate_ws_connections",
    "Open widget WebSocket connections.",
    multiprocess_mode="livesum",
)
SESSIONS_ACTIVE = Gauge(
    "omnigate_sessions_active",
    "Widget sessions currently attached to a connection (after hello).",
    multiprocess_mode="livesum",
)
MESSAGES = Counter(
    "omnigate_messages_total",
    "Visitor messages by final outcome.",
    ["outcome"],
)
ERROR_FRAMES = Counter(
    "omnigate_error_frames_total",
    "Error frames sent to widgets, by protocol error code.",
    ["code"],
)
UPSTREAM_TTFT = Histogram(
    "omnigate_upstream_ttft_seconds",
    "Time from forwarding a message to the first streamed token from the model.",
    buckets=TTFT_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "omnigate_upstream_duration_seconds",
    "Total duration of an upstream model call, until the stream ends.",
    buckets=DURATION_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "omnigate_upstream_errors_total",
    "Messages whose upstream call failed (after any retries), by the last error's kind.",
    ["kind"],
)
STAGE_SECONDS = Histogram(
    "omnigate_stage_seconds",
    "Gateway overhead per message, by stage.",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
REDACTIONS = Counter(
    "omnigate_redactions_total",
    "PII entities replaced by placeholders before forwarding, by entity.",
    ["entity"],
)
REDACTION_HELPER = Counter(
    "omnigate_redaction_helper_total",
    "Messages searched for PII by a helper process (costly ones), off the event loop.",
)
CONSENT_DECISIONS = Counter(
    "omnigate_consent_decisions_total",
    "Consent decisions recorded, by purpose and decision.",
    ["purpose", "decision"],
)
PRIVACY_SIGNALS = Counter(
    "omnigate_privacy_signals_total",
    "Sessions that carried a honoured privacy signal (dnt, gpc).",
    ["signal"],
)
PRIVACY_REQUESTS = Counter(
    "omnigate_privacy_requests_total",
    "Privacy (GDPR/CCPA) request transitions, by kind and status.",
    ["kind", "status"],
)
PRIVACY_REQUESTS_OVERDUE = Gauge(
    "omnigate_privacy_requests_overdue",
    "Open privacy requests past their due date (all tenants).",
    # Every worker that computes it reads the same database: take the largest.
    multiprocess_mode="livemax",
)
PRIVACY_REQUESTS_ACK_OVERDUE = Gauge(
    "omnigate_privacy_requests_ack_overdue",
    "Privacy requests not yet acknowledged past their acknowledgement date (all tenants).",
    # computed with the overdue gauge, from the same database: take the largest
    multiprocess_mode="livemax",
)
RETENTION_PURGED = Counter(
    "omnigate_retention_purged_total",
    "Items deleted or anonymized by retention, by kind.",
    ["kind"],
)
DB_POOL_CONNECTIONS = Gauge(
    "omnigate_db_pool_connections",
    "Database pool connections: state=size (open) or idle.",
    ["state"],
    multiprocess_mode="livesum",
)
REDIS_UP = Gauge(
    "omnigate_redis_up",
    "1 when Redis is reachable, 0 when degraded (or not configured).",
    # A single worker that cannot reach Redis makes the instance degraded.
    multiprocess_mode="livemin",
)
RATELIMIT_FALLBACK = Counter(
    "omnigate_ratelimit_fallback_total",
    "Rate-limit checks answered by the local fallback because Redis was unavailable.",
)
IDENTITY_UNVERIFIED = Counter(
    "omnigate_identity_unverified_total",
    "hello frames whose user identity HMAC did not verify.",
)
HTTP_REQUESTS = Counter(
    "omnigate_http_requests_total",
    "HTTP requests by aiohttp route template and status code.",
    ["route", "status"],
)

# Pre-create the small fixed series so they read 0 instead of being absent
# (rate() and alerts then work from the first scrape), and so the hot path
# of timed() is a dict lookup.
for _outcome in OUTCOMES:
    MESSAGES.labels(outcome=_outcome)
for _code in ERROR_CODES:
    ERROR_FRAMES.labels(code=_code)
_STAGE_CHILDREN = {s: STAGE_SECONDS.labels(stage=s) for s in (*STAGES, OTHER)}


# --- helpers -------------------------------------------------------------------


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Observe the wall time of the ``with`` block in ``omnigate_stage_seconds{stage}``."""
    child = _STAGE_CHILDREN.get(stage) or _STAGE_CHILDREN[OTHER]
    start = time.perf_counter()
    try:
        yield
    finally:
        child.observe(time.perf_counter() - start)


def count_message(outcome: str) -> None:
    """Count one visitor message with its final outcome."""
    MESSAGES.labels(outcome=label_guard(outcome, OUTCOMES)).inc()


def count_error_frame(code: str) -> None:
    """Count one error frame sent to a widget."""
    ERROR_FRAMES.labels(code=label_guard(code, ERROR_CODES)).inc()


def count_upstream_error(kind: str) -> None:
    """Count one failed upstream attempt."""
    UPSTREAM_ERRORS.labels(kind=label_guard(kind, UPSTREAM_ERROR_KINDS)).inc()


def count_redaction(entity: str, n: int = 1) -> None:
    """Count ``n`` redacted entities of one kind."""
    if n > 0:
        REDACTIONS.labels(entity=label_guard(entity, ENTITIES)).inc(n)


def count_consent(purpose: str, decision: str) -> None:
    """Count one consent decision (``granted`` or ``revoked``) for a purpose."""
    CONSENT_DECISIONS.labels(
        purpose=label_guard(purpose, PURPOSES), decision=label_guard(decision, DECISIONS)
    ).inc()


def count_privacy_signal(signal: str) -> None:
    """Count one honoured privacy signal (``dnt`` or ``gpc``)."""
    PRIVACY_SIGNALS.labels(signal=label_guard(signal, SIGNALS)).inc()


def count_privacy_request(kind: str, status: str) -> None:
    """Count one privacy request reaching ``status``."""
    PRIVACY_REQUESTS.labels(
        kind=label_guard(kind, PRIVACY_REQUEST_KINDS),
        status=label_guard(status, PRIVACY_REQUEST_STATUSES),
    ).inc()


def count_retention_purged(kind: str, n: int) -> None:
    """Count ``n`` items of one kind purged by retention."""
    if n > 0:
        RETENTION_PURGED.labels(kind=label_guard(kind, RETENTION_KINDS)).inc(n)


def set_db_pool(size: int, idle: int) -> None:
    """Record this process's database pool size and idle connections."""
    DB_POOL_CONNECTIONS.labels(state="size").set(size)
    DB_POOL_CONNECTIONS.labels(state="idle").set(idle)


def register_routes(templates: Iterable[str]) -> None:
    """Add route templates (``resource.canonical``) to the allowed ``route`` label values."""
    _ROUTES.update(t for t in templates if t.startswith("/") and len(t) <= 120)


def count_http_request(route: str | None, status: int) -> None:
    """Count one HTTP response; ``route`` is the matched template or None when unmatched."""
    route_label = UNMATCHED_ROUTE if route is None else label_guard(route, _ROUTES)
    status_label = str(status) if 100 <= status <= 599 else OTHER
    HTTP_REQUESTS.labels(route=route_label, status=status_label).inc()


# The storage mode prometheus_client actually chose in this process, at its import.
_MULTIPROC_DIR: str | None = (
    None
    if values.ValueClass is values.MutexValue
    else os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
)


def multiprocess_enabled() -> bool:
    """Whether this process records metrics in PROMETHEUS_MULTIPROC_DIR."""
    return _MULTIPROC_DIR is not None


def render_metrics() -> tuple[bytes, str]:
    """Return ``(body, content_type)`` for ``GET /metrics``, aggregated over workers.

    In multiprocess mode this reads every worker's files (blocking I/O, a few
    milliseconds): call it from an executor if that matters. The content type
    carries a charset, so set it as a header, not as aiohttp's ``content_type=``.
    """
    if _MULTIPROC_DIR is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=_MULTIPROC_DIR)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Forget an exited worker's live gauges; a no-op outside multiprocess mode."""
    if _MULTIPROC_DIR is not None:
        multiprocess.mark_process_dead(pid, _MULTIPROC_DIR)  # type: ignore[no-untyped-call]
