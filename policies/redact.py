"""PII redaction with conversation-stable placeholders, and streaming restore.

Placeholders look like ``<EMAIL_1>``; the same value (in canonical form: e-mail
lower-cased, phone as E.164, card/IBAN without spaces) keeps its number for the
whole conversation because the ``PlaceholderMap`` is stored with it.

Visitor-typed placeholders. A visitor may type ``<EMAIL_1>`` themselves. Such
tokens are forwarded unchanged, but the map's counters skip past their numbers,
so a placeholder the map issues later never equals a token the visitor typed and
that token is never restored. A typed token whose number was already issued for
this conversation can be restored, but only to a value this same visitor sent in
this conversation (the map is per conversation), so nothing of anyone else's can
leak. Restoring maps only placeholders the map issued; others pass through.

Redaction fails closed: nothing here catches exceptions; if detection fails the
caller gets the exception and must not forward the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .detect import (
    DEFAULT_PHONE_REGIONS,
    Match,
    PhoneWindow,
    detectors,
    digit_count,
    find_phones,
    phone_cost,
    phone_windows,
    resolve,
)
from .schema import ENTITIES

PLACEHOLDER_NAMES: dict[str, str] = {e: e.upper() for e in ENTITIES}
_ENTITY_BY_NAME = {v: k for k, v in PLACEHOLDER_NAMES.items()}
MAX_COUNTER = 999_999_999
# Any placeholder-shaped token; only ones the map issued are ever replaced.
_NAMES_ALT = "|".join(sorted(PLACEHOLDER_NAMES.values(), key=len, reverse=True))
PLACEHOLDER_RE = re.compile(r"<(" + _NAMES_ALT + r")_([1-9]\d{0,8})>")
_MAP_FORMAT = 1


class Remark(NamedTuple):
    """Why a span of the ORIGINAL text was replaced; never holds the value."""

    entity: str
    rule: str
    start: int
    end: int


@dataclass(frozen=True)
class RedactionResult:
    """Redacted text plus per-entity counts and one remark per replacement."""

    text: str
    counts: dict[str, int]
    remarks: tuple[Remark, ...]


class PlaceholderMap:
    """Per-conversation value <-> placeholder table with per-entity counters."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], str] = {}
        self._values: dict[str, str] = {}
        self._counters: dict[str, int] = {}
        # Built by ``reapply`` on first use; dropped whenever a placeholder is issued.
        self._spellings: dict[str, str] | None = None

    @property
    def is_empty(self) -> bool:
        """True when no placeholder was issued yet."""
        return not self._values

    def __len__(self) -> int:
        return len(self._values)

    def placeholder_for(self, entity: str, key: str, value: str) -> str:
        """Return the placeholder of ``key`` (canonical form), issuing one if new."""
        existing = self._by_key.get((entity, key))
        if existing is not None:
            return existing
        number = self._counters.get(entity, 0) + 1
        if number > MAX_COUNTER:
            raise OverflowError(f"too many {entity} placeholders in one conversation")
        self._counters[entity] = number
        placeholder = f"<{PLACEHOLDER_NAMES[entity]}_{number}>"
        self._by_key[(entity, key)] = placeholder
        self._values[placeholder] = value
        self._spellings = None
        return placeholder

    def reserve(self, entity: str, number: int) -> None:
        """Never issue ``number`` (or below) for ``entity``: the visitor typed it literally."""
        if self._counters.get(entity, 0) < number <= MAX_COUNTER:
            self._counters[entity] = number

    def value_of(self, placeholder: str) -> str | None:
        """Return the original value of an issued placeholder, else None."""
        return self._values.get(placeholder)

    def placeholders(self) -> frozenset[str]:
        """Return every placeholder issued so far."""
        return frozenset(self._values)

    def reapply(self, text: str) -> str:
        """Replace every value this map knows by its placeholder, without any detection.

        Each placeholder is matched in two spellings: the value as first seen (what
        ``restore_text`` gives back) and its canonical form (e-mail lower-cased, phone as
        E.164, card/IBAN without spaces, ...). Leftmost first, and at one position the
        longest spelling, so a value that contains another wins (what a regex
        alternation sorted longest first does, without compiling one: ``re`` compiles
        in Python, 0.15-5 ms for 1-100 values, and would keep every conversation's
        values in its module cache). Matching is literal and ignores word boundaries:
        a known value inside a longer token is replaced too (over-redaction, the safe
        side).

        Values the map never saw are NOT redacted. That is fine only because ``reapply``
        is meant for text that already went through ``Redactor.redact`` with this map
        (stored user text, restored) or that the model produced from redacted input
        (assistant text whose placeholders were restored): every value in it was issued
        a placeholder. Use ``Redactor.redact`` for anything new.
        """
        if not self._values or not text:
            return text
        spellings = self._spellings
        if spellings is None:
            spellings = {}
            for placeholder, value in self._values.items():
                spellings.setdefault(value, placeholder)
            for (_, key), placeholder in self._by_key.items():
                spellings.setdefault(key, placeholder)
            spellings.pop("", None)
            self._spellings = spellings
        # every occurrence of every spelling present: (start, -length, placeholder)
        hits: list[tuple[int, int, str]] = []
        for spelling, placeholder in spellings.items():
            at = text.find(spelling)
            while at >= 0:
                hits.append((at, -len(spelling), placeholder))
                at = text.find(spelling, at + 1)
        if not hits:
            return text
        hits.sort()
        parts: list[str] = []
        pos = 0
        for start, neg_len, placeholder in hits:
            if start >= pos:  # else it overlaps what was just replaced
                parts.append(text[pos:start])
                parts.append(placeholder)
                pos = start - neg_len
        parts.append(text[pos:])
        return "".join(parts)

    def retain_seen_in(self, texts: Iterable[str]) -> int:
        """Drop the entries no text contains in either spelling; return how many went.

        For retention: once the messages that held a value are deleted, the map need
        not keep it. An entry stays while any remaining text holds its value or its
        canonical form, exactly the spellings ``reapply`` replaces, so the texts left
        are redacted again as before. The counters stay: a number once issued is
        never issued again, to this value or another.

        One search per spelling over the texts joined by NUL: a spelling holding a NUL
        could match across two texts and keep its entry, the safe side.
        """
        joined = "\0".join(texts)
        drop = [
            (entity_key, placeholder)
            for entity_key, placeholder in self._by_key.items()
            if self._values[placeholder] not in joined
            and not (entity_key[1] and entity_key[1] in joined)
        ]
        for entity_key, placeholder in drop:
            del self._by_key[entity_key]
            del self._values[placeholder]
        if drop:
            self._spellings = None
        return len(drop)

    def entries_in(self, text: str) -> list[tuple[str, str, str]]:
        """The (entity, canonical key, value) of every issued placeholder in ``text``."""
        wanted = {m.group(0) for m in PLACEHOLDER_RE.finditer(text)} & self._values.keys()
        return [
            (entity, key, self._values[placeholder])
            for (entity, key), placeholder in self._by_key.items()
            if placeholder in wanted
        ]

    def reissue(self, entries: Iterable[tuple[str, str, str]]) -> bool:
        """Make sure each (entity, key, value) has a placeholder; True when any was new."""
        before = len(self._values)
        for entity, key, value in entries:
            self.placeholder_for(entity, key, value)
        return len(self._values) != before

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able form for (encrypted) storage."""
        return {
            "v": _MAP_FORMAT,
            "entries": [
                [entity, key, placeholder, self._values[placeholder]]
                for (entity, key), placeholder in self._by_key.items()
            ],
            "counters": dict(sorted(self._counters.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlaceholderMap:
        """Rebuild a map from ``to_dict`` output; raise ValueError if it is malformed."""
        if not isinstance(data, Mapping) or data.get("v") != _MAP_FORMAT:
            raise ValueError("unsupported placeholder map format")
        out = cls()
        counters = data.get("counters")
        entries = data.get("entries")
        if not isinstance(counters, Mapping) or not isinstance(entries, list):
            raise ValueError("malformed placeholder map")
        for entity, n in counters.items():
            if entity not in PLACEHOLDER_NAMES or type(n) is not int or not 0 <= n <= MAX_COUNTER:
                raise ValueError("malformed placeholder map counter")
            out._counters[entity] = n
        for entry in entries:
            if not (
                isinstance(entry, list)
                and len(entry) == 4
                and all(isinstance(x, str) for x in entry)
            ):
                raise ValueError("malformed placeholder map entry")
            entity, key, placeholder, value = entry
            m = PLACEHOLDER_RE.fullmatch(placeholder)
            if (
                m is None
                or _ENTITY_BY_NAME[m.group(1)] != entity
                or int(m.group(2)) > out._counters.get(entity, 0)
                or placeholder in out._values
            ):
                raise ValueError("malformed placeholder map entry")
            out._by_key[(entity, key)] = placeholder
            out._values[placeholder] = value
        return out


class TooCostly(Exception):
    """``Redactor.find`` was given a budget this search would reach; nothing was searched."""


# Digits per matcher pass of cost, for the card detector: it checks every window of
# digit groups, about 1 ms (four passes) for 256 digits in groups of four.
_CARD_DIGITS_PER_PASS = 64


class Redactor:
    """Finds and replaces the configured PII entities; built once per policy version."""

    def __init__(
        self, entities: Iterable[str], phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS
    ) -> None:
        ents = frozenset(entities)
        unknown = ents - set(ENTITIES)
        if unknown:
            raise ValueError(f"unknown entities: {', '.join(sorted(unknown))}")
        self.entities = ents
        self.phone_regions = tuple(phone_regions)
        # phone numbers are searched apart: their windows also price the search
        self._phones = "phone" in ents
        self._cards = "credit_card" in ents
        self._detectors = detectors(ents - {"phone"}, self.phone_regions)

    def find(self, text: str, budget: int = 0) -> list[Match]:
        """Return the non-overlapping matches in ``text``, left to right.

        With a ``budget`` (in matcher passes, see ``detect.phone_cost``), raise
        ``TooCostly`` instead, before searching, when the search would cost that much:
        the caller searches elsewhere (gateway/redactpool.py). The phone windows that
        price it are the ones searched, so deciding costs no second scan.
        """
        windows = phone_windows(text, self.phone_regions) if self._phones else None
        if budget and self._cost(text, windows, budget) >= budget:
            raise TooCostly
        found: list[Match] = []
        for detect in self._detectors:
            found.extend(detect(text))
        if windows:
            found.extend(find_phones(text, self.phone_regions, windows))
        return resolve(found)

    def _cost(self, text: str, windows: list[PhoneWindow] | None, budget: int) -> int:
        cost = phone_cost(windows) if windows else 0
        # the digits are counted only when there could be enough of them to matter
        if self._cards and cost + len(text) // _CARD_DIGITS_PER_PASS >= budget:
            cost += digit_count(text) // _CARD_DIGITS_PER_PASS
        return cost

    def redact(self, text: str, mapping: PlaceholderMap) -> RedactionResult:
        """Replace every match with its placeholder, recording it in ``mapping``."""
        return self.apply(text, self.find(text), mapping)

    def apply(
        self, text: str, matches: Sequence[Match], mapping: PlaceholderMap
    ) -> RedactionResult:
        """Replace ``matches`` (what ``find`` returned for ``text``, wherever it ran)."""
        # Reserve first, so a value found in this very message cannot be issued a number
        # the visitor typed literally.
        for m in PLACEHOLDER_RE.finditer(text):
            mapping.reserve(_ENTITY_BY_NAME[m.group(1)], int(m.group(2)))
        parts: list[str] = []
        counts: dict[str, int] = {}
        remarks: list[Remark] = []
        pos = 0
        for hit in matches:
            parts.append(text[pos : hit.start])
            parts.append(mapping.placeholder_for(hit.entity, hit.key, text[hit.start : hit.end]))
            counts[hit.entity] = counts.get(hit.entity, 0) + 1
            remarks.append(Remark(hit.entity, hit.rule, hit.start, hit.end))
            pos = hit.end
        parts.append(text[pos:])
        return RedactionResult("".join(parts), counts, tuple(remarks))


def restore_text(text: str, mapping: PlaceholderMap) -> str:
    """Replace every placeholder the map issued by its value; leave others unchanged."""
    if mapping.is_empty or "<" not in text:
        return text

    def sub(m: re.Match[str]) -> str:
        value = mapping.value_of(m.group())
        return m.group() if value is None else value

    return PLACEHOLDER_RE.sub(sub, text)


class ReplyRestorer:
    """Restores placeholders in a streamed reply, whatever the chunk boundaries."""

    def __init__(self, mapping: PlaceholderMap) -> None:
        self._mapping = mapping
        # Every proper prefix ("<", "<E", ... "<EMAIL_1") of an issued placeholder: a chunk
        # ending in one of these may still become a placeholder, so it is held back.
        # Built on the first "<" only: most replies never contain one.
        self._prefixes: frozenset[str] | None = None
        self._pending = ""

    def feed(self, chunk: str) -> str:
        """Return the text that is safe to show now."""
        buffer = self._pending + chunk
        self._pending = ""
        # A placeholder has exactly one "<", at its start, so only the tail after the last
        # "<" can be an unfinished one; it is at most (longest placeholder - 1) chars.
        cut = buffer.rfind("<")
        if cut >= 0 and buffer[cut:] in self._held_prefixes():
            self._pending = buffer[cut:]
            buffer = buffer[:cut]
        return restore_text(buffer, self._mapping)

    def _held_prefixes(self) -> frozenset[str]:
        if self._prefixes is None:
            issued = self._mapping.placeholders()
            self._prefixes = frozenset(p[:i] for p in issued for i in range(1, len(p)))
        return self._prefixes

    def flush(self) -> str:
        """Return whatever was held back; call once when the reply ends."""
        rest, self._pending = self._pending, ""
        return rest
