"""Routes of the privacy API (being built)."""

from __future__ import annotations

from aiohttp import web


def setup_routes(app: web.Application) -> None:
    """Bind the privacy routes."""
