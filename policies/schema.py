"""Tenant policy document: the dataclasses, validation, canonical form and diff.

A policy arrives as JSON from the site owner. ``parse_policy`` validates it
completely (every error is collected, so one PUT shows the owner everything
wrong at once) and returns a frozen ``Policy``; ``policy_to_doc`` is its
canonical JSON form, so ``parse_policy(policy_to_doc(p)) == p``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

PURPOSES: tuple[str, ...] = (
    "ai_processing",
    "conversation_storage",
    "analytics",
    "marketing",
    "preferences",
)
# "necessary" needs no consent; it is accepted wherever a purpose is and ignored.
NECESSARY = "necessary"
ENTITIES: tuple[str, ...] = ("email", "phone", "credit_card", "iban", "ip", "us_ssn", "secret")
IP_MODES: tuple[str, ...] = ("truncate", "hash", "drop", "full")

MAX_SYSTEM_PROMPT_CHARS = 8000
MAX_URL_CHARS = 2048
# Model names are forwarded upstream verbatim; a tight charset keeps them out of trouble.
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class RateLimit:
    """Per-minute budgets: messages, and new sessions (each writes a subject, a data key,
    a session and a conversation)."""

    per_session_per_minute: int = 20
    per_ip_per_minute: int = 60
    per_tenant_per_minute: int = 6000
    new_sessions_per_ip_per_minute: int = 60


@dataclass(frozen=True)
class Redact:
    """Which PII entities are replaced by placeholders before forwarding."""

    entities: frozenset[str] = frozenset(ENTITIES)
    restore_in_reply: bool = True


@dataclass(frozen=True)
class Policy:
    """One validated version of a tenant's privacy policy."""

    retention_days: int = 90
    ip_mode: str = "truncate"
    honor_dnt: bool = True
    required_consents: frozenset[str] = frozenset()
    # offered by the widget but not needed to chat; conversation_storage listed
    # here means transcripts are kept only for visitors who grant it
    optional_consents: frozenset[str] = frozenset()
    redact: Redact = field(default_factory=Redact)
    allowed_origins: tuple[str, ...] = ()
    system_prompt: str = "You are a helpful customer-service assistant."
    model: str = "gpt-4o-mini"
    max_message_chars: int = 4000
    rate_limit: RateLimit = field(default_factory=RateLimit)
    min_age: int | None = 16
    age_confirmation: bool = False
    consent_version: int = 1
    privacy_policy_url: str | None = None
    session_days: int = 30


class PolicyError(ValueError):
    """A policy document failed validation; ``errors`` lists every problem."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        summary = "; ".join(f"{e['field'] or '<document>'}: {e['message']}" for e in errors)
        super().__init__(f"invalid policy: {summary}")


class _Errors:
    """Collects errors so validation can continue past the first one."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append({"field": path, "message": message})


_MISSING = object()

# Integer ranges: (min, max). Upper bounds exist even where the brief has none
# so that a typo cannot create absurd values (and DB int columns never overflow).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "retention_days": (1, 3650),
    "max_message_chars": (1, 32000),
    "consent_version": (1, 2_147_483_647),
    "session_days": (1, 400),
    "rate_limit.per_session_per_minute": (1, 100_000),
    "rate_limit.per_ip_per_minute": (1, 100_000),
    "rate_limit.per_tenant_per_minute": (1, 10_000_000),
    "rate_limit.new_sessions_per_ip_per_minute": (1, 100_000),
}
_MIN_AGE_RANGE = (13, 21)


def _int(errs: _Errors, path: str, value: object, lo: int, hi: int) -> int | None:
    # bool is a subclass of int in Python but never a number in a policy.
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        errs.add(path, f"must be an integer between {lo} and {hi}")
        return None
    return value


def _bool(errs: _Errors, path: str, value: object) -> bool | None:
    if not isinstance(value, bool):
        errs.add(path, "must be true or false")
        return None
    return value


def _choices(
    errs: _Errors,
    path: str,
    value: object,
    allowed: tuple[str, ...],
    what: str,
    ignore: frozenset[str] = frozenset(),
) -> frozenset[str] | None:
    if not isinstance(value, list | tuple):
        errs.add(path, f"must be a list of {what}s")
        return None
    out: set[str] = set()
    ok = True
    for i, item in enumerate(value):
        if not isinstance(item, str) or (item not in allowed and item not in ignore):
            expected = ", ".join(allowed)
            errs.add(f"{path}[{i}]", f"unknown {what} {item!r}; expected one of {expected}")
            ok = False
        elif item not in ignore:
            out.add(item)
    return frozenset(out) if ok else None


def normalize_origin(value: str) -> str:
    """Return the canonical ``scheme://host[:port]`` form of an origin or raise ValueError."""
    if not value or value != value.strip() or len(value) > MAX_URL_CHARS:
        raise ValueError("must be an origin like https://example.com")
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("scheme must be http or https")
    # A bare trailing "/" is how people paste origins; anything more is a URL, not an origin.
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError("must be an origin without path, query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials")
    host = parts.hostname
    if not host:
        raise ValueError("must contain a host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError("invalid port") from exc
    if not host.isascii():
        # Browsers send IDN hosts as punycode in the Origin header.
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError("invalid host name") from exc
    if not re.fullmatch(r"[a-z0-9.:\-\[\]_]+", host):
        raise ValueError("invalid host name")
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def _origins(errs: _Errors, path: str, value: object) -> tuple[str, ...] | None:
    if not isinstance(value, list | tuple):
        errs.add(path, "must be a list of origins")
        return None
    out: set[str] = set()
    ok = True
    for i, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError("must be a string origin like https://example.com")
            out.add(normalize_origin(item))
        except ValueError as exc:
            errs.add(f"{path}[{i}]", str(exc))
            ok = False
    # Sorted and deduplicated: the canonical form, so equal sets compare equal.
    return tuple(sorted(out)) if ok else None


def _url(errs: _Errors, path: str, value: object) -> object:
    """Return the URL, None for null, or _MISSING after recording an error."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_URL_CHARS and value == value.strip():
        try:
            parts = urlsplit(value)
            usable = parts.scheme.lower() in _DEFAULT_PORTS and bool(parts.hostname)
        except ValueError:  # an unclosed [IPv6] bracket, a host NFKC would change
            usable = False
        if usable and " " not in value:
            return value
    errs.add(path, "must be null or an http(s) URL")
    return _MISSING


def _min_age(errs: _Errors, path: str, value: object) -> object:
    """Return the age, None for null, or _MISSING after recording an error."""
    lo, hi = _MIN_AGE_RANGE
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        errs.add(path, f"must be null or an integer between {lo} and {hi}")
        return _MISSING
    return value


def _check_keys(errs: _Errors, prefix: str, doc: Mapping[str, object], known: set[str]) -> None:
    for key in doc:
        if key not in known:
            errs.add(f"{prefix}{key}", "unknown field")


def _parse_rate_limit(errs: _Errors, value: object, base: RateLimit) -> RateLimit | None:
    if not isinstance(value, Mapping):
        errs.add("rate_limit", "must be an object")
        return None
    names = {f.name for f in fields(RateLimit)}
    _check_keys(errs, "rate_limit.", value, names)
    out: dict[str, int] = {}
    for name in names:
        if name in value:
            path = f"rate_limit.{name}"
            parsed = _int(errs, path, value[name], *_INT_RANGES[path])
            if parsed is not None:
                out[name] = parsed
    return RateLimit(**{n: out.get(n, getattr(base, n)) for n in names})


def _parse_redact(errs: _Errors, value: object, base: Redact) -> Redact | None:
    if not isinstance(value, Mapping):
        errs.add("redact", "must be an object")
        return None
    _check_keys(errs, "redact.", value, {"entities", "restore_in_reply"})
    entities = base.entities
    restore = base.restore_in_reply
    if "entities" in value:
        entities = _choices(errs, "redact.entities", value["entities"], ENTITIES, "entity") or (
            frozenset()
        )
    if "restore_in_reply" in value:
        restore = bool(_bool(errs, "redact.restore_in_reply", value["restore_in_reply"]))
    return Redact(entities=entities, restore_in_reply=restore)


def _parse_str(
    errs: _Errors, path: str, value: object, check: Callable[[str], bool], message: str
) -> str | None:
    if not isinstance(value, str) or not check(value):
        errs.add(path, message)
        return None
    return value


def parse_policy(doc: Mapping[str, object], base: Policy | None = None) -> Policy:
    """Validate a (possibly partial) policy document on top of ``base`` or the defaults."""
    base = base if base is not None else Policy()
    errs = _Errors()
    if not isinstance(doc, Mapping):
        raise PolicyError([{"field": "", "message": "must be an object"}])
    known = {f.name for f in fields(Policy)}
    _check_keys(errs, "", doc, known)
    values: dict[str, Any] = {}
    for name in known:
        if name not in doc:
            continue
        v = doc[name]
        parsed: object
        if name in _INT_RANGES:
            parsed = _int(errs, name, v, *_INT_RANGES[name])
        elif name in ("honor_dnt", "age_confirmation"):
            parsed = _bool(errs, name, v)
        elif name == "ip_mode":
            parsed = _parse_str(
                errs, name, v, lambda s: s in IP_MODES, f"must be one of {', '.join(IP_MODES)}"
            )
        elif name in ("required_consents", "optional_consents"):
            parsed = _choices(errs, name, v, PURPOSES, "purpose", frozenset({NECESSARY}))
        elif name == "redact":
            parsed = _parse_redact(errs, v, base.redact)
        elif name == "rate_limit":
            parsed = _parse_rate_limit(errs, v, base.rate_limit)
        elif name == "allowed_origins":
            parsed = _origins(errs, name, v)
        elif name == "system_prompt":
            parsed = _parse_str(
                errs,
                name,
                v,
                lambda s: len(s) <= MAX_SYSTEM_PROMPT_CHARS,
                f"must be a string of at most {MAX_SYSTEM_PROMPT_CHARS} characters",
            )
        elif name == "model":
            parsed = _parse_str(
                errs,
                name,
                v,
                lambda s: _MODEL_RE.fullmatch(s) is not None,
                "must be a model name (1-128 of A-Z a-z 0-9 . _ : / @ + -)",
            )
        elif name in ("min_age", "privacy_policy_url"):
            # Nullable fields: None is a valid value, so _MISSING marks failure.
            parsed = (_min_age if name == "min_age" else _url)(errs, name, v)
            if parsed is not _MISSING:
                values[name] = parsed
            continue
        else:  # pragma: no cover - every Policy field is handled above
            raise AssertionError(name)
        if parsed is not None:
            values[name] = parsed
    if errs.items:
        raise PolicyError(errs.items)
    return replace(base, **values)


def policy_to_doc(p: Policy) -> dict[str, Any]:
    """Return the canonical JSON-able document of a policy (lists sorted)."""
    return {
        "retention_days": p.retention_days,
        "ip_mode": p.ip_mode,
        "honor_dnt": p.honor_dnt,
        "required_consents": sorted(p.required_consents),
        "optional_consents": sorted(p.optional_consents),
        "redact": {
            "entities": sorted(p.redact.entities),
            "restore_in_reply": p.redact.restore_in_reply,
        },
        "allowed_origins": sorted(p.allowed_origins),
        "system_prompt": p.system_prompt,
        "model": p.model,
        "max_message_chars": p.max_message_chars,
        "rate_limit": {f.name: getattr(p.rate_limit, f.name) for f in fields(RateLimit)},
        "min_age": p.min_age,
        "age_confirmation": p.age_confirmation,
        "consent_version": p.consent_version,
        "privacy_policy_url": p.privacy_policy_url,
        "session_days": p.session_days,
    }


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def policy_diff(old: Policy, new: Policy) -> dict[str, dict[str, Any]]:
    """Return ``{field path: {"old": ..., "new": ...}}`` for every changed field."""
    a = _flatten(policy_to_doc(old))
    b = _flatten(policy_to_doc(new))
    return {k: {"old": a[k], "new": b[k]} for k in a if a[k] != b[k]}


def validate_policy(p: Policy) -> Policy:
    """Re-validate a Policy built in code (not parsed); return it or raise PolicyError."""
    try:
        doc = policy_to_doc(p)
    except TypeError as exc:  # e.g. an unsortable mix in a set field
        raise PolicyError([{"field": "", "message": str(exc)}]) from exc
    parsed = parse_policy(doc)
    if parsed != p:
        # A hand-built Policy whose fields are not in canonical form (unsorted origins, ...)
        raise PolicyError([{"field": "", "message": "policy is not in canonical form"}])
    return p
