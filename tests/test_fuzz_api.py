"""Property tests for every HTTP API body and query: typed 4xx answers, never a 500.

The callers are authenticated (a real admin key, a real session token), so the
bodies and queries reach the handlers' own validation rather than stopping at auth.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.provision import NewTenant
from tests.conftest import Gateway, hello
from tests.test_fuzz import JSON, TEXT

pytestmark = pytest.mark.usefixtures("no_tracebacks")

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIMEOUT = aiohttp.ClientTimeout(total=10)

ADMIN_WRITES = [
    ("PUT", "/api/admin/policy"),
    ("POST", "/api/admin/keys"),
    ("POST", "/api/admin/site-keys"),
    ("PUT", "/api/admin/upstream"),
    ("POST", "/api/admin/subjects/erase-by-user"),
    ("POST", "/api/admin/subjects/erase-by-conversation"),
    ("POST", "/api/admin/requests/{id}/extend"),
    ("POST", "/api/admin/requests/{id}/reject"),
]
ADMIN_READS = [
    "/api/admin/conversations",
    "/api/admin/conversations/{id}",
    "/api/admin/audit",
    "/api/admin/requests",
    "/api/admin/policy/history",
]
VISITOR_WRITES = ["/api/privacy/consent", "/api/gdpr/request", "/api/privacy/ccpa/request"]

BODIES = st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())
# objects with plausible keys, so validation below the top level is reached too
OBJECTS = st.dictionaries(
    st.sampled_from(
        [
            "kind",
            "details",
            "grant",
            "revoke",
            "user_id",
            "label",
            "api_key",
            "base_url",
            "model",
            "days",
            "reason",
            "retention_days",
            "redact",
            "rate_limit",
            "allowed_origins",
            "required_consents",
            "ip_mode",
        ]
    ),
    JSON,
    max_size=4,
).map(lambda v: json.dumps(v).encode())
QUERIES = st.dictionaries(
    st.sampled_from(["limit", "cursor", "since", "until", "subject", "before", "status"]),
    TEXT,
    max_size=3,
)


async def _session_token(g: Gateway, tenant: NewTenant) -> str:
    ws = await g.ws(tenant.site_key)
    welcome = await hello(ws)
    await ws.close()
    return str(welcome["session_token"])


def _typed(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400 and body:
        err = json.loads(body)["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str), err


async def _call(
    g: Gateway,
    method: str,
    path: str,
    auth: str,
    body: bytes | None = None,
    params: dict[str, Any] | None = None,
) -> None:
    async with g.session.request(
        method,
        g.url(path),
        data=body,
        params=params,
        timeout=TIMEOUT,
        headers={"Authorization": auth, "Content-Type": "application/json"},
    ) as resp:
        _typed(resp.status, await resp.read())


@FUZZ
@given(route=st.sampled_from(ADMIN_WRITES), body=BODIES | OBJECTS, ident=TEXT)
async def test_admin_bodies(
    offline_gateway: Gateway, tenant: NewTenant, route: tuple[str, str], body: bytes, ident: str
) -> None:
    method, path = route
    path = path.replace("{id}", quote(ident, safe="") or "x")
    await _call(offline_gateway, method, path, f"Bearer {tenant.admin_key}", body)


@FUZZ
@given(path=st.sampled_from(ADMIN_READS), params=QUERIES, ident=TEXT)
async def test_admin_queries(
    offline_gateway: Gateway, tenant: NewTenant, path: str, params: dict[str, str], ident: str
) -> None:
    path = path.replace("{id}", quote(ident, safe="") or "x")
    await _call(offline_gateway, "GET", path, f"Bearer {tenant.admin_key}", params=params)


@FUZZ
@given(path=st.sampled_from(VISITOR_WRITES), body=BODIES | OBJECTS)
async def test_visitor_bodies(
    offline_gateway: Gateway, tenant: NewTenant, path: str, body: bytes
) -> None:
    token = await _session_token(offline_gateway, tenant)
    await _call(offline_gateway, "POST", path, f"Session {token}", body)
