"""The widget in a real browser (headless Chromium) against a real gateway.

Skipped, with the reason printed, only when /usr/bin/chromium is absent.
Set OMNIGATE_UPDATE_SCREENSHOT=1 to refresh docs/widget.png from the screenshot test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import WSCloseCode

from gateway import store
from gateway.appkeys import CONNECTIONS, SERVICES
from gateway.config import Settings
from gateway.db import tenant_tx
from gateway.provision import NewTenant, create_tenant
from policies import parse_policy, policy_to_doc
from tests import support
from tests.conftest import Gateway, start_gateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    # the gateway listens on loopback; a real shop and gateway are both public, so the
    # private-network guard (http://shop.test -> 127.0.0.1) is not what is under test
    "--disable-features=BlockInsecurePrivateNetworkRequests,LocalNetworkAccessChecks",
]
DOCS_PNG = Path(__file__).resolve().parent.parent / "docs" / "widget.png"
POLICY_URL = "https://example.com/privacy"

pytestmark = pytest.mark.timeout(120)

if not CHROMIUM.exists():  # pragma: no cover - depends on the machine
    print("test_browser: skipped, /usr/bin/chromium is absent")
    pytestmark = [pytestmark, pytest.mark.skip(reason="/usr/bin/chromium is absent")]

from playwright.async_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Page,
    WebSocketRoute,
    async_playwright,
    expect,
)


@dataclass
class Live:
    """A gateway on a real port and a tenant whose allowed origin is the gateway itself."""

    gateway: Gateway
    origin: str
    tenant: NewTenant

    @property
    def demo(self) -> str:
        return f"{self.origin}/demo?site={self.tenant.site_key}"

    async def drop_sockets(self) -> int:
        """Close every widget socket from the server side, as a restart would."""
        sockets = list(self.gateway.server.app[CONNECTIONS])  # type: ignore[index]
        for ws in sockets:
            await ws.close(code=WSCloseCode.SERVICE_RESTART, message=b"test drop")
        return len(sockets)


async def set_policy(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, doc: dict[str, Any], version: int = 2
) -> None:
    """Append a policy version (2 by default: before the gateway has cached version 1)."""
    policy = parse_policy(doc)
    async with tenant_tx(pool, tenant_id) as conn:
        await store.insert_policy(conn, tenant_id, version, policy_to_doc(policy), {}, "test")


@pytest.fixture
async def live(settings: Settings, app_pool: asyncpg.Pool) -> AsyncIterator[Live]:
    """The gateway (offline model) and a tenant requiring ai_processing, on plain http."""
    async for g in start_gateway(replace(settings, cookie_secure=False)):
        origin = f"http://127.0.0.1:{g.server.port}"
        tenant = await create_tenant(app_pool, f"b-{uuid.uuid4().hex[:8]}", [origin])
        await set_policy(
            app_pool,
            tenant.tenant_id,
            {
                "allowed_origins": [origin],
                "required_consents": ["ai_processing"],
                "privacy_policy_url": POLICY_URL,
            },
        )
        yield Live(g, origin, tenant)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless system Chromium."""
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    try:
        yield ctx
    finally:
        await ctx.close()


class Watch:
    """What a page did: requests, sockets, frames sent, CSP violations."""

    def __init__(self, page: Page) -> None:
        self.requests: list[str] = []
        self.sockets: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.console: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("console", lambda m: self.console.append(m.text))
        page.on("websocket", self._on_ws)

    def _on_ws(self, ws: Any) -> None:
        self.sockets.append(ws.url)
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def csp_violations(self) -> list[str]:
        return [m for m in self.console if "Content Security Policy" in m]

    def hellos(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("type") == "hello"]

    def welcomes(self) -> list[dict[str, Any]]:
        return [f for f in self.received if f.get("type") == "welcome"]


async def until(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait until check() is true (a condition on what a Watch recorded)."""
    await support.until(check, timeout)


async def open_widget(page: Page) -> None:
    await page.get_by_role("button", name="Open chat").click()
    await expect(page.get_by_role("dialog", name="Chat with us")).to_be_visible()


async def give_consent(page: Page, keep: bool = True) -> None:
    """Tick the required purpose (and optionally keeping the conversation), then agree."""
    await page.get_by_label("AI processing").check()
    if keep:
        await page.get_by_label("Keep this conversation (optional)").check()
    await page.get_by_role("button", name="Agree and start chatting").click()
    await expect(page.get_by_label("Message")).to_be_visible()


async def say(page: Page, text: str, replies_before: int) -> None:
    """Send a message and wait for its completed (no longer streaming) reply."""
    await page.get_by_label("Message").fill(text)
    await page.get_by_label("Message").press("Enter")
    done = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(done.nth(replies_before)).to_have_text(text)


async def texts(page: Page) -> list[tuple[str, str]]:
    items = page.locator("li.msg")
    out = []
    for i in range(await items.count()):
        li = items.nth(i)
        out.append(
            (await li.get_attribute("data-role") or "", await li.locator(".text").inner_text())
        )
    return out


async def test_nothing_connects_or_is_stored_before_opening(
    live: Live, context: BrowserContext
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await expect(page.get_by_role("button", name="Open chat")).to_be_visible()
    await page.wait_for_timeout(500)
    paths = {r.removeprefix(live.origin).split("?")[0] for r in watch.requests}
    assert paths <= {"/demo", "/demo.css", "/widget.js", "/widget.css"}, watch.requests
    assert {"/widget.js", "/widget.css"} <= paths
    assert watch.sockets == []
    stored = await page.evaluate(
        "() => [sessionStorage.length, localStorage.length, document.cookie]"
    )
    assert stored == [0, 0, ""]
    assert await context.cookies() == []
    assert watch.csp_violations() == []


async def test_consent_chat_stream_and_announce(live: Live, context: BrowserContext) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    # the consent panel comes first: the policy requires ai_processing
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    await expect(page.get_by_role("link", name="Privacy policy").first).to_have_attribute(
        "href", POLICY_URL
    )
    await page.get_by_role("button", name="Agree and start chatting").click()
    await expect(page.get_by_role("alert").first).to_contain_text("tick each box")
    await give_consent(page)
    await say(page, "hello <b>there</b> friend", 0)
    # model text is text, never markup
    assert await page.locator("li.msg b").count() == 0
    await expect(page.locator("[aria-live=polite].sr-only")).to_have_text(
        "Assistant: hello <b>there</b> friend"
    )
    hello = watch.hellos()[0]
    assert set(hello["signals"]) == {"gpc", "dnt"}
    assert {"type": "consent", "grant": ["ai_processing", "conversation_storage"]} in watch.sent
    assert len(watch.sockets) == 1 and watch.sockets[0].startswith("ws://127.0.0.1:")
    # the token is kept for this tab only once the widget was opened
    stored = await page.evaluate("() => Object.keys(sessionStorage)")
    assert stored == [f"omnigate.session.{live.tenant.site_key}"]
    assert await page.evaluate("() => localStorage.length") == 0
    assert watch.csp_violations() == []


async def test_unticked_keep_box_revokes_storage(live: Live, context: BrowserContext) -> None:
    # the policy names conversation_storage in neither list: kept unless refused
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page, keep=False)
    consent = [f for f in watch.sent if f["type"] == "consent"]
    assert consent == [
        {"type": "consent", "grant": ["ai_processing"], "revoke": ["conversation_storage"]}
    ]
    await say(page, "do not keep this", 0)
    # a reload resumes the session, and there is no transcript to replay
    await page.reload()
    await open_widget(page)
    await until(lambda: any(f["type"] == "history" for f in watch.received))
    history = [f for f in watch.received if f["type"] == "history"]
    assert history[-1]["messages"] == []
    await expect(page.get_by_label("Message")).to_be_visible()
    assert await page.locator("li.msg").count() == 0


async def test_gpc_is_sent_in_hello(live: Live, context: BrowserContext) -> None:
    await context.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"
    )
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    assert watch.hellos()[0]["signals"]["gpc"] is True


async def test_reconnect_neither_loses_nor_duplicates(live: Live, context: BrowserContext) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page)
    await say(page, "first message", 0)

    # a drop between messages
    assert await live.drop_sockets() == 1
    await expect(page.locator(".status-bar")).to_contain_text("Reconnecting")
    await expect(page.locator(".panel")).to_have_attribute("data-state", "ready")
    await say(page, "second message", 1)

    # a drop racing a message in flight: either way it is answered exactly once
    await page.get_by_label("Message").fill("third message")
    await page.get_by_label("Message").press("Enter")
    await live.drop_sockets()
    done = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(done.nth(2)).to_have_text("third message")
    await expect(page.locator(".panel")).to_have_attribute("data-state", "ready")
    await page.wait_for_timeout(300)
    expected = [
        ("user", "first message"),
        ("assistant", "first message"),
        ("user", "second message"),
        ("assistant", "second message"),
        ("user", "third message"),
        ("assistant", "third message"),
    ]
    assert await texts(page) == expected
    hellos = watch.hellos()
    assert len(hellos) >= 3
    assert all(h["session_token"] == hellos[1]["session_token"] for h in hellos[1:])

    # a reload resumes from sessionStorage and replays history without duplicates
    await page.reload()
    await open_widget(page)
    await expect(page.locator("li.msg")).to_have_count(6)
    assert await texts(page) == expected
    await say(page, "fourth message", 3)
    await expect(page.locator("li.msg")).to_have_count(8)


# a network that blocks WebSockets: every socket fails before it opens
BLOCKED_SOCKETS = """
window.WebSocket = class {
  static OPEN = 1;
  constructor() {
    this.readyState = 0;
    this._l = {};
    setTimeout(() => {
      this.readyState = 3;
      (this._l.error || []).forEach((f) => f(new Event('error')));
      (this._l.close || []).forEach((f) => f({ code: 1006 }));
    }, 20);
  }
  addEventListener(t, f) { (this._l[t] = this._l[t] || []).push(f); }
  send() {}
  close() {}
};
"""


async def test_http_fallback_when_websockets_fail(live: Live, context: BrowserContext) -> None:
    await context.add_init_script(BLOCKED_SOCKETS)
    page = await context.new_page()
    watch = Watch(page)
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: (
            bodies.append(json.loads(r.post_data or "{}")) if "/v1/widget/chat" in r.url else None
        ),
    )
    await page.goto(live.demo)
    await open_widget(page)
    await expect(page.locator(".panel")).to_have_attribute("data-transport", "http")
    await page.get_by_label("Message").fill("over plain http")
    await page.get_by_label("Message").press("Enter")
    # the answer to the first message asks for consent; the message waits for it
    await give_consent(page, keep=False)
    done = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(done.nth(0)).to_have_text("over plain http")
    await say(page, "and again", 1)
    assert await page.locator("li.msg").count() == 4
    posts = [u for u in watch.requests if "/v1/widget/chat" in u]
    assert len(posts) >= 3
    # the unticked optional box is a refusal, sent with the consent on the next hello
    consents = [b["hello"]["consent"] for b in bodies if "consent" in b.get("hello", {})]
    assert consents == [{"ai_processing": True, "conversation_storage": False}], bodies
    assert watch.csp_violations() == []


async def test_privacy_export_and_delete(live: Live, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page)
    await say(page, "please remember me", 0)
    key = f"omnigate.session.{live.tenant.site_key}"
    token = await page.evaluate("(k) => sessionStorage.getItem(k)", key)
    assert token

    await page.get_by_role("button", name="Privacy").click()
    await expect(page.get_by_role("region", name="Your data")).to_be_visible()
    await expect(page.locator(".privacy .policy-link a")).to_have_attribute("href", POLICY_URL)
    async with page.expect_download() as info:
        await page.get_by_role("button", name="Download my data").click()
    download = await info.value
    assert download.suggested_filename == "my-chat-data.json"
    exported = await asyncio.to_thread(Path(await download.path()).read_text)
    assert "please remember me" in exported
    data = json.loads(exported)
    assert {"purposes", "recipients", "retention"} <= set(data), sorted(data)

    await page.get_by_role("button", name="Delete my data").click()
    dialog = page.get_by_role("alertdialog", name="Delete your data?")
    await expect(dialog).to_be_visible()
    await page.keyboard.press("Escape")  # Esc cancels the confirmation, not the widget
    await expect(dialog).to_be_hidden()
    await expect(page.get_by_role("dialog", name="Chat with us")).to_be_visible()
    await page.get_by_role("button", name="Delete my data").click()
    await page.get_by_role("button", name="Delete everything").click()
    # a fresh session: new token, empty conversation, consent asked again
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    new = await page.evaluate("(k) => sessionStorage.getItem(k)", key)
    assert new and new != token
    assert await page.locator("li.msg").count() == 0


async def test_keyboard_and_phone_layout(live: Live, browser: Browser) -> None:
    # reduced motion: no entry animation, so the panel's box is final at once
    ctx = await browser.new_context(
        viewport={"width": 375, "height": 667}, is_mobile=True, reduced_motion="reduce"
    )
    try:
        page = await ctx.new_page()
        await page.goto(live.demo)
        launcher = page.get_by_role("button", name="Open chat")
        await expect(launcher).to_be_visible()
        await launcher.focus()
        await page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog", name="Chat with us")
        await expect(dialog).to_be_visible()
        # focus moves into the panel (the first consent checkbox once the policy is known)
        await expect(page.get_by_label("AI processing")).to_be_focused()
        box = await dialog.bounding_box()
        assert box is not None
        assert (box["x"], box["y"], box["width"], box["height"]) == pytest.approx((0, 0, 375, 667))
        await page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
        # focus returns to the launcher
        await expect(page.get_by_role("button", name="Open chat")).to_be_focused()
    finally:
        await ctx.close()


async def test_screenshot_of_open_widget(
    live: Live, context: BrowserContext, tmp_path: Path
) -> None:
    page = await context.new_page()
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page)
    await say(page, "Hi! Do you have the Trailblazer 29 in a medium frame?", 0)
    await say(page, "Great, please email me at jane.doe@example.com when it is back.", 1)
    await page.get_by_label("Message").blur()
    await asyncio.sleep(0.3)  # let the entry animation settle
    shot = tmp_path / "widget.png"
    await page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("OMNIGATE_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, DOCS_PNG)


class ScriptedServer:
    """A stand-in widget server (page.route_web_socket) answering from a script of errors."""

    def __init__(
        self, errors: list[dict[str, Any]], hello_errors: list[dict[str, Any]] | None = None
    ) -> None:
        self.errors = errors
        self.hello_errors = hello_errors or []  # answers to the first hellos, in turn
        self.hellos = 0
        self.messages: list[dict[str, Any]] = []
        self.seq = 0

    async def attach(self, page: Page) -> None:
        await page.route_web_socket(re.compile(r".*/v1/widget/ws.*"), self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        def send(frame: dict[str, Any]) -> None:
            ws.send(json.dumps(frame))

        def on_message(raw: str | bytes) -> None:
            frame = json.loads(raw)
            if frame["type"] == "hello":
                self.hellos += 1
                if self.hello_errors:
                    send({"type": "error", **self.hello_errors.pop(0)})
                    return
                policy = {"required_consents": [], "granted": [], "retention_days": 30}
                send({"type": "welcome", "session_token": "t" * 32, "resumed": False,
                      "conversation_id": "c", "policy": policy})  # fmt: skip
            elif frame["type"] == "message":
                self.messages.append(frame)
                if self.errors:
                    send({"type": "error", "id": frame["id"], **self.errors.pop(0)})
                    return
                self.seq += 2
                send({"type": "ack", "id": frame["id"], "seq": self.seq - 1})
                for word in frame["text"].split(" "):
                    send({"type": "delta", "id": frame["id"], "text": word + " "})
                send({"type": "done", "id": frame["id"], "seq": self.seq, "finish_reason": "stop"})

        ws.on_message(on_message)


@pytest.mark.parametrize(
    ("error", "shown", "retry_button"),
    [
        (
            {"code": "rate_limited", "message": "slow down", "retry_after": 1.2},
            "sending messages too quickly. Trying again in 2 s",
            False,
        ),
        (
            {"code": "rate_limited", "message": "x", "retry_after": 0.5, "reason": "busy"},
            "being answered in another tab. Checking again in 1 s",
            False,
        ),
        ({"code": "storage_unavailable", "message": "x", "retry_after": 0.2}, "Retrying", False),
        ({"code": "upstream_unavailable", "message": "x"}, "unavailable right now", True),
        ({"code": "upstream_timeout", "message": "x"}, "took too long", True),
    ],
    ids=["rate_limited", "busy", "storage_unavailable", "upstream_unavailable", "upstream_timeout"],
)
async def test_error_states_are_shown_and_recovered(
    live: Live,
    context: BrowserContext,
    error: dict[str, Any],
    shown: str,
    retry_button: bool,
) -> None:
    server = ScriptedServer([error])
    page = await context.new_page()
    await server.attach(page)
    await page.goto(live.demo)
    await open_widget(page)
    await page.get_by_label("Message").fill("try this")
    await page.get_by_label("Message").press("Enter")
    await expect(page.get_by_role("dialog", name="Chat with us")).to_contain_text(shown)
    if retry_button:
        await page.get_by_role("button", name="Retry").click()
    await expect(page.locator("li.msg.assistant:not(.streaming) .text")).to_have_text("try this ")
    assert await page.locator("li.msg").count() == 2
    # every attempt carried the same client id, so the server could dedupe it
    assert len(server.messages) == 2
    assert len({m["id"] for m in server.messages}) == 1


async def test_a_refused_hello_is_tried_again_after_its_wait(
    live: Live, context: BrowserContext
) -> None:
    # too many new sessions from this address: the hello itself is refused, with no
    # message id; the widget must try again rather than wait for a reload
    refused = {"code": "rate_limited", "message": "too many new sessions", "retry_after": 0.5}
    server = ScriptedServer([], hello_errors=[refused])
    page = await context.new_page()
    await server.attach(page)
    await page.goto(live.demo)
    await open_widget(page)
    await page.get_by_label("Message").fill("after the wait")
    await page.get_by_label("Message").press("Enter")
    reply = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(reply).to_have_text("after the wait ", timeout=10_000)
    assert server.hellos == 2 and len(server.messages) == 1


async def test_offline_and_back(live: Live, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page, keep=False)
    await context.set_offline(True)
    await expect(page.locator(".status-bar")).to_contain_text("You are offline")
    await context.set_offline(False)
    await expect(page.locator(".status-bar")).to_be_hidden()
    await say(page, "back online", 0)


SHOP = "http://shop.test"
CSP_EVENTS = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) =>
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


async def open_shop(
    live: Live, pool: asyncpg.Pool, context: BrowserContext, before: str = ""
) -> tuple[Page, Watch]:
    """The widget on a third-party shop page with its own strict CSP, the shop allowed.

    `before` is markup the page has ahead of the widget's script tag."""
    await set_policy(
        pool,
        live.tenant.tenant_id,
        {
            "allowed_origins": [SHOP],
            "required_consents": ["ai_processing"],
            "privacy_policy_url": POLICY_URL,
        },
        version=3,
    )
    app = live.gateway.server.app
    assert app is not None
    app[SERVICES].tenants.invalidate(live.tenant.tenant_id)
    gw, ws = live.origin, live.origin.replace("http://", "ws://", 1)
    csp = (
        f"default-src 'none'; script-src 'self' {gw}; style-src 'self' {gw}; "
        f"connect-src 'self' {gw} {ws}; img-src 'self' data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Shop</title></head>'
        f"<body><h1>Trailblazer 29</h1>{before}"
        f'<script src="{gw}/widget.js" data-site="{live.tenant.site_key}" async></script>'
        "</body></html>"
    )
    await context.route(
        f"{SHOP}/**",
        lambda route: route.fulfill(
            status=200,
            headers={"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": csp},
            body=html,
        ),
    )
    await context.add_init_script(CSP_EVENTS)
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(f"{SHOP}/bikes/trailblazer-29")
    return page, watch


async def csp_violations(page: Page, watch: Watch) -> list[str]:
    return watch.csp_violations() + await page.evaluate("() => window.__csp")


async def test_third_party_origin_with_strict_csp(
    live: Live, app_pool: asyncpg.Pool, context: BrowserContext
) -> None:
    page, watch = await open_shop(live, app_pool, context)
    await open_widget(page)
    await give_consent(page)
    await say(page, "is the medium frame in stock?", 0)
    port = live.origin.rsplit(":", 1)[1]
    assert len(watch.sockets) == 1
    assert watch.sockets[0].startswith(f"ws://127.0.0.1:{port}/v1/widget/ws?")
    assert watch.hellos() and watch.csp_violations() == []
    # the token is the shop page's, for this tab only
    stored = await page.evaluate("() => Object.keys(sessionStorage)")
    assert stored == [f"omnigate.session.{live.tenant.site_key}"]
    assert await csp_violations(page, watch) == []


async def test_third_party_origin_export_and_delete(
    live: Live, app_pool: asyncpg.Pool, context: BrowserContext
) -> None:
    page, watch = await open_shop(live, app_pool, context)
    await open_widget(page)
    await give_consent(page)
    await say(page, "remember my shop order 4711", 0)
    key = f"omnigate.session.{live.tenant.site_key}"
    token = await page.evaluate("(k) => sessionStorage.getItem(k)", key)
    assert token

    await page.get_by_role("button", name="Privacy").click()
    await expect(page.get_by_role("region", name="Your data")).to_be_visible()
    export = f"{live.origin}/api/privacy/export"
    async with page.expect_response(lambda r: r.url.startswith(export)) as answer:
        async with page.expect_download() as info:
            await page.get_by_role("button", name="Download my data").click()
    # a cross-origin call the gateway vouched for: the shop may read it, with credentials
    headers = await (await answer.value).all_headers()
    assert headers["access-control-allow-origin"] == SHOP
    assert headers["access-control-allow-credentials"] == "true"
    download = await info.value
    assert download.suggested_filename == "my-chat-data.json"
    raw = await asyncio.to_thread(Path(await download.path()).read_text)
    assert "remember my shop order 4711" in json.dumps(json.loads(raw))

    await page.get_by_role("button", name="Delete my data").click()
    await page.get_by_role("button", name="Delete everything").click()
    await expect(page.locator(".privacy .note")).to_have_text(
        "Your data was deleted. A new, empty conversation has started."
    )
    # a fresh session: new token, empty conversation, consent asked again
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    new = await page.evaluate("(k) => sessionStorage.getItem(k)", key)
    assert new and new != token
    assert await page.locator("li.msg").count() == 0
    assert await csp_violations(page, watch) == []


async def test_a_session_that_ended_is_said_so_by_the_privacy_panel(
    live: Live, app_pool: asyncpg.Pool, context: BrowserContext
) -> None:
    # Expired (or erased from another tab) while the page stayed open: the export is
    # answered 401, which the shop page may read, and the widget says what happened
    # instead of offering a download that can never succeed.
    page, watch = await open_shop(live, app_pool, context)
    await open_widget(page)
    await give_consent(page)
    await say(page, "my order 4712", 0)
    key = f"omnigate.session.{live.tenant.site_key}"
    token = await page.evaluate("(k) => sessionStorage.getItem(k)", key)
    async with tenant_tx(app_pool, live.tenant.tenant_id) as conn:
        await conn.execute("UPDATE sessions SET expires_at = now() - interval '1 minute'")
    await page.get_by_role("button", name="Privacy").click()
    await page.get_by_role("button", name="Download my data").click()
    await expect(page.locator(".privacy .note")).to_have_text(
        "This conversation has ended, so its data can no longer be reached from here. "
        "A new, empty conversation has started."
    )
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    assert await page.locator("li.msg").count() == 0
    new = await page.evaluate("(k) => sessionStorage.getItem(k)", key)
    assert new != token
    assert await csp_violations(page, watch) == []


class ReplacingServer:
    """A scripted widget server whose session is gone after a restart.

    The first socket's session answers the first message and leaves the second
    unanswered; every later socket starts a new session (another token, not resumed).
    """

    def __init__(self) -> None:
        self.routes: list[WebSocketRoute] = []
        self.frames: list[list[dict[str, Any]]] = []

    async def attach(self, page: Page) -> None:
        await page.route_web_socket(re.compile(r".*/v1/widget/ws.*"), self._route)

    def token(self, n: int) -> str:
        return chr(ord("a") + n) * 32

    def _route(self, ws: WebSocketRoute) -> None:
        n = len(self.routes)
        self.routes.append(ws)
        self.frames.append([])

        def send(frame: dict[str, Any]) -> None:
            ws.send(json.dumps(frame))

        def on_message(raw: str | bytes) -> None:
            frame = json.loads(raw)
            self.frames[n].append(frame)
            if frame["type"] == "hello":
                policy = {"required_consents": [], "granted": [], "retention_days": 30}
                send({"type": "welcome", "session_token": self.token(n), "resumed": False,
                      "conversation_id": f"c{n}", "policy": policy})  # fmt: skip
            elif frame["type"] == "message":
                answered = sum(f["type"] == "message" for f in self.frames[n])
                if n == 0 and answered > 1:
                    return  # in flight when the gateway went away
                send({"type": "ack", "id": frame["id"], "seq": 2 * answered - 1})
                send({"type": "delta", "id": frame["id"], "text": frame["text"]})
                send({"type": "done", "id": frame["id"], "seq": 2 * answered,
                      "finish_reason": "stop"})  # fmt: skip

        ws.on_message(on_message)

    def sent(self, n: int, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames[n] if f["type"] == kind]


async def test_a_session_replaced_while_away_is_not_continued(
    live: Live, context: BrowserContext
) -> None:
    server = ReplacingServer()
    page = await context.new_page()
    await server.attach(page)
    await page.goto(live.demo)
    await open_widget(page)
    await say(page, "answered before", 0)
    await page.get_by_label("Message").fill("never answered")
    await page.get_by_label("Message").press("Enter")
    await until(lambda: len(server.sent(0, "message")) == 2)
    await expect(page.locator("li.msg")).to_have_count(3)

    # the gateway restarts and the session is gone: the widget's hello names the old
    # token, and the answer is a new session
    await server.routes[0].close(code=1012, reason="restart")
    await until(lambda: len(server.routes) == 2 and server.sent(1, "hello") != [])
    assert server.sent(1, "hello")[0]["session_token"] == server.token(0)
    await expect(page.locator(".panel")).to_have_attribute("data-state", "ready")
    # the old conversation is over: nothing of it is shown, nothing re-sent into the new one
    await expect(page.locator("li.msg")).to_have_count(0)
    await expect(page.locator(".empty")).to_be_visible()
    key = f"omnigate.session.{live.tenant.site_key}"
    assert await page.evaluate("(k) => sessionStorage.getItem(k)", key) == server.token(1)
    await say(page, "a new start", 0)
    assert [m["text"] for m in server.sent(1, "message")] == ["a new start"]
    await page.wait_for_timeout(300)
    assert len(server.routes) == 2  # no further reconnect
    assert await texts(page) == [("user", "a new start"), ("assistant", "a new start")]


async def test_clobbered_current_script_is_ignored(
    live: Live, app_pool: asyncpg.Pool, context: BrowserContext
) -> None:
    # markup a shop lets through (a review, a product description) shadowing
    # document.currentScript with its own gateway and site key
    await context.route("https://evil.test/**", lambda route: route.abort())
    clobber = '<img name="currentScript" src="https://evil.test/widget.js" data-site="x">'
    page, watch = await open_shop(live, app_pool, context, before=clobber)
    await open_widget(page)
    await give_consent(page)
    await say(page, "which gateway is this?", 0)
    port = live.origin.rsplit(":", 1)[1]
    assert watch.sockets == [f"ws://127.0.0.1:{port}/v1/widget/ws?site={live.tenant.site_key}"]
    assert await page.locator(f'[data-omnigate="{live.tenant.site_key}"]').count() == 1
    assert await page.locator('[data-omnigate="x"]').count() == 0
    assert [r for r in watch.requests if "evil.test" in r and not r.endswith("/widget.js")] == []


# sockets 2 and 3 fail before they open (a gateway restarting); the others are real
FLAKY_SOCKETS = """
(() => {
  const Real = window.WebSocket;
  window.__sockets = 0;
  class Refused {
    constructor() {
      this.readyState = 0;
      this._l = {};
      setTimeout(() => {
        this.readyState = 3;
        (this._l.error || []).forEach((f) => f(new Event('error')));
        (this._l.close || []).forEach((f) => f({ code: 1006 }));
      }, 20);
    }
    addEventListener(t, f) { (this._l[t] = this._l[t] || []).push(f); }
    send() {}
    close() {}
  }
  function Flaky(url, protocols) {
    window.__sockets += 1;
    if (window.__sockets === 2 || window.__sockets === 3) return new Refused();
    return new Real(url, protocols);
  }
  Object.assign(Flaky, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });
  window.WebSocket = Flaky;
})();
"""


async def test_a_short_outage_keeps_websockets(live: Live, context: BrowserContext) -> None:
    await context.add_init_script(FLAKY_SOCKETS)
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page)
    await say(page, "before the restart", 0)
    assert await live.drop_sockets() == 1
    # two sockets fail to open, then the gateway is back: a WebSocket again, not HTTP
    await until(lambda: len(watch.sockets) == 2)
    await expect(page.locator(".panel")).to_have_attribute("data-state", "ready")
    await say(page, "after the restart", 1)
    assert await page.locator(".panel").get_attribute("data-transport") is None
    assert await page.evaluate("() => window.__sockets") == 4
    assert not [u for u in watch.requests if "/v1/widget/chat" in u]


async def erase_conversation(live: Live, conversation_id: str) -> None:
    """The owner erases the visitor behind a conversation (admin API): sockets get 4001."""
    async with live.gateway.session.post(
        live.gateway.url("/api/admin/subjects/erase-by-conversation"),
        json={"conversation_id": conversation_id},
        headers={"Authorization": f"Bearer {live.tenant.admin_key}"},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def only_conversation(live: Live) -> str:
    """The id of the tenant's one conversation (admin API)."""
    async with live.gateway.session.get(
        live.gateway.url("/api/admin/conversations"),
        headers={"Authorization": f"Bearer {live.tenant.admin_key}"},
    ) as resp:
        conversations = (await resp.json())["conversations"]
    assert len(conversations) == 1, conversations
    return str(conversations[0]["id"])


async def test_http_fallback_starts_over_after_erasure(live: Live, context: BrowserContext) -> None:
    await context.add_init_script(BLOCKED_SOCKETS)
    page = await context.new_page()
    await page.goto(live.demo)
    await open_widget(page)
    await expect(page.locator(".panel")).to_have_attribute("data-transport", "http")
    await page.get_by_label("Message").fill("before erasure")
    await page.get_by_label("Message").press("Enter")
    await give_consent(page)
    done = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(done.nth(0)).to_have_text("before erasure")

    await erase_conversation(live, await only_conversation(live))
    # the next message names the erased session: the gateway starts a new one, which
    # asks for consent again; only that message moves over into it
    await page.get_by_label("Message").fill("after erasure")
    await page.get_by_label("Message").press("Enter")
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    assert await texts(page) == [("user", "after erasure")]
    await give_consent(page, keep=False)
    await expect(done.nth(0)).to_have_text("after erasure")
    await page.wait_for_timeout(300)
    assert await texts(page) == [("user", "after erasure"), ("assistant", "after erasure")]


async def test_an_erased_session_leaves_nothing_on_screen(
    live: Live, context: BrowserContext
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page)
    await say(page, "my order is 4711", 0)
    announcer = page.locator("[aria-live=polite].sr-only")
    await expect(announcer).to_have_text("Assistant: my order is 4711")
    await page.get_by_role("button", name="Privacy").click()
    info = page.locator(".privacy-info")
    await expect(info).to_contain_text("Keep this conversation")
    await page.get_by_role("button", name="Back to chat").click()

    await erase_conversation(live, watch.welcomes()[-1]["conversation_id"])
    # a fresh session asks for consent again; nothing of the old one is left behind
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    await expect(announcer).to_have_text("")
    await expect(info).not_to_contain_text("Keep this conversation")
    assert await page.locator("li.msg").count() == 0


async def test_privacy_view_withdraws_and_restores_keeping(
    live: Live, context: BrowserContext
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page)
    await say(page, "keep this for now", 0)
    await page.get_by_role("button", name="Privacy").click()
    region = page.get_by_role("region", name="Your data")
    keep = region.get_by_role("checkbox", name="Keep this conversation")
    await expect(keep).to_be_checked()

    welcomes = len(watch.welcomes())
    await keep.uncheck()
    await until(lambda: len(watch.welcomes()) > welcomes)
    assert {"type": "consent", "revoke": ["conversation_storage"]} in watch.sent
    assert "conversation_storage" not in watch.welcomes()[-1]["policy"]["granted"]
    await expect(keep).not_to_be_checked()
    await expect(keep).to_be_enabled()
    await expect(region.locator(".privacy-info")).to_contain_text("You agreed to: AI processing.")
    await expect(region.locator(".note")).to_have_text("Your choice was saved.")

    welcomes = len(watch.welcomes())
    await keep.check()
    await until(lambda: len(watch.welcomes()) > welcomes)
    assert {"type": "consent", "grant": ["conversation_storage"]} in watch.sent
    assert "conversation_storage" in watch.welcomes()[-1]["policy"]["granted"]
    await expect(keep).to_be_checked()
    await expect(region.locator(".privacy-info")).to_contain_text("Keep this conversation")
    # the chat goes on
    await page.get_by_role("button", name="Back to chat").click()
    await say(page, "still here", 1)


async def test_privacy_view_withdraws_over_http(live: Live, context: BrowserContext) -> None:
    await context.add_init_script(BLOCKED_SOCKETS)
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await page.get_by_label("Message").fill("keep me")
    await page.get_by_label("Message").press("Enter")
    await give_consent(page)
    await expect(page.locator("li.msg.assistant:not(.streaming) .text")).to_have_text("keep me")
    await page.get_by_role("button", name="Privacy").click()
    region = page.get_by_role("region", name="Your data")
    keep = region.get_by_role("checkbox", name="Keep this conversation")
    await expect(keep).to_be_checked()
    # the fallback has no consent frame: the privacy API records the change
    async with page.expect_request(lambda r: r.url.endswith("/api/privacy/consent")) as sent:
        await keep.uncheck()
    request = await sent.value
    assert request.method == "POST"
    assert json.loads(request.post_data or "") == {"revoke": ["conversation_storage"]}
    await expect(region.locator(".note")).to_have_text("Your choice was saved.")
    await expect(keep).not_to_be_checked()
    await expect(region.locator(".privacy-info")).to_contain_text("You agreed to: AI processing.")
    assert watch.sockets == []


async def test_keeping_by_default_shows_ticked_and_can_be_withdrawn(
    live: Live, context: BrowserContext, app_pool: asyncpg.Pool
) -> None:
    # A tenant that asks for nothing: the consent panel never shows, and the policy keeps
    # the transcript by default. Your choices must say so, not show an unticked box.
    await set_policy(app_pool, live.tenant.tenant_id, {"allowed_origins": [live.origin]}, version=3)
    app = live.gateway.server.app
    assert app is not None
    app[SERVICES].tenants.invalidate(live.tenant.tenant_id)
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await say(page, "kept by default", 0)
    assert watch.welcomes()[-1]["policy"]["storage"] == "on"
    await page.get_by_role("button", name="Privacy").click()
    region = page.get_by_role("region", name="Your data")
    keep = region.get_by_role("checkbox", name="Keep this conversation")
    await expect(keep).to_be_checked()
    welcomes = len(watch.welcomes())
    await keep.uncheck()
    await until(lambda: len(watch.welcomes()) > welcomes)
    assert watch.welcomes()[-1]["policy"]["storage"] == "off"
    await expect(keep).not_to_be_checked()


async def restrict_processing(live: Live, token: str) -> None:
    """The visitor files a GDPR restriction request: the gateway refuses their messages."""
    async with live.gateway.session.post(
        live.gateway.url("/api/gdpr/request"),
        json={"kind": "restriction"},
        headers={"Authorization": f"Session {token}"},
    ) as resp:
        assert resp.status == 201, await resp.text()


async def session_token(page: Page, live: Live) -> str:
    key = f"omnigate.session.{live.tenant.site_key}"
    token = await page.evaluate("(k) => sessionStorage.getItem(k)", key)
    assert token
    return str(token)


async def test_a_restricted_visitors_message_fails_visibly(
    live: Live, context: BrowserContext
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(live.demo)
    await open_widget(page)
    await give_consent(page)
    await say(page, "before the restriction", 0)
    await restrict_processing(live, await session_token(page, live))
    # refused with error consent_required but no consent_required frame: consent is
    # not what is missing, so the message must not wait for a panel that never opens
    await page.get_by_label("Message").fill("after the restriction")
    await page.get_by_label("Message").press("Enter")
    refused = page.locator("li.msg.user").nth(1)
    await expect(refused).to_have_class(re.compile(r"\bfailed\b"))
    await expect(refused.get_by_role("alert")).to_contain_text("restricted at your request")
    await expect(page.get_by_role("form", name="Before we chat")).to_be_hidden()
    await page.wait_for_timeout(500)
    sent = [f["text"] for f in watch.sent if f.get("type") == "message"]
    assert sent == ["before the restriction", "after the restriction"]


async def test_a_restricted_visitors_message_is_posted_once_over_http(
    live: Live, context: BrowserContext
) -> None:
    await context.add_init_script(BLOCKED_SOCKETS)
    page = await context.new_page()
    posted: list[str] = []
    page.on(
        "request",
        lambda r: (
            posted.append(json.loads(r.post_data or "{}").get("text", ""))
            if "/v1/widget/chat" in r.url
            else None
        ),
    )
    await page.goto(live.demo)
    await open_widget(page)
    await expect(page.locator(".panel")).to_have_attribute("data-transport", "http")
    await page.get_by_label("Message").fill("before the restriction")
    await page.get_by_label("Message").press("Enter")
    await give_consent(page)
    done = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(done.nth(0)).to_have_text("before the restriction")
    await restrict_processing(live, await session_token(page, live))
    await page.get_by_label("Message").fill("after the restriction")
    await page.get_by_label("Message").press("Enter")
    refused = page.locator("li.msg.user").nth(1)
    await expect(refused).to_have_class(re.compile(r"\bfailed\b"))
    await expect(refused.get_by_role("alert")).to_contain_text("restricted at your request")
    # not re-posted every few seconds: the gateway gets it once
    await page.wait_for_timeout(4000)
    assert posted.count("after the restriction") == 1, posted


async def test_another_session_resumed_by_the_cookie_replaces_the_old_one(
    live: Live, context: BrowserContext
) -> None:
    # Tab A's socket is down while tab B erases the visitor's data and starts afresh. A's
    # hello then names an erased token, and the cookie (B's) resumes B's new session:
    # `resumed` is true, yet it is not the conversation A shows.
    blocked = False
    refusing: list[asyncio.Future[None]] = []

    def route(ws: WebSocketRoute) -> None:
        if blocked:
            refusing.append(asyncio.ensure_future(ws.close(code=1011)))
            return
        ws.connect_to_server()

    a = await context.new_page()
    watch = Watch(a)
    await a.route_web_socket(re.compile(r".*/v1/widget/ws.*"), route)
    await a.goto(live.demo)
    await open_widget(a)
    await give_consent(a)
    await say(a, "secret one", 0)
    old = await session_token(a, live)

    b = await context.new_page()
    await b.goto(live.demo)
    await open_widget(b)
    await expect(b.locator("li.msg")).to_have_count(2)  # the same session, by the cookie

    blocked = True
    await live.drop_sockets()
    await a.get_by_label("Message").fill("secret two")
    await a.get_by_label("Message").press("Enter")
    await b.get_by_role("button", name="Privacy").click()
    await b.get_by_role("button", name="Delete my data").click()
    await b.get_by_role("button", name="Delete everything").click()
    await expect(b.get_by_role("form", name="Before we chat")).to_be_visible()
    new = await session_token(b, live)
    assert new != old

    blocked = False
    await until(lambda: any(w["session_token"] == new for w in watch.welcomes()), 40)
    assert [w["resumed"] for w in watch.welcomes() if w["session_token"] == new] == [True]
    # nothing of the erased conversation is left, and the visitor is told why
    notice = "Your earlier conversation has ended. A new conversation has started."
    await expect(a.locator(".empty")).to_have_text(notice)
    await expect(a.locator("[aria-live=polite].sr-only")).to_have_text(notice)
    assert await a.locator("li.msg").count() == 0
    await give_consent(a)
    await a.wait_for_timeout(500)
    assert await a.locator("li.msg").count() == 0
    # the unsent message of the erased conversation never goes into the other one
    sent = [f["text"] for f in watch.sent if f.get("type") == "message"]
    assert "secret two" not in sent, sent


class HeldWelcome:
    """The real gateway behind page.route_web_socket, its frames held back until released."""

    def __init__(self) -> None:
        self.held: list[str] | None = []
        self.sent: list[dict[str, Any]] = []
        self.route: WebSocketRoute | None = None

    async def attach(self, page: Page) -> None:
        await page.route_web_socket(re.compile(r".*/v1/widget/ws.*"), self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        self.route = ws
        server = ws.connect_to_server()

        def from_page(raw: str | bytes) -> None:
            self.sent.append(json.loads(raw))
            server.send(raw)

        def from_server(raw: str | bytes) -> None:
            if self.held is not None:
                self.held.append(str(raw))
            else:
                ws.send(raw)

        ws.on_message(from_page)
        server.on_message(from_server)

    def release(self) -> None:
        held, self.held = self.held or [], None
        assert self.route is not None
        for raw in held:
            self.route.send(raw)


async def test_text_typed_before_welcome_waits_for_age_confirmation(
    live: Live, context: BrowserContext, app_pool: asyncpg.Pool
) -> None:
    # a tenant that asks only for age confirmation: no purpose is missing in the welcome
    await set_policy(
        app_pool,
        live.tenant.tenant_id,
        {"allowed_origins": [live.origin], "required_consents": [], "age_confirmation": True},
        version=3,
    )
    app = live.gateway.server.app
    assert app is not None
    app[SERVICES].tenants.invalidate(live.tenant.tenant_id)
    server = HeldWelcome()
    page = await context.new_page()
    await server.attach(page)
    await page.goto(live.demo)
    await open_widget(page)
    await until(lambda: any(f["type"] == "hello" for f in server.sent))
    await page.get_by_label("Message").fill("I am 13, my phone is 555 0100")
    await page.get_by_label("Message").press("Enter")
    server.release()
    age = page.get_by_label("I am at least 16 years old")
    await expect(age).to_be_visible()
    await page.wait_for_timeout(500)
    assert [f for f in server.sent if f["type"] == "message"] == []
    await age.check()
    await page.get_by_role("button", name="Agree and start chatting").click()
    done = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(done).to_have_text("I am 13, my phone is 555 0100")
    assert len([f for f in server.sent if f["type"] == "message"]) == 1


async def test_a_refusal_that_raced_a_revocation_waits_for_consent(
    live: Live, context: BrowserContext
) -> None:
    # consent withdrawn in another tab while a message was past its check: its error
    # comes before the pushed welcome and consent_required that open the panel
    sent: list[dict[str, Any]] = []

    def route(ws: WebSocketRoute) -> None:
        def send(frame: dict[str, Any]) -> None:
            ws.send(json.dumps(frame))

        def welcome(granted: list[str]) -> None:
            policy = {"required_consents": ["ai_processing"], "granted": granted}
            send({"type": "welcome", "session_token": "t" * 32, "resumed": True,
                  "conversation_id": "c", "policy": policy})  # fmt: skip

        def on_message(raw: str | bytes) -> None:
            frame = json.loads(raw)
            sent.append(frame)
            if frame["type"] == "hello":
                welcome(["ai_processing"])
            elif frame["type"] == "consent":
                welcome(["ai_processing"])
            elif frame["type"] == "message" and sum(f["type"] == "message" for f in sent) == 1:
                send({"type": "error", "id": frame["id"], "code": "consent_required",
                      "message": "consent was withdrawn meanwhile"})  # fmt: skip
                welcome([])
                send({"type": "consent_required", "purposes": ["ai_processing"]})
            elif frame["type"] == "message":
                send({"type": "ack", "id": frame["id"], "seq": 1})
                send({"type": "delta", "id": frame["id"], "text": frame["text"]})
                send({"type": "done", "id": frame["id"], "seq": 2, "finish_reason": "stop"})

        ws.on_message(on_message)

    page = await context.new_page()
    await page.route_web_socket(re.compile(r".*/v1/widget/ws.*"), route)
    await page.goto(live.demo)
    await open_widget(page)
    await page.get_by_label("Message").fill("in flight")
    await page.get_by_label("Message").press("Enter")
    await expect(page.get_by_role("form", name="Before we chat")).to_be_visible()
    await give_consent(page)
    # sent again once consent is given, as a refusal with the panel open is
    done = page.locator("li.msg.assistant:not(.streaming) .text")
    await expect(done).to_have_text("in flight")
    assert await page.locator(".msg-error").count() == 0
    ids = [f["id"] for f in sent if f["type"] == "message"]
    assert len(ids) == 2 and len(set(ids)) == 1
