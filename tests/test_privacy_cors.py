"""The visitor privacy API from a widget embedded on the tenant's own site (cross-origin)."""

from __future__ import annotations

from gateway.provision import NewTenant
from tests.conftest import ORIGIN, Gateway, hello


async def _token(g: Gateway, tenant: NewTenant) -> str:
    ws = await g.ws(tenant.site_key)
    welcome = await hello(ws)
    await ws.close()
    return str(welcome["session_token"])


async def test_preflight_then_export_from_allowed_origin(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    url = offline_gateway.url("/api/privacy/export")
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with offline_gateway.session.options(url, headers=headers) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    token = await _token(offline_gateway, tenant)
    auth = {"Origin": ORIGIN, "Authorization": f"Session {token}"}
    async with offline_gateway.session.get(url, headers=auth) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"


async def test_foreign_origin_is_refused_even_with_a_valid_token(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    token = await _token(offline_gateway, tenant)
    for path, method in (("/api/privacy/export", "GET"), ("/api/privacy/delete", "POST")):
        async with offline_gateway.session.request(
            method,
            offline_gateway.url(path),
            headers={"Origin": "http://evil.test", "Authorization": f"Session {token}"},
        ) as resp:
            assert resp.status == 403, path
            assert "Access-Control-Allow-Origin" not in resp.headers
    # the refused delete erased nothing: the token still works without an Origin
    async with offline_gateway.session.get(
        offline_gateway.url("/api/privacy/export"),
        headers={"Authorization": f"Session {token}"},
    ) as resp:
        assert resp.status == 200


async def test_a_foreign_preflight_is_answered_but_its_request_is_refused(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    """The preflight carries no credentials, so no tenant is known: it answers any
    well-formed Origin and grants nothing. The real request, which names the tenant by
    its token, is refused for an Origin the tenant does not allow, with no CORS grant."""
    foreign = "http://evil.test"
    token = await _token(offline_gateway, tenant)
    for path, method in (("/api/privacy/export", "GET"), ("/api/privacy/delete", "POST")):
        url = offline_gateway.url(path)
        preflight = {
            "Origin": foreign,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization",
        }
        async with offline_gateway.session.options(url, headers=preflight) as resp:
            assert resp.status == 204, path
            assert resp.headers["Access-Control-Allow-Origin"] == foreign, path
        real = {"Origin": foreign, "Authorization": f"Session {token}"}
        async with offline_gateway.session.request(method, url, headers=real) as resp:
            assert resp.status == 403, path
            assert (await resp.json())["error"]["code"] == "origin_not_allowed", path
            assert "Access-Control-Allow-Origin" not in resp.headers, path
            assert "Access-Control-Allow-Credentials" not in resp.headers, path
    # the refused delete erased nothing
    async with offline_gateway.session.get(
        offline_gateway.url("/api/privacy/export"),
        headers={"Authorization": f"Session {token}"},
    ) as resp:
        assert resp.status == 200


async def test_preflight_without_origin_is_refused(offline_gateway: Gateway) -> None:
    async with offline_gateway.session.options(offline_gateway.url("/api/privacy/delete")) as resp:
        assert resp.status == 403


async def test_restriction_reaches_an_open_socket(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    from tests.conftest import chat, reply_text

    ws = await offline_gateway.ws(tenant.site_key)
    welcome = await hello(ws)
    assert reply_text(await chat(ws, "a", "before")) == "before"
    async with offline_gateway.session.post(
        offline_gateway.url("/api/gdpr/request"),
        json={"kind": "restriction"},
        headers={"Authorization": f"Session {welcome['session_token']}"},
    ) as resp:
        assert resp.status == 201
    frames = await chat(ws, "b", "after")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "consent_required"
    assert "restricted" in frames[-1]["message"]
    await ws.close()


async def test_unparseable_host_is_not_same_origin(
    offline_gateway: Gateway, tenant: NewTenant, no_tracebacks: None
) -> None:
    """`Host: x:99999` cannot be the page's own origin: the Origin must then be allowed.

    The tenant allows ORIGIN, so that call succeeds (200, with CORS headers as for any
    allowed cross-origin call); any other Origin is refused (403). Never a 500.
    """
    token = await _token(offline_gateway, tenant)
    url = offline_gateway.url("/api/privacy/export")
    for origin, status in ((ORIGIN, 200), ("http://x:99999", 403), ("http://evil.test", 403)):
        headers = {"Host": "x:99999", "Origin": origin, "Authorization": f"Session {token}"}
        async with offline_gateway.session.get(url, headers=headers) as resp:
            assert resp.status == status, (origin, resp.status, await resp.text())
            if status == 200:
                assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            else:
                assert (await resp.json())["error"]["code"] == "origin_not_allowed"


async def test_a_token_that_is_no_longer_valid_gets_a_401_its_page_can_read(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    # The widget must learn that its session ended (expired, erased elsewhere) rather
    # than see a network error; the tenant, and its origins, are unknown by then.
    url = offline_gateway.url("/api/privacy/export")
    token = await _token(offline_gateway, tenant)
    async with offline_gateway.session.post(
        offline_gateway.url("/api/privacy/delete"), headers={"Authorization": f"Session {token}"}
    ) as resp:
        assert resp.status == 200
    for origin in (ORIGIN, "http://another.test"):
        headers = {"Origin": origin, "Authorization": f"Session {token}"}
        async with offline_gateway.session.get(url, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "session_invalid"
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    # the cookie alone: no answer another site could read (where third-party cookies
    # are still sent, it would tell that site whether the visitor has a session here)
    cookie = {"Origin": "http://another.test", "Cookie": f"__Host-omnigate_session={token}"}
    async with offline_gateway.session.get(url, headers=cookie) as resp:
        assert resp.status == 401
        assert "Access-Control-Allow-Origin" not in resp.headers
