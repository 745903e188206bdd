"""GDPR/CCPA request intake, deadlines, admin workflow, restriction and objection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from prometheus_client import REGISTRY

from gateway import bus, dsr, metrics, requests_api
from gateway.appkeys import SERVICES
from gateway.provision import NewTenant
from gateway.requests_api import refresh_overdue
from tests.conftest import Gateway, chat, hello


def session(token: str) -> dict[str, str]:
    return {"Authorization": f"Session {token}"}


def admin(t: NewTenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {t.admin_key}"}


async def new_visitor(g: Gateway, t: NewTenant) -> tuple[Any, str]:
    ws = await g.ws(t.site_key)
    w = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
    return ws, w["session_token"]


async def post(g: Gateway, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
    async with g.session.post(g.url(path), json=body, headers=headers) as r:
        return r.status, await r.json()


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.mark.parametrize(
    ("path", "kind", "days"),
    [
        ("/api/gdpr/request", "access", 30),
        ("/api/gdpr/request", "erasure", 30),
        ("/api/gdpr/request", "automated_decision", 30),
        ("/api/privacy/ccpa/request", "know", 45),
        ("/api/privacy/ccpa/request", "delete", 45),
    ],
    ids=["gdpr-access", "gdpr-erasure", "gdpr-automated", "ccpa-know", "ccpa-delete"],
)
async def test_deadlines_per_kind(
    offline_gateway: Gateway, tenant: NewTenant, path: str, kind: str, days: int
) -> None:
    ws, token = await new_visitor(offline_gateway, tenant)
    status, doc = await post(offline_gateway, path, session(token), {"kind": kind})
    assert status == 201, doc
    assert doc["kind"] == kind and doc["status"] == "received"
    created = ts(doc["created_at"])
    assert ts(doc["ack_due_at"]) - created == timedelta(hours=48)
    # GDPR: 30 days, or one month when that is shorter (test_gdpr_due_date_is_one_month_at_most)
    assert ts(doc["due_at"]) == dsr.deadlines(doc["regime"], created).due_at
    assert timedelta(days=days - 2) <= ts(doc["due_at"]) - created <= timedelta(days=days)
    async with offline_gateway.session.get(
        offline_gateway.url(f"/api/gdpr/request/{doc['id']}"), headers=session(token)
    ) as r:
        assert r.status == 200 and (await r.json())["id"] == doc["id"]
    await ws.close()


async def test_unknown_kind_and_foreign_request(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    ws1, t1 = await new_visitor(g, tenant)
    ws2, t2 = await new_visitor(g, tenant)
    status, _ = await post(g, "/api/gdpr/request", session(t1), {"kind": "know"})
    assert status == 422
    status, _ = await post(g, "/api/privacy/ccpa/request", session(t1), {"kind": "access"})
    assert status == 422
    _, doc = await post(g, "/api/gdpr/request", session(t1), {"kind": "access"})
    async with g.session.get(g.url(f"/api/gdpr/request/{doc['id']}"), headers=session(t2)) as r:
        assert r.status == 404
    async with g.session.get(g.url("/api/gdpr/request/not-a-uuid"), headers=session(t2)) as r:
        assert r.status == 404
    await ws1.close()
    await ws2.close()


async def test_admin_workflow_and_extension_rules(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, gdpr = await post(g, "/api/gdpr/request", session(token), {"kind": "access"})
    _, ccpa = await post(g, "/api/privacy/ccpa/request", session(token), {"kind": "know"})
    base = "/api/admin/requests"
    async with g.session.get(g.url(base), headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    async with g.session.get(g.url(base + "?status=received"), headers=admin(tenant)) as r:
        listed = (await r.json())["requests"]
    assert {x["id"] for x in listed} == {gdpr["id"], ccpa["id"]}
    status, acked = await post(g, f"{base}/{gdpr['id']}/acknowledge", admin(tenant), {})
    assert status == 200 and acked["status"] == "acknowledged" and acked["acknowledged_at"]
    status, _ = await post(
        g, f"{base}/{gdpr['id']}/extend", admin(tenant), {"days": 61, "reason": "x"}
    )
    assert status == 422
    status, _ = await post(g, f"{base}/{gdpr['id']}/extend", admin(tenant), {"days": 30})
    assert status == 422
    status, ext = await post(
        g, f"{base}/{gdpr['id']}/extend", admin(tenant), {"days": 60, "reason": "complex"}
    )
    assert status == 200
    assert ts(ext["due_at"]) - ts(gdpr["due_at"]) == timedelta(days=60)
    status, _ = await post(
        g, f"{base}/{gdpr['id']}/extend", admin(tenant), {"days": 5, "reason": "again"}
    )
    assert status == 409
    status, done = await post(g, f"{base}/{gdpr['id']}/complete", admin(tenant), {})
    assert status == 200 and done["status"] == "completed"
    status, _ = await post(g, f"{base}/{ccpa['id']}/reject", admin(tenant), {})
    assert status == 422
    status, rej = await post(g, f"{base}/{ccpa['id']}/reject", admin(tenant), {"reason": "dup"})
    assert status == 200 and rej["status"] == "rejected"
    status, _ = await post(g, f"{base}/{ccpa['id']}/complete", admin(tenant), {})
    assert status == 409
    actions = [
        r["action"]
        for r in await owner_pool.fetch(
            "SELECT action FROM audit_log WHERE tenant_id = $1 ORDER BY seq", tenant.tenant_id
        )
    ]
    assert actions == [
        "tenant.create",
        "request.received",
        "request.received",
        "request.acknowledge",
        "request.extend",
        "request.complete",
        "request.reject",
    ]
    await ws.close()


async def test_overdue_gauge(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    ws, token = await new_visitor(offline_gateway, tenant)
    _, doc = await post(offline_gateway, "/api/gdpr/request", session(token), {"kind": "access"})
    before = await refresh_overdue(app_pool)
    await owner_pool.execute(
        "UPDATE privacy_requests SET due_at = now() - interval '1 day' WHERE request_id = $1::uuid",
        doc["id"],
    )
    assert await refresh_overdue(app_pool) == before + 1
    assert metrics.PRIVACY_REQUESTS_OVERDUE._value.get() == before + 1
    async with offline_gateway.session.get(
        offline_gateway.url("/api/admin/requests?status=overdue"), headers=admin(tenant)
    ) as r:
        assert [x["id"] for x in (await r.json())["requests"]] == [doc["id"]]
    await ws.close()


async def test_extending_after_the_deadline_is_refused(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, "/api/gdpr/request", session(token), {"kind": "access"})
    await owner_pool.execute(
        "UPDATE privacy_requests SET due_at = now() - interval '1 day' WHERE request_id = $1::uuid",
        doc["id"],
    )
    columns = "status, due_at, extended_at, extension_days, extension_reason"
    query = f"SELECT {columns} FROM privacy_requests WHERE request_id = $1::uuid"
    before = dict(await owner_pool.fetchrow(query, doc["id"]))
    overdue = await refresh_overdue(app_pool)
    status, err = await post(
        g, f"/api/admin/requests/{doc['id']}/extend", admin(tenant), {"days": 30, "reason": "late"}
    )
    assert status == 409 and err["error"]["code"] == "deadline_passed", err
    assert dict(await owner_pool.fetchrow(query, doc["id"])) == before
    assert await refresh_overdue(app_pool) == overdue
    async with g.session.get(
        g.url("/api/admin/requests?status=overdue"), headers=admin(tenant)
    ) as r:
        listed = (await r.json())["requests"]
    assert [(x["id"], x["overdue"]) for x in listed] == [(doc["id"], True)]
    actions = await owner_pool.fetch(
        "SELECT action FROM audit_log WHERE tenant_id = $1", tenant.tenant_id
    )
    assert "request.extend" not in [a["action"] for a in actions]
    await ws.close()


async def test_acknowledgement_deadline_is_surfaced(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, app_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    base = "/api/admin/requests"
    ws, token = await new_visitor(g, tenant)
    status, late = await post(g, "/api/gdpr/request", session(token), {"kind": "access"})
    assert status == 201 and late["ack_overdue"] is False
    _, closed = await post(g, "/api/privacy/ccpa/request", session(token), {"kind": "know"})
    _, fresh = await post(g, "/api/gdpr/request", session(token), {"kind": "portability"})
    await refresh_overdue(app_pool)
    before = metrics.PRIVACY_REQUESTS_ACK_OVERDUE._value.get()
    await owner_pool.execute(
        "UPDATE privacy_requests SET ack_due_at = now() - interval '1 hour'"
        " WHERE request_id = ANY($1::uuid[])",
        [late["id"], closed["id"]],
    )
    # answered without an acknowledgement: the answer is the acknowledgement
    status, rej = await post(g, f"{base}/{closed['id']}/reject", admin(tenant), {"reason": "dup"})
    assert status == 200 and rej["ack_overdue"] is False
    async with g.session.get(g.url(f"/api/gdpr/request/{late['id']}"), headers=session(token)) as r:
        mine = await r.json()
    assert mine["ack_overdue"] is True and mine["overdue"] is False
    async with g.session.get(g.url(f"{base}?status=ack_overdue"), headers=admin(tenant)) as r:
        assert r.status == 200
        assert [x["id"] for x in (await r.json())["requests"]] == [late["id"]]
    async with g.session.get(g.url(base), headers=admin(tenant)) as r:
        flags = {x["id"]: x["ack_overdue"] for x in (await r.json())["requests"]}
    assert flags == {late["id"]: True, closed["id"]: False, fresh["id"]: False}
    await refresh_overdue(app_pool)
    assert metrics.PRIVACY_REQUESTS_ACK_OVERDUE._value.get() == before + 1
    status, acked = await post(g, f"{base}/{late['id']}/acknowledge", admin(tenant), {})
    assert status == 200 and acked["ack_overdue"] is False
    async with g.session.get(g.url(f"{base}?status=ack_overdue"), headers=admin(tenant)) as r:
        assert (await r.json())["requests"] == []
    await refresh_overdue(app_pool)
    assert metrics.PRIVACY_REQUESTS_ACK_OVERDUE._value.get() == before
    await ws.close()


async def test_restriction_refuses_chat_at_once(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    w = await hello(ws, consent={"conversation_storage": True, "ai_processing": True})
    assert (await chat(ws, "a", "before"))[-1]["type"] == "done"
    status, _ = await post(
        g, "/api/gdpr/request", session(w["session_token"]), {"kind": "restriction"}
    )
    assert status == 201
    await ws.close()
    ws = await g.ws(tenant.site_key)
    await hello(ws, session_token=w["session_token"])
    frames = await chat(ws, "b", "after")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "consent_required"
    # the data is kept: the export still has the earlier message
    async with g.session.get(
        g.url("/api/privacy/export"), headers=session(w["session_token"])
    ) as r:
        export = await r.json()
    assert export["subject"]["restricted"] is True
    assert any(m["text"] == "before" for m in export["conversations"][0]["messages"])
    await ws.close()


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/api/gdpr/request", "objection"), ("/api/privacy/ccpa/request", "opt_out")],
    ids=["gdpr-objection", "ccpa-opt-out"],
)
async def test_objection_switches_tracking_off(
    offline_gateway: Gateway, tenant: NewTenant, path: str, kind: str
) -> None:
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    w = await hello(ws, consent={"analytics": True, "marketing": True})
    token = w["session_token"]
    status, _ = await post(g, path, session(token), {"kind": kind, "details": "stop it"})
    assert status == 201
    async with g.session.get(g.url("/api/privacy/consent"), headers=session(token)) as r:
        doc = await r.json()
    assert doc["tracking_opt_out"] is True
    assert doc["purposes"]["analytics"]["granted"] is False
    assert doc["purposes"]["marketing"]["granted"] is False
    assert {h["source"] for h in doc["history"] if not h["granted"]} == {"request"}
    await ws.close()


async def test_completing_an_erasure_request_erases(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(
        g, "/api/gdpr/request", session(token), {"kind": "erasure", "details": "my name is X"}
    )
    status, done = await post(g, f"/api/admin/requests/{doc['id']}/complete", admin(tenant), {})
    assert status == 200 and done["status"] == "completed"
    row = await owner_pool.fetchrow(
        "SELECT subject_id, details FROM privacy_requests WHERE request_id = $1::uuid", doc["id"]
    )
    assert row["subject_id"] is None and row["details"] is None
    async with g.session.get(g.url("/api/privacy/export"), headers=session(token)) as r:
        assert r.status == 401
    await ws.close()


async def test_a_completion_refused_by_a_concurrent_rejection_erases_nothing(
    offline_gateway: Gateway,
    tenant: NewTenant,
    owner_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, "/api/gdpr/request", session(token), {"kind": "erasure"})
    base = f"/api/admin/requests/{doc['id']}"
    real, rejected = requests_api.erase_rows, []

    async def rejected_meanwhile(*args: Any) -> Any:
        # a second admin rejects the request after the completion read it as open
        rejected.append(await post(g, f"{base}/reject", admin(tenant), {"reason": "not verified"}))
        return await real(*args)

    monkeypatch.setattr(requests_api, "erase_rows", rejected_meanwhile)
    status, err = await post(g, f"{base}/complete", admin(tenant), {})
    assert rejected and rejected[0][0] == 200
    assert status == 409 and err["error"]["code"] == "closed"
    row = await owner_pool.fetchrow(
        "SELECT subject_id, status FROM privacy_requests WHERE request_id = $1::uuid", doc["id"]
    )
    assert row["status"] == "rejected" and row["subject_id"] is not None
    actions = await owner_pool.fetch(
        "SELECT action FROM audit_log WHERE tenant_id = $1", tenant.tenant_id
    )
    assert "erasure" not in {a["action"] for a in actions}
    async with g.session.get(g.url("/api/privacy/export"), headers=session(token)) as r:
        assert r.status == 200
    await ws.close()


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/api/gdpr/request", "erasure"), ("/api/privacy/ccpa/request", "delete")],
    ids=["gdpr-erasure", "ccpa-delete"],
)
async def test_completing_an_erasure_request_keeps_no_free_text(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, path: str, kind: str
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, path, session(token), {"kind": kind, "details": "I am Jane Roe"})
    status, done = await post(
        g,
        f"/api/admin/requests/{doc['id']}/complete",
        admin(tenant),
        {"resolution": "erased Jane Roe"},
    )
    assert status == 200 and done["status"] == "completed" and done["closed_at"]
    assert done["resolution"] is None and "Jane" not in repr(done)
    row = await owner_pool.fetchrow(
        "SELECT subject_id, status, closed_at, details, extension_reason, resolution"
        " FROM privacy_requests WHERE request_id = $1::uuid",
        doc["id"],
    )
    assert row["status"] == "completed" and row["closed_at"] is not None
    assert row["subject_id"] is None and row["resolution"] is None
    assert "Jane" not in repr(dict(row))
    await ws.close()


async def test_requests_of_an_erased_subject_keep_no_free_text(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    base = "/api/admin/requests"
    ws, token = await new_visitor(g, tenant)
    _, first = await post(g, "/api/gdpr/request", session(token), {"kind": "access"})
    _, second = await post(g, "/api/gdpr/request", session(token), {"kind": "portability"})
    async with g.session.post(g.url("/api/privacy/delete"), headers=session(token)) as r:
        assert r.status == 200
    status, ext = await post(
        g, f"{base}/{first['id']}/extend", admin(tenant), {"days": 10, "reason": "Rupert called"}
    )
    assert status == 200 and ext["extension_days"] == 10 and ext["extension_reason"] is None
    status, done = await post(
        g, f"{base}/{first['id']}/complete", admin(tenant), {"resolution": "sent to Rupert Poe"}
    )
    assert status == 200 and done["status"] == "completed" and done["resolution"] is None
    # a rejection still needs a reason, even though it is not kept
    status, err = await post(g, f"{base}/{second['id']}/reject", admin(tenant), {})
    assert status == 422 and err["error"]["code"] == "reason_required"
    status, rej = await post(
        g, f"{base}/{second['id']}/reject", admin(tenant), {"reason": "Rupert is not the user"}
    )
    assert status == 200 and rej["status"] == "rejected" and rej["resolution"] is None
    dump = await owner_pool.fetch(
        "SELECT * FROM privacy_requests WHERE tenant_id = $1", tenant.tenant_id
    )
    assert len(dump) == 2 and "Rupert" not in repr([dict(r) for r in dump])
    await ws.close()


@pytest.mark.parametrize(
    "body",
    [{"resolution": 5}, {"reason": ["x"]}, {"resolution": {"a": 1}}],
    ids=["int-resolution", "list-reason", "dict-resolution"],
)
async def test_complete_with_non_string_text_is_refused_before_erasing(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool, body: Any
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, "/api/gdpr/request", session(token), {"kind": "erasure"})
    status, err = await post(g, f"/api/admin/requests/{doc['id']}/complete", admin(tenant), body)
    assert status == 422, err
    row = await owner_pool.fetchrow(
        "SELECT subject_id, status FROM privacy_requests WHERE request_id = $1::uuid", doc["id"]
    )
    assert row["subject_id"] is not None and row["status"] == "received"
    assert (
        await owner_pool.fetchval(
            "SELECT count(*) FROM subjects WHERE subject_id = $1", row["subject_id"]
        )
        == 1
    )
    async with g.session.get(g.url("/api/privacy/export"), headers=session(token)) as r:
        assert r.status == 200
    await ws.close()


async def test_extend_with_non_integer_days_or_text_reason_is_422(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, "/api/gdpr/request", session(token), {"kind": "access"})
    base = f"/api/admin/requests/{doc['id']}"
    status, _ = await post(g, f"{base}/extend", admin(tenant), {"days": 5, "reason": 7})
    assert status == 422
    status, _ = await post(g, f"{base}/reject", admin(tenant), {"reason": True})
    assert status == 422
    await ws.close()


async def test_request_details_are_sealed_at_rest(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    status, doc = await post(
        g, "/api/gdpr/request", session(token), {"kind": "access", "details": "my name is Jane Roe"}
    )
    assert status == 201 and doc["details"] == "my name is Jane Roe"
    dump = await owner_pool.fetch(
        "SELECT * FROM privacy_requests WHERE tenant_id = $1", tenant.tenant_id
    )
    assert dump and "Jane" not in repr([dict(r) for r in dump])
    stored = await owner_pool.fetchval(
        "SELECT details FROM privacy_requests WHERE request_id = $1::uuid", doc["id"]
    )
    assert stored.startswith("sealed:v1:")
    async with g.session.get(g.url(f"/api/gdpr/request/{doc['id']}"), headers=session(token)) as r:
        assert (await r.json())["details"] == "my name is Jane Roe"
    async with g.session.get(g.url("/api/admin/requests"), headers=admin(tenant)) as r:
        listed = (await r.json())["requests"]
    assert [x["details"] for x in listed] == ["my name is Jane Roe"]
    status, acked = await post(g, f"/api/admin/requests/{doc['id']}/acknowledge", admin(tenant), {})
    assert status == 200 and acked["details"] == "my name is Jane Roe"
    async with g.session.get(g.url("/api/privacy/export"), headers=session(token)) as r:
        export = await r.json()
    assert [x["details"] for x in export["privacy_requests"]] == ["my name is Jane Roe"]
    # every admin response that carried the opened details was audited, without the text
    entries = await owner_pool.fetch(
        "SELECT actor, action, target, details FROM audit_log WHERE tenant_id = $1 ORDER BY seq",
        tenant.tenant_id,
    )
    assert [(e["action"], e["target"]) for e in entries if e["actor"].startswith("admin:")] == [
        ("request.details_read", f"request:{doc['id']}"),
        ("request.acknowledge", f"request:{doc['id']}"),
        ("request.details_read", f"request:{doc['id']}"),
    ]
    assert "Jane" not in repr([dict(e) for e in entries])
    await ws.close()


async def test_erasure_clears_the_free_text_of_requests(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, "/api/gdpr/request", session(token), {"kind": "access"})
    status, _ = await post(
        g,
        f"/api/admin/requests/{doc['id']}/extend",
        admin(tenant),
        {"days": 10, "reason": "Rupert asked for paper copies"},
    )
    assert status == 200
    status, _ = await post(
        g,
        f"/api/admin/requests/{doc['id']}/complete",
        admin(tenant),
        {"resolution": "sent to Rupert Poe"},
    )
    assert status == 200
    async with g.session.post(g.url("/api/privacy/delete"), headers=session(token)) as r:
        assert r.status == 200
    row = await owner_pool.fetchrow(
        "SELECT details, extension_reason, resolution, subject_id FROM privacy_requests"
        " WHERE request_id = $1::uuid",
        doc["id"],
    )
    assert dict(row) == {
        "details": None,
        "extension_reason": None,
        "resolution": None,
        "subject_id": None,
    }
    await ws.close()


async def test_admin_request_endpoints_answer_like_the_rest_of_the_admin_api(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    async with g.session.get(
        g.url("/api/admin/requests"), headers={"Authorization": "Bearer wrong"}
    ) as r:
        assert r.status == 401
        assert r.headers.get("WWW-Authenticate") == 'Bearer realm="omnigate-admin"'
        assert (await r.json())["error"]["code"] == "unauthorized"
    status, err = await post(g, "/api/admin/requests/not-a-uuid/complete", admin(tenant), {})
    assert status == 404 and err["error"]["code"] == "not_found"
    async with g.session.get(g.url("/api/admin/requests?status=nope"), headers=admin(tenant)) as r:
        assert r.status == 422 and (await r.json())["error"]["code"] == "bad_status"
    async with g.session.post(
        g.url(f"/api/admin/requests/{uuid4()}/acknowledge"), data=b"[1]", headers=admin(tenant)
    ) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"


async def test_a_restricted_visitor_is_not_tracked(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws = await g.ws(tenant.site_key)
    w = await hello(ws, consent={"analytics": True}, context={"page": "/a"})
    assert w["policy"]["tracking"] == "on"
    status, _ = await post(
        g, "/api/gdpr/request", session(w["session_token"]), {"kind": "restriction"}
    )
    assert status == 201
    await ws.close()
    ws = await g.ws(tenant.site_key)
    again = await hello(ws, session_token=w["session_token"], context={"page": "/b"})
    await ws.send_json({"type": "ping"})
    assert (await ws.receive_json(timeout=5))["type"] == "pong"  # the page view is written
    await ws.close()
    assert again["policy"]["tracking"] == "off"
    views = await owner_pool.fetchval(
        "SELECT count(*) FROM analytics_events WHERE tenant_id = $1", tenant.tenant_id
    )
    assert views == 1  # "/a", before the restriction


async def test_gdpr_due_date_is_one_month_at_most(owner_pool: asyncpg.Pool) -> None:
    # Art. 12(3) says one month: 30 days would end on 1 or 2 March for 30 or 31 January
    jan31 = datetime(2025, 1, 31, 10, tzinfo=UTC)
    assert dsr.deadlines("gdpr", jan31).due_at == datetime(2025, 2, 28, 10, tzinfo=UTC)
    leap = datetime(2024, 1, 31, 10, tzinfo=UTC)
    assert dsr.deadlines("gdpr", leap).due_at == datetime(2024, 2, 29, 10, tzinfo=UTC)
    assert dsr.deadlines("ccpa", jan31).due_at == jan31 + timedelta(days=45)
    # every day of a common and a leap year, late in the UTC day: the same as PostgreSQL's
    # month (which clamps to the month's end); and the longest extension, 60 days, still
    # ends within three months of receipt (the month plus "two further months")
    async with owner_pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        rows = await conn.fetch(
            "SELECT t, least(t + interval '1 month', t + interval '30 days') AS due,"
            " t + interval '3 months' AS latest FROM generate_series("
            "'2023-01-01 23:30+00'::timestamptz, '2024-12-31 23:30+00', interval '1 day') AS t"
        )
    assert len(rows) == 731
    for row in rows:
        due = dsr.deadlines("gdpr", row["t"]).due_at
        assert due == row["due"], row["t"]
        assert due + timedelta(days=60) <= row["latest"], row["t"]


async def restricted(pool: asyncpg.Pool, subject_id: str) -> bool:
    value = await pool.fetchval(
        "SELECT restricted FROM subjects WHERE subject_id = $1::uuid", subject_id
    )
    assert isinstance(value, bool)
    return value


async def reject_effects(pool: asyncpg.Pool, request_id: str) -> Any:
    return await pool.fetchval(
        "SELECT details->'effects' FROM audit_log WHERE action = 'request.reject' AND target = $1",
        f"request:{request_id}",
    )


async def test_rejecting_a_restriction_request_lifts_the_restriction(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    events: list[dict[str, Any]] = []

    async def record(payload: dict[str, Any]) -> None:
        events.append(payload)

    g.server.app[SERVICES].bus.subscribe(bus.CONSENT_CHANGED, record)
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, "/api/gdpr/request", session(token), {"kind": "restriction"})
    events.clear()
    status, rej = await post(
        g, f"/api/admin/requests/{doc['id']}/reject", admin(tenant), {"reason": "not verified"}
    )
    assert status == 200 and rej["status"] == "rejected"
    subject = rej["subject_id"]
    assert await restricted(owner_pool, subject) is False
    assert await reject_effects(owner_pool, doc["id"]) == '["restriction_lifted"]'
    # open sockets on every process read their state again (a lift, like a grant, is never
    # taken from an event)
    assert events == [{"tenant_id": str(tenant.tenant_id), "subject_id": subject, "revoke": []}]
    await ws.close()
    ws = await g.ws(tenant.site_key)
    await hello(ws, session_token=token)
    assert (await chat(ws, "b", "after"))[-1]["type"] == "done"
    await ws.close()


async def test_a_restriction_stays_while_another_request_holds_it(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    base = "/api/admin/requests"
    ws, token = await new_visitor(g, tenant)
    _, first = await post(g, "/api/gdpr/request", session(token), {"kind": "restriction"})
    _, second = await post(g, "/api/gdpr/request", session(token), {"kind": "restriction"})
    status, rej = await post(g, f"{base}/{first['id']}/reject", admin(tenant), {"reason": "dup"})
    assert status == 200
    subject = rej["subject_id"]
    assert await restricted(owner_pool, subject) is True  # the second is still open
    assert await reject_effects(owner_pool, first["id"]) is None
    # completing a restriction request grants it (Art. 18): it stays
    status, _ = await post(g, f"{base}/{second['id']}/complete", admin(tenant), {})
    assert status == 200
    assert await restricted(owner_pool, subject) is True
    _, third = await post(g, "/api/gdpr/request", session(token), {"kind": "restriction"})
    status, _ = await post(g, f"{base}/{third['id']}/reject", admin(tenant), {"reason": "dup"})
    assert status == 200
    assert await restricted(owner_pool, subject) is True  # the completed one holds it
    await ws.close()


async def test_a_lifted_restriction_reaches_an_open_socket(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    _, doc = await post(g, "/api/gdpr/request", session(token), {"kind": "restriction"})
    assert (await chat(ws, "a", "restricted"))[-1]["type"] == "error"
    status, _ = await post(
        g, f"/api/admin/requests/{doc['id']}/reject", admin(tenant), {"reason": "not verified"}
    )
    assert status == 200
    assert (await chat(ws, "b", "lifted"))[-1]["type"] == "done"
    await ws.close()


def counted() -> dict[tuple[str, str], float]:
    """omnigate_privacy_requests_total by (kind, status), for the kinds these tests file."""
    return {
        (kind, status): REGISTRY.get_sample_value(
            "omnigate_privacy_requests_total", {"kind": kind, "status": status}
        )
        or 0.0
        for kind in ("access", "know", "erasure", "delete")
        for status in ("received", "acknowledged", "completed")
    }


def increase(before: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    after = counted()
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/api/gdpr/request", "access"), ("/api/privacy/ccpa/request", "know")],
    ids=["gdpr", "ccpa"],
)
async def test_an_extension_is_not_counted_as_a_transition(
    offline_gateway: Gateway, tenant: NewTenant, path: str, kind: str
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    before = counted()
    _, doc = await post(g, path, session(token), {"kind": kind})
    base = f"/api/admin/requests/{doc['id']}"
    assert (await post(g, f"{base}/acknowledge", admin(tenant), {}))[0] == 200
    assert (await post(g, f"{base}/extend", admin(tenant), {"days": 5, "reason": "x"}))[0] == 200
    assert increase(before) == {(kind, "received"): 1, (kind, "acknowledged"): 1}
    await ws.close()


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/api/gdpr/request", "erasure"), ("/api/privacy/ccpa/request", "delete")],
    ids=["gdpr-erasure", "ccpa-delete"],
)
async def test_completing_an_erasure_request_is_counted_once(
    offline_gateway: Gateway, tenant: NewTenant, path: str, kind: str
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    before = counted()
    _, doc = await post(g, path, session(token), {"kind": kind})
    status, _ = await post(g, f"/api/admin/requests/{doc['id']}/complete", admin(tenant), {})
    assert status == 200
    assert increase(before) == {(kind, "received"): 1, (kind, "completed"): 1}
    await ws.close()


async def test_a_self_service_erasure_is_counted_once(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    g = offline_gateway
    ws, token = await new_visitor(g, tenant)
    before = counted()
    async with g.session.post(g.url("/api/privacy/delete"), headers=session(token)) as r:
        assert r.status == 200
    assert increase(before) == {("erasure", "completed"): 1}
    await ws.close()


async def test_a_ccpa_request_is_extended_once_by_up_to_45_days(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    base = "/api/admin/requests"
    ws, token = await new_visitor(g, tenant)
    _, know = await post(g, "/api/privacy/ccpa/request", session(token), {"kind": "know"})
    _, delete = await post(g, "/api/privacy/ccpa/request", session(token), {"kind": "delete"})
    _, opt_out = await post(g, "/api/privacy/ccpa/request", session(token), {"kind": "opt_out"})
    _, late = await post(g, "/api/privacy/ccpa/request", session(token), {"kind": "know"})
    extend = f"{base}/{know['id']}/extend"
    for body, code in [
        ({"days": 46, "reason": "complex"}, "bad_days"),
        ({"days": 45}, "reason_required"),
        ({"days": 45, "reason": "  "}, "reason_required"),
    ]:
        status, err = await post(g, extend, admin(tenant), body)
        assert status == 422 and err["error"]["code"] == code, (body, err)
    status, ext = await post(g, extend, admin(tenant), {"days": 45, "reason": "many systems"})
    assert status == 200, ext
    assert ts(ext["due_at"]) - ts(know["due_at"]) == timedelta(days=45)
    assert ext["extension_days"] == 45 and ext["extended_at"] and ext["status"] == "received"
    status, err = await post(g, extend, admin(tenant), {"days": 1, "reason": "again"})
    assert status == 409 and err["error"]["code"] == "already_extended"
    # the consumer sees the notice on their request
    async with g.session.get(g.url(f"/api/gdpr/request/{know['id']}"), headers=session(token)) as r:
        mine = await r.json()
    assert mine["extension_reason"] == "many systems" and mine["due_at"] == ext["due_at"]
    status, ext = await post(
        g, f"{base}/{delete['id']}/extend", admin(tenant), {"days": 10, "reason": "backups"}
    )
    assert status == 200 and ts(ext["due_at"]) - ts(delete["due_at"]) == timedelta(days=10)
    # an opt-out is never extended
    status, err = await post(
        g, f"{base}/{opt_out['id']}/extend", admin(tenant), {"days": 5, "reason": "x"}
    )
    assert status == 422 and err["error"]["code"] == "not_extendable"
    # before the original due date only
    await owner_pool.execute(
        "UPDATE privacy_requests SET due_at = now() - interval '1 second'"
        " WHERE request_id = $1::uuid",
        late["id"],
    )
    status, err = await post(
        g, f"{base}/{late['id']}/extend", admin(tenant), {"days": 10, "reason": "late"}
    )
    assert status == 409 and err["error"]["code"] == "deadline_passed"
    await ws.close()


async def _requests_pages(
    g: Gateway, t: NewTenant, limit: int, status: str | None = None
) -> list[dict[str, Any]]:
    """GET /api/admin/requests page by page, following next_cursor to its null."""
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": str(limit), **({"status": status} if status else {})}
        if cursor is not None:
            params["cursor"] = cursor
        async with g.session.get(
            g.url("/api/admin/requests"), params=params, headers=admin(t)
        ) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        pages.append(page)
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 20, "the cursor does not advance"


async def _seven_requests(
    g: Gateway, t: NewTenant, owner_pool: asyncpg.Pool
) -> tuple[Any, list[tuple[datetime, str]]]:
    """Seven requests, five sharing a due_at (microseconds and all), some with details;
    (the visitor's socket, every (due_at, id) in list order)."""
    ws, token = await new_visitor(g, t)
    ids = []
    for i in range(7):
        body: dict[str, Any] = {"kind": "access"}
        if i % 2 == 0:
            body["details"] = f"note {i}"
        status, doc = await post(g, "/api/gdpr/request", session(token), body)
        assert status == 201, doc
        ids.append(doc["id"])
    shared = datetime(2031, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    due = [shared + timedelta(days=1), *[shared] * 5, shared - timedelta(days=1)]
    for request_id, at in zip(ids, due, strict=True):
        await owner_pool.execute(
            "UPDATE privacy_requests SET due_at = $2 WHERE request_id = $1::uuid", request_id, at
        )
    rows = await owner_pool.fetch(
        "SELECT request_id, due_at FROM privacy_requests WHERE tenant_id = $1", t.tenant_id
    )
    # PostgreSQL orders uuids byte by byte: the order of their canonical text
    order = sorted((r["due_at"], str(r["request_id"])) for r in rows)
    return ws, order


@pytest.mark.usefixtures("no_tracebacks")
async def test_admin_requests_page_by_cursor_each_request_once(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, order = await _seven_requests(g, tenant, owner_pool)
    pages = await _requests_pages(g, tenant, limit=3)
    assert [len(p["requests"]) for p in pages] == [3, 3, 1]
    assert all(p["next_cursor"] for p in pages[:-1]) and pages[-1]["next_cursor"] is None
    listed = [(ts(x["due_at"]), x["id"]) for p in pages for x in p["requests"]]
    assert listed == order
    # a page boundary inside the five that share a due_at loses and repeats nothing
    assert len({x for _, x in listed}) == 7
    # each request's details read is audited once, for the page that returned it
    # (never for the row read ahead to know whether another page follows)
    audited = await owner_pool.fetch(
        "SELECT target FROM audit_log WHERE tenant_id = $1 AND action = 'request.details_read'",
        tenant.tenant_id,
    )
    with_details = [f"request:{x['id']}" for p in pages for x in p["requests"] if x["details"]]
    assert len(with_details) == 4
    assert sorted(a["target"] for a in audited) == sorted(with_details)
    # a page that holds exactly the rest: no next page
    whole = await _requests_pages(g, tenant, limit=7)
    assert len(whole) == 1 and [x["id"] for x in whole[0]["requests"]] == [x for _, x in order]
    await ws.close()


@pytest.mark.usefixtures("no_tracebacks")
async def test_admin_requests_status_filter_holds_across_pages(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    g = offline_gateway
    ws, order = await _seven_requests(g, tenant, owner_pool)
    acked = {order[1][1], order[3][1]}
    for request_id in acked:
        status, _ = await post(
            g, f"/api/admin/requests/{request_id}/acknowledge", admin(tenant), {}
        )
        assert status == 200
    received = await _requests_pages(g, tenant, limit=2, status="received")
    assert [len(p["requests"]) for p in received] == [2, 2, 1]
    assert [x["id"] for p in received for x in p["requests"]] == [
        x for _, x in order if x not in acked
    ]
    assert {x["status"] for p in received for x in p["requests"]} == {"received"}
    acknowledged = await _requests_pages(g, tenant, limit=1, status="acknowledged")
    assert [[x["id"] for x in p["requests"]] for p in acknowledged] == [
        [x] for _, x in order if x in acked
    ]
    # a filter over both statuses still walks all seven, in order, once each
    opened = await _requests_pages(g, tenant, limit=3, status="open")
    assert [x["id"] for p in opened for x in p["requests"]] == [x for _, x in order]
    await ws.close()


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!",
        "bm90IGpzb24",  # "not json"
        "WyIyMDMxLTAxLTAxVDAwOjAwOjAwKzAwOjAwIiw1XQ",  # ["2031-01-01T00:00:00+00:00", 5]
        "WyIyMDMxLTAxLTAxVDAwOjAwOjAwIiwiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIl0",
    ],
    ids=["not-base64", "not-json", "numeric-id", "naive-time"],
)
@pytest.mark.usefixtures("no_tracebacks")
async def test_admin_requests_refuse_a_cursor_not_from_the_api(
    offline_gateway: Gateway, tenant: NewTenant, cursor: str
) -> None:
    """Refused as the conversation list refuses one: 400 bad_request naming `cursor`."""
    g = offline_gateway
    async with g.session.get(
        g.url("/api/admin/requests"), params={"cursor": cursor}, headers=admin(tenant)
    ) as r:
        assert r.status == 400, await r.text()
        err = (await r.json())["error"]
    assert err["code"] == "bad_request"
    assert err["fields"] == [{"field": "cursor", "message": "is not a cursor from this API"}]
