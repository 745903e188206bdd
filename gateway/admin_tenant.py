"""Admin API: tenant secrets — the bring-your-own upstream and the identity secret.

Both are sealed under the primary master key (AAD binds tenant and purpose) and
never returned after they are set: the upstream key shows only its last four
characters, the identity secret only in the response that creates it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from gateway import audit, identity, netguard
from gateway.admin import Admin, ApiError, admin_route, announce, json_response, read_json
from gateway.db import tenant_tx

# A tenant-supplied URL makes the gateway send requests on the tenant's behalf
# (server-side request forgery): only https is accepted, and only to a public
# host: an IP literal must be globally routable, "localhost" is refused, and a
# name must not resolve (within RESOLVE_TIMEOUT) to any non-global address. A
# name that does not resolve is accepted (the request fails later, reaching
# nothing). A name re-pointed afterwards (DNS rebinding) is caught when the
# gateway connects: see gateway/netguard.py, which also holds the ALLOW_HTTP
# development/test switch.
RESOLVE_TIMEOUT = 2.0
_MODEL_RE = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
# visible ASCII only: the key goes into an Authorization header, where a control
# character would make every upstream request fail instead of this PUT
_API_KEY_RE = re.compile(r"[\x21-\x7e]{8,500}")


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(
        422, "invalid_request", f"{field} {message}", fields=[{"field": field, "message": message}]
    )


def _upstream_body(body: dict[str, Any]) -> dict[str, str | None]:
    unknown = sorted(set(body) - {"api_key", "base_url", "model"})
    if unknown:
        raise _invalid(unknown[0], "is not a known field")
    key, url, model = body.get("api_key"), body.get("base_url"), body.get("model")
    if not isinstance(key, str) or not _API_KEY_RE.fullmatch(key):
        raise _invalid("api_key", "must be 8 to 500 visible ASCII characters (no spaces)")
    if not isinstance(url, str) or len(url) > 500:
        raise _invalid("base_url", "must be an https URL")
    try:
        # refuses an unclosed "[" and a netloc that NFKC normalizes into separators
        # (U+2100 "℀" becomes "a/c")
        parts = urlsplit(url)
    except ValueError:
        raise _invalid("base_url", "must be a valid https URL") from None
    try:
        port = parts.port  # ValueError: not decimal digits, or above 65535
    except ValueError:
        port = 0
    if port == 0:
        raise _invalid("base_url", "must have a port between 1 and 65535, if any")
    schemes = ("https", "http") if netguard.ALLOW_HTTP else ("https",)
    if parts.scheme not in schemes or not parts.hostname or parts.username or parts.query:
        raise _invalid("base_url", "must be an https URL without credentials or query")
    if model is not None and (not isinstance(model, str) or not _MODEL_RE.fullmatch(model)):
        raise _invalid("model", "must be a model name (1-128 of A-Z a-z 0-9 . _ : / @ + -)")
    return {"api_key": key, "base_url": url.rstrip("/"), "model": model}


async def _check_public_host(host: str) -> None:
    """Refuse a base_url host that is, or resolves to, a loopback/private/link-local address."""
    if netguard.ALLOW_HTTP:
        return  # the development/test switch: see gateway/netguard.py
    message = "must be an https URL to a public host (not a private or loopback address)"
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        raise _invalid("base_url", message)
    try:
        literal = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None:
        if not netguard.is_public(literal):
            raise _invalid("base_url", message)
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, 443, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
        )
    except (OSError, TimeoutError, UnicodeError):
        return  # does not resolve (now): nothing private to reach
    for info in infos:
        if not netguard.public_text(str(info[4][0])):
            raise _invalid("base_url", message)


@admin_route
async def get_upstream(request: web.Request, admin: Admin) -> web.Response:
    """Whether the tenant has its own upstream, and which; never the key."""
    svc = admin.svc
    async with tenant_tx(svc.pool, admin.tenant_id) as conn:
        row = await conn.fetchrow(
            "SELECT upstream_sealed, upstream_key_last4 FROM tenants WHERE tenant_id = $1",
            admin.tenant_id,
        )
    if row is None or row["upstream_sealed"] is None:
        return json_response(
            {"configured": False, "base_url": None, "model": None, "api_key_last4": None}
        )
    raw = orjson.loads(svc.keyring.open_secret(admin.tenant_id, "upstream", row["upstream_sealed"]))
    return json_response(
        {
            "configured": True,
            "base_url": raw["base_url"],
            "model": raw.get("model"),
            "api_key_last4": row["upstream_key_last4"],
        }
    )


@admin_route
async def put_upstream(request: web.Request, admin: Admin) -> web.Response:
    """Use the tenant's own OpenAI-compatible upstream (key, URL, optional model)."""
    cfg = _upstream_body(await read_json(request))
    key, url = cfg["api_key"], cfg["base_url"]
    assert key is not None and url is not None
    host = urlsplit(url).hostname or ""
    await _check_public_host(host)
    sealed = admin.svc.keyring.seal_secret(admin.tenant_id, "upstream", orjson.dumps(cfg))
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        await conn.execute(
            "UPDATE tenants SET upstream_sealed = $2, upstream_key_last4 = $3 WHERE tenant_id = $1",
            admin.tenant_id,
            sealed,
            key[-4:],
        )
        await audit.append(
            conn,
            admin.tenant_id,
            admin.actor,
            "upstream.set",
            "upstream",
            # the host only: a URL's path may carry a token
            {"host": host, "model": cfg["model"]},
        )
    await announce(admin)
    return json_response(
        {
            "configured": True,
            "base_url": cfg["base_url"],
            "model": cfg["model"],
            "api_key_last4": key[-4:],
        }
    )


@admin_route
async def delete_upstream(request: web.Request, admin: Admin) -> web.Response:
    """Go back to the gateway's own upstream."""
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        await conn.execute(
            "UPDATE tenants SET upstream_sealed = NULL, upstream_key_last4 = NULL "
            "WHERE tenant_id = $1",
            admin.tenant_id,
        )
        await audit.append(conn, admin.tenant_id, admin.actor, "upstream.delete", "upstream")
    await announce(admin)
    return json_response(
        {"configured": False, "base_url": None, "model": None, "api_key_last4": None}
    )


@admin_route
async def rotate_identity_secret(request: web.Request, admin: Admin) -> web.Response:
    """A new identity-verification secret, shown once; the previous one stops verifying."""
    secret = identity.new_secret()
    async with tenant_tx(admin.svc.pool, admin.tenant_id) as conn:
        await identity.store_secret(conn, admin.svc.keyring, admin.tenant_id, secret)
        await audit.append(conn, admin.tenant_id, admin.actor, "identity_secret.rotate", "identity")
    return json_response({"identity_secret": secret, "algorithm": "HMAC-SHA256, hex"}, status=201)


def setup_routes(app: web.Application) -> None:
    """Bind the tenant-secret routes."""
    r = app.router
    r.add_get("/api/admin/upstream", get_upstream)
    r.add_put("/api/admin/upstream", put_upstream)
    r.add_delete("/api/admin/upstream", delete_upstream)
    r.add_post("/api/admin/identity-secret", rotate_identity_secret)
