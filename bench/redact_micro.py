"""Micro-benchmark of ``Redactor.redact`` and ``PlaceholderMap.reapply``: before/after.

Run: ``.venv/bin/python bench/redact_micro.py``. "before" swaps the phone detector for the
original one (a full ``PhoneNumberMatcher`` pass per region over the whole text) and
rebuilds context with ``redact``; "after" is the current code. The last table rebuilds
a context with round 4's regex alternation (compiled afresh, or from ``re``'s cache)
and with the current ``PlaceholderMap.reapply``.
"""

from __future__ import annotations

import re
import sys
import timeit
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import phonenumbers

from policies import ENTITIES, PlaceholderMap, Redactor, restore_text
from policies.detect import _PHONE_HINT_RE, DEFAULT_PHONE_REGIONS, Match


def old_find_phones(text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> Iterator[Match]:
    if not _PHONE_HINT_RE.search(text):
        return
    seen: set[tuple[int, int]] = set()
    for region in regions:
        for pm in phonenumbers.PhoneNumberMatcher(
            text, region, leniency=phonenumbers.Leniency.VALID
        ):
            if (pm.start, pm.end) in seen:
                continue
            seen.add((pm.start, pm.end))
            key = phonenumbers.format_number(pm.number, phonenumbers.PhoneNumberFormat.E164)
            yield Match(pm.start, pm.end, "phone", "redact.phone", key)


_FILLER = "The quick brown fox jumps over the lazy dog while we discuss the plan. "
MESSAGES = {
    "plain text": "Hello, could you help me plan a trip to Lisbon next spring? Thanks!",
    "one email": "Please write to jane.doe@example.com about my booking.",
    "one phone": "You can call me at +1 415 555 2671 after five.",
    "long 4000 chars, 3 PII": (
        _FILLER * 18
        + "mail jane.doe@example.com, phone (415) 555-2671, card 4111 1111 1111 1111. "
        + _FILLER * 37
    )[:4000],
    "many digits, no phone": (
        "Order 12345678 shipped 2024-01-05 12:30, total $1234.56, ref 98765432, "
        "version 1.2.3.4, qty 250, SKU 4400-1200-77, invoice 2023/11/07."
    ),
}


def per_call_us(fn: partial[object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    after = Redactor(ENTITIES)
    before = Redactor(ENTITIES)
    before._phones = False  # the current phone search off, the original one in its place
    before._detectors = (*after._detectors, partial(old_find_phones, regions=before.phone_regions))
    print(f"{'message':<26}{'chars':>6}{'before µs':>11}{'after µs':>10}{'speed-up':>10}")
    for name, text in MESSAGES.items():
        assert (
            before.redact(text, PlaceholderMap()).text == after.redact(text, PlaceholderMap()).text
        )
        b = per_call_us(partial(before.redact, text, PlaceholderMap()), 200)
        a = per_call_us(partial(after.redact, text, PlaceholderMap()), 200)
        print(f"{name:<26}{len(text):>6}{b:>11.1f}{a:>10.1f}{b / a:>9.1f}x")

    # Context rebuild on resume: 20 stored messages (restored text), re-redacted vs reapplied.
    mapping = PlaceholderMap()
    stored = [
        restore_text(after.redact(t, mapping).text, mapping) for t in list(MESSAGES.values()) * 4
    ]
    redacted = [after.redact(t, mapping).text for t in stored]
    assert [mapping.reapply(t) for t in stored] == redacted

    def rebuild_before() -> None:
        for t in stored:
            before.redact(t, mapping)

    def rebuild_after() -> None:
        for t in stored:
            mapping.reapply(t)

    b = per_call_us(partial(rebuild_before), 20)
    a = per_call_us(partial(rebuild_after), 20)
    print(f"{'context rebuild, 20 msgs':<26}{'':>6}{b:>11.1f}{a:>10.1f}{b / a:>9.1f}x")
    reapply_table()


def regex_reapply(mapping: PlaceholderMap, texts: list[str], cold: bool) -> None:
    """Round 4's reapply: one alternation of every spelling, longest first."""
    spellings: dict[str, str] = {}
    for (_, key), placeholder in mapping._by_key.items():
        spellings.setdefault(mapping.value_of(placeholder) or "", placeholder)
        spellings.setdefault(key, placeholder)
    if cold:
        re.purge()  # what a cache holding other conversations' patterns leaves
    ordered = sorted(spellings, key=lambda v: (-len(v), v))
    pattern = re.compile("|".join(re.escape(v) for v in ordered))
    for t in texts:
        pattern.sub(lambda m: spellings[m.group()], t)


def reapply_all(mapping: PlaceholderMap, texts: list[str]) -> None:
    for t in texts:
        mapping.reapply(t)


def reapply_table() -> None:
    """Rebuilding a 20-message context for a conversation holding k values."""
    print(
        f"\n{'reapply, 20 msgs, k values':<26}{'regex cold':>11}{'regex warm':>11}{'find':>10}  µs"
    )
    for k in (1, 3, 10, 30, 100):
        mapping = PlaceholderMap()
        for i in range(k):
            mapping.placeholder_for("email", f"user{i}@example.com", f"User{i}@Example.com")
        texts = [MESSAGES["one email"].replace("jane.doe", "User0") + f" #{n}" for n in range(20)]
        cold = per_call_us(partial(regex_reapply, mapping, texts, True), 20)
        warm = per_call_us(partial(regex_reapply, mapping, texts, False), 20)
        now = per_call_us(partial(reapply_all, mapping, texts), 20)
        print(f"{'k = ' + str(k):<26}{cold:>11.1f}{warm:>11.1f}{now:>10.1f}")


if __name__ == "__main__":
    main()
