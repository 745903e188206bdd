"""A policy version compiled once, so per-message work does no parsing."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .detect import DEFAULT_PHONE_REGIONS
from .redact import Redactor
from .schema import Policy, validate_policy


@dataclass(frozen=True)
class CompiledPolicy:
    """Everything the gateway needs per message, precomputed from one policy version."""

    policy: Policy
    version: int
    redactor: Redactor
    required: frozenset[str]
    allowed_origins: frozenset[str]
    ip_mode: str
    honor_dnt: bool
    restore_in_reply: bool
    consent_version: int
    max_message_chars: int
    session_max_age_seconds: int

    def origin_allowed(self, origin: str | None) -> bool:
        """True when ``origin`` (the raw Origin header) is one of the allowed origins."""
        # Browsers send the origin already serialised (lower-case, no default port), so an
        # exact comparison with the normalised list is both correct and O(1).
        return origin is not None and origin.lower() in self.allowed_origins


@lru_cache(maxsize=64)
def _redactor(entities: frozenset[str]) -> Redactor:
    # Tenants mostly share a few entity sets; sharing the redactor shares its setup work.
    return Redactor(entities, DEFAULT_PHONE_REGIONS)


def compile_policy(policy: Policy, version: int) -> CompiledPolicy:
    """Validate ``policy`` and precompute what applying it needs."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("policy version must be a positive integer")
    validate_policy(policy)
    return CompiledPolicy(
        policy=policy,
        version=version,
        redactor=_redactor(policy.redact.entities),
        required=policy.required_consents,
        allowed_origins=frozenset(policy.allowed_origins),
        ip_mode=policy.ip_mode,
        honor_dnt=policy.honor_dnt,
        restore_in_reply=policy.redact.restore_in_reply,
        consent_version=policy.consent_version,
        max_message_chars=policy.max_message_chars,
        session_max_age_seconds=policy.session_days * 86_400,
    )
