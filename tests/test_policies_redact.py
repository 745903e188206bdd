"""PII detection and redaction: entities, look-alikes, overlaps, placeholder maps."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from policies import ENTITIES, PlaceholderMap, Redactor, Remark
from policies.detect import (
    _PHONE_CHARS,
    _PHONE_HINT_RE,
    DEFAULT_PHONE_REGIONS,
    Match,
    _region_min_digits,
    find_phones,
    iban_valid,
    luhn_valid,
    phone_cost,
    phone_windows,
)

ALL = Redactor(ENTITIES)


def redacted(text: str, redactor: Redactor = ALL) -> str:
    return redactor.redact(text, PlaceholderMap()).text


@pytest.mark.parametrize(
    ("text", "expected", "rule"),
    [
        ("mail John.Doe+shop@Example.co.uk now", "mail <EMAIL_1> now", "redact.email"),
        ("(jane_d@mail.example.)", "(<EMAIL_1>.)", "redact.email"),
        ("call +1 415 555 2671 today", "call <PHONE_1> today", "redact.phone"),
        ("call (415) 555-2671", "call <PHONE_1>", "redact.phone"),
        ("ring 020 7946 0958", "ring <PHONE_1>", "redact.phone"),
        ("Handy 0151 23456789", "Handy <PHONE_1>", "redact.phone"),
        ("tel 01 23 45 67 89", "tel <PHONE_1>", "redact.phone"),
        ("+49 30 901820.", "<PHONE_1>.", "redact.phone"),
        (
            "card 4111 1111 1111 1111 exp 12/26",
            "card <CREDIT_CARD_1> exp 12/26",
            "redact.credit_card",
        ),
        ("card 4111-1111-1111-1111", "card <CREDIT_CARD_1>", "redact.credit_card"),
        ("card 4111111111111111.", "card <CREDIT_CARD_1>.", "redact.credit_card"),
        ("amex 3782 822463 10005", "amex <CREDIT_CARD_1>", "redact.credit_card"),
        ("visa13 4222222222222", "visa13 <CREDIT_CARD_1>", "redact.credit_card"),
        ("then 6011 0009 9013 9424 123", "then <CREDIT_CARD_1> 123", "redact.credit_card"),
        ("IBAN DE89 3704 0044 0532 0130 00 thanks", "IBAN <IBAN_1> thanks", "redact.iban"),
        ("iban DE89370400440532013000", "iban <IBAN_1>", "redact.iban"),
        ("GB82 WEST 1234 5698 7654 32", "<IBAN_1>", "redact.iban"),
        ("gb82west12345698765432", "<IBAN_1>", "redact.iban"),
        ("NO9386011117947 ok", "<IBAN_1> ok", "redact.iban"),
        ("MT84MALT011000012345MTLCAST001S", "<IBAN_1>", "redact.iban"),
        ("DE89 3704 0044 0532 0130 00 12", "<IBAN_1> 12", "redact.iban"),
        ("from 203.0.113.7.", "from <IP_1>.", "redact.ip"),
        ("v6 2001:db8::1, ok", "v6 <IP_1>, ok", "redact.ip"),
        ("link fe80::1%eth0 up", "link <IP_1> up", "redact.ip"),
        ("mapped ::ffff:192.0.2.1", "mapped <IP_1>", "redact.ip"),
        ("[2001:db8::2]:443", "[<IP_1>]:443", "redact.ip"),
        ("ssn 123-45-6789", "ssn <US_SSN_1>", "redact.us_ssn"),
        ("sk-proj-abcdefghijklmnopqrstuvwx12", "<SECRET_1>", "redact.secret.openai_key"),
        ("key=sk-abcdefghijklmnopqrstuvwxyz0123", "key=<SECRET_1>", "redact.secret.openai_key"),
        ("ghp_" + "a1" * 18, "<SECRET_1>", "redact.secret.github_token"),
        (
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            "<SECRET_1>",
            "redact.secret.github_token",
        ),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws <SECRET_1>", "redact.secret.aws_access_key"),
        ("xoxb-123456789012-abcdefghij", "<SECRET_1>", "redact.secret.slack_token"),
        (
            "Authorization: Bearer abc123def456ghi789",
            "Authorization: Bearer <SECRET_1>",
            "redact.secret.bearer",
        ),
        (
            "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.abc_DEF-123",
            "token <SECRET_1>",
            "redact.secret.jwt",
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIEv\nQ==\n-----END PRIVATE KEY-----\nbye",
            "<SECRET_1>\nbye",
            "redact.secret.private_key",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE truncated paste",
            "<SECRET_1>",
            "redact.secret.private_key",
        ),
    ],
    ids=[
        "email",
        "email-in-parens",
        "phone-intl",
        "phone-us-national",
        "phone-gb",
        "phone-de",
        "phone-fr",
        "phone-trailing-dot",
        "card-spaces",
        "card-dashes",
        "card-compact",
        "card-amex",
        "card-13",
        "card-then-digits",
        "iban-spaced",
        "iban-compact",
        "iban-gb-letters",
        "iban-lowercase",
        "iban-norway-shortest",
        "iban-malta-long",
        "iban-then-number",
        "ipv4",
        "ipv6",
        "ipv6-zone",
        "ipv4-mapped",
        "ipv6-bracket-port",
        "ssn",
        "openai-proj",
        "openai",
        "github",
        "github-pat",
        "aws",
        "slack",
        "bearer",
        "jwt",
        "private-key",
        "private-key-unterminated",
    ],
)
def test_entities(text: str, expected: str, rule: str) -> None:
    result = ALL.redact(text, PlaceholderMap())
    assert result.text == expected
    if expected != text:
        assert rule in {r.rule for r in result.remarks}


@pytest.mark.parametrize(
    "text",
    [
        "Order #123456789 shipped",
        "order 1234567890123",
        "on 2024-05-01 at 10:30",
        "on 12/05/2024",
        "on 12.05.2024",
        "2024-05-01 12:30:45",
        "costs $1,299.99 or €1.299,99",
        "version 1.2.3 and v1.2.3.4 and 10.0.19041",
        "Chrome 120.0.6099.109",
        "number 1234567812345678 is not Luhn-valid",
        "zeros 0000 0000 0000 0000",
        "twenty digits 41111111111111111111",
        "IBAN DE12 3456 7890 1234 5678 90 has a bad checksum",
        "DE8937040044053201300 is one short",
        "XX89370400440532013000 has no country",
        "999.1.1.1 and 256.256.256.256",
        "01.02.03.04",
        "std::vector and a::b and dead::beef",
        "time 12:30:45 and MAC 00:1A:2B:3C:4D:5E",
        "ssn-like 000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000",
        "ticket 123-45-67890",
        "email@ without domain and user@localhost",
        "the bearer responsibilities and Bearer of bad news",
        "sk-short and ghp_short and AKIA123",
        "tracking 1Z999AA10123456784",
        "timestamp 1714567890",
        "ISBN 978-3-16-148410-0",
        "placeholder <EMAIL_1> typed",
    ],
    ids=[
        "order-number",
        "order-13-digits",
        "iso-date",
        "slash-date",
        "dotted-date",
        "datetime",
        "prices",
        "versions",
        "ua-version",
        "non-luhn-16",
        "all-zero-card",
        "20-digits",
        "iban-bad-checksum",
        "iban-short",
        "iban-bad-country",
        "bad-ipv4",
        "leading-zero-ipv4",
        "cpp-scope",
        "time-and-mac",
        "invalid-ssns",
        "ssn-too-long",
        "broken-emails",
        "bearer-prose",
        "short-tokens",
        "ups-tracking",
        "unix-time",
        "isbn",
        "typed-placeholder",
    ],
)
def test_look_alikes_are_not_redacted(text: str) -> None:
    result = ALL.redact(text, PlaceholderMap())
    assert result.text == text, result.remarks
    assert result.counts == {}


@pytest.mark.parametrize(
    ("text", "entity"),
    [
        ("DE89 3704 0044 0532 0130 00", "iban"),
        ("4111 1111 1111 1111", "credit_card"),
        ("john.4155552671@example.com", "email"),
        ("Bearer sk-abcdefghijklmnopqrstuvwxyz0123", "secret"),
        ("::ffff:192.0.2.1", "ip"),
        ("123-45-6789", "us_ssn"),
    ],
    ids=[
        "iban-not-phone",
        "card-not-phone",
        "email-not-phone",
        "openai-over-bearer",
        "ipv6-over-ipv4",
        "ssn-not-phone",
    ],
)
def test_overlaps_resolve_to_one_specific_entity(text: str, entity: str) -> None:
    result = ALL.redact(text, PlaceholderMap())
    assert result.counts == {entity: 1}
    if entity == "secret":
        assert result.remarks[0].rule == "redact.secret.openai_key"


def test_remarks_point_into_original_text_and_hold_no_values() -> None:
    text = "a@b.org and +1 415 555 2671"
    result = ALL.redact(text, PlaceholderMap())
    assert result.remarks == (
        Remark("email", "redact.email", 0, 7),
        Remark("phone", "redact.phone", 12, 27),
    )
    assert text[0:7] == "a@b.org"
    assert all("@" not in str(r) for r in result.remarks)
    assert result.counts == {"email": 1, "phone": 1}


def test_only_configured_entities_are_redacted() -> None:
    r = Redactor({"email"})
    assert redacted("a@b.org +1 415 555 2671 4111111111111111", r) == (
        "<EMAIL_1> +1 415 555 2671 4111111111111111"
    )
    assert redacted("a@b.org", Redactor(())) == "a@b.org"


def test_unknown_entity_rejected() -> None:
    with pytest.raises(ValueError, match="passport"):
        Redactor({"email", "passport"})


def test_placeholders_are_consistent_across_messages() -> None:
    m = PlaceholderMap()
    first = ALL.redact("I am Jo@Example.com, card 4111 1111 1111 1111", m)
    second = ALL.redact("again jo@example.com and 4111111111111111 and x@y.org", m)
    assert first.text == "I am <EMAIL_1>, card <CREDIT_CARD_1>"
    assert second.text == "again <EMAIL_1> and <CREDIT_CARD_1> and <EMAIL_2>"
    # Restore gives back the first spelling the visitor used.
    assert m.value_of("<EMAIL_1>") == "Jo@Example.com"
    assert m.value_of("<EMAIL_3>") is None


def test_same_phone_in_two_formats_is_one_placeholder() -> None:
    m = PlaceholderMap()
    assert ALL.redact("+1 415-555-2671 or (415) 555-2671", m).text == "<PHONE_1> or <PHONE_1>"


def test_typed_placeholders_are_never_issued() -> None:
    m = PlaceholderMap()
    result = ALL.redact("<EMAIL_1> <EMAIL_3> then a@b.org", m)
    assert result.text == "<EMAIL_1> <EMAIL_3> then <EMAIL_4>"
    assert m.value_of("<EMAIL_1>") is None
    assert m.value_of("<EMAIL_4>") == "a@b.org"


def test_map_round_trip_and_validation() -> None:
    m = PlaceholderMap()
    assert m.is_empty
    ALL.redact("a@b.org 203.0.113.9 <PHONE_7>", m)
    assert not m.is_empty and len(m) == 2
    again = PlaceholderMap.from_dict(m.to_dict())
    assert again.to_dict() == m.to_dict()
    assert ALL.redact("+1 415 555 2671 a@b.org", again).text == "<PHONE_8> <EMAIL_1>"
    bad = m.to_dict()
    bad["entries"][0][2] = "<EMAIL_9>"  # beyond the counter: forged
    for broken in (
        {"v": 2},
        {"v": 1, "entries": [], "counters": {"email": -1}},
        bad,
        {
            "v": 1,
            "entries": [["email", "k", "<PHONE_1>", "v"]],
            "counters": {"email": 1, "phone": 1},
        },
    ):
        with pytest.raises(ValueError):
            PlaceholderMap.from_dict(broken)


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("79927398713", True),
        ("0", True),
        ("18", True),
        ("5555555555554444", True),
        ("378282246310005", True),
    ],
    ids=["visa", "visa-off-by-one", "classic", "zero", "two-digit", "mastercard", "amex"],
)
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize(
    ("iban", "valid"),
    [
        ("DE89370400440532013000", True),
        ("DE89370400440532013001", False),
        ("DE8937040044053201300", False),
        ("FR1420041010050500013M02606", True),
        ("NL91ABNA0417164300", True),
        ("NL91ABNA0417164301", False),
        ("QQ91ABNA0417164300", False),
        ("de89370400440532013000", True),
        ("DE89-3704", False),
    ],
    ids=[
        "de",
        "de-bad-check",
        "de-short",
        "fr-letter",
        "nl",
        "nl-bad",
        "unknown-country",
        "lowercase",
        "junk",
    ],
)
def test_iban_valid(iban: str, valid: bool) -> None:
    assert iban_valid(iban) is valid


def test_errors_propagate_fail_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import policies.detect as detect

    def boom(text: str) -> list[object]:
        raise RuntimeError("detector broke")

    r = Redactor({"email"})
    monkeypatch.setattr(r, "_detectors", (boom,))
    with pytest.raises(RuntimeError, match="detector broke"):
        r.redact("a@b.org", PlaceholderMap())
    assert detect.find_emails  # the module itself is untouched


def test_long_adversarial_input_is_fast() -> None:
    import time

    text = ("a" * 16000) + "@" + ("1." * 4000) + (":" * 4000) + ("-" * 2000) + " 1" * 2000
    started = time.perf_counter()
    ALL.redact(text, PlaceholderMap())
    assert time.perf_counter() - started < 2.0


# --- phone detection: windowed matcher vs the original full-text passes ----------------


def find_phones_reference(
    text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS
) -> Iterator[Match]:
    """The original implementation: one full PhoneNumberMatcher pass per region."""
    if not _PHONE_HINT_RE.search(text):
        return
    seen: set[tuple[int, int]] = set()
    for region in regions:
        matcher = phonenumbers.PhoneNumberMatcher(
            text, region, leniency=phonenumbers.Leniency.VALID
        )
        for pm in matcher:
            span = (pm.start, pm.end)
            if span in seen:
                continue
            seen.add(span)
            key = phonenumbers.format_number(pm.number, phonenumbers.PhoneNumberFormat.E164)
            yield Match(pm.start, pm.end, "phone", "redact.phone", key)


def _phones(text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> list[Match]:
    return sorted(find_phones(text, regions), key=lambda m: (m.start, m.end))


def _reference(text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> list[Match]:
    return sorted(find_phones_reference(text, regions), key=lambda m: (m.start, m.end))


def test_phone_char_class_covers_every_character_of_the_matcher_pattern() -> None:
    # Windows are cut at characters outside _PHONE_CHARS; that is only exact if the
    # matcher's candidate pattern can never match such a character.
    from phonenumbers.phonenumbermatcher import _PATTERN

    parsed = re._parser.parse(_PATTERN.pattern, _PATTERN.flags)  # type: ignore[attr-defined]
    sets: list[str] = []

    def walk(items: object) -> None:
        for op, av in items:  # type: ignore[attr-defined]
            name = str(op)
            if name == "LITERAL":
                sets.append(re.escape(chr(av)))
            elif name == "IN":
                for o, a in av:
                    if str(o) == "LITERAL":
                        sets.append(re.escape(chr(a)))
                    elif str(o) == "RANGE":
                        sets.append(f"[{re.escape(chr(a[0]))}-{re.escape(chr(a[1]))}]")
                    elif str(o) == "CATEGORY" and str(a) == "CATEGORY_DIGIT":
                        sets.append(r"\d")
                    else:
                        raise AssertionError(f"unexpected class item {o} {a}")
            elif name == "SUBPATTERN":
                walk(av[3])
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                walk(av[2])
            elif name == "BRANCH":
                for branch in av[1]:
                    walk(branch)
            else:
                raise AssertionError(f"unexpected pattern node {name}")

    walk(parsed)
    any_char = re.compile("|".join(sets), _PATTERN.flags)
    ours = re.compile(f"[{_PHONE_CHARS}]")
    missing = [
        hex(c)
        for c in range(0x110000)
        if not 0xD800 <= c <= 0xDFFF and any_char.fullmatch(chr(c)) and not ours.fullmatch(chr(c))
    ]
    assert missing == []


@pytest.mark.parametrize(
    "text",
    [
        "call +1 415 555 2671 today",
        "call (415) 555-2671 or 020 7946 0958, Handy 0151 23456789; tel 01 23 45 67 89",
        "+49 30 901820.",
        "order 12345678 on 2024-01-05 at 12:30, total $1234.56, version 1.2.3.4",
        "abc4155552671 and 4155552671def and €4155552671 and 4155552671%",
        "ext: 415 555 2671 ext. 12, 415-555-2671 x 7, 415.555.2671#33",
        "1999-12-31 23:59 and 2024/01/05 12:00:00",
        "DE89 3704 0044 0532 0130 00 and 4111 1111 1111 1111 and 123-45-6789",
        "+1 415 555 2671 / 72 and +41 79 123 45 67 / 68",
        "(415) 555-2671)) [020 7946 0958] "
        "\uff0b\uff14\uff14 \uff12\uff10 \uff17\uff19\uff14\uff16 \uff10\uff19\uff15\uff18",
        "tonne an ox exists 0151 23456789 anexo 12 доб 5",
        "",
        "1234567",
        "order 1007 of 2024, 12345 pieces at 123456 each",
        "00 683 4002, 011 683 4002, 0011 683 4002 and 00683 4002",
        "00 49 30 901820 or 011 44 20 7946 0958 or 011 33 1 23 45 67 89",
    ],
)
def test_find_phones_matches_reference(text: str) -> None:
    assert _phones(text) == _reference(text)


@pytest.mark.parametrize("region", ["US", "GB", "DE", "FR", "IT", "NU", "AT", "JP", "AU"])
def test_short_windows_skip_only_regions_that_cannot_match(region: str) -> None:
    text = (
        "ref 1007, 12345, 123456, 1234567; 00 683 4002, 011 683 4002, 0011 683 4002, "
        "00 43 1 234567, 0043 1234, 030 901820, 02 1234 5678, 123 456 78"
    )
    assert _phones(text, (region,)) == _reference(text, (region,))


def test_region_digit_bound_holds_for_every_example_number() -> None:
    # A number dialled from region R (international prefix, country code, national
    # number) or written nationally in R never has fewer digits than R's bound.
    examples = [
        n for n in (phonenumbers.example_number(r) for r in phonenumbers.SUPPORTED_REGIONS) if n
    ]
    for region in phonenumbers.SUPPORTED_REGIONS:
        bound = _region_min_digits(region)
        assert 4 <= bound
        for number in examples:
            written = phonenumbers.format_out_of_country_calling_number(number, region)
            if written.startswith("+"):
                continue  # no plain-digit prefix in this region: "+" windows try every region
            assert sum(ch.isdecimal() for ch in written) >= bound, (region, written)


_PHONE_TOKENS = st.sampled_from(
    [
        "+1 415 555 2671",
        "(415) 555-2671",
        "415.555.2671",
        "4155552671",
        "020 7946 0958",
        "+44 20 7946 0958",
        "0151 23456789",
        "+49 30 901820",
        "030 901820",
        "01 23 45 67 89",
        "+33 1 23 45 67 89",
        "06 12 34 56 78",
        "ext. 12",
        "x 7",
        "#33",
        "12345678",
        "2024-01-05",
        "12:30",
        "$1234.56",
        "€99",
        "1.2.3",
        "v1.2.3.4",
        "4111 1111 1111 1111",
        "DE89 3704 0044 0532 0130 00",
        "123-45-6789",
        "192.168.0.1",
        "jo@example.com",
        "call",
        "tel",
        "an",
        "to",
        "Handy",
        "and",
        "abc",
        "%",
        "/",
        "(",
        ")",
        "+",
        "-",
        ".",
        ",",
        ";",
        ":",
        "0",
        "42",
        "555",
        "2671",
        "1007",
        "12345",
        "00 683 4002",
        "011 683 4002",
        "00 49 30 901820",
    ]
)
_SEPARATORS = st.sampled_from([" ", " ", "", "\n", ", ", "-", "/", ". "])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.tuples(_PHONE_TOKENS, _SEPARATORS), max_size=12))
# found by this test once: US reads the "+" and the exit code 011, FR a national number
@example(parts=[("+", "/"), ("011 683 4002", " ")])
def test_find_phones_random_texts_match_reference(parts: list[tuple[str, str]]) -> None:
    text = "".join(token + sep for token, sep in parts)
    assert _phones(text) == _reference(text)
    assert _phones(text, ("FR",)) == _reference(text, ("FR",))


@pytest.mark.parametrize(
    "text",
    [
        "DE89 3704 0044 0532 0130 00 and DE89 3704 0044 0532 0130 00",
        "GB82WEST12345698765432 DE89370400440532013000",
        "pay DE89 3704 0044 0532 0130 00 GB82 WEST 1234 5698 7654 32 today",
    ],
    ids=["same-twice", "compact-pair", "grouped-pair"],
)
def test_every_iban_in_a_message_is_redacted(text: str) -> None:
    result = Redactor(frozenset({"iban"})).redact(text, PlaceholderMap())
    assert result.counts == {"iban": 2}
    assert not any(
        ch.isdigit() for ch in result.text.replace("<IBAN_1>", "").replace("<IBAN_2>", "")
    ), result.text


@pytest.mark.parametrize(
    "text",
    [
        "call (415) 555-2671 about order 12345678 of 2026-03-04",
        "Ruf mich an: 030 12345678, oder 0171 2345678",
        "call +1 415 555 2671 today",
        "no digits at all",
        "order 1007 only",
        "+44 20 7946 0958 and 01 23 45 67 89",
    ],
)
def test_phone_cost_of_short_windows_is_the_matcher_passes_find_phones_makes(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = 0
    real = phonenumbers.PhoneNumberMatcher

    def counting(*args: object, **kwargs: object) -> phonenumbers.PhoneNumberMatcher:
        nonlocal made
        made += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(phonenumbers, "PhoneNumberMatcher", counting)
    list(find_phones(text))
    assert phone_cost(phone_windows(text)) == made


def test_retain_seen_in_keeps_what_the_remaining_texts_need() -> None:
    m = PlaceholderMap()
    old = "write to Jane.Doe@Example.org or call +44 20 7946 0958"
    kept = "my other address is max@example.net"
    assert ALL.redact(old, m).text == "write to <EMAIL_1> or call <PHONE_1>"
    assert ALL.redact(kept, m).text == "my other address is <EMAIL_2>"
    # the reply restored the phone in its canonical spelling: that keeps it too
    reply = "We will call +442079460958."
    assert m.retain_seen_in([kept, reply]) == 1  # jane's address: in no text left
    assert m.value_of("<EMAIL_1>") is None
    assert m.reapply(kept) == "my other address is <EMAIL_2>"
    assert m.reapply(reply) == "We will call <PHONE_1>."
    # a number once issued is not issued again, to this value or another
    assert ALL.redact("again Jane.Doe@Example.org", m).text == "again <EMAIL_3>"
    assert PlaceholderMap.from_dict(m.to_dict()).value_of("<EMAIL_3>") == "Jane.Doe@Example.org"
    assert m.retain_seen_in([]) == 3
    assert m.is_empty and ALL.redact("x@y.org", m).text == "<EMAIL_4>"
