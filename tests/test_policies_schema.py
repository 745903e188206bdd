"""Policy document validation, canonical form and diff."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import (
    ENTITIES,
    PURPOSES,
    Policy,
    PolicyError,
    RateLimit,
    Redact,
    compile_policy,
    normalize_origin,
    parse_policy,
    policy_diff,
    policy_to_doc,
    validate_policy,
)


def errors_of(doc: Any, base: Policy | None = None) -> list[dict[str, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, base)
    return info.value.errors


def test_empty_doc_gives_defaults() -> None:
    p = parse_policy({})
    assert p == Policy()
    assert p.retention_days == 90
    assert p.ip_mode == "truncate"
    assert p.redact.entities == frozenset(ENTITIES)
    assert p.rate_limit == RateLimit(20, 60, 6000)
    assert p.min_age == 16
    assert p.session_days == 30
    assert p.required_consents == frozenset()
    assert p.optional_consents == frozenset()


@pytest.mark.parametrize(
    ("doc", "field", "message_part"),
    [
        ({"colour": "red"}, "colour", "unknown field"),
        ({"redact": {"entities": [], "mask": True}}, "redact.mask", "unknown field"),
        ({"rate_limit": {"per_hour": 5}}, "rate_limit.per_hour", "unknown field"),
        ({"retention_days": True}, "retention_days", "integer"),
        ({"retention_days": 90.0}, "retention_days", "integer"),
        ({"retention_days": "90"}, "retention_days", "integer"),
        ({"retention_days": 0}, "retention_days", "between 1 and 3650"),
        ({"retention_days": 3651}, "retention_days", "between 1 and 3650"),
        (
            {"rate_limit": {"per_ip_per_minute": False}},
            "rate_limit.per_ip_per_minute",
            "must be an integer between 1 and 100000",
        ),
        ({"rate_limit": {"per_ip_per_minute": 0}}, "rate_limit.per_ip_per_minute", "between"),
        ({"rate_limit": []}, "rate_limit", "object"),
        ({"max_message_chars": 32001}, "max_message_chars", "between 1 and 32000"),
        ({"session_days": 401}, "session_days", "between 1 and 400"),
        ({"consent_version": 0}, "consent_version", "between 1"),
        ({"min_age": 12}, "min_age", "null or an integer between 13 and 21"),
        ({"min_age": 22}, "min_age", "between 13 and 21"),
        ({"min_age": True}, "min_age", "integer"),
        ({"honor_dnt": 1}, "honor_dnt", "true or false"),
        ({"age_confirmation": "yes"}, "age_confirmation", "true or false"),
        ({"ip_mode": "mask"}, "ip_mode", "truncate, hash, drop, full"),
        ({"ip_mode": None}, "ip_mode", "one of"),
        (
            {"required_consents": ["ai_processing", "telemetry"]},
            "required_consents[1]",
            "unknown purpose 'telemetry'",
        ),
        ({"required_consents": "analytics"}, "required_consents", "list"),
        (
            {"optional_consents": ["conversation_storage", "telemetry"]},
            "optional_consents[1]",
            "unknown purpose 'telemetry'",
        ),
        ({"optional_consents": "conversation_storage"}, "optional_consents", "list"),
        ({"optional_consents": [None]}, "optional_consents[0]", "unknown purpose None"),
        (
            {"redact": {"entities": ["email", "passport"]}},
            "redact.entities[1]",
            "unknown entity 'passport'",
        ),
        ({"redact": {"restore_in_reply": "no"}}, "redact.restore_in_reply", "true or false"),
        ({"redact": None}, "redact", "object"),
        ({"allowed_origins": ["https://a.example/path"]}, "allowed_origins[0]", "path"),
        ({"allowed_origins": ["https://a.example?x=1"]}, "allowed_origins[0]", "query"),
        ({"allowed_origins": ["ftp://a.example"]}, "allowed_origins[0]", "http or https"),
        ({"allowed_origins": ["a.example"]}, "allowed_origins[0]", "http or https"),
        ({"allowed_origins": ["https://"]}, "allowed_origins[0]", "host"),
        ({"allowed_origins": ["https://u:p@a.example"]}, "allowed_origins[0]", "credentials"),
        ({"allowed_origins": ["https://a.example:99999"]}, "allowed_origins[0]", "port"),
        ({"allowed_origins": [42]}, "allowed_origins[0]", "string"),
        ({"allowed_origins": "https://a.example"}, "allowed_origins", "list"),
        ({"system_prompt": "x" * 8001}, "system_prompt", "8000"),
        ({"system_prompt": None}, "system_prompt", "string"),
        ({"model": ""}, "model", "model name"),
        ({"model": "gpt 4"}, "model", "model name"),
        ({"privacy_policy_url": "javascript:alert(1)"}, "privacy_policy_url", "http(s) URL"),
        ({"privacy_policy_url": "/privacy"}, "privacy_policy_url", "http(s) URL"),
        ({"privacy_policy_url": 7}, "privacy_policy_url", "http(s) URL"),
    ],
    ids=[
        "unknown-top",
        "unknown-nested-redact",
        "unknown-nested-rate",
        "bool-as-int",
        "float-as-int",
        "str-as-int",
        "retention-low",
        "retention-high",
        "nested-bool-as-int",
        "rate-zero",
        "rate-not-object",
        "max-chars-high",
        "session-high",
        "consent-version-0",
        "min-age-low",
        "min-age-high",
        "min-age-bool",
        "dnt-int",
        "age-conf-str",
        "ip-mode",
        "ip-mode-null",
        "unknown-purpose",
        "purposes-string",
        "optional-unknown-purpose",
        "optional-string",
        "optional-not-str",
        "unknown-entity",
        "restore-str",
        "redact-null",
        "origin-path",
        "origin-query",
        "origin-ftp",
        "origin-no-scheme",
        "origin-no-host",
        "origin-credentials",
        "origin-bad-port",
        "origin-not-str",
        "origins-string",
        "prompt-long",
        "prompt-null",
        "model-empty",
        "model-space",
        "privacy-js",
        "privacy-relative",
        "privacy-int",
    ],
)
def test_validation_errors(doc: dict[str, Any], field: str, message_part: str) -> None:
    errs = errors_of(doc)
    assert [e["field"] for e in errs] == [field], errs
    assert message_part in errs[0]["message"]


def test_all_errors_are_collected() -> None:
    errs = errors_of(
        {
            "retention_days": 0,
            "ip_mode": "x",
            "bogus": 1,
            "rate_limit": {"per_session_per_minute": True, "nope": 1},
            "redact": {"entities": ["ssn"]},
        }
    )
    assert sorted(e["field"] for e in errs) == sorted(
        [
            "retention_days",
            "ip_mode",
            "bogus",
            "rate_limit.per_session_per_minute",
            "rate_limit.nope",
            "redact.entities[0]",
        ]
    )
    assert all(set(e) == {"field", "message"} for e in errs)


def test_not_a_mapping() -> None:
    assert errors_of([1, 2]) == [{"field": "", "message": "must be an object"}]


def test_policy_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="retention_days"):
        parse_policy({"retention_days": -1})


def test_partial_doc_takes_base_values() -> None:
    base = parse_policy(
        {
            "retention_days": 30,
            "rate_limit": {"per_ip_per_minute": 10},
            "redact": {"entities": ["email"], "restore_in_reply": False},
        }
    )
    p = parse_policy(
        {"rate_limit": {"per_session_per_minute": 5}, "redact": {"restore_in_reply": True}}, base
    )
    assert p.retention_days == 30
    assert p.rate_limit == RateLimit(per_session_per_minute=5, per_ip_per_minute=10)
    assert p.redact == Redact(entities=frozenset({"email"}), restore_in_reply=True)


def test_necessary_is_accepted_and_ignored() -> None:
    p = parse_policy({"required_consents": ["necessary", "ai_processing", "ai_processing"]})
    assert p.required_consents == frozenset({"ai_processing"})
    p = parse_policy({"optional_consents": ["necessary", "conversation_storage"]})
    assert p.optional_consents == frozenset({"conversation_storage"})


def test_optional_consents_partial_update_keeps_base() -> None:
    base = parse_policy({"optional_consents": ["conversation_storage", "analytics"]})
    assert parse_policy({"retention_days": 30}, base).optional_consents == frozenset(
        {"analytics", "conversation_storage"}
    )
    assert parse_policy({"optional_consents": []}, base).optional_consents == frozenset()


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("https://Shop.Example.COM", "https://shop.example.com"),
        ("https://shop.example.com/", "https://shop.example.com"),
        ("https://shop.example.com:443", "https://shop.example.com"),
        ("http://shop.example.com:80", "http://shop.example.com"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("HTTPS://[2001:DB8::1]:8443", "https://[2001:db8::1]:8443"),
        ("https://bücher.example", "https://xn--bcher-kva.example"),
    ],
    ids=[
        "lowercase",
        "trailing-slash",
        "default-https-port",
        "default-http-port",
        "custom-port",
        "ipv6-host",
        "idn",
    ],
)
def test_origin_normalization(raw: str, normalized: str) -> None:
    assert normalize_origin(raw) == normalized


def test_origins_are_sorted_and_deduplicated() -> None:
    p = parse_policy(
        {"allowed_origins": ["https://b.example", "https://A.example", "https://a.example:443"]}
    )
    assert p.allowed_origins == ("https://a.example", "https://b.example")


def test_nullable_fields() -> None:
    p = parse_policy({"min_age": None, "privacy_policy_url": "https://shop.example/privacy"})
    assert p.min_age is None
    assert p.privacy_policy_url == "https://shop.example/privacy"
    assert parse_policy({"privacy_policy_url": None}, p).privacy_policy_url is None


FULL_DOC: dict[str, Any] = {
    "retention_days": 30,
    "ip_mode": "hash",
    "honor_dnt": False,
    "required_consents": ["conversation_storage", "ai_processing"],
    "optional_consents": ["marketing", "analytics", "necessary"],
    "redact": {"entities": ["secret", "email"], "restore_in_reply": False},
    "allowed_origins": ["https://shop.example", "http://localhost:3000"],
    "system_prompt": "Be brief.",
    "model": "gpt-4o",
    "max_message_chars": 2000,
    "rate_limit": {
        "per_session_per_minute": 5,
        "per_ip_per_minute": 30,
        "per_tenant_per_minute": 1000,
    },
    "min_age": 18,
    "age_confirmation": True,
    "consent_version": 3,
    "privacy_policy_url": "https://shop.example/privacy",
    "session_days": 7,
}


def test_round_trip_full_doc() -> None:
    p = parse_policy(FULL_DOC)
    doc = policy_to_doc(p)
    assert parse_policy(doc) == p
    assert doc["required_consents"] == ["ai_processing", "conversation_storage"]
    assert doc["optional_consents"] == ["analytics", "marketing"]
    assert doc["redact"]["entities"] == ["email", "secret"]
    assert doc["allowed_origins"] == ["http://localhost:3000", "https://shop.example"]
    assert set(doc) == set(FULL_DOC)


@given(
    retention=st.integers(1, 3650),
    ip_mode=st.sampled_from(["truncate", "hash", "drop", "full"]),
    purposes=st.frozensets(st.sampled_from(PURPOSES)),
    optional=st.frozensets(st.sampled_from(PURPOSES)),
    entities=st.frozensets(st.sampled_from(ENTITIES)),
    min_age=st.none() | st.integers(13, 21),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_round_trip_property(
    retention: int,
    ip_mode: str,
    purposes: frozenset[str],
    optional: frozenset[str],
    entities: frozenset[str],
    min_age: int | None,
    flags: tuple[bool, bool, bool],
) -> None:
    p = Policy(
        retention_days=retention,
        ip_mode=ip_mode,
        required_consents=purposes,
        optional_consents=optional,
        redact=Redact(entities, flags[0]),
        honor_dnt=flags[1],
        age_confirmation=flags[2],
        min_age=min_age,
    )
    assert parse_policy(policy_to_doc(p)) == p
    assert validate_policy(p) is p


def test_diff_lists_changed_paths() -> None:
    old = Policy()
    new = parse_policy(
        {
            "retention_days": 30,
            "rate_limit": {"per_ip_per_minute": 10},
            "redact": {"entities": ["email"]},
        }
    )
    assert policy_diff(old, new) == {
        "retention_days": {"old": 90, "new": 30},
        "rate_limit.per_ip_per_minute": {"old": 60, "new": 10},
        "redact.entities": {"old": sorted(ENTITIES), "new": ["email"]},
    }
    assert policy_diff(new, new) == {}
    opt = parse_policy({"optional_consents": ["conversation_storage"]})
    assert policy_diff(old, opt) == {
        "optional_consents": {"old": [], "new": ["conversation_storage"]},
    }


def test_compile_rejects_invalid_hand_built_policy() -> None:
    with pytest.raises(PolicyError):
        compile_policy(replace(Policy(), retention_days=0), 1)
    with pytest.raises(ValueError, match="version"):
        compile_policy(Policy(), 0)


def test_compile_precomputes() -> None:
    cp = compile_policy(parse_policy(FULL_DOC), 4)
    assert cp.version == 4
    assert cp.required == frozenset({"ai_processing", "conversation_storage"})
    assert cp.redactor.entities == frozenset({"email", "secret"})
    assert cp.session_max_age_seconds == 7 * 86_400
    assert cp.origin_allowed("https://shop.example")
    assert not cp.origin_allowed("https://evil.example")
    assert not cp.origin_allowed(None)
    # The redactor is shared between versions with the same entity set.
    assert compile_policy(parse_policy(FULL_DOC), 5).redactor is cp.redactor
