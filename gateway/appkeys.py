"""Typed application keys, in one module."""

from __future__ import annotations

import weakref

from aiohttp import web

from gateway.config import Settings
from gateway.services import Services
from policies import SaltChain

SETTINGS = web.AppKey("settings", Settings)
SERVICES = web.AppKey("services", Services)
CONNECTIONS = web.AppKey("connections", weakref.WeakSet[web.WebSocketResponse])
# --workers N: the day's IP salts, handed down by the supervisor (policies.SaltChain)
SALT_CHAIN = web.AppKey("salt_chain", SaltChain)
