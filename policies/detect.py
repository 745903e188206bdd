"""PII detectors: one function per entity, each yielding candidate spans with a rule.

Every detector validates what it finds (Luhn, mod-97, ``ipaddress``, phone
metadata) so look-alikes such as order numbers, dates, prices and version
strings stay untouched. Overlapping candidates are resolved by ``resolve``.
All patterns are anchored on a left boundary (a lookbehind) so a long run of
characters is scanned once, not once per position.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial

import phonenumbers

# Phone numbers written with "+" are found whatever the region; national formats need a
# region to be parsed. These four cover the gateway's first markets; a number valid in
# none of them stays visible (documented in docs/policy-reference.md).
DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR")

# Lower wins when two candidates of equal length cover the same text: the more
# specific, checksum-validated entities beat the looser ones.
PRIORITY: dict[str, int] = {
    "secret": 0,
    "iban": 1,
    "credit_card": 2,
    "us_ssn": 3,
    "email": 4,
    "ip": 5,
    "phone": 6,
}


@dataclass(frozen=True, slots=True)
class Match:
    """A detected span of the original text; ``key`` is its canonical form."""

    start: int
    end: int
    entity: str
    rule: str
    key: str


# --- email ---------------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.%+\-])[\w.%+\-]+@[^\W_][\w\-]*(?:\.[\w\-]+)*\.[^\W\d_]{2,}(?![\w\-])"
)


def find_emails(text: str) -> Iterator[Match]:
    """Yield e-mail addresses."""
    if "@" not in text:  # a substring test: far cheaper than the pattern's scan
        return
    for m in _EMAIL_RE.finditer(text):
        yield Match(m.start(), m.end(), "email", "redact.email", m.group().lower())


# --- phone ---------------------------------------------------------------------------

# Cheap pre-check: the matcher is slow, and a phone number needs at least 7 digits.
_PHONE_HINT_RE = re.compile(r"\d(?:[\s().\-/]{0,3}\d){6}")

# Every character ``phonenumbers``' candidate pattern can match (digits, its punctuation,
# lead characters "+" and "(", and the letters and signs of extensions such as "ext. 12",
# "x12", "#12", with their case variants: the pattern ignores case). A candidate never
# spans a character outside this class, so the matcher run over one maximal run of these
# characters (plus the one character either side it looks at) finds exactly what it finds
# over the whole text. tests/test_policies_redact.py checks the class against the pattern.
_PHONE_CHARS = (
    "\\d\\t ()\\[\\]+#,\\-./:;=~"
    "aAeEiI\u0130\u0131nNoOsS\u017ftTxX\u00f3\u00d3\u0301"
    "\u0431\u0411\u0434\u0414\u1c81\u043e\u041e\u1c82"
    "\u00a0\u00ad\u200b\u2060\u3000\u2010-\u2015\u2053\u2212\u223c\u30fc"
    "\uff03\uff08\uff09\uff0b\uff0d-\uff0f\uff3b\uff3d\uff5e"
    "\uff45\uff25\uff49\uff29\uff4e\uff2e\uff54\uff34\uff58\uff38"
)
# One maximal run of candidate characters holding a digit; the lookbehind keeps it linear.
_PHONE_WINDOW_RE = re.compile(f"(?<![{_PHONE_CHARS}])[{_PHONE_CHARS}]*?\\d[{_PHONE_CHARS}]*+")
# A valid number has at least this many digits (shortest national number in the regions'
# metadata, and never fewer than 4 written with "+"): shorter runs are not parsed at all.
_INTL_MIN_DIGITS = 4


@lru_cache(maxsize=16)
def _min_digits(regions: tuple[str, ...]) -> int:
    lengths = [_INTL_MIN_DIGITS]
    for region in regions:
        md = phonenumbers.PhoneMetadata.metadata_for_region(region)
        if md is not None and md.general_desc is not None:
            lengths.extend(n for n in md.general_desc.possible_length if n > 0)
    return min(lengths)


@lru_cache(maxsize=64)
def _region_min_digits(region: str) -> int:
    """Fewest digits a window without "+" needs for a `region` pass to find anything.

    Such a pass finds either a national number of a region sharing `region`'s country
    code (at least its shortest possible length), or a number dialled from `region`
    with its international prefix: that prefix, a country code (one digit or more) and
    a national number (never fewer than 4 digits anywhere).
    """
    cc = phonenumbers.country_code_for_region(region)
    national: list[int] = []
    for other in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(cc, ()):
        md = phonenumbers.PhoneMetadata.metadata_for_region(other)
        if md is not None and md.general_desc is not None:
            national.extend(n for n in md.general_desc.possible_length if n > 0)
    md = phonenumbers.PhoneMetadata.metadata_for_region(region)
    idd = md.international_prefix if md is not None else None
    # a plain-digit prefix ("00", "011") has its own length; a pattern, conservatively 0
    idd_digits = len(idd) if idd and idd.isdigit() else 0
    if not national:
        return _INTL_MIN_DIGITS
    return min(min(national), idd_digits + 1 + _INTL_MIN_DIGITS)


def _regions_for(run: str, digits: int, regions: tuple[str, ...]) -> tuple[str, ...]:
    """The regions whose pass can find a number in this window."""
    if "+" in run or "\uff0b" in run:
        return regions  # "+…" reads the same in any region: every pass may find it
    return tuple(r for r in regions if digits >= _region_min_digits(r))


# (offset, window, run, regions to pass it to): a window of text worth a matcher pass
PhoneWindow = tuple[int, str, str, tuple[str, ...]]


def phone_windows(text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> list[PhoneWindow]:
    """The windows ``find_phones`` passes to the matcher, with the regions for each."""
    if not _PHONE_HINT_RE.search(text):
        return []
    regions = tuple(regions)
    min_digits = _min_digits(regions)
    size = len(text)
    out: list[PhoneWindow] = []
    for w in _PHONE_WINDOW_RE.finditer(text):
        run = w.group()
        digits = sum(ch.isdecimal() for ch in run)
        if digits < min_digits:
            continue
        # One character of context either side: the matcher rejects a number glued to a
        # Latin letter or a currency sign, and "at the start of the text" must stay true.
        lo = w.start() - 1 if w.start() > 0 else 0
        hi = w.end() + 1 if w.end() < size else size
        out.append((lo, text[lo:hi], run, _regions_for(run, digits, regions)))
    return out


def phone_cost(windows: Sequence[PhoneWindow]) -> int:
    """What ``find_phones`` costs over these windows, in matcher passes over a short
    window (a few tenths of a millisecond each).

    Each window costs a pass per region it goes to, and one more per 32 characters (a
    pass reads the window candidate by candidate). A short window written "+..." counts
    one pass: the first region's settles it when it holds one number. A longer one may
    hold more, and whether the first pass settles it is known only after searching, so
    it counts every region's.
    """
    cost = 0
    for _, _, run, for_regions in windows:
        short = len(run) < _LONG_WINDOW
        passes = 1 if short and ("+" in run or "\uff0b" in run) else len(for_regions)
        cost += passes * (1 + len(run) // _LONG_WINDOW)
    return cost


_LONG_WINDOW = 32
_NOT_DIGITS = re.compile(r"\D+")


def digit_count(text: str) -> int:
    """How many decimal digits ``text`` holds (any script, as the detectors read them)."""
    return len(_NOT_DIGITS.sub("", text))


def find_phones(
    text: str,
    regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
    windows: Sequence[PhoneWindow] | None = None,
) -> Iterator[Match]:
    """Yield phone numbers that are VALID for one of ``regions`` (or international).

    Same result as one ``PhoneNumberMatcher`` pass per region over the whole text (a span
    found by an earlier region keeps that region's reading), but each matcher only sees
    the short windows of phone-like characters, windows with too few digits are
    skipped, and a window is passed only to the regions that could read that many
    digits as a number. ``windows`` are ``phone_windows(text, regions)``, when the
    caller already has them.
    """
    regions = tuple(regions)
    min_digits = _min_digits(regions)
    seen: set[tuple[int, int]] = set()
    if windows is None:
        windows = phone_windows(text, regions)
    for lo, window, _, for_regions in windows:
        for n, region in enumerate(for_regions):
            found = list(
                phonenumbers.PhoneNumberMatcher(
                    window, region, leniency=phonenumbers.Leniency.VALID
                )
            )
            for pm in found:
                span = (lo + pm.start, lo + pm.end)
                if span in seen:
                    continue
                seen.add(span)
                key = phonenumbers.format_number(pm.number, phonenumbers.PhoneNumberFormat.E164)
                yield Match(span[0], span[1], "phone", "redact.phone", key)
            if n == 0 and found and _international_only(window, found, min_digits):
                # every number here is written "+…", which reads the same in any region,
                # and too few digits are left for another: the other passes add nothing
                break


def _international_only(
    window: str, found: list[phonenumbers.PhoneNumberMatch], min_digits: int
) -> bool:
    # "+" then a digit: a "+" cut from its digits ("+/011 683 4002") is read through an
    # exit code by one region and as a national number by another
    if not all(pm.raw_string[:1] == "+" and pm.raw_string[1:2].isdecimal() for pm in found):
        return False
    inside: set[int] = set()
    for pm in found:
        inside.update(range(pm.start, pm.end))
    left = sum(ch.isdecimal() for i, ch in enumerate(window) if i not in inside)
    return left < min_digits


# --- credit card ---------------------------------------------------------------------

# A run of digits with single space/dash separators; windows of its groups are checked.
_DIGIT_RUN_RE = re.compile(r"(?<![\w\-])\d++(?:[ \-]\d++)*+(?![\w])")
_GROUP_RE = re.compile(r"\d+")


def luhn_valid(digits: str) -> bool:
    """Return True when ``digits`` passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(digits: str) -> bool:
    # All-same digits (0000 0000 0000 0000) pass Luhn but are placeholders, not cards.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _card_grouping(sizes: Sequence[int]) -> bool:
    # Cards are printed 4-4-4-4(-3), 4-6-5 (Amex), 4-6-4 (Diners) or unbroken. Requiring a
    # real grouping keeps runs like "000-12-3456 666-12-3456" or an invalid IBAN's digit
    # groups from yielding a Luhn-valid window by chance (one in ten would).
    if len(sizes) == 1:
        return True
    if all(n == 4 for n in sizes[:-1]) and 1 <= sizes[-1] <= 4:
        return True
    return tuple(sizes) in ((4, 6, 5), (4, 6, 4))


_MAX_CARD_GROUPS = 5  # 4-4-4-4-3 is the longest grouping


def find_cards(text: str) -> Iterator[Match]:
    """Yield Luhn-valid card numbers of 13-19 digits, grouped by spaces or dashes."""
    for run in _DIGIT_RUN_RE.finditer(text):
        raw = run.group()
        if len(raw) - raw.count(" ") - raw.count("-") < 13:
            continue  # fewer digits than the shortest card: order numbers, phones, years
        groups = [(g.start(), g.end()) for g in _GROUP_RE.finditer(raw)]
        base = run.start()
        i = 0
        # Greedy from the left, longest valid window first: "4111 1111 1111 1111 12" finds
        # the card and leaves the trailing "12" alone. Windows are bounded, so a run of
        # thousands of groups costs linear time.
        while i < len(groups):
            found = False
            for j in range(min(len(groups), i + _MAX_CARD_GROUPS) - 1, i - 1, -1):
                window = groups[i : j + 1]
                if not _card_grouping([e - s for s, e in window]):
                    continue
                digits = "".join(raw[s:e] for s, e in window)
                if _card_ok(digits):
                    yield Match(
                        base + groups[i][0],
                        base + groups[j][1],
                        "credit_card",
                        "redact.credit_card",
                        digits,
                    )
                    i = j + 1
                    found = True
                    break
            if not found:
                i += 1


# --- IBAN ----------------------------------------------------------------------------

IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27,
    "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28,
    "PS": 29, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

_IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}")


def iban_valid(compact: str) -> bool:
    """Return True for an IBAN (no spaces) of the right length whose mod-97 check is 1."""
    iban = compact.upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum() or not iban.isascii():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def find_ibans(text: str) -> Iterator[Match]:
    """Yield mod-97-valid IBANs, written compact or in groups separated by single spaces."""
    pos = 0
    # not finditer: a match may run over the next IBAN, so resume right after what was used
    while (m := _IBAN_RE.search(text, pos)) is not None:
        pos = m.start() + 1
        length = IBAN_LENGTHS.get(m.group()[:2].upper())
        if length is None:
            continue
        # The pattern may run into the following word; cut at the country's exact length.
        taken = 0
        end = m.start()
        for k in range(m.start(), m.end()):
            if text[k] != " ":
                taken += 1
            if taken == length:
                end = k + 1
                break
        if taken != length or (end < len(text) and text[end].isalnum()):
            continue
        compact = text[m.start() : end].replace(" ", "").upper()
        if iban_valid(compact):
            pos = end
            yield Match(m.start(), end, "iban", "redact.iban", compact)


# --- IP ------------------------------------------------------------------------------

# Four dotted parts only: "1.2.3" (versions) and dates never qualify; "v1.2.3.4" neither.
_IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6_RE = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f.]*:)[0-9A-Fa-f:.]++(?:%[A-Za-z0-9_\-]++)?")


def find_ips(text: str) -> Iterator[Match]:
    """Yield IPv4 and IPv6 address literals that ``ipaddress`` accepts."""
    for m in _IPV4_RE.finditer(text):
        try:
            ip4 = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield Match(m.start(), m.end(), "ip", "redact.ip", str(ip4))
    if ":" not in text:
        return
    for m in _IPV6_RE.finditer(text):
        token = m.group()
        end = m.end()
        while token.endswith("."):  # sentence punctuation, not part of the address
            token = token[:-1]
            end -= 1
        # Needs a digit: hex-only words around "::" ("a::b", "std::vector") are code, not IPs.
        if (
            token.count(":") < 2
            or not any(ch.isdigit() for ch in token)
            or (end < len(text) and (text[end].isalnum() or text[end] == "_"))
        ):
            continue
        try:
            ip6 = ipaddress.IPv6Address(token)
        except ValueError:
            continue
        yield Match(m.start(), end, "ip", "redact.ip", str(ip6))


# --- US SSN --------------------------------------------------------------------------

# Area 000, 666 and 900-999, group 00 and serial 0000 are never issued.
_SSN_RE = re.compile(r"(?<![\w\-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w\-])")


def find_ssns(text: str) -> Iterator[Match]:
    """Yield US social security numbers written AAA-GG-SSSS."""
    if "-" not in text:
        return
    for m in _SSN_RE.finditer(text):
        yield Match(m.start(), m.end(), "us_ssn", "redact.us_ssn", m.group())


# --- secrets -------------------------------------------------------------------------

_SECRET_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # A key block without its END line is still a key: redact to the end of the text.
    (
        "private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?"
            r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)"
        ),
    ),
    ("jwt", re.compile(r"(?<![\w\-])eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*")),
    ("openai_key", re.compile(r"(?<![\w\-])sk-[A-Za-z0-9_\-]{20,}")),
    (
        "github_token",
        re.compile(r"(?<![\w\-])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    ),
    ("aws_access_key", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])")),
    ("slack_token", re.compile(r"(?<![\w\-])xox[baprs]-[A-Za-z0-9\-]{10,}")),
)
# Only the token after "Bearer" is redacted, so the reply can still talk about the header.
# It must hold a digit: "bearer responsibilities" is prose, not a credential.
_BEARER_RE = re.compile(r"(?i:\bbearer)[ \t]+([A-Za-z0-9\-._~+/]{12,}=*)")


# Every rule above needs one of these literals: one scan rules all of them out at once.
_SECRET_HINT_RE = re.compile(
    r"-----BEGIN |eyJ|sk-|gh[pousr]_|github_pat_|AKIA|ASIA|xox[baprs]-|(?i:bearer)"
)


def find_secrets(text: str) -> Iterator[Match]:
    """Yield API keys, tokens, JWTs and private key blocks."""
    if not _SECRET_HINT_RE.search(text):
        return
    for name, pattern in _SECRET_RULES:
        for m in pattern.finditer(text):
            yield Match(m.start(), m.end(), "secret", f"redact.secret.{name}", m.group())
    for m in _BEARER_RE.finditer(text):
        token = m.group(1)
        if any(ch.isdigit() for ch in token):
            yield Match(m.start(1), m.end(1), "secret", "redact.secret.bearer", token)


# Among secrets, a named key format beats the generic "Bearer <token>" over the same span.
_RULE_RANK: dict[str, int] = {f"redact.secret.{n}": i for i, (n, _) in enumerate(_SECRET_RULES)}
_RULE_RANK["redact.secret.bearer"] = len(_SECRET_RULES)

Detector = Callable[[str], Iterator[Match]]


def detectors(entities: frozenset[str], phone_regions: Sequence[str]) -> tuple[Detector, ...]:
    """Return the detector functions for ``entities`` in a fixed order."""
    table: dict[str, Detector] = {
        "email": find_emails,
        "phone": partial(find_phones, regions=tuple(phone_regions)),
        "credit_card": find_cards,
        "iban": find_ibans,
        "ip": find_ips,
        "us_ssn": find_ssns,
        "secret": find_secrets,
    }
    return tuple(table[e] for e in PRIORITY if e in entities)


def resolve(matches: Sequence[Match]) -> list[Match]:
    """Pick non-overlapping matches: longest first, then most specific, then leftmost."""
    ordered = sorted(
        matches,
        key=lambda m: (-(m.end - m.start), PRIORITY[m.entity], _RULE_RANK.get(m.rule, 0), m.start),
    )
    chosen: list[Match] = []
    for m in ordered:
        if all(m.end <= c.start or m.start >= c.end for c in chosen):
            chosen.append(m)
    chosen.sort(key=lambda m: m.start)
    return chosen
