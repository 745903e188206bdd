"""Consent as the widget sends it: in hello, in a consent frame, over the fallback."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from gateway.appkeys import SERVICES
from gateway.provision import NewTenant
from tests.conftest import Gateway, hello, recv_until
from tests.support import ORIGIN, parse_sse, set_policy, tenant_with

BAD_CONSENTS = [{"grant": 5}, {"grant": True}, {"revoke": [1]}, {"grant": [], "analytics": True}]


@pytest.mark.usefixtures("no_tracebacks")
@pytest.mark.parametrize("consent", BAD_CONSENTS, ids=["int", "bool", "int-item", "mixed"])
async def test_a_malformed_hello_consent_is_a_bad_request(
    offline_gateway: Gateway, tenant: NewTenant, consent: dict[str, Any]
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await ws.send_json({"type": "hello", "v": 1, "consent": consent})
    frame = await ws.receive_json()
    assert frame["type"] == "error" and frame["code"] == "bad_request", frame
    await ws.close()


@pytest.mark.usefixtures("no_tracebacks")
@pytest.mark.parametrize("consent", BAD_CONSENTS, ids=["int", "bool", "int-item", "mixed"])
async def test_a_malformed_hello_consent_over_the_fallback_is_a_typed_event(
    offline_gateway: Gateway, tenant: NewTenant, consent: dict[str, Any]
) -> None:
    async with offline_gateway.session.post(
        offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"),
        json={"id": "m1", "text": "hi", "hello": {"consent": consent}},
        headers={"Origin": ORIGIN},
    ) as resp:
        assert resp.status == 200
        events = parse_sse(await resp.read())
    assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_request", events


@pytest.mark.parametrize(
    "frame",
    [{"age_confirmed": True}, {}, {"grant": ["analytics"]}],
    ids=["age-only", "empty", "grant-only"],
)
async def test_a_consent_frame_with_any_optional_field_is_answered_with_welcome(
    offline_gateway: Gateway, tenant: NewTenant, frame: dict[str, Any]
) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws, consent={"ai_processing": True})
    await ws.send_json({"type": "consent", **frame})
    answer = await recv_until(ws, "welcome")
    assert answer[-1]["type"] == "welcome", answer
    if "grant" in frame:
        assert "analytics" in answer[-1]["policy"]["granted"]
    await ws.close()


async def test_an_age_confirmation_survives_a_consent_version_change(
    offline_gateway: Gateway, app_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    t = await tenant_with(app_pool, age_confirmation=True)
    ws = await g.ws(t.site_key)
    first = await hello(ws, age_confirmed=True)
    await ws.close()
    await set_policy(app_pool, t, 3, age_confirmation=True, consent_version=2)
    g.server.app[SERVICES].tenants.invalidate(t.tenant_id)
    ws = await g.ws(t.site_key)
    await ws.send_json({"type": "hello", "v": 1, "session_token": first["session_token"]})
    welcome = await ws.receive_json(timeout=5)
    await ws.send_json({"type": "ping"})
    after = await ws.receive_json(timeout=5)
    await ws.close()
    assert (welcome["type"], welcome["resumed"]) == ("welcome", True)
    assert after["type"] == "pong", after  # no consent_required for the age in between
