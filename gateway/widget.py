"""Widget routes: the embeddable script and stylesheet, and the /demo host page.

Assets are read once at start and served with an ETag; every response also gets
the global security headers (CSP, nosniff, Referrer-Policy) from app.py.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.provision import DEMO_SITE_KEY

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "/widget.js": ("widget.js", "text/javascript"),
    "/widget.css": ("widget.css", "text/css"),
    "/demo.css": ("demo.css", "text/css"),
}
# short: a fixed widget reaches every host page within minutes
CACHE_CONTROL = "public, max-age=300"
SITE_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")

DEMO_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>omnigate demo - Green Lane Bikes</title>
<link rel="stylesheet" href="/demo.css">
</head>
<body>
<header><h1>Green Lane Bikes</h1></header>
<main>
<h2>An ordinary web page with the omnigate widget</h2>
<p>This page stands in for a customer's site. It embeds the chat widget with
one tag, <code>&lt;script src="/widget.js" data-site="{site}" async&gt;&lt;/script&gt;</code>,
and carries no inline script or style.</p>
<p>Open the chat with the button in the corner. Nothing connects to the gateway
and nothing is stored in your browser until you do.</p>
<p class="note">Site key: <code>{site}</code></p>
</main>
<script src="/widget.js" data-site="{site}" async></script>
</body>
</html>
"""


@dataclass(frozen=True)
class Asset:
    """A static file held in memory with its validator."""

    body: bytes
    content_type: str
    etag: str


def _load(name: str, content_type: str) -> Asset:
    body = (STATIC / name).read_bytes()
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _asset_handler(asset: Asset) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        headers = {"Cache-Control": CACHE_CONTROL, "ETag": asset.etag}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
        )

    return handler


async def demo(request: web.Request) -> web.Response:
    """`GET /demo[?site=KEY]`: a host page embedding the widget (the demo tenant by default)."""
    site = request.query.get("site", DEMO_SITE_KEY)
    if SITE_KEY_RE.fullmatch(site) is None:
        raise web.HTTPBadRequest(text="site must be a site key")
    page = DEMO_HTML.replace("{site}", html.escape(site, quote=True))
    return web.Response(
        text=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"}
    )


def setup_routes(app: web.Application) -> None:
    """Bind the widget routes."""
    for path, (name, content_type) in ASSETS.items():
        app.router.add_get(path, _asset_handler(_load(name, content_type)))
    app.router.add_get("/demo", demo)
