"""/openapi.json documents every HTTP route the application registers."""

from __future__ import annotations

from gateway.app import create_app
from gateway.config import Settings
from gateway.openapi import document
from tests.conftest import Gateway

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


async def test_served(offline_gateway: Gateway) -> None:
    async with offline_gateway.session.get(offline_gateway.url("/openapi.json")) as r:
        assert r.status == 200 and r.content_type == "application/json"
        body = await r.json()
    assert "/api/admin/policy" in body["paths"]
