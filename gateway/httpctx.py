"""What the gateway takes from an HTTP request: origin, client IP (anonymized), signals, cookie."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_network
from types import MappingProxyType
from uuid import UUID

from aiohttp import web

from gateway.crypto import keyed_hash
from gateway.sealedip import seal_ip
from gateway.services import Services
from gateway.visitor import RequestContext, today
from policies import CompiledPolicy, anonymize_ip, client_ip, coarse_client, normalize_origin

# `__Host-`: browsers accept it only Secure, with Path=/ and no Domain, so no sibling
# subdomain (nor a plain-http one) can plant a cookie of this name to fix a visitor's
# session on its own; plain-http development (OMNIGATE_COOKIE_SECURE=false) cannot use it
COOKIE = "__Host-omnigate_session"
DEV_COOKIE = "omnigate_session"


def cookie_name(secure: bool) -> str:
    """The session cookie's name under OMNIGATE_COOKIE_SECURE=`secure`."""
    return COOKIE if secure else DEV_COOKIE


NO_SIGNALS: Mapping[str, str] = MappingProxyType({})
# set on a request whose Origin the tenant allows; the response then carries CORS headers
CORS_ORIGIN = web.RequestKey("omnigate_cors_origin", str)
SIGNAL_HEADERS = ("DNT", "Sec-GPC")


def origin_allowed(request: web.Request, cp: CompiledPolicy) -> str | None:
    """The request's Origin when the tenant allows it, else None."""
    raw = request.headers.get("Origin")
    try:
        origin = normalize_origin(raw) if raw else None
    except ValueError:
        return None
    return origin if origin is not None and origin in cp.policy.allowed_origins else None


def anonymized_ip(
    request: web.Request, svc: Services, cp: CompiledPolicy, tenant_id: UUID
) -> tuple[str | None, str | None]:
    """The client IP in the tenant's ip_mode: (what may be stored, what limits count by).

    The raw address never leaves this function. Under `full` the address is kept
    whole, as the tenant chose, but sealed (`seal_ip`): DESIGN §5 allows no full IP
    in an unencrypted column, and rate limits count it by a keyed hash instead.
    """
    ip = client_ip(
        request.remote, request.headers.getall("X-Forwarded-For", []), svc.settings.trusted_proxies
    )
    if ip is None:
        return None, None
    salt = None
    if cp.policy.ip_mode == "hash" and svc.salts:
        day = today()
        svc.salts.expire(day)  # salts older than 48 h are destroyed, never reused
        salt = svc.salts.salt_for(day)
    value = anonymize_ip(ip, cp.policy.ip_mode, salt)
    if value is None or cp.policy.ip_mode == "truncate":
        return value, value  # a /24 or /48 already: what limits count by
    # hash and full name one address, and an IPv6 client has a /64 of them to rotate
    # through: limits count the /64 (IPv4: the address), by a keyed hash that lasts a
    # minute (the primary's derived key may change with a rotation, and it is known here
    # without a database read, as every process agrees on it)
    net = ip_network(f"{ip}/{64 if ip.version == 6 else 32}", strict=False)
    key = "k:" + keyed_hash(svc.keyring.hash_key, b"ip", net.network_address.packed).hex()
    if cp.policy.ip_mode == "full":
        value = seal_ip(svc.keyring, tenant_id, value)
    return value, key


def header_session_token(request: web.Request) -> str | None:
    """The session token from `Authorization: Session <token>`, if the request sent one."""
    auth = request.headers.get("Authorization", "")
    if auth[:8].lower() == "session ":
        return auth[8:].strip() or None
    return None


def session_token_of(request: web.Request, secure: bool) -> str | None:
    """The session token from `Authorization: Session <token>` or the session cookie."""
    return header_session_token(request) or request.cookies.get(cookie_name(secure)) or None


def request_context(
    request: web.Request,
    svc: Services,
    cp: CompiledPolicy,
    tenant_id: UUID,
    new_token: str | None = None,
) -> RequestContext:
    """Reduce a request to what the visitor logic may see."""
    signals = {h: request.headers[h] for h in SIGNAL_HEADERS if h in request.headers}
    stored, key = anonymized_ip(request, svc, cp, tenant_id)
    return RequestContext(
        stored,
        signals or NO_SIGNALS,  # most send none: one shared empty mapping, not a dict each
        session_token_of(request, svc.settings.cookie_secure),
        new_token,
        coarse_client(request.headers.get("User-Agent")),
        key,
    )


def session_cookie(secure: bool, max_age: int, token: str) -> str:
    """The Set-Cookie value: HttpOnly; Secure; SameSite=None; Partitioned; Path=/; no Domain.

    Written by hand because Python 3.11's http.cookies rejects the Partitioned
    attribute. Browsers drop SameSite=None and Partitioned cookies that are not
    Secure, so plain-http local development (OMNIGATE_COOKIE_SECURE=false) gets Lax.
    """
    attrs = "Secure; SameSite=None; Partitioned" if secure else "SameSite=Lax"
    return f"{cookie_name(secure)}={token}; Max-Age={max_age}; Path=/; HttpOnly; {attrs}"


def clear_session_cookie(response: web.StreamResponse, svc: Services) -> None:
    """Expire the session cookie with the same attributes it was set with (Partitioned too)."""
    response.headers.add("Set-Cookie", session_cookie(svc.settings.cookie_secure, 0, ""))


def set_session_cookie(
    response: web.StreamResponse, svc: Services, cp: CompiledPolicy, token: str
) -> None:
    """Attach the session cookie with the policy's lifetime."""
    response.headers.add(
        "Set-Cookie",
        session_cookie(svc.settings.cookie_secure, cp.session_max_age_seconds, token),
    )


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: expose the response to an origin the handler vouched for."""
    origin = request.get(CORS_ORIGIN)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers.add("Vary", "Origin")


async def privacy_preflight(request: web.Request) -> web.Response:
    """CORS preflight of the visitor privacy API.

    The preflight carries no credentials, so the tenant is unknown here; it grants
    nothing by itself. The real request is refused (403) unless its Origin is one
    of the tenant's allowed origins, and only then carries Allow-Origin.
    """
    raw = request.headers.get("Origin")
    try:
        origin = normalize_origin(raw) if raw else None
    except ValueError:
        origin = None
    if origin is None:
        raise web.HTTPForbidden(text="origin required")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )
