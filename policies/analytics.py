"""Coarse, non-identifying analytics fields: all that is kept from the browser.

The user agent is reduced to a browser family, its major version and a device
class; the referrer to its origin; the page URL to its path. Query strings and
fragments (where tokens, e-mails and campaign ids live) are always dropped, and path
segments that do not read like a page name, or that identify someone, become ``:id``.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import unicodedata
from urllib.parse import unquote, urlsplit

MAX_PATH_CHARS = 512
_DEFAULT_PORTS = {"http": 80, "https": 443}

_BOT_RE = re.compile(
    r"bot\b|bot/|crawl|spider|slurp|headless|lighthouse|curl/|wget/|python-|java/|go-http|"
    r"okhttp|axios/|node-fetch|httpclient|facebookexternalhit|preview",
    re.IGNORECASE,
)
# Order matters: Edge and Opera also say "Chrome", Chrome also says "Safari".
_BROWSERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("edge", re.compile(r"\b(?:Edg|EdgA|EdgiOS|Edge)/(\d+)")),
    ("opera", re.compile(r"\b(?:OPR|OPiOS|OPT)/(\d+)|\bOpera[/ ](\d+)")),
    ("firefox", re.compile(r"\b(?:Firefox|FxiOS)/(\d+)")),
    ("other", re.compile(r"\b(?:SamsungBrowser|UCBrowser|YaBrowser|Vivaldi|Brave)/(\d+)")),
    ("chrome", re.compile(r"\b(?:Chrome|CriOS|HeadlessChrome|Chromium)/(\d+)")),
    ("safari", re.compile(r"\bVersion/(\d+)[\d.]* (?:Mobile/\w+ )?Safari/")),
)
_TABLET_RE = re.compile(r"iPad|Tablet|PlayBook|Kindle|Silk/|Nexus (?:7|9|10)\b", re.IGNORECASE)
_MOBILE_RE = re.compile(r"Mobi|iPhone|iPod|Windows Phone|BlackBerry", re.IGNORECASE)
_DESKTOP_RE = re.compile(r"Windows NT|Macintosh|Mac OS X|X11|Linux|CrOS", re.IGNORECASE)


def coarse_client(user_agent: str | None) -> dict[str, str | int | None]:
    """Return browser_family, browser_major and device_class from a User-Agent."""
    ua = (user_agent or "")[:1024]  # bounded: a huge header must not cost regex time
    family, major = "other", None
    for name, pattern in _BROWSERS:
        m = pattern.search(ua)
        if m:
            digits = next((g for g in m.groups() if g), None)
            family = name
            major = int(digits) if digits and len(digits) <= 4 else None
            break
    if not ua.strip():
        device = "other"
    elif _BOT_RE.search(ua):
        device = "bot"
    elif _TABLET_RE.search(ua) or ("Android" in ua and "Mobile" not in ua):
        # Android tablets are Android without "Mobile"; Android phones always say Mobile.
        device = "tablet"
    elif _MOBILE_RE.search(ua) or "Android" in ua:
        device = "mobile"
    elif _DESKTOP_RE.search(ua):
        device = "desktop"
    else:
        device = "other"
    return {"browser_family": family, "browser_major": major, "device_class": device}


def referrer_origin(url: str | None) -> str | None:
    """Return scheme://host[:port] of an http(s) referrer, else None."""
    if not url or not isinstance(url, str) or len(url) > 4096:
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


# A path segment is kept only if it reads like a page name: letters, digits and
# "-", "_", ".", "~". Anything else (spaces, "@", ":", "=", "+", ",", "%" left after
# decoding once, ...) is how e-mails, IPv6 addresses, key=value pairs, free text and
# re-encoded values ride along, so such a segment becomes ``:id`` whole.
_READABLE_SEGMENT_RE = re.compile(r"[\w.~-]+")
# Within a readable segment, one that still names someone or something of theirs: a
# run of 5+ digits (order, phone, account numbers), a hex or UUID id.
_IDENTIFYING_SEGMENT_RE = re.compile(r"\d{5}|^(?=.*\d)[0-9A-Fa-f-]{16,}$")
# how numbers are written in groups: "123-45-6789", "4111 1111 …", "(415) 555-2671"
_DIGIT_GROUP_SEPARATORS_RE = re.compile(r"(?<=\d)[\s().\-/]{1,3}(?=\d)")
_TOKEN_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]{16,}")
# a signed token's parts are joined by dots (a JWT: header.payload.signature)
_TOKEN_PART_SEPARATORS_RE = re.compile(r"[.~]")
ID_SEGMENT = ":id"


def _char_class(c: str) -> int:
    return 0 if c.isdigit() else 1 if c.isupper() else 2


def _looks_opaque(segment: str) -> bool:
    """A reset or login token (base64url, mixed case and digits), not a readable slug.

    Words, even run together in camel case, change between upper case, lower case and
    digits every six characters or so; a random base64url token at five in eight. A
    segment with digits and both cases counts at one change in three: a 32-character
    token passes unnoticed once in 200, a 43-character one once in 1,400; a product
    slug like ``Galaxy-S24-Ultra`` is hidden too, which loses a page name, not a person.
    """
    if not _TOKEN_SEGMENT_RE.fullmatch(segment):
        return False
    chars = segment.replace("-", "").replace("_", "")
    changes = sum(_char_class(a) != _char_class(b) for a, b in itertools.pairwise(chars))
    if changes * 2 >= len(chars):
        return True
    mixed = (
        any(c.isdigit() for c in chars)
        and any(c.isupper() for c in chars)
        and any(c.islower() for c in chars)
    )
    return mixed and changes * 3 >= len(chars)


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _coarse_segment(segment: str) -> str:
    """The segment decoded and NFKC-normalised if it reads like a page name, else ``:id``.

    Matrix parameters (``;jsessionid=…``) are dropped first. One decoding is enough: a
    value encoded twice still holds a ``%`` and is not readable. NFKC turns look-alikes
    (full-width letters, the full-width at sign U+FF20) into the characters checked here.
    """
    text = unicodedata.normalize("NFKC", unquote(segment.split(";", 1)[0]))
    if not text:
        return text
    if (
        not _READABLE_SEGMENT_RE.fullmatch(text)
        or _IDENTIFYING_SEGMENT_RE.search(text)
        or _IDENTIFYING_SEGMENT_RE.search(_DIGIT_GROUP_SEPARATORS_RE.sub("", text))
        or _is_ip_address(text)
        or any(_looks_opaque(part) for part in _TOKEN_PART_SEPARATORS_RE.split(text))
    ):
        return ID_SEGMENT
    return text


def page_path(url_or_path: str | None) -> str | None:
    """Return only the path of a page URL or path (no query/fragment/matrix parameters,
    max 512 chars), with each segment that is not a readable page name (an e-mail, an
    IP address, free text) or that identifies someone (a long number, an id, a token)
    replaced by ``:id``: paths like ``/account/jane@example.org`` or ``/reset/<token>``
    are kept in daily aggregates for good."""
    if not url_or_path or not isinstance(url_or_path, str):
        return None
    text = url_or_path.strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if parts.scheme:
        if parts.scheme.lower() not in _DEFAULT_PORTS:
            return None
        path = parts.path or "/"
    elif text.startswith("//"):
        path = parts.path or "/"  # scheme-relative URL: the netloc is not a path
    elif text.startswith("/"):
        path = parts.path
    else:
        return None
    return "/".join(_coarse_segment(seg) for seg in path.split("/"))[:MAX_PATH_CHARS]
