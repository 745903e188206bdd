"""The long-lived parts a request needs, built once per process by the app."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

from gateway.bus import LocalBus
from gateway.config import Settings
from gateway.crypto import KeyRing
from gateway.db import Pool
from gateway.ratelimit import LocalRateLimiter, RateLimiter
from gateway.tenants import TenantRegistry
from gateway.upstream import ChatModel, UpstreamConfig
from gateway.vault import Vault
from policies import CompiledPolicy, SaltRing


@dataclass
class Services:
    """Everything the connection logic and handlers call into."""

    settings: Settings
    pool: Pool
    keyring: KeyRing
    vault: Vault
    tenants: TenantRegistry
    model: ChatModel
    upstream: UpstreamConfig | None
    limiter: RateLimiter = field(default_factory=LocalRateLimiter)
    salts: SaltRing | None = None
    redis: Any = None
    bus: Any = field(default_factory=LocalBus)
    # live connections by (tenant, subject): erasure closes them on every process
    live: dict[tuple[UUID, UUID], set[Any]] = field(default_factory=dict)

    def upstream_for(self, tenant_id: UUID, cp: CompiledPolicy) -> UpstreamConfig | None:
        """The upstream settings for a tenant: the gateway's, with the policy's model."""
        if self.upstream is None:
            return None
        return replace(self.upstream, model=cp.policy.model)
