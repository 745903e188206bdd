"""Typed application keys, in one module."""

from __future__ import annotations

import weakref

from aiohttp import web

from gateway.config import Settings
from gateway.services import Services

SETTINGS = web.AppKey("settings", Settings)
SERVICES = web.AppKey("services", Services)
CONNECTIONS = web.AppKey("connections", weakref.WeakSet[web.WebSocketResponse])
