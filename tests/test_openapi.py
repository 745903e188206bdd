"""/openapi.json documents every HTTP route the application registers."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from gateway.app import create_app
from gateway.appkeys import SERVICES
from gateway.config import Settings
from gateway.openapi import document
from gateway.provision import NewTenant
from tests.conftest import ORIGIN, Gateway, hello, start_gateway

# aiohttp adds HEAD beside every GET; "*" is a catch-all, not an operation
IMPLIED = {"HEAD", "*"}


def test_every_route_is_documented() -> None:
    app = create_app(Settings(database_url="postgresql://unused@localhost/unused"))
    paths = document()["paths"]
    missing = sorted(
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route.resource is not None
        and route.method not in IMPLIED
        and route.method.lower() not in paths.get(route.resource.canonical, {})
    )
    assert not missing, (
        "routes missing from the OpenAPI document (describe them in gateway/openapi.py, "
        "or call gateway.openapi.describe(method, path, operation) from your setup_routes):\n  "
        + "\n  ".join(missing)
    )


def test_document_shape() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    for path, ops in doc["paths"].items():
        assert path.startswith("/")
        for method, op in ops.items():
            assert method in {"get", "put", "post", "delete", "patch", "options"}, (path, method)
            assert op["summary"] and op["responses"], (path, method)
            if path.startswith("/api/admin/"):
                assert op["security"] == [{"adminKey": []}]
                assert "401" in op["responses"]
            if op.get("security") in ([{"adminKey": []}], [{"session": []}]):
                # both read PostgreSQL first: unreachable, it is 503 storage_unavailable
                assert "503" in op["responses"], (path, method)


async def test_served(offline_gateway: Gateway) -> None:
    async with offline_gateway.session.get(offline_gateway.url("/openapi.json")) as r:
        assert r.status == 200 and r.content_type == "application/json"
        body = await r.json()
    assert "/api/admin/policy" in body["paths"]


def _documented(path: str, method: str, status: int) -> None:
    """The document lists `status` for the route; a success must be its only 2xx."""
    responses = document()["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, (method, path, status, sorted(responses))
    if 200 <= status < 300:
        successes = sorted(code for code in responses if code.startswith("2"))
        assert successes == [str(status)], (method, path, status, successes)


async def test_visitor_routes_answer_what_is_documented(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    """Real calls to the privacy routes: each status they answer is in the document."""
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    token = (await hello(ws))["session_token"]
    await ws.close()
    auth = {"Authorization": f"Session {token}"}
    gdpr, ccpa, consent = "/api/gdpr/request", "/api/privacy/ccpa/request", "/api/privacy/consent"
    evil = {"Origin": "https://evil.example"}
    calls: list[tuple[str, str, dict[str, Any] | None, dict[str, str], int]] = [
        ("POST", gdpr, {"kind": "access"}, {}, 201),
        ("POST", ccpa, {"kind": "know"}, {}, 201),
        ("POST", gdpr, {"kind": "nope"}, {}, 422),
        ("POST", ccpa, {"kind": "nope"}, {}, 422),
        ("POST", consent, {"grant": ["nope"]}, {}, 422),
        ("GET", "/api/gdpr/request/{id}", None, {}, 404),
        ("GET", consent, None, evil, 403),
        ("POST", gdpr, {"kind": "access"}, evil, 403),
    ]
    for method, path, body, headers, expected in calls:
        url = g.url(path.replace("{id}", str(uuid.uuid4())))
        async with g.session.request(method, url, json=body, headers={**auth, **headers}) as r:
            assert r.status == expected, (method, path, r.status, await r.text())
        _documented(path, method, r.status)
    # every visitor route refuses a disallowed Origin the same way
    for path, ops in document()["paths"].items():
        for method, op in ops.items():
            if op.get("security") == [{"session": []}]:
                assert "403" in op["responses"], (method, path)


async def test_operations_routes_answer_what_is_documented(
    settings: Settings, tenant: NewTenant
) -> None:
    """/metrics refusals and the per-IP socket cap, as answered, are in the document."""
    async for g in start_gateway(replace(settings, max_connections_per_ip=1)):
        async with g.session.get(g.url("/metrics"), headers={"X-Forwarded-For": "1.2.3.4"}) as r:
            assert r.status == 403
        _documented("/metrics", "GET", r.status)
        first = await g.ws(tenant.site_key)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await g.ws(tenant.site_key)
        assert refused.value.status == 429
        _documented("/v1/widget/ws", "GET", refused.value.status)
        await first.close()
    async for g in start_gateway(replace(settings, metrics_token="scrape-token")):
        async with g.session.get(g.url("/metrics")) as r:
            assert r.status == 401
        _documented("/metrics", "GET", r.status)


async def test_the_fallback_answers_what_is_documented(
    offline_gateway: Gateway, tenant: NewTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST and OPTIONS /v1/widget/chat: each status they answer is in the document, and
    the POST documents its JSON body."""
    g = offline_gateway
    path = "/v1/widget/chat"
    url = g.url(f"{path}?site={tenant.site_key}")
    body = {"id": "d1", "text": "hi", "hello": {"consent": {"ai_processing": True}}}
    evil = {"Origin": "https://evil.example"}
    # (method sent, operation that documents the answer, extra headers, status)
    calls: list[tuple[str, str, dict[str, str], int]] = [
        ("POST", "POST", {}, 200),
        ("POST", "POST", evil, 403),
        ("GET", "POST", {}, 405),  # any other method: the POST documents the 405
        ("PUT", "POST", {}, 405),
        ("OPTIONS", "OPTIONS", {}, 204),
        ("OPTIONS", "OPTIONS", evil, 403),
    ]
    for method, operation, headers, expected in calls:
        async with g.session.request(
            method, url, json=body, headers={"Origin": ORIGIN, **headers}
        ) as r:
            assert r.status == expected, (method, r.status, await r.text())
        _documented(path, operation, r.status)

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("database unreachable")

    # the site lookup fails: a storage outage, though the error is a ConnectionError
    monkeypatch.setattr(g.server.app[SERVICES].tenants, "resolve_site", down)
    for method in ("POST", "OPTIONS"):
        async with g.session.request(method, url, json=body, headers={"Origin": ORIGIN}) as r:
            assert r.status == 503, (method, r.status)
            assert (await r.json())["error"]["code"] == "storage_unavailable"
            assert r.headers["Retry-After"] == "1"
            assert "Access-Control-Allow-Origin" not in r.headers
        _documented(path, method, r.status)
    request_body = document()["paths"][path]["post"]["requestBody"]
    schema = request_body["content"]["application/json"]["schema"]
    assert request_body["required"] and schema["required"] == ["id", "text"]
    assert {"id", "text", "hello"} <= set(schema["properties"])
