"""The long-lived parts a request needs, built once per process by the app."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

import orjson

from gateway.bus import LocalBus
from gateway.claims import ReplyClaims
from gateway.config import Settings
from gateway.crypto import KeyRing
from gateway.db import Pool, tenant_tx
from gateway.groupcommit import GroupCommitter
from gateway.hashkeys import HashKeys
from gateway.ratelimit import LocalRateLimiter, RateLimiter
from gateway.redactpool import RedactionPool
from gateway.tenants import TenantRegistry
from gateway.upstream import ChatModel, ChatStream, UpstreamClient, UpstreamConfig
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
    # message writes of concurrent sessions, batched into one round trip (None: one each)
    writer: GroupCommitter | None = None
    # costly messages are searched for PII off the event loop (0 helpers: inline)
    redaction: RedactionPool = field(default_factory=lambda: RedactionPool(0))
    # live connections by (tenant, subject): erasure closes them on every process
    live: dict[tuple[UUID, UUID], list[Any]] = field(default_factory=dict)
    # open widget sockets per (tenant, anonymized IP) in this process
    ip_connections: dict[str, int] = field(default_factory=dict)

    # bring-your-own upstream per tenant: decrypted config (None = gateway's), filled lazily
    byo: dict[UUID, UpstreamConfig | None] = field(default_factory=dict, repr=False)
    # bumped by forget_upstream: a load that raced it does not cache what it read
    _byo_generation: int = field(default=0, init=False, repr=False)
    _byo_client: UpstreamClient | None = field(default=None, repr=False)
    _byo_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # every tenant's key for keyed hashes (verified user ids, client_refs), opened once
    hash_keys: HashKeys = field(init=False, repr=False)
    # who is generating which reply, shared through `redis` when set (gateway/claims.py)
    claims: ReplyClaims = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.hash_keys = HashKeys(self.pool, self.keyring)
        self.claims = ReplyClaims(self.redis)
        # chat.py streams from `svc.model`; route tenants with their own upstream to a
        # real client even when the gateway's own model is the offline one.
        if not isinstance(self.model, _TenantRoutedModel):
            self.model = _TenantRoutedModel(self.model, self)

    async def upstream_for(self, tenant_id: UUID, cp: CompiledPolicy) -> UpstreamConfig | None:
        """A tenant's own upstream when set, else the gateway's with the policy's model."""
        if tenant_id in self.byo:
            own = self.byo[tenant_id]
        else:
            own = await self._load_byo(tenant_id)
        if own is not None:
            routed = self.model
            if isinstance(routed, _TenantRoutedModel) and not routed.is_client:
                await self._byo_started(own)
            return own if own.model else replace(own, model=cp.policy.model)
        if self.upstream is None:
            return None
        return replace(self.upstream, model=cp.policy.model)

    def forget_upstream(self, tenant_id: UUID | None = None) -> None:
        """Drop the cached own-upstream config of one tenant (or all); reloaded on next use."""
        self._byo_generation += 1
        if tenant_id is None:
            self.byo.clear()
        else:
            self.byo.pop(tenant_id, None)

    async def _load_byo(self, tenant_id: UUID) -> UpstreamConfig | None:
        """Read and decrypt a tenant's own upstream; cached unless forgotten meanwhile."""
        generation = self._byo_generation
        async with tenant_tx(self.pool, tenant_id) as conn:
            sealed = await conn.fetchval(
                "SELECT upstream_sealed FROM tenants WHERE tenant_id = $1", tenant_id
            )
        config = None
        if sealed is not None:
            raw = orjson.loads(self.keyring.open_secret(tenant_id, "upstream", sealed))
            s = self.settings
            config = UpstreamConfig(
                base_url=raw["base_url"],
                api_key=raw["api_key"],
                model=raw.get("model") or "",
                first_token_timeout=s.first_token_timeout,
                idle_timeout=s.idle_timeout,
                retries=s.upstream_retries,
                public_only=True,  # chosen by the tenant: never a private address
            )
        if generation != self._byo_generation:
            # changed while we read: `config` may be the deleted or rotated one, fine
            # for this call (it began before the change) but not to keep
            return config
        if len(self.byo) > 10_000:
            self.byo.clear()
        self.byo[tenant_id] = config
        return config

    async def _byo_started(self, config: UpstreamConfig) -> UpstreamClient:
        """The shared pooled client for tenants' own upstreams, started on first use."""
        if self._byo_client is None:
            async with self._byo_lock:
                if self._byo_client is None:
                    client = UpstreamClient(config)
                    await client.start()
                    self._byo_client = client
        return self._byo_client

    def byo_client(self) -> UpstreamClient | None:
        """The started BYO client, if any tenant has used one in this process."""
        return self._byo_client

    async def aclose(self) -> None:
        """Release what Services opened itself (the BYO upstream client); idempotent."""
        client, self._byo_client = self._byo_client, None
        if client is not None:
            await client.close()


class _TenantRoutedModel:
    """The gateway's model, except that a tenant's own upstream goes to a real client."""

    def __init__(self, default: ChatModel, svc: Services) -> None:
        self.default = default
        self._svc = svc
        # a real client already takes a per-request config; only the offline model needs help
        self.is_client = isinstance(default, UpstreamClient)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.default, name)

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str | None = None,
        config: UpstreamConfig | None = None,
    ) -> ChatStream:
        """Stream from the tenant's own upstream when `config` is one, else the default."""
        client = self._svc.byo_client()
        if config is not None and client is not None and not self.is_client:
            return client.stream_chat(messages, model=model, config=config)
        return self.default.stream_chat(messages, model=model, config=config)
