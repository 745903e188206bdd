"""The site-owner admin API: bearer-key auth, the policy endpoints, and every admin route.

Authentication is `Authorization: Bearer <admin_key>`. The key is 256 random
bits; we look it up by its SHA-256 inside `lookup_tx`, where row-level security
shows only the row whose hash equals the presented one. No secret is ever
compared byte by byte in Python, so there is no timing oracle to exploit: the
equality runs on a hash the attacker cannot steer (a pre-image of SHA-256 would
be needed), via a B-tree index probe whose timing says nothing about the key.

Objects of another tenant are simply invisible under RLS, so they answer 404
exactly like objects that do not exist; nothing ever answers 403.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web

from gateway import bus, store
from gateway.appkeys import SERVICES
from gateway.crypto import token_hash
from gateway.db import lookup_tx, tenant_tx
from gateway.services import Services
from policies import Policy, PolicyError, compile_policy, parse_policy, policy_to_doc

MAX_KEY_CHARS = 200


class ApiError(Exception):
    """An admin API failure with its HTTP status and closed error code."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def unauthorized() -> ApiError:
    """The one answer for every authentication failure (never says which)."""
    return ApiError(401, "unauthorized", "a valid admin key is required")


def not_found(what: str = "resource") -> ApiError:
    """Missing, malformed id, or another tenant's: all the same to the caller."""
    return ApiError(404, "not_found", f"{what} not found")


@dataclass(frozen=True)
class Admin:
    """The authenticated caller: its tenant and which admin key it used."""

    svc: Services
    tenant_id: UUID
    admin_key_id: UUID

    @property
    def actor(self) -> str:
        """The audit actor string of this key."""
        return f"admin:{self.admin_key_id}"


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialized with orjson."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(exc: ApiError) -> web.Response:
    """The JSON error envelope: {"error": {"code", "message", ...}}."""
    headers = {"WWW-Authenticate": 'Bearer realm="omnigate-admin"'} if exc.status == 401 else None
    body = {"error": {"code": exc.code, "message": exc.message, **exc.extra}}
    return json_response(body, exc.status, headers)


# --- query parameters, shared by the admin routes that page -----------------------

MAX_PAGE = 100


def bad_param(field: str, message: str) -> ApiError:
    """400 `bad_request` naming the query parameter at fault."""
    return ApiError(
        400, "bad_request", f"{field}: {message}", fields=[{"field": field, "message": message}]
    )


def int_param(request: web.Request, name: str, default: int, hi: int) -> int:
    """Query parameter `name` as an integer in 1..hi (`default` when absent); else 400."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_param(name, "must be an integer") from None
    if not 1 <= value <= hi:
        raise bad_param(name, f"must be between 1 and {hi}")
    return value


def aware(value: datetime) -> bool:
    """Whether `value` has a time zone and lies within years 1-9999 in UTC.

    PostgreSQL stores timestamptz in UTC: a time near either end whose offset moves it
    past the range could not even be sent as a query argument.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        return False
    try:
        value.astimezone(UTC)
    except OverflowError:
        return False
    return True


def encode_cursor(at: datetime, conversation_id: UUID) -> str:
    """An opaque cursor for keyset pagination by (a time, an id): the conversation list's
    (last_message_at, conversation_id), the privacy requests' (due_at, request_id)."""
    raw = orjson.dumps([at.isoformat(), str(conversation_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """The position a cursor names; 400 when it was not made by encode_cursor."""
    bad = bad_param("cursor", "is not a cursor from this API")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        pos = orjson.loads(raw)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise bad from None
    # decoded JSON may be anything: only the exact shape encode_cursor writes is a cursor
    if not (isinstance(pos, list) and len(pos) == 2 and all(isinstance(p, str) for p in pos)):
        raise bad
    try:
        at, cid = datetime.fromisoformat(pos[0]), UUID(pos[1])
    except ValueError:
        raise bad from None
    if not aware(at):
        raise bad
    return at, cid


def parse_uuid(value: str, what: str) -> UUID:
    """A path id, or 404 (a malformed id names nothing)."""
    try:
        return UUID(value)
    except ValueError:
        raise not_found(what) from None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


async def authenticate(request: web.Request) -> Admin:
    """Resolve the bearer admin key to its tenant, or raise 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_CHARS:
        raise unauthorized()
    svc = request.app[SERVICES]
    h = token_hash(key)
    async with lookup_tx(svc.pool, h) as conn:
        found = await store.tenant_for_admin_key(conn, h)
    if found is None:
        raise unauthorized()
    return Admin(svc, found[0], found[1])


AdminHandler = Callable[[web.Request, Admin], Awaitable[web.StreamResponse]]


def admin_route(handler: AdminHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Authenticate, call the handler with the caller, and map ApiError to its JSON shape."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request, await authenticate(request))
        except ApiError as exc:
            return error_response(exc)

    return wrapper


async def announce(admin: Admin) -> None:
    """Tell every process the tenant's configuration changed (policy, keys, upstream)."""
    admin.svc.tenants.invalidate(admin.tenant_id)
    admin.svc.forget_upstream(admin.tenant_id)
    await admin.svc.bus.publish(bus.POLICY_CHANGED, {"tenant_id": str(admin.tenant_id)})


# --- policy ------------------------------------------------------------------------


@admin_route
async def get_policy(request: web.Request, admin: Admin) -> web.Response:
    """The current policy version and document."""
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        row = await store.latest_policy(conn, admin.tenant_id)
    version, doc = (0, policy_to_doc(Policy())) if row is None else row
    return json_response({"version": version, "policy": doc}, headers={"ETag": f'"{version}"'})


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    raw = raw.strip()
    if raw == "*":
        return None  # any current version
    version = raw.strip('"')
    if not (version.isascii() and version.isdigit()):
        raise ApiError(400, "bad_request", "If-Match must be a policy version")
    return int(version)


@admin_route
async def put_policy(request: web.Request, admin: Admin) -> web.Response:
    """Validate a full or partial document on top of the current one and store a new version."""
    body = await read_json(request)
    doc = body.get("policy", body) if set(body) == {"policy"} else body
    expected = _if_match(request)
    svc = admin.svc
    try:
        async with tenant_tx(svc.pool, admin.tenant_id) as conn:
            row = await store.latest_policy(conn, admin.tenant_id)
            version = row[0] if row else 0
            if expected is not None and expected != version:
                raise ApiError(
                    409, "conflict", "the policy changed since it was read", version=version
                )
            current = parse_policy(row[1]) if row else Policy()
            try:
                new = parse_policy(doc, base=current)
            except PolicyError as exc:
                raise ApiError(
                    422, "invalid_policy", "the policy is not valid", fields=exc.errors
                ) from None
            if new.consent_version < current.consent_version:
                # grants that went stale under the later version would count again
                raise ApiError(
                    422,
                    "invalid_policy",
                    "the policy is not valid",
                    fields=[{"field": "consent_version", "message": "must not decrease"}],
                )
            if row is not None and new == current:
                # nothing changes: no new version, no audit entry, the same ETag
                return json_response(
                    {"version": version, "policy": row[1], "diff": {}},
                    headers={"ETag": f'"{version}"'},
                )
            new_doc, diff = await store.append_policy_version(
                conn, admin.tenant_id, version, current, new, admin.actor
            )
    except asyncpg.UniqueViolationError:
        # another PUT stored the same version first: the caller must re-read and retry
        raise ApiError(409, "conflict", "another policy update won; read it and retry") from None
    svc.tenants.install(admin.tenant_id, compile_policy(new, version + 1))
    await svc.bus.publish(bus.POLICY_CHANGED, {"tenant_id": str(admin.tenant_id)})
    return json_response(
        {"version": version + 1, "policy": new_doc, "diff": diff},
        headers={"ETag": f'"{version + 1}"'},
    )


@admin_route
async def policy_history(request: web.Request, admin: Admin) -> web.Response:
    """Every policy version, newest first: who, when, what changed; `before` (a version)
    pages back, like the audit log's `before` (a seq)."""
    limit = int_param(request, "limit", 100, MAX_PAGE)
    before = int_param(request, "before", 2**62, 2**62) if "before" in request.query else None
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        rows = await conn.fetch(
            "SELECT version, created_at, created_by, diff FROM policies WHERE tenant_id = $1 "
            "AND ($2::bigint IS NULL OR version < $2) ORDER BY version DESC LIMIT $3",
            admin.tenant_id,
            before,
            limit + 1,
        )
    page = rows[:limit]
    versions = [
        {
            "version": r["version"],
            "created_at": r["created_at"].isoformat(),
            "created_by": r["created_by"],
            "diff": orjson.loads(r["diff"]),
        }
        for r in page
    ]
    nxt = page[-1]["version"] if len(rows) > limit else None
    return json_response({"versions": versions, "next_before": nxt})


def setup_routes(app: web.Application) -> None:
    """Bind the admin routes, /openapi.json, and the BYO-upstream cache hooks."""
    from gateway import admin_data, admin_keys, admin_tenant, openapi

    r = app.router
    r.add_get("/api/admin/policy", get_policy)
    r.add_put("/api/admin/policy", put_policy)
    r.add_get("/api/admin/policy/history", policy_history)
    admin_keys.setup_routes(app)
    admin_tenant.setup_routes(app)
    admin_data.setup_routes(app)
    r.add_get("/openapi.json", openapi.openapi_json)
