"""Admin API: admin keys and widget site keys (created, listed, revoked; secrets shown once)."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import asyncpg
from aiohttp import web

from gateway import audit
from gateway.admin import (
    Admin,
    ApiError,
    admin_route,
    announce,
    json_response,
    not_found,
    parse_uuid,
    read_json,
)
from gateway.crypto import new_token, token_hash
from gateway.db import tenant_tx

MAX_LABEL = 100


def _label(body: dict[str, Any]) -> str:
    label = body.get("label", "")
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        raise ApiError(
            422,
            "invalid_request",
            "label must be a string",
            fields=[
                {"field": "label", "message": f"must be a string of at most {MAX_LABEL} characters"}
            ],
        )
    return label


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _admin_key(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(r["admin_key_id"]),
        "label": r["label"],
        "last4": r["last4"],
        "created_at": _iso(r["created_at"]),
        "revoked_at": _iso(r["revoked_at"]),
    }


def _site_key(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(r["site_key_id"]),
        "prefix": r["key_prefix"],
        "created_at": _iso(r["created_at"]),
        "revoked_at": _iso(r["revoked_at"]),
    }


@admin_route
async def list_admin_keys(request: web.Request, admin: Admin) -> web.Response:
    """Every admin key of the tenant, without secrets."""
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        rows = await conn.fetch(
            "SELECT * FROM admin_keys WHERE tenant_id = $1 ORDER BY created_at, admin_key_id",
            admin.tenant_id,
        )
    return json_response({"keys": [_admin_key(r) for r in rows]})


@admin_route
async def create_admin_key(request: web.Request, admin: Admin) -> web.Response:
    """A new admin key; the secret is in this response only."""
    label = _label(await read_json(request))
    key, key_id = new_token("ak_"), uuid4()
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        row = await conn.fetchrow(
            "INSERT INTO admin_keys (tenant_id, admin_key_id, key_hash, label, last4) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING *",
            admin.tenant_id,
            key_id,
            token_hash(key),
            label,
            key[-4:],
        )
        await audit.append(
            conn, admin.tenant_id, admin.actor, "admin_key.create", f"admin_key:{key_id}"
        )
    return json_response({**_admin_key(row), "key": key}, status=201)


@admin_route
async def revoke_admin_key(request: web.Request, admin: Admin) -> web.Response:
    """Revoke an admin key at once; the last active key cannot be revoked."""
    key_id = parse_uuid(request.match_info["key_id"], "admin key")
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        # lock the active keys so two keys cannot revoke each other concurrently
        active = {
            r["admin_key_id"]
            for r in await conn.fetch(
                "SELECT admin_key_id FROM admin_keys WHERE tenant_id = $1 AND revoked_at IS NULL "
                "FOR UPDATE",
                admin.tenant_id,
            )
        }
        if key_id in active and len(active) == 1:
            raise ApiError(
                409, "conflict", "this is the last active admin key; create another first"
            )
        row = await conn.fetchrow(
            "UPDATE admin_keys SET revoked_at = COALESCE(revoked_at, now()) "
            "WHERE tenant_id = $1 AND admin_key_id = $2 RETURNING *",
            admin.tenant_id,
            key_id,
        )
        if row is None:
            raise not_found("admin key")
        if key_id in active:
            await audit.append(
                conn, admin.tenant_id, admin.actor, "admin_key.revoke", f"admin_key:{key_id}"
            )
    return json_response(_admin_key(row))


@admin_route
async def list_site_keys(request: web.Request, admin: Admin) -> web.Response:
    """Every widget site key of the tenant (prefix only)."""
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        rows = await conn.fetch(
            "SELECT * FROM site_keys WHERE tenant_id = $1 ORDER BY created_at, site_key_id",
            admin.tenant_id,
        )
    return json_response({"keys": [_site_key(r) for r in rows]})


@admin_route
async def create_site_key(request: web.Request, admin: Admin) -> web.Response:
    """A new widget site key; the full key is in this response only."""
    key, key_id = new_token("pk_"), uuid4()
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        row = await conn.fetchrow(
            "INSERT INTO site_keys (tenant_id, site_key_id, key_hash, key_prefix) "
            "VALUES ($1, $2, $3, $4) RETURNING *",
            admin.tenant_id,
            key_id,
            token_hash(key),
            key[:7],
        )
        await audit.append(
            conn, admin.tenant_id, admin.actor, "site_key.create", f"site_key:{key_id}"
        )
    return json_response({**_site_key(row), "key": key}, status=201)


@admin_route
async def revoke_site_key(request: web.Request, admin: Admin) -> web.Response:
    """Revoke a site key: new widget connections with it are refused."""
    key_id = parse_uuid(request.match_info["key_id"], "site key")
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        was_active = await conn.fetchval(
            "SELECT revoked_at IS NULL FROM site_keys WHERE tenant_id = $1 AND site_key_id = $2 "
            "FOR UPDATE",
            admin.tenant_id,
            key_id,
        )
        if was_active is None:
            raise not_found("site key")
        row = await conn.fetchrow(
            "UPDATE site_keys SET revoked_at = COALESCE(revoked_at, now()) "
            "WHERE tenant_id = $1 AND site_key_id = $2 "
            "RETURNING *",
            admin.tenant_id,
            key_id,
        )
        if was_active:  # revoking again is answered the same, and audited once
            await audit.append(
                conn, admin.tenant_id, admin.actor, "site_key.revoke", f"site_key:{key_id}"
            )
    # every process drops its cached site-key resolutions
    await announce(admin)
    return json_response(_site_key(row))


def setup_routes(app: web.Application) -> None:
    """Bind the key routes."""
    r = app.router
    r.add_get("/api/admin/keys", list_admin_keys)
    r.add_post("/api/admin/keys", create_admin_key)
    r.add_delete("/api/admin/keys/{key_id}", revoke_admin_key)
    r.add_get("/api/admin/site-keys", list_site_keys)
    r.add_post("/api/admin/site-keys", create_site_key)
    r.add_delete("/api/admin/site-keys/{key_id}", revoke_site_key)
