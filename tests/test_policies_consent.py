"""Consent decisions, DNT/GPC signals and consent changes."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from policies import (
    ChatDecision,
    ConsentEvent,
    ConsentState,
    Policy,
    Signals,
    UnknownPurpose,
    apply_consent_change,
    compile_policy,
    confirm_age,
    consent_map_to_change,
    decide_chat,
    effective_purposes,
    parse_policy,
    signals_from,
)
from policies.compiled import CompiledPolicy


def cp_of(**doc: Any) -> CompiledPolicy:
    return compile_policy(parse_policy(doc), 1)


def state(
    *granted: str, version: int = 1, age: bool = False, revoked: tuple[str, ...] = ()
) -> ConsentState:
    return ConsentState(frozenset(granted), version, age, frozenset(revoked))


NO = Signals()
DNT = Signals(dnt=True)
GPC = Signals(gpc=True)


@pytest.mark.parametrize(
    ("headers", "hello", "honor", "expected"),
    [
        ({}, None, True, (False, False)),
        ({"DNT": "1"}, None, True, (True, False)),
        ({"DNT": "1"}, None, False, (False, False)),
        ({"dnt": "1"}, None, True, (True, False)),
        ({"DNT": "0"}, None, True, (False, False)),
        ({"DNT": "yes"}, None, True, (False, False)),
        ({"Sec-GPC": "1"}, None, False, (False, True)),
        ({"sec-gpc": "1"}, None, True, (False, True)),
        ({"Sec-GPC": "true"}, None, True, (False, False)),
        ({"Sec-GPC": "0"}, None, True, (False, False)),
        ({}, {"dnt": True}, True, (True, False)),
        ({}, {"dnt": "1"}, True, (True, False)),
        ({}, {"dnt": "yes"}, True, (True, False)),
        ({}, {"dnt": "0"}, True, (False, False)),
        ({}, {"dnt": None}, True, (False, False)),
        ({}, {"dnt": "1"}, False, (False, False)),
        ({}, {"gpc": True}, False, (False, True)),
        ({}, {"gpc": False}, True, (False, False)),
        ({}, {"gpc": "1"}, True, (False, True)),
        ({}, {"gpc": 1}, True, (False, True)),
        ({}, {"gpc": "yes"}, False, (False, True)),
        ({}, {"gpc": " TRUE "}, True, (False, True)),
        ({}, {"gpc": "0"}, True, (False, False)),
        ({}, {"gpc": 0}, True, (False, False)),
        ({}, {"gpc": None}, True, (False, False)),
        ({}, {"gpc": "false"}, True, (False, False)),
        ({}, {"dnt": 1}, True, (True, False)),
        ({}, {"dnt": 1}, False, (False, False)),
        ({}, {}, True, (False, False)),
        ({}, "dnt", True, (False, False)),
        ({}, ["gpc"], True, (False, False)),
        ({}, {"dnt": {"x": 1}, "gpc": [True]}, True, (False, False)),
        ({"DNT": "1", "Sec-GPC": "1"}, {"dnt": True, "gpc": True}, True, (True, True)),
    ],
    ids=[
        "nothing",
        "dnt-header",
        "dnt-header-not-honoured",
        "dnt-lowercase",
        "dnt-0",
        "dnt-header-yes",
        "gpc-header",
        "gpc-lowercase",
        "gpc-true-ignored",
        "gpc-0",
        "hello-dnt-bool",
        "hello-dnt-1",
        "hello-dnt-yes",
        "hello-dnt-0",
        "hello-dnt-null",
        "hello-dnt-not-honoured",
        "hello-gpc",
        "hello-gpc-false",
        "hello-gpc-1",
        "hello-gpc-number",
        "hello-gpc-yes",
        "hello-gpc-true-string",
        "hello-gpc-0",
        "hello-gpc-number-0",
        "hello-gpc-null",
        "hello-gpc-false-string",
        "hello-dnt-number",
        "hello-dnt-number-not-honoured",
        "hello-no-signals",
        "hello-string",
        "hello-list",
        "hello-garbage",
        "everything",
    ],
)
def test_signals_from(
    headers: dict[str, str], hello: object, honor: bool, expected: tuple[bool, bool]
) -> None:
    s = signals_from(headers, hello, honor)
    assert (s.dnt, s.gpc) == expected
    assert bool(s.source) == any(expected)


def test_signal_source_names_origin() -> None:
    assert signals_from({"Sec-GPC": "1"}, {"dnt": "1"}, True).source == "header:gpc,hello:dnt"


ALL = ("ai_processing", "conversation_storage", "analytics", "marketing", "preferences")
STORAGE = "conversation_storage"
OPTIONAL_STORAGE: dict[str, Any] = {"optional_consents": [STORAGE]}


# Truth table: every combination of analytics/marketing grant x DNT x GPC.
@pytest.mark.parametrize(
    ("analytics", "marketing", "dnt", "gpc"),
    list(itertools.product([False, True], repeat=4)),
    ids=lambda v: str(int(v)),
)
def test_tracking_truth_table(analytics: bool, marketing: bool, dnt: bool, gpc: bool) -> None:
    granted = (
        {"preferences"}
        | ({"analytics"} if analytics else set())
        | ({"marketing"} if marketing else set())
    )
    st = ConsentState(frozenset(granted), 1)
    sig = Signals(dnt=dnt, gpc=gpc)
    eff = effective_purposes(st, sig)
    blocked = dnt or gpc
    assert ("analytics" in eff) == (analytics and not blocked)
    assert ("marketing" in eff) == (marketing and not blocked)
    assert "preferences" in eff  # signals only touch tracking purposes
    d = decide_chat(cp_of(), st, sig)
    assert d.tracking == ((analytics or marketing) and not blocked)
    assert d.allowed


# Transcript storage (store_transcript, 4th field): conversation_storage required -> only
# when granted (and chat waits for it); listed in optional_consents -> only when granted;
# in neither list -> stored unless the visitor explicitly revoked it.
@pytest.mark.parametrize(
    ("doc", "st", "sig", "expected"),
    [
        ({}, state(), NO, ChatDecision(True, (), "consent.not_required", True, False)),
        (
            {},
            state("conversation_storage"),
            NO,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        ({}, state(*ALL), DNT, ChatDecision(True, (), "consent.not_required", True, False)),
        ({}, state(*ALL), NO, ChatDecision(True, (), "consent.not_required", True, True)),
        (
            {"required_consents": ["ai_processing"]},
            state(),
            NO,
            ChatDecision(False, ("ai_processing",), "consent.required_missing", False, False),
        ),
        (
            {"required_consents": ["ai_processing"]},
            state("ai_processing"),
            NO,
            ChatDecision(True, (), "consent.granted", True, False),
        ),
        (
            {"required_consents": ["ai_processing", "conversation_storage"]},
            state("ai_processing"),
            NO,
            ChatDecision(
                False, ("conversation_storage",), "consent.required_missing", False, False
            ),
        ),
        (
            {"required_consents": ["ai_processing", "conversation_storage"]},
            state("ai_processing", "conversation_storage"),
            GPC,
            ChatDecision(True, (), "consent.granted", True, False),
        ),
        (
            {"required_consents": ["analytics"]},
            state("analytics"),
            GPC,
            ChatDecision(True, (), "consent.granted", True, False),
        ),
        (
            {"required_consents": ["ai_processing"], "consent_version": 2},
            state("ai_processing", "analytics"),
            NO,
            ChatDecision(False, ("ai_processing",), "consent.stale_version", False, False),
        ),
        (
            {"consent_version": 2},
            state("conversation_storage", "analytics"),
            NO,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        (
            {"required_consents": ["ai_processing"]},
            state("ai_processing", version=2),
            NO,
            ChatDecision(False, ("ai_processing",), "consent.stale_version", False, False),
        ),
        (
            {"age_confirmation": True},
            state(),
            NO,
            ChatDecision(False, ("age_confirmation",), "consent.age_unconfirmed", False, False),
        ),
        (
            {"age_confirmation": True},
            state(age=True),
            NO,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        (
            {"age_confirmation": True, "required_consents": ["ai_processing"]},
            state(),
            NO,
            ChatDecision(
                False,
                ("ai_processing", "age_confirmation"),
                "consent.required_missing",
                False,
                False,
            ),
        ),
        (
            {"age_confirmation": True, "required_consents": ["ai_processing"]},
            state("ai_processing"),
            NO,
            ChatDecision(False, ("age_confirmation",), "consent.age_unconfirmed", False, False),
        ),
        (
            {"age_confirmation": True, "consent_version": 3},
            state(version=1, age=True),
            NO,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        # storage listed in optional_consents: kept only when granted
        (
            OPTIONAL_STORAGE,
            state(STORAGE),
            NO,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        (
            OPTIONAL_STORAGE,
            state(),
            NO,
            ChatDecision(True, (), "consent.not_required", False, False),
        ),
        (
            OPTIONAL_STORAGE,
            state("analytics", revoked=(STORAGE,)),
            NO,
            ChatDecision(True, (), "consent.not_required", False, True),
        ),
        (
            OPTIONAL_STORAGE,
            state(STORAGE, "analytics"),
            GPC,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        (
            {**OPTIONAL_STORAGE, "consent_version": 2},
            state(STORAGE),
            NO,
            ChatDecision(True, (), "consent.not_required", False, False),
        ),
        (
            {**OPTIONAL_STORAGE, "required_consents": ["ai_processing"]},
            state("ai_processing", STORAGE),
            NO,
            ChatDecision(True, (), "consent.granted", True, False),
        ),
        (
            {**OPTIONAL_STORAGE, "required_consents": ["ai_processing"]},
            state("ai_processing"),
            NO,
            ChatDecision(True, (), "consent.granted", False, False),
        ),
        (
            {"optional_consents": ["analytics"]},
            state(),
            NO,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        # storage in neither list: kept unless explicitly revoked
        (
            {},
            state(revoked=(STORAGE,)),
            NO,
            ChatDecision(True, (), "consent.not_required", False, False),
        ),
        (
            {},
            state(revoked=("analytics",)),
            NO,
            ChatDecision(True, (), "consent.not_required", True, False),
        ),
        (
            {"required_consents": ["ai_processing"]},
            state("ai_processing", revoked=(STORAGE,)),
            NO,
            ChatDecision(True, (), "consent.granted", False, False),
        ),
        # an explicit refusal survives a consent_version change (grants do not)
        (
            {"consent_version": 2},
            state(revoked=(STORAGE,)),
            NO,
            ChatDecision(True, (), "consent.not_required", False, False),
        ),
        (
            {"consent_version": 2},
            state(version=3, revoked=(STORAGE,)),
            NO,
            ChatDecision(True, (), "consent.not_required", False, False),
        ),
        # required storage that was refused: chat waits, nothing stored
        (
            {"required_consents": [STORAGE]},
            state(revoked=(STORAGE,)),
            NO,
            ChatDecision(False, (STORAGE,), "consent.required_missing", False, False),
        ),
    ],
    ids=[
        "none-required-nothing-granted",
        "none-required-storage-granted",
        "dnt-all-granted",
        "all-granted",
        "required-missing",
        "required-granted",
        "storage-required-missing",
        "storage-required-granted-gpc",
        "analytics-required-gpc",
        "stale-version",
        "stale-version-nothing-required",
        "newer-version-is-stale",
        "age-unconfirmed",
        "age-confirmed",
        "age-and-consent-missing",
        "only-age-missing",
        "age-survives-version-change",
        "optional-storage-granted",
        "optional-storage-not-granted",
        "optional-storage-revoked",
        "optional-storage-granted-gpc",
        "optional-storage-grant-stale",
        "optional-storage-with-required-granted",
        "optional-storage-with-required-not-granted",
        "optional-other-purpose-stores",
        "neither-storage-revoked",
        "neither-other-purpose-revoked",
        "neither-storage-revoked-with-required",
        "revoked-survives-older-version",
        "revoked-survives-newer-version",
        "required-storage-revoked",
    ],
)
def test_decide_chat(
    doc: dict[str, Any], st: ConsentState, sig: Signals, expected: ChatDecision
) -> None:
    assert decide_chat(cp_of(**doc), st, sig) == expected


def test_missing_purposes_are_in_canonical_order() -> None:
    cp = cp_of(required_consents=["preferences", "ai_processing", "analytics"])
    assert decide_chat(cp, state(), NO).missing == ("ai_processing", "analytics", "preferences")


@pytest.mark.parametrize(
    ("before", "grant", "revoke", "version", "after", "revoked", "events"),
    [
        (
            state(),
            ["analytics"],
            [],
            1,
            {"analytics"},
            set(),
            [ConsentEvent("analytics", True, "consent.granted")],
        ),
        (state("analytics"), ["analytics"], [], 1, {"analytics"}, set(), []),
        (
            state("analytics"),
            [],
            ["analytics"],
            1,
            set(),
            {"analytics"},
            [ConsentEvent("analytics", False, "consent.revoked")],
        ),
        # a refusal of something never granted is recorded (it decides storage)
        (
            state(),
            [],
            ["analytics"],
            1,
            set(),
            {"analytics"},
            [ConsentEvent("analytics", False, "consent.revoked")],
        ),
        (
            state(),
            [],
            [STORAGE],
            1,
            set(),
            {STORAGE},
            [ConsentEvent(STORAGE, False, "consent.revoked")],
        ),
        # ... but only once: an already revoked purpose records nothing new
        (state(revoked=(STORAGE,)), [], [STORAGE], 1, set(), {STORAGE}, []),
        (state(revoked=(STORAGE,)), [], [STORAGE], 2, set(), {STORAGE}, []),
        (
            state(),
            ["marketing"],
            ["marketing"],
            1,
            set(),
            {"marketing"},
            [ConsentEvent("marketing", False, "consent.revoked")],
        ),
        (
            state("marketing"),
            ["marketing"],
            ["marketing"],
            1,
            set(),
            {"marketing"},
            [ConsentEvent("marketing", False, "consent.revoked")],
        ),
        (
            state(),
            ["necessary", "ai_processing"],
            ["necessary"],
            1,
            {"ai_processing"},
            set(),
            [ConsentEvent("ai_processing", True, "consent.granted")],
        ),
        (
            state("analytics", "marketing"),
            ["analytics"],
            [],
            2,
            {"analytics"},
            set(),
            [
                ConsentEvent("marketing", False, "consent.stale_version"),
                ConsentEvent("analytics", True, "consent.granted"),
            ],
        ),
        (
            state("analytics", "marketing"),
            [],
            ["marketing"],
            2,
            set(),
            {"marketing"},
            [
                ConsentEvent("analytics", False, "consent.stale_version"),
                ConsentEvent("marketing", False, "consent.stale_version"),
                ConsentEvent("marketing", False, "consent.revoked"),
            ],
        ),
        # refusals are carried into a new consent version; grants lapse
        (
            state("analytics", revoked=(STORAGE,)),
            [],
            [],
            2,
            set(),
            {STORAGE},
            [ConsentEvent("analytics", False, "consent.stale_version")],
        ),
        # granting again withdraws the refusal
        (
            state(revoked=(STORAGE, "marketing")),
            [STORAGE],
            [],
            1,
            {STORAGE},
            {"marketing"},
            [ConsentEvent(STORAGE, True, "consent.granted")],
        ),
        (
            state(revoked=(STORAGE,)),
            [STORAGE],
            [],
            2,
            {STORAGE},
            set(),
            [ConsentEvent(STORAGE, True, "consent.granted")],
        ),
    ],
    ids=[
        "grant",
        "regrant-no-event",
        "revoke",
        "revoke-ungranted",
        "revoke-ungranted-storage",
        "revoke-again-no-event",
        "revoke-again-new-version-no-event",
        "grant-and-revoke",
        "grant-and-revoke-granted",
        "necessary-ignored",
        "new-version-regrant",
        "new-version-revoke",
        "new-version-keeps-revoked",
        "grant-clears-revoked",
        "grant-clears-revoked-new-version",
    ],
)
def test_apply_consent_change(
    before: ConsentState,
    grant: list[str],
    revoke: list[str],
    version: int,
    after: set[str],
    revoked: set[str],
    events: list[ConsentEvent],
) -> None:
    new, got = apply_consent_change(before, grant, revoke, version)
    assert new == ConsentState(frozenset(after), version, before.age_confirmed, frozenset(revoked))
    assert got == events


def test_revoke_of_ungranted_purpose_is_recorded_once() -> None:
    first, ev1 = apply_consent_change(state(), [], [STORAGE], 1)
    assert ev1 == [ConsentEvent(STORAGE, False, "consent.revoked")]
    second, ev2 = apply_consent_change(first, [], [STORAGE], 1)
    assert ev2 == []
    assert second == first == state(revoked=(STORAGE,))


def test_storage_refusal_outlives_consent_version_change() -> None:
    # Default policy: storage in neither list, so it is the service's basis until refused.
    v1 = cp_of()
    st, _ = apply_consent_change(state(), [], [STORAGE], v1.consent_version)
    assert decide_chat(v1, st, NO).store_transcript is False
    v2 = cp_of(consent_version=2)
    assert decide_chat(v2, st, NO) == ChatDecision(True, (), "consent.not_required", False, False)
    moved, events = apply_consent_change(st, [], [], v2.consent_version)
    assert events == [] and moved.revoked == frozenset({STORAGE})
    assert decide_chat(v2, moved, NO).store_transcript is False
    regranted, _ = apply_consent_change(moved, [STORAGE], [], v2.consent_version)
    assert decide_chat(v2, regranted, NO).store_transcript is True


def test_optional_storage_grant_lapses_with_version() -> None:
    st, _ = apply_consent_change(state(), [STORAGE], [], 1)
    assert decide_chat(cp_of(**OPTIONAL_STORAGE), st, NO).store_transcript is True
    stale = cp_of(**OPTIONAL_STORAGE, consent_version=2)
    assert decide_chat(stale, st, NO).store_transcript is False


def test_changes_keep_age_confirmation_and_fix_staleness() -> None:
    st, ev = confirm_age(state(revoked=(STORAGE,)))
    assert st.age_confirmed and ev.rule == "consent.age_confirmed"
    assert st.revoked == frozenset({STORAGE})
    cp = cp_of(required_consents=["ai_processing"], consent_version=2)
    new, _ = apply_consent_change(st, ["ai_processing"], [], cp.consent_version)
    assert new.age_confirmed
    assert new.revoked == frozenset({STORAGE})
    assert decide_chat(cp, new, NO).allowed


@pytest.mark.parametrize(
    ("grant", "revoke"),
    [(["telemetry"], []), ([], ["Analytics"]), ([None], [])],
    ids=["unknown-grant", "unknown-revoke-case", "not-a-string"],
)
def test_unknown_purpose(grant: list[Any], revoke: list[Any]) -> None:
    with pytest.raises(UnknownPurpose):
        apply_consent_change(state("analytics"), grant, revoke, 1)
    assert issubclass(UnknownPurpose, ValueError)


@pytest.mark.parametrize(
    ("consent", "expected"),
    [
        ({"analytics": True, "marketing": False}, (["analytics"], ["marketing"])),
        ({}, ([], [])),
    ],
    ids=["mixed", "empty"],
)
def test_consent_map_to_change(consent: object, expected: tuple[list[str], list[str]]) -> None:
    assert consent_map_to_change(consent) == expected


@pytest.mark.parametrize(
    "consent",
    [{"telemetry": True}, {"analytics": "yes"}, ["analytics"]],
    ids=["unknown", "not-bool", "not-object"],
)
def test_consent_map_to_change_errors(consent: object) -> None:
    with pytest.raises(UnknownPurpose):
        consent_map_to_change(consent)


def test_default_policy_needs_no_consent() -> None:
    assert compile_policy(Policy(), 1).required == frozenset()
    assert Policy().optional_consents == frozenset()
    # ... and keeps the transcript: storage is in neither list
    assert decide_chat(compile_policy(Policy(), 1), state(), NO).store_transcript is True


def test_consent_states_share_their_purpose_sets_and_the_sharing_is_bounded() -> None:
    # every idle visitor holds a ConsentState: equal sets are one object, not one each
    a = ConsentState(frozenset({"ai_processing", "analytics"}), 1)
    b, _ = apply_consent_change(ConsentState(frozenset(), 1), ["analytics", "ai_processing"], [], 1)
    assert a.granted == b.granted and a.granted is b.granted
    assert a.revoked is b.revoked
    # only sets of known purposes are shared: arbitrary strings cannot grow the table
    odd = ConsentState(frozenset({"not-a-purpose"}), 1)
    assert odd.granted is not ConsentState(frozenset({"not-a-purpose"}), 1).granted
    assert not hasattr(a, "__dict__")  # slots: no per-instance dict either
