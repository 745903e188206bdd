"""Identity verification: a verified site user id shares one subject; anything else does not."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from gateway import identity, metrics
from gateway.provision import NewTenant
from tests.conftest import Gateway, chat, hello
from tests.support import call, tenant_with


@pytest.mark.parametrize(
    "user, ok",
    [
        ({"id": "u1", "hash": identity.user_hash("s3cret", "u1")}, True),
        ({"id": "u1", "hash": identity.user_hash("s3cret", "u1").upper()}, True),
        ({"id": "u1", "hash": identity.user_hash("other", "u1")}, False),
        ({"id": "u2", "hash": identity.user_hash("s3cret", "u1")}, False),
        ({"id": "u1"}, False),
        ({"id": 1, "hash": "00"}, False),
        ({"id": "", "hash": identity.user_hash("s3cret", "")}, False),
        ("u1", False),
    ],
    ids=["valid", "upper-hex", "wrong-secret", "other-id", "no-hash", "int-id", "empty", "string"],
)
def test_verify_table(user: object, ok: bool) -> None:
    assert (identity.verify("s3cret", user) is not None) is ok
    assert identity.verify(None, user) is None


async def _subject(owner_pool: asyncpg.Pool, conversation_id: str) -> uuid.UUID:
    sid: uuid.UUID = await owner_pool.fetchval(
        "SELECT subject_id FROM conversations WHERE conversation_id = $1",
        uuid.UUID(conversation_id),
    )
    return sid


async def _users(g: Gateway, t: NewTenant, *uids: str) -> list[dict[str, str]]:
    """Hello `user` claims that verify: a new identity secret for the tenant, each id signed."""
    _, body = await call(g, "POST", "/api/admin/identity-secret", t.admin_key)
    return [{"id": uid, "hash": identity.user_hash(body["identity_secret"], uid)} for uid in uids]


def _unverified() -> float:
    return metrics.IDENTITY_UNVERIFIED._value.get()  # type: ignore[no-any-return]


async def test_verified_user_shares_one_subject_across_sockets(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    status, body = await call(
        offline_gateway, "POST", "/api/admin/identity-secret", tenant.admin_key
    )
    assert status == 201
    secret = body["identity_secret"]
    user = {"id": "customer-42", "hash": identity.user_hash(secret, "customer-42")}
    ws1 = await offline_gateway.ws(tenant.site_key)
    w1 = await hello(ws1, user=user)
    ws2 = await offline_gateway.ws(tenant.site_key)
    w2 = await hello(ws2, user=user)
    assert w1["conversation_id"] != w2["conversation_id"]
    s1, s2 = (
        await _subject(owner_pool, w1["conversation_id"]),
        await _subject(owner_pool, w2["conversation_id"]),
    )
    assert s1 == s2
    ref = await owner_pool.fetchval("SELECT external_ref FROM subjects WHERE subject_id = $1", s1)
    assert ref is not None and b"customer-42" not in ref  # a keyed hash, never the id
    # both sockets chat under the shared subject's data key
    assert (await chat(ws1, "a", "one"))[-1]["type"] == "done"
    assert (await chat(ws2, "b", "two"))[-1]["type"] == "done"

    before = _unverified()
    ws3 = await offline_gateway.ws(tenant.site_key)
    forged = {"id": "customer-42", "hash": identity.user_hash("guess", "customer-42")}
    w3 = await hello(ws3, user=forged)
    assert await _subject(owner_pool, w3["conversation_id"]) != s1
    assert _unverified() == before + 1
    for ws in (ws1, ws2, ws3):
        await ws.close()

    # rotation: the old secret stops verifying at once
    _, rotated = await call(offline_gateway, "POST", "/api/admin/identity-secret", tenant.admin_key)
    assert rotated["identity_secret"] != secret
    ws4 = await offline_gateway.ws(tenant.site_key)
    w4 = await hello(ws4, user=user)
    assert await _subject(owner_pool, w4["conversation_id"]) != s1
    await ws4.close()
    _, log = await call(offline_gateway, "GET", "/api/admin/audit", tenant.admin_key)
    actions = [e["action"] for e in log["entries"]]
    assert actions == ["identity_secret.rotate"] * 2 + ["tenant.create"]  # newest first
    assert secret not in str(log)


async def test_a_new_session_of_a_known_user_keeps_the_users_consent(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    [user] = await _users(offline_gateway, tenant, "customer-7")
    ws1 = await offline_gateway.ws(tenant.site_key)
    first = await hello(ws1, user=user, consent={"ai_processing": True, "analytics": True})
    assert sorted(first["policy"]["granted"]) == ["ai_processing", "analytics"]
    await ws1.close()
    # a new session, no consent in hello: the subject's earlier decisions still hold
    ws2 = await offline_gateway.ws(tenant.site_key)
    second = await hello(ws2, user=user)
    assert second["conversation_id"] != first["conversation_id"]
    assert sorted(second["policy"]["granted"]) == ["ai_processing", "analytics"]
    await ws2.close()
    # an anonymous visitor starts with nothing granted
    ws3 = await offline_gateway.ws(tenant.site_key)
    assert (await hello(ws3))["policy"]["granted"] == []
    await ws3.close()


async def test_user_without_a_secret_is_ignored(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    user = {"id": "x", "hash": identity.user_hash("", "x")}
    ws1 = await offline_gateway.ws(tenant.site_key)
    w1 = await hello(ws1, user=user)
    ws2 = await offline_gateway.ws(tenant.site_key)
    w2 = await hello(ws2, user=user)
    assert await _subject(owner_pool, w1["conversation_id"]) != await _subject(
        owner_pool, w2["conversation_id"]
    )
    for ws in (ws1, ws2):
        await ws.close()


async def test_erase_by_user(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    [user] = await _users(offline_gateway, tenant, "gone-7")
    ws = await offline_gateway.ws(tenant.site_key)
    w = await hello(ws, user=user, consent={"conversation_storage": True})
    await chat(ws, "a", "remember me")
    sid = await _subject(owner_pool, w["conversation_id"])
    status, out = await call(
        offline_gateway,
        "POST",
        "/api/admin/subjects/erase-by-user",
        tenant.admin_key,
        {"user_id": "gone-7"},
    )
    assert status == 200 and out["erased"] is True and out["subject_id"] == str(sid)
    assert (
        await owner_pool.fetchval("SELECT count(*) FROM subjects WHERE subject_id = $1", sid) == 0
    )
    status, out = await call(
        offline_gateway,
        "POST",
        "/api/admin/subjects/erase-by-user",
        tenant.admin_key,
        {"user_id": "gone-7"},
    )
    assert status == 404
    status, out = await call(
        offline_gateway, "POST", "/api/admin/subjects/erase-by-user", tenant.admin_key, {}
    )
    assert status == 422 and out["error"]["fields"][0]["field"] == "user_id"
    await ws.close()


async def test_a_session_is_resumed_only_by_its_own_user(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    # One browser, two site users: the cookie or token of the first must not hand the
    # second the first one's conversation (nor, through it, their export or erasure).
    ann, bob = await _users(offline_gateway, tenant, "ann-1", "bob-2")
    ws = await offline_gateway.ws(tenant.site_key)
    first = await hello(ws, user=ann)
    assert (await chat(ws, "a", "ann's question"))[-1]["type"] == "done"
    await ws.close()
    token = first["session_token"]
    ann_subject = await _subject(owner_pool, first["conversation_id"])

    ws = await offline_gateway.ws(tenant.site_key)
    again = await hello(ws, session_token=token, user=ann)  # the same user: resumed
    assert again["resumed"] is True and again["conversation_id"] == first["conversation_id"]
    await ws.close()

    ws = await offline_gateway.ws(tenant.site_key)
    other = await hello(ws, session_token=token, user=bob)
    assert other["resumed"] is False and other["session_token"] != token
    assert await _subject(owner_pool, other["conversation_id"]) != ann_subject
    await ws.send_json({"type": "history"})
    frames = []
    while not frames or frames[-1]["type"] != "history":
        frames.append(await ws.receive_json(timeout=3))
    assert frames[-1]["messages"] == []  # nothing of ann's
    await ws.close()

    # ann's session is resumed only by a hello that verifies as ann: not by one naming
    # nobody (ann signed out; the next person on this browser has her cookie), nor by
    # one whose claim does not verify
    forged = {"id": "ann-1", "hash": identity.user_hash("guess", "ann-1")}
    for claim in ({}, {"user": forged}):
        ws = await offline_gateway.ws(tenant.site_key)
        after = await hello(ws, session_token=token, **claim)
        assert after["resumed"] is False and after["session_token"] != token, claim
        assert await _subject(owner_pool, after["conversation_id"]) != ann_subject
        await ws.close()

    # an anonymous session: a claim that does not verify is ignored, as everywhere
    ws = await offline_gateway.ws(tenant.site_key)
    anonymous = await hello(ws)
    await ws.close()
    ws = await offline_gateway.ws(tenant.site_key)
    resumed = await hello(ws, session_token=anonymous["session_token"], user=forged)
    assert resumed["resumed"] is True
    await ws.close()


async def test_a_refused_resume_leaves_the_users_session_untouched(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    # the next person on ann's browser, with her cookie, GPC on, from another address:
    # refused, and none of it is written to ann's session (her export would show another
    # person's address and signals), nor her session's expiry slid by them
    ann, bob = await _users(offline_gateway, tenant, "ann-3", "bob-3")
    ws = await offline_gateway.ws(tenant.site_key)
    first = await hello(ws, user=ann)
    await ws.close()
    conversation = uuid.UUID(first["conversation_id"])
    # a minute later: a resume now would touch the row whatever changed
    await owner_pool.execute(
        "UPDATE sessions SET last_seen_at = now() - interval '2 minutes'"
        " WHERE conversation_id = $1",
        conversation,
    )
    row = (
        "SELECT subject_id, ip_anon, dnt, gpc, last_seen_at, expires_at FROM sessions"
        " WHERE conversation_id = $1"
    )
    before = await owner_pool.fetchrow(row, conversation)
    for claim in ({}, {"user": bob}):
        ws = await offline_gateway.ws(
            tenant.site_key, headers={"Sec-GPC": "1", "X-Forwarded-For": "198.51.100.9"}
        )
        other = await hello(ws, session_token=first["session_token"], **claim)
        assert other["resumed"] is False, claim
        await ws.close()
    assert await owner_pool.fetchrow(row, conversation) == before
    records = await owner_pool.fetchval(
        "SELECT count(*) FROM signal_records WHERE subject_id = $1", before["subject_id"]
    )
    assert records == 0
    # ann herself, with the same headers, resumes and is touched
    ws = await offline_gateway.ws(tenant.site_key, headers={"Sec-GPC": "1"})
    again = await hello(ws, session_token=first["session_token"], user=ann)
    await ws.close()
    assert again["resumed"] is True
    after = await owner_pool.fetchrow(row, conversation)
    assert after["gpc"] is True and after["expires_at"] > before["expires_at"]


async def test_gpc_from_a_verified_user_holds_on_their_other_devices(
    offline_gateway: Gateway, tenant: NewTenant, owner_pool: asyncpg.Pool
) -> None:
    # a known consumer's signal applies to the consumer, not only to the browser that
    # sends it: the laptop (no signal) and the laptop's open socket stop tracking too
    [ann] = await _users(offline_gateway, tenant, "ann-5")
    laptop = await offline_gateway.ws(tenant.site_key)
    before = await hello(laptop, user=ann, consent={"analytics": True}, context={"page": "/"})
    assert before["policy"]["tracking"] == "on"
    phone = await offline_gateway.ws(tenant.site_key, headers={"Sec-GPC": "1"})
    assert (await hello(phone, user=ann))["policy"]["tracking"] == "off"
    await phone.close()
    # the open laptop socket is told (a fresh welcome), as for any consent change
    welcome = await laptop.receive_json(timeout=5)
    assert welcome["type"] == "welcome" and welcome["policy"]["tracking"] == "off"
    await laptop.close()
    later = await offline_gateway.ws(tenant.site_key)
    again = await hello(later, user=ann, context={"page": "/pricing"})
    await later.close()
    assert again["policy"]["tracking"] == "off"
    subject = await _subject(owner_pool, before["conversation_id"])
    rows = await owner_pool.fetch(
        "SELECT purpose, granted, source FROM consents WHERE subject_id = $1 ORDER BY consent_id",
        subject,
    )
    assert [tuple(r) for r in rows] == [
        ("analytics", True, "widget"),
        ("analytics", False, "signal"),
        ("marketing", False, "signal"),
    ]
    events = await owner_pool.fetchval(
        "SELECT count(*) FROM analytics_events WHERE subject_id = $1", subject
    )
    assert events == 1  # the laptop's first hello, before the signal; none after
    # a second signalled hello records nothing more
    phone = await offline_gateway.ws(tenant.site_key, headers={"Sec-GPC": "1"})
    await hello(phone, user=ann)
    await phone.close()
    count = "SELECT count(*) FROM consents WHERE subject_id = $1"
    assert await owner_pool.fetchval(count, subject) == 3


async def test_gpc_from_a_verified_user_does_not_refuse_what_the_site_requires(
    offline_gateway: Gateway, app_pool: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> None:
    # a site that requires analytics to chat: the signal switches tracking off on this
    # browser, as for an anonymous visitor, and refuses only what is not required
    t = await tenant_with(app_pool, required_consents=["analytics"])
    [ann] = await _users(offline_gateway, t, "ann-6")
    for n in range(2):
        phone = await offline_gateway.ws(t.site_key, headers={"Sec-GPC": "1"})
        w = await hello(phone, user=ann, consent={"analytics": True} if n == 0 else {})
        assert w["policy"]["tracking"] == "off"
        assert (await chat(phone, f"m{n}", "hello"))[-1]["type"] == "done"
        await phone.close()
    subject = await _subject(owner_pool, w["conversation_id"])
    rows = await owner_pool.fetch(
        "SELECT purpose, granted, source FROM consents WHERE subject_id = $1 ORDER BY consent_id",
        subject,
    )
    assert [tuple(r) for r in rows] == [
        ("analytics", True, "widget"),
        ("marketing", False, "signal"),
    ]


async def test_a_verified_session_answers_the_privacy_api_only_to_its_token(
    offline_gateway: Gateway, tenant: NewTenant
) -> None:
    # ann signed out of the site, but the site cannot clear the gateway's cookie: the
    # next person on the browser still sends it, and must not get her export with it
    [ann] = await _users(offline_gateway, tenant, "ann-9")
    ws = await offline_gateway.ws(tenant.site_key)
    w = await hello(ws, user=ann)
    assert (await chat(ws, "a", "ann's question"))[-1]["type"] == "done"
    await ws.close()
    ws = await offline_gateway.ws(tenant.site_key)
    anonymous = await hello(ws)
    await ws.close()

    def cookie(token: str) -> dict[str, str]:
        return {"Cookie": f"__Host-omnigate_session={token}"}

    export = "/api/privacy/export"
    status, out = await call(
        offline_gateway, "GET", export, None, headers=cookie(w["session_token"])
    )
    assert status == 401 and out["error"]["code"] == "session_invalid"
    status, out = await call(
        offline_gateway, "POST", "/api/privacy/delete", None, headers=cookie(w["session_token"])
    )
    assert status == 401
    # the token the widget holds for ann's tab still works, and her data is intact
    status, out = await call(
        offline_gateway,
        "GET",
        export,
        None,
        headers={"Authorization": f"Session {w['session_token']}"},
    )
    assert status == 200 and len(out["conversations"][0]["messages"]) == 2
    # an anonymous session is still reached by its cookie alone, as the design says
    status, _ = await call(
        offline_gateway, "GET", export, None, headers=cookie(anonymous["session_token"])
    )
    assert status == 200
