"""Consent, Do Not Track and Global Privacy Control decisions.

Choices written down here because the contract leaves them open:

* Stale consent. Grants carry the ``consent_version`` they were given under. When
  it differs from the policy's (older, or newer after an owner lowered it), the
  grants count for nothing: every required purpose is missing (rule
  "consent.stale_version") and analytics/marketing are off until the visitor
  answers again. Age confirmation is a fact about the visitor, not a consent,
  so it survives a version change.
* Transcript storage. If ``conversation_storage`` is required it must be
  granted before chatting at all. If the policy lists it in
  ``optional_consents``, the transcript is kept only when the visitor granted
  it (otherwise only for the session: ``store_transcript`` False). If the
  policy names it in neither list, keeping the transcript is part of the
  service the site offers (the privacy policy's 90-day promise), so it is
  stored unless the visitor explicitly revoked it.
* Tracking. Analytics or marketing granted under the current version and not
  switched off by DNT (when the policy honours it) or GPC (always).
* Conflicting change. A purpose both granted and revoked in one change ends
  revoked: when in doubt, less processing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .compiled import CompiledPolicy
from .schema import NECESSARY, PURPOSES

TRACKING_PURPOSES = frozenset({"analytics", "marketing"})
AGE_CONFIRMATION = "age_confirmation"


class UnknownPurpose(ValueError):
    """A consent change named a purpose that does not exist."""


@dataclass(frozen=True)
class Signals:
    """Browser privacy signals after applying the policy (DNT only when honoured)."""

    dnt: bool = False
    gpc: bool = False
    source: str = ""


def _signal_on(value: object) -> bool:
    # navigator.doNotTrack is "1" / "yes" when on, "0" / "unspecified" / null otherwise;
    # navigator.globalPrivacyControl is a boolean, which a widget may send as it is, as a
    # number or as a string. Both signals are read alike, and any form of "on" counts:
    # when in doubt, less processing.
    if value is True or (type(value) is int and value == 1):
        return True
    return isinstance(value, str) and value.strip().lower() in ("1", "yes", "true")


def signals_from(headers: Mapping[str, str], hello_signals: object, honor_dnt: bool) -> Signals:
    """Combine request headers and the widget's hello signals; malformed input is ignored."""
    sources: list[str] = []
    dnt = gpc = False
    # aiohttp's headers are case-insensitive; a plain dict (tests, SSE) may be either case.
    header_dnt = headers.get("DNT") or headers.get("dnt")
    header_gpc = headers.get("Sec-GPC") or headers.get("sec-gpc")
    if isinstance(header_gpc, str) and header_gpc.strip() == "1":
        gpc = True
        sources.append("header:gpc")
    if honor_dnt and isinstance(header_dnt, str) and header_dnt.strip() == "1":
        dnt = True
        sources.append("header:dnt")
    if isinstance(hello_signals, Mapping):
        if _signal_on(hello_signals.get("gpc")):
            gpc = True
            sources.append("hello:gpc")
        if honor_dnt and _signal_on(hello_signals.get("dnt")):
            dnt = True
            sources.append("hello:dnt")
    return Signals(dnt=dnt, gpc=gpc, source=",".join(sources))


_KNOWN = frozenset(PURPOSES) | {NECESSARY}
_SHARED: dict[frozenset[str], frozenset[str]] = {}


def _shared(purposes: frozenset[str]) -> frozenset[str]:
    # Sets of known purposes are few (2 ** 6 at most), so every visitor holding one
    # holds the same object: an idle socket carries no set of its own.
    s = frozenset(purposes)
    return _SHARED.setdefault(s, s) if s <= _KNOWN else s


@dataclass(frozen=True, slots=True)
class ConsentState:
    """The purposes a visitor granted and the consent_version they were granted under."""

    granted: frozenset[str]
    version: int
    age_confirmed: bool = False
    # explicit refusals; they never go stale (a "no" stays a "no" across versions)
    revoked: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "granted", _shared(self.granted))
        object.__setattr__(self, "revoked", _shared(self.revoked))


@dataclass(frozen=True)
class ConsentEvent:
    """One recorded change of consent for one purpose."""

    purpose: str
    granted: bool
    rule: str


@dataclass(frozen=True)
class ChatDecision:
    """Whether the visitor may chat now, what is missing, and what may be kept."""

    allowed: bool
    missing: tuple[str, ...]
    rule: str
    store_transcript: bool
    tracking: bool


def effective_purposes(state: ConsentState, signals: Signals) -> frozenset[str]:
    """Return the granted purposes minus analytics/marketing when DNT or GPC is on."""
    if signals.dnt or signals.gpc:
        return state.granted - TRACKING_PURPOSES
    return state.granted


def decide_chat(cp: CompiledPolicy, state: ConsentState, signals: Signals) -> ChatDecision:
    """Decide whether a visitor may chat under ``cp`` (rule says why)."""
    stale = state.version != cp.consent_version
    current = (
        ConsentState(frozenset(), cp.consent_version, state.age_confirmed, state.revoked)
        if stale
        else state
    )
    effective = effective_purposes(current, signals)
    tracking = bool(effective & TRACKING_PURPOSES)
    missing = [p for p in PURPOSES if p in cp.required and p not in current.granted]
    if cp.policy.age_confirmation and not state.age_confirmed:
        missing.append(AGE_CONFIRMATION)
    if missing:
        if stale and cp.required:
            rule = "consent.stale_version"
        elif missing != [AGE_CONFIRMATION]:
            rule = "consent.required_missing"
        else:
            rule = "consent.age_unconfirmed"
        return ChatDecision(False, tuple(missing), rule, False, tracking)
    storage = "conversation_storage"
    if storage in cp.required or storage in cp.policy.optional_consents:
        store = storage in effective
    else:
        store = storage not in current.revoked
    if not cp.required:
        rule = "consent.not_required"
    else:
        rule = "consent.granted"
    return ChatDecision(True, (), rule, store, tracking)


def _check(purposes: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for p in purposes:
        if not isinstance(p, str) or (p not in PURPOSES and p != NECESSARY):
            raise UnknownPurpose(f"unknown purpose {p!r}; expected one of {', '.join(PURPOSES)}")
        if p != NECESSARY:  # necessary needs no consent and cannot be revoked
            out.add(p)
    return out


def apply_consent_change(
    state: ConsentState, grant: Iterable[str], revoke: Iterable[str], version: int
) -> tuple[ConsentState, list[ConsentEvent]]:
    """Apply grants and revocations under consent ``version``; return the events to record."""
    to_grant = _check(grant)
    to_revoke = _check(revoke)
    to_grant -= to_revoke
    events: list[ConsentEvent] = []
    if state.version != version:
        # Grants from another consent version lapse; record that so the consent log
        # explains why a purpose stopped applying.
        base: frozenset[str] = frozenset()
        for p in PURPOSES:
            if p in state.granted and p not in to_grant:
                events.append(ConsentEvent(p, False, "consent.stale_version"))
    else:
        base = state.granted
    for p in PURPOSES:
        if p in to_grant and p not in base:
            events.append(ConsentEvent(p, True, "consent.granted"))
        elif p in to_revoke and (p in base or p not in state.revoked):
            # a refusal of something never granted is still a decision worth recording
            events.append(ConsentEvent(p, False, "consent.revoked"))
    granted = (base | to_grant) - to_revoke
    revoked = frozenset((state.revoked | to_revoke) - to_grant)
    new = ConsentState(frozenset(granted), version, state.age_confirmed, revoked)
    return new, events


def consent_map_to_change(consent: object) -> tuple[list[str], list[str]]:
    """Split the hello frame's ``{purpose: bool}`` into (grant, revoke); raise on bad input."""
    if not isinstance(consent, Mapping):
        raise UnknownPurpose("consent must be an object of purpose: true/false")
    grant: list[str] = []
    revoke: list[str] = []
    for purpose, value in consent.items():
        if not isinstance(value, bool):
            raise UnknownPurpose(f"consent for {purpose!r} must be true or false")
        (grant if value else revoke).append(purpose)
    _check(grant + revoke)
    return grant, revoke


def confirm_age(state: ConsentState) -> tuple[ConsentState, ConsentEvent]:
    """Record the visitor's age confirmation."""
    new = ConsentState(state.granted, state.version, True, state.revoked)
    return new, ConsentEvent(AGE_CONFIRMATION, True, "consent.age_confirmed")
