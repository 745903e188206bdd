"""Property tests: whatever a client throws at the gateway, it answers with typed frames.

Every test keeps ONE live widget socket across all hypothesis examples (reconnecting
and saying hello again only when the gateway closes it for abuse with 1008/1009).
Property: every reply is a valid gateway frame of a known type, every error carries
a code from the closed set, and every close is 1008 or 1009. After each test a fresh
socket still says hello and chats. The HTTP fallback, the `site` query parameter and
the admin API are fuzzed too: never a 500.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.protocol import ERROR_CODES
from gateway.provision import NewTenant
from tests.conftest import ORIGIN, Gateway, chat, hello, reply_text

pytestmark = pytest.mark.usefixtures("no_tracebacks")

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SERVER_TYPES = {"error", "pong", "welcome", "consent_required", "ack", "delta", "done", "history"}
ABUSE_CLOSES = {1008, 1009}
STEP_TIMEOUT = 10.0

# text that survives JSON encoding (no lone surrogates), control characters included
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=20,
)
# a JSON value that is not `type` (str) — anything but a string
NON_STR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(TEXT, st.integers(), max_size=2)
)


def check_frame(frame: Any) -> None:
    """A gateway frame: an object of a known type; errors carry a closed-set code."""
    assert isinstance(frame, dict), frame
    assert frame.get("type") in SERVER_TYPES, frame
    if frame["type"] == "error":
        assert frame.get("code") in ERROR_CODES, frame
        assert isinstance(frame.get("message"), str), frame


class FuzzSocket:
    """One widget socket reused across examples; reconnects after an abuse close."""

    def __init__(self, gw: Gateway, site_key: str) -> None:
        self.gw = gw
        self.site_key = site_key
        self.ws: ClientWebSocketResponse | None = None
        self.closes: list[int] = []
        self.frames = 0

    async def connect(self) -> ClientWebSocketResponse:
        if self.ws is None or self.ws.closed:
            self.ws = await self.gw.ws(self.site_key)
            await hello(self.ws)
        return self.ws

    async def _read_until_pong(self, ws: ClientWebSocketResponse) -> bool:
        """Validate every frame up to our pong; False when the gateway closed the socket."""
        while True:
            msg = await ws.receive(timeout=STEP_TIMEOUT)
            if msg.type == WSMsgType.TEXT:
                frame = json.loads(msg.data)
                check_frame(frame)
                self.frames += 1
                if frame["type"] == "pong":
                    return True
                continue
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED), msg
            code = ws.close_code if msg.type != WSMsgType.CLOSE else msg.data
            assert code in ABUSE_CLOSES, f"unexpected close {code} ({msg.extra!r})"
            self.closes.append(code)
            await ws.close()
            return False

    async def send(self, payload: str | bytes) -> None:
        """Send one frame then a ping, checking everything answered up to the pong."""
        ws = await self.connect()
        if isinstance(payload, bytes):
            await ws.send_bytes(payload)
        else:
            await ws.send_str(payload)
        try:
            await ws.send_str('{"type":"ping"}')
        except (ConnectionError, RuntimeError):
            pass  # already being closed; the read below sees the close code
        await self._read_until_pong(ws)

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()


@pytest.fixture
async def fsock(offline_gateway: Gateway, tenant: NewTenant):
    sock = FuzzSocket(offline_gateway, tenant.site_key)
    yield sock
    await sock.close()
    assert sock.frames > 0, "no frame was ever answered"
    # after the barrage a fresh socket still works end to end
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    frames = await chat(ws, "ok", "still alive")
    for f in frames:
        check_frame(f)
    assert reply_text(frames) == "still alive", frames
    await ws.close()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@FUZZ
@given(value=JSON)
async def test_arbitrary_json_values(fsock: FuzzSocket, value: Any) -> None:
    await fsock.send(dumps(value))


@FUZZ
@given(ftype=TEXT | NON_STR, extra=st.dictionaries(TEXT, JSON, max_size=3))
async def test_arbitrary_types(fsock: FuzzSocket, ftype: Any, extra: dict[str, Any]) -> None:
    await fsock.send(dumps({**extra, "type": ftype}))


WRONG = {
    # each entry: the frame type and fields with at least one wrongly typed value
    "message": {"id": NON_STR, "text": NON_STR},
    "history": {"before": TEXT | st.floats() | st.booleans(), "limit": TEXT | st.booleans()},
    "consent": {"grant": TEXT | st.integers(), "revoke": st.dictionaries(TEXT, TEXT)},
    "hello": {"v": TEXT | st.booleans() | st.floats(), "consent": TEXT | st.integers()},
}


@st.composite
def wrong_fields(draw: st.DrawFn) -> dict[str, Any]:
    ftype = draw(st.sampled_from(sorted(WRONG)))
    spec = WRONG[ftype]
    names = sorted(spec)
    bad = draw(st.sampled_from(names))
    frame: dict[str, Any] = {"type": ftype, bad: draw(spec[bad])}
    for name in names:
        if name != bad and draw(st.booleans()):
            frame[name] = draw(JSON)
    return frame


@FUZZ
@given(frame=wrong_fields())
async def test_wrong_field_types(fsock: FuzzSocket, frame: dict[str, Any]) -> None:
    await fsock.send(json.dumps(frame, allow_nan=True))


@FUZZ
@given(data=st.binary(min_size=1, max_size=200))
async def test_invalid_utf8_binary(fsock: FuzzSocket, data: bytes) -> None:
    await fsock.send(b"\xff\xfe" + data)


async def test_deep_nesting(fsock: FuzzSocket) -> None:
    depth = 10_000
    await fsock.send("[" * depth + "]" * depth)
    await fsock.send('{"a":' * depth + "1" + "}" * depth)
    await fsock.send("[" * depth)  # unterminated


async def test_one_megabyte_frame(offline_gateway: Gateway, tenant: NewTenant) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_str(dumps({"type": "message", "id": "big", "text": "x" * 1_000_000}))
    msg = await ws.receive(timeout=STEP_TIMEOUT)
    # under the 1 MiB hard cap: a typed refusal on an open socket, not a close
    assert msg.type == WSMsgType.TEXT, msg
    frame = json.loads(msg.data)
    check_frame(frame)
    assert frame["type"] == "error" and frame["code"] == "too_large", frame
    await ws.close()
    # and well past the hard limit: always a 1009 close
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    await ws.send_str("x" * (17 * 64 * 1024))
    msg = await ws.receive(timeout=STEP_TIMEOUT)
    assert msg.type == WSMsgType.CLOSE and msg.data == 1009, msg
    await ws.close()
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    assert reply_text(await chat(ws, "ok", "still alive")) == "still alive"
    await ws.close()


async def test_ping_flood_answered_in_order(offline_gateway: Gateway, tenant: NewTenant) -> None:
    ws = await offline_gateway.ws(tenant.site_key)
    await hello(ws)
    for _ in range(200):
        await ws.send_str('{"type":"ping"}')
    await ws.send_json({"type": "history", "limit": 1})
    frames = [await ws.receive_json(timeout=STEP_TIMEOUT) for _ in range(201)]
    assert [f["type"] for f in frames] == ["pong"] * 200 + ["history"], frames[-3:]
    assert reply_text(await chat(ws, "ok", "still alive")) == "still alive"
    await ws.close()


# ---- HTTP fallback, site key and admin API -------------------------------------------


async def _sse_ok(resp: aiohttp.ClientResponse) -> None:
    assert resp.status != 500
    if resp.status in (403, 413):
        return
    assert resp.status == 200, (resp.status, await resp.text())
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    body = await resp.text()
    events = [e for e in body.split("\n\n") if e.strip()]
    assert events, body
    for ev in events:
        lines = ev.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), ev
        frame = json.loads(lines[1][len("data: ") :])
        check_frame(frame)
        assert frame["type"] == lines[0][len("event: ") :], ev


@FUZZ
@given(body=st.binary(max_size=300) | JSON.map(lambda v: dumps(v).encode()))
async def test_http_fallback_bodies(
    offline_gateway: Gateway, tenant: NewTenant, body: bytes
) -> None:
    async with offline_gateway.session.post(
        offline_gateway.url(f"/v1/widget/chat?site={tenant.site_key}"),
        data=body,
        headers={"Origin": ORIGIN, "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT),
    ) as resp:
        await _sse_ok(resp)


@FUZZ
@given(site=st.text(max_size=300))
async def test_ws_site_param(offline_gateway: Gateway, tenant: NewTenant, site: str) -> None:
    assume(site != tenant.site_key)
    async with offline_gateway.session.get(
        offline_gateway.url("/v1/widget/ws"),
        params={"site": site},
        headers={
            "Origin": ORIGIN,
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
        timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT),
    ) as resp:
        assert resp.status == 403, (site, resp.status)


@FUZZ
@given(token=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=200))
async def test_admin_random_bearer(offline_gateway: Gateway, token: str) -> None:
    async with offline_gateway.session.get(
        offline_gateway.url("/api/admin/policy"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT),
    ) as resp:
        assert resp.status == 401, (token, resp.status)
