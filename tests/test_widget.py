"""Widget routes without a browser: content types, security headers, the demo page, the script."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import protocol
from gateway.app import CSP
from gateway.provision import DEMO_SITE_KEY
from tests.conftest import Gateway

STATIC = Path(__file__).resolve().parent.parent / "gateway" / "static"
WIDGET_JS = (STATIC / "widget.js").read_text()


def assert_security_headers(headers: object) -> None:
    h = headers  # CIMultiDictProxy
    assert h["Content-Security-Policy"] == CSP  # type: ignore[index]
    assert h["X-Content-Type-Options"] == "nosniff"  # type: ignore[index]
    assert h["Referrer-Policy"] == "no-referrer"  # type: ignore[index]


def test_csp_allows_no_inline_code_or_eval() -> None:
    assert "unsafe-inline" not in CSP
    assert "unsafe-eval" not in CSP
    assert "script-src 'self'" in CSP and "style-src 'self'" in CSP


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/widget.js", "text/javascript"), ("/widget.css", "text/css"), ("/demo.css", "text/css")],
    ids=["script", "widget-style", "demo-style"],
)
async def test_assets_are_served_with_type_headers_and_etag(
    offline_gateway: Gateway, path: str, content_type: str
) -> None:
    async with offline_gateway.session.get(offline_gateway.url(path)) as resp:
        assert resp.status == 200
        assert resp.content_type == content_type
        assert resp.charset == "utf-8"
        assert_security_headers(resp.headers)
        assert resp.headers["Cache-Control"].startswith("public")
        etag = resp.headers["ETag"]
        body = await resp.read()
    assert body == (STATIC / path.lstrip("/")).read_bytes()
    async with offline_gateway.session.get(
        offline_gateway.url(path), headers={"If-None-Match": etag}
    ) as resp:
        assert resp.status == 304
        assert_security_headers(resp.headers)


async def test_demo_page_has_headers_and_no_inline_code(offline_gateway: Gateway) -> None:
    async with offline_gateway.session.get(offline_gateway.url("/demo")) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert_security_headers(resp.headers)
        assert resp.headers["Cache-Control"] == "no-store"
        page = await resp.text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S | re.I)
    assert scripts, "the demo embeds the widget"
    for attrs, body in scripts:
        assert 'src="/widget.js"' in attrs and body.strip() == ""
    assert not re.search(r"<style\b", page, re.I)
    assert not re.search(r"\sstyle\s*=", page, re.I)
    assert not re.search(r"\son[a-z]+\s*=", page, re.I)
    assert "javascript:" not in page.lower()
    assert f'data-site="{DEMO_SITE_KEY}"' in page


async def test_demo_uses_the_site_param(offline_gateway: Gateway) -> None:
    async with offline_gateway.session.get(offline_gateway.url("/demo?site=pk_test-Key_1")) as resp:
        page = await resp.text()
    assert re.search(r'<script src="/widget\.js" data-site="pk_test-Key_1" async>', page)


@pytest.mark.parametrize(
    "site", ['"><script>alert(1)</script>', "", "a" * 201, "pk demo"], ids=lambda s: repr(s)[:12]
)
async def test_demo_rejects_a_site_that_is_not_a_key(offline_gateway: Gateway, site: str) -> None:
    async with offline_gateway.session.get(
        offline_gateway.url("/demo"), params={"site": site}
    ) as resp:
        assert resp.status == 400
        assert "<script>" not in await resp.text()


@pytest.mark.parametrize(
    "pattern",
    [
        r"\beval\s*\(",
        r"new\s+Function\b",
        r"\.innerHTML\b",
        r"\.outerHTML\b",
        r"insertAdjacentHTML",
        r"document\.write",
        r"setTimeout\(\s*[\"']",
        r"localStorage",
        r"document\.cookie",
        r"setAttribute\(\s*[\"']style",
    ],
    ids=[
        "eval",
        "Function",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "string-timeout",
        "localStorage",
        "cookie",
        "style-attr",
    ],
)
def test_widget_script_avoids(pattern: str) -> None:
    assert not re.search(pattern, WIDGET_JS), pattern


@pytest.mark.parametrize(
    "code",
    [
        protocol.RATE_LIMITED,
        protocol.CONSENT_REQUIRED,
        protocol.STORAGE_UNAVAILABLE,
        protocol.UPSTREAM_UNAVAILABLE,
        protocol.UPSTREAM_TIMEOUT,
        protocol.UPSTREAM_REJECTED,
        protocol.SESSION_INVALID,
        protocol.TOO_LARGE,
    ],
)
def test_widget_has_a_case_for_error_code(code: str) -> None:
    """A text check only: widget.js names the code in a `case` of its error switch. What
    the cases do is checked in a browser (tests/test_browser.py, error states)."""
    assert f'case "{code}":' in WIDGET_JS


def test_widget_speaks_the_protocol() -> None:
    for frame in ("welcome", "consent_required", "ack", "delta", "done", "history", "error"):
        assert f'case "{frame}":' in WIDGET_JS
    for path in ("/v1/widget/ws?site=", "/v1/widget/chat?site=", "/api/privacy/export"):
        assert path in WIDGET_JS
    # storage is touched only through the guarded helpers, after the widget was opened
    assert len(re.findall(r"\bsessionStorage\.", WIDGET_JS)) == 3  # get, set, remove
    assert "if (!opened) return;" in WIDGET_JS
