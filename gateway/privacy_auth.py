"""Who is calling a privacy endpoint: a visitor by session token (admins: gateway.admin)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, NoReturn
from uuid import UUID

import orjson
from aiohttp import web

from gateway import store
from gateway.appkeys import SERVICES
from gateway.crypto import token_hash
from gateway.db import lookup_tx, tenant_tx
from gateway.httpctx import CORS_ORIGIN, header_session_token, session_token_of
from policies import normalize_origin


@dataclass(frozen=True)
class VisitorAuth:
    """The subject behind a valid, unexpired session token."""

    tenant_id: UUID
    subject_id: UUID
    session_id: UUID


_STATUS: dict[int, type[web.HTTPError]] = {
    400: web.HTTPBadRequest,
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    422: web.HTTPUnprocessableEntity,
}


def error(status: int, code: str, message: str, **extra: Any) -> NoReturn:
    """Raise a JSON error with an HTTP status; the message never echoes a secret."""
    body = orjson.dumps({"error": {"code": code, "message": message, **extra}}).decode()
    raise _STATUS[status](text=body, content_type="application/json")


async def require_visitor(request: web.Request) -> VisitorAuth:
    """Resolve the session token; 401 whether it is unknown, expired or erased (no oracle)."""
    svc = request.app[SERVICES]
    header_token = header_session_token(request)
    token = session_token_of(request, svc.settings.cookie_secure)
    if not token:
        error(401, "session_invalid", "a session token is required")
    h = token_hash(token)
    async with lookup_tx(svc.pool, h) as conn:
        tenant_id = await store.tenant_for_session(conn, h)
    if tenant_id is not None:
        async with tenant_tx(svc.pool, tenant_id) as conn:
            found = await store.find_session(conn, tenant_id, h)
        # A signed-in user's session outlives their sign-out in the cookie, which the
        # site cannot clear: on a shared browser the next person still sends it. Such a
        # session answers only to the token the widget holds for the tab that said
        # hello as that user, never to the cookie alone (and the same 401: no oracle).
        if found is not None and (header_token is not None or not found[1]):
            row = found[0]
            await _check_origin(request, tenant_id)
            return VisitorAuth(tenant_id, row.subject_id, row.session_id)
    if header_token is not None:
        _expose_to_caller(request)
    error(401, "session_invalid", "the session is not valid")


def _expose_to_caller(request: web.Request) -> None:
    """Let the page that sent a token in the header read the 401 it gets for it.

    With no valid session the tenant, and so its allowed origins, are unknown; the
    answer is exposed to any well-formed Origin all the same, so a widget learns that
    its session ended rather than seeing a network error. The caller sent the token
    itself: it learns only that the token is not valid. A 401 for the cookie alone
    stays unreadable across origins: where a browser still sends third-party cookies,
    a readable answer would tell any site whether the visitor has a session here.
    """
    raw = request.headers.get("Origin")
    if raw:
        with contextlib.suppress(ValueError):
            request[CORS_ORIGIN] = normalize_origin(raw)


async def _check_origin(request: web.Request, tenant_id: UUID) -> None:
    """A cross-origin call must come from the tenant's allowed origins (CSRF guard, CORS)."""
    raw = request.headers.get("Origin")
    if raw is None:
        return  # not a browser cross-origin request: the token alone authenticates
    try:
        origin = normalize_origin(raw)
    except ValueError:
        error(403, "origin_not_allowed", "this origin may not use the privacy API")
    try:
        own = normalize_origin(f"{request.scheme}://{request.host}")
    except ValueError:
        own = None  # an unparseable Host (e.g. port 99999) is nobody's origin
    if origin == own:
        return
    cp = await request.app[SERVICES].tenants.policy(tenant_id)
    if origin not in cp.policy.allowed_origins:
        error(403, "origin_not_allowed", "this origin may not use the privacy API")
    request[CORS_ORIGIN] = origin


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (an empty body is `{}`); 400 otherwise."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        error(400, "bad_request", "the body is not valid JSON")
    if not isinstance(data, dict):
        error(400, "bad_request", "the body must be a JSON object")
    return data
