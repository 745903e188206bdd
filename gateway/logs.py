"""Structured logs: one JSON object per line, scrubbed of IPs, tokens and visitor text.

Every line carries ``time`` (ISO 8601 UTC), ``level``, ``logger`` and ``event``
(the message), plus the ``extra=`` fields on :data:`ALLOWED_EXTRAS` and
``exc`` for a traceback. Pass context with ``extra``::

    log.info("message_done", extra={"request_id": rid, "outcome": "answered",
                                    "duration_ms": 12.5})

The last step before a line is serialised runs every string in it (event,
exception message, traceback, extras) through :func:`scrub`: IP addresses are
anonymized (IPv4 /24, IPv6 /48, IPv4-mapped unwrapped first), opaque tokens,
emails and long digit runs are replaced by ``[token]``, ``[email]`` and
``[number]``. Credential and client-address headers (``Cookie``,
``Authorization``, ``X-Forwarded-For``...) lose their whole value, and the
session cookie ``omnigate_session=`` its value, wherever they appear. Canonical
UUIDs (request and tenant ids) are kept: session tokens and keys are never UUIDs.

aiohttp's own error records (a malformed request, a failing handler) can quote
the raw request, headers included, in their exception text. Those records are
reduced to a fixed event and the exception's type in ``error``: by the filter
:func:`setup_logging` installs on aiohttp's loggers (so no handler sees the
text) and again by the formatter.

Message text cannot be recognised by pattern, so the gateway never passes it
to a logger; as a second line of defence it wraps a visitor's message
processing in :func:`log_secrets`, and any log line written by that task
replaces those strings with ``[text]``, even inside an exception's message or
traceback. The secrets live in a contextvar: they apply to the current task
(and tasks it creates afterwards), not to executor threads, and formatting
must stay synchronous in the logging call (no QueueHandler).
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

#: ``extra=`` keys that reach the log line; anything else is dropped.
ALLOWED_EXTRAS = (
    "request_id",
    "tenant_id",
    "outcome",
    "duration_ms",
    "stage",
    "code",
    "kind",
    "route",
    "status",
    "worker",
    "count",
    "reason",
    "version",
    "session_ref",
    "error",  # an exception class name or a fixed code, checked when rendered
    "connections",
    "outage_seconds",
    # a retention pass's counts (gateway/retention.py KINDS)
    "messages_deleted",
    "conversations_anonymized",
    "redaction_maps_cleared",
    "sessions_deleted",
    "session_ips_cleared",
    "analytics_events_aggregated",
    "subjects_deleted",
    "redaction_entries_pruned",
)
_MAX_EXTRA_CHARS = 200
# What an ``error`` extra may hold: an exception class name or a fixed code.
_ERROR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")
_MIN_SECRET_CHARS = 4

# --- scrubbing -----------------------------------------------------------------

_HEX = "[0-9A-Fa-f]"
_OPAQUE_CHARS = "A-Za-z0-9_-"
# Headers whose whole value is a credential or a client address.
_CREDENTIAL_HEADERS = "cookie|set-cookie|proxy-authorization|authorization"
_ADDRESS_HEADERS = "x-forwarded-for|x-real-ip|forwarded"
# A header name starts a word, or follows an escaped line break or byte as in
# the ``repr`` of raw request bytes (``b'...\r\nCookie: ...'``).
_HEADER_START = r"(?:(?<![\w-])|(?<=\\[nrt])|(?<=\\x[0-9A-Fa-f]{2}))"
# An address starts a word, or follows '_' (client_198.51.100.7) or a percent-escape
# (ip%3D198.51.100.7); an IPv4 address may follow any colon (src:198.51.100.7), an IPv6
# one only a label's colon after a letter no address has (peer:2001:db8::1).
_IPV4_START = r"(?:(?<![\w.])|(?<=_)|(?<=%[0-9A-Fa-f]{2}))"
_IPV6_START = r"(?:(?<![\w:.])|(?<=_)|(?<=%[0-9A-Fa-f]{2})|(?<=[G-Zg-z_]:))"
# One pass, alternatives in priority order; at each position the first that
# matches wins, so e.g. an IPv4 address is never mistaken for a digit run.
_SCRUB_RE = re.compile(
    rf"""
    # 'Cookie': '...' as in a dict's repr: the value ends at the closing quote
    (?P<header_q>{_HEADER_START}(?i:{_CREDENTIAL_HEADERS}|{_ADDRESS_HEADERS})
        (?P<quote>["'])[\ \t]*:[\ \t]*(?P=quote))
      (?P<header_q_value>(?:\\.|(?!(?P=quote))[^\r\n\\])*)
    # Cookie: ... as on the wire: the value ends at a (possibly escaped) line break
    | (?P<header>{_HEADER_START}(?i:{_CREDENTIAL_HEADERS}|{_ADDRESS_HEADERS})[\ \t]*:[\ \t]*)
      (?P<header_value>(?:[^\r\n\\]|\\[^rn\r\n])*)
    | (?P<uuid>(?<![\w-]){_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}(?![\w-]))
    | (?P<kv>\b(?:omnigate_session|session_token|access_token|refresh_token|api_key
                  |admin_key|password|secret|token)
          ["']?\s*[:=]\s*["']?)
      (?P<kv_value>[^\s"',;&)}}\]]+)
    | (?P<scheme>\b(?:[Bb]earer|BEARER|Basic))\s+[A-Za-z0-9._~+/=-]{{6,}}
    | (?P<session>\bSession\s+)(?P<session_value>[A-Za-z0-9._~+/=-]{{16,}})
    | (?P<sk>(?<![\w-])sk-[{_OPAQUE_CHARS}]{{8,}})
    | (?P<email>[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{{2,}})
    | (?P<ipv6>{_IPV6_START}(?:{_HEX}{{1,4}}:|:(?=:[Ff]{{4}}:))(?:{_HEX}{{0,4}}:){{1,6}}
          (?:{_HEX}{{1,4}}|(?:\d{{1,3}}\.){{3}}\d{{1,3}})?(?:%[0-9A-Za-z]+)?(?![\w:]|\.\d))
    | (?P<ipv4>{_IPV4_START}(?:\d{{1,3}}\.){{3}}\d{{1,3}}(?![0-9A-Za-z]|\.\d))
    | (?P<number>(?<!\w)(?:\+?\d(?:[\ ()-]{{0,2}}\d){{8,}}|\d{{3}}\.\d{{3}}\.\d{{4}})(?!\w))
    | (?P<opaque>(?<![{_OPAQUE_CHARS}])[{_OPAQUE_CHARS}]{{20,}}(?![{_OPAQUE_CHARS}]))
    """,
    re.VERBOSE,
)
# Words of an identifier: camelCase/PascalCase humps, ACRONYMS, digit runs.
_WORD_RE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_HEX_RUN_RE = re.compile(rf"{_HEX}{{20,}}")
_DIGIT_RUN_RE = re.compile(r"\d{9,}")
_VOWELS = frozenset("aeiouAEIOU")
# An auth scheme (``Bearer``, ``Session``) is kept; its credentials are not.
_AUTH_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*[ \t]+(?=\S)")


def _anonymize_ip(text: str, unreadable: str | None = None) -> str:
    """Return the /24 (IPv4) or /48 (IPv6) network address; if not an IP, ``unreadable``
    or else ``text``."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text if unreadable is None else unreadable
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def _looks_random(candidate: str) -> bool:
    """Tell an opaque token from a long identifier such as ``ConnectionRefusedError``.

    Identifiers are made of words averaging 4+ characters with English vowel
    rates; random base64url or hex breaks into 1-2 character case/digit runs
    with few vowels. Measured on ~24k identifiers from Python sources against
    22-character urlsafe tokens: ~1.7% of identifiers redacted, ~0.06% of
    tokens missed (fewer for longer tokens).
    """
    if _HEX_RUN_RE.fullmatch(candidate) and any(c.isdigit() for c in candidate):
        return True
    words = _WORD_RE.findall(candidate)
    if not words:
        return False
    avg_word = sum(len(w) for w in words) / len(words)
    if avg_word < 3.2:
        return True
    letters = [c for c in candidate if c.isalpha()]
    vowel_rate = sum(c in _VOWELS for c in letters) / max(1, len(letters))
    return avg_word < 6.0 and vowel_rate < 0.25


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    text = match.group()
    if kind in ("header_value", "header_q_value"):
        return _replace_header(match, kind)
    if kind == "uuid":
        return text
    if kind == "kv_value":
        return match.group("kv") + "[token]"
    if kind == "scheme":
        return match.group("scheme") + " [token]"
    if kind == "session_value":
        value = match.group("session_value")
        if _looks_random(value) or any(c.isdigit() for c in value):
            return match.group("session") + "[token]"
        return text
    if kind == "sk":
        return "[token]"
    if kind == "email":
        return "[email]"
    if kind == "ipv4":
        # a dotted quad ipaddress will not read (leading zeros, 300.1.2.3) is hidden whole
        return _anonymize_ip(text, unreadable="[ip]")
    if kind == "ipv6":
        return _anonymize_ip(text)
    if kind == "number":
        return "[number]"
    # opaque candidate
    if _looks_random(text):
        return "[token]"
    return _DIGIT_RUN_RE.sub("[number]", text)


def _replace_header(match: re.Match[str], kind: str) -> str:
    """Mask a sensitive header's whole value (keeping an Authorization scheme)."""
    name = match.group("header" if kind == "header_value" else "header_q")
    value = match.group(kind)
    if not value.strip():
        return match.group()
    lowered = name.lower()
    if "authorization" in lowered:
        scheme = _AUTH_SCHEME_RE.match(value)
        return name + (scheme.group() if scheme else "") + "[token]"
    return name + ("[token]" if "cookie" in lowered else "[ip]")


def scrub(text: str) -> str:
    """Anonymize IPs and remove registered secrets, tokens, emails and long numbers."""
    secrets = _SECRETS.get()
    if secrets:
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, "[text]")
    return _SCRUB_RE.sub(_replace, text)


# --- per-task secrets ------------------------------------------------------------

_SECRETS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "omnigate_log_secrets", default=()
)


def _with_variants(current: tuple[str, ...], values: tuple[str, ...]) -> tuple[str, ...]:
    """Add each value and its ``repr`` form (as in ``f"{text!r}"``), longest first."""
    found = set(current)
    for value in values:
        if isinstance(value, str) and len(value) >= _MIN_SECRET_CHARS:
            found.add(value)
            found.add(repr(value)[1:-1])
    return tuple(sorted(found, key=len, reverse=True))


@contextmanager
def log_secrets(*values: str) -> Iterator[None]:
    """Within the block, redact these strings (e.g. a visitor's message) from log lines."""
    token = _SECRETS.set(_with_variants(_SECRETS.get(), values))
    try:
        yield
    finally:
        _SECRETS.reset(token)


# --- formatting ------------------------------------------------------------------


def _extra_value(value: Any) -> Any:
    """Keep JSON scalars (floats rounded so they are not digit runs); stringify the rest."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return round(value, 3)
    return str(value)[:_MAX_EXTRA_CHARS]


def _error_value(value: Any) -> str:
    """An exception's class name or a fixed code; anything else (``str(exc)``) is withheld."""
    if isinstance(value, BaseException):
        return type(value).__name__
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, str) and _ERROR_NAME_RE.fullmatch(value):
        return value
    return "[withheld]"


# --- aiohttp's records -------------------------------------------------------------

#: Every logger aiohttp writes to. Its error records can quote the raw request:
#: a malformed header line (``Cookie: omnigate_session=...``) in a parser
#: exception, a request's repr in a handler's traceback.
AIOHTTP_LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)
AIOHTTP_EVENT = "aiohttp error (details withheld: they can quote the request)"


def _from_aiohttp(record: logging.LogRecord) -> bool:
    return record.name == "aiohttp" or record.name.startswith("aiohttp.")


def _is_error(record: logging.LogRecord) -> bool:
    return bool(record.exc_info or record.exc_text) or record.levelno >= logging.WARNING


def _withhold_request_text(record: logging.LogRecord) -> None:
    """Reduce ``record`` to a fixed event and its exception's type, in place."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        record.error = type(exc).__name__
    record.msg = AIOHTTP_EVENT
    record.args = ()
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None


class AiohttpErrorFilter(logging.Filter):
    """On aiohttp's loggers: error records lose their message and traceback text.

    A logger's filters run before any handler, so neither our handler nor one
    added by a library or a test sees the request text. Nothing is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Withhold an error record's text; always keep the record."""
        if _is_error(record):
            _withhold_request_text(record)
        return True


class JsonFormatter(logging.Formatter):
    """Render a record as one scrubbed JSON line; never raises."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the JSON line for ``record`` (a minimal line if rendering fails)."""
        try:
            return self._render(record)
        except Exception:
            # Nothing from the record but fixed fields: they cannot leak.
            fallback = {
                "time": _iso(record.created),
                "level": str(getattr(record, "levelname", "ERROR")),
                "logger": scrub(str(getattr(record, "name", "?"))),
                "event": "log_render_failed",
            }
            return orjson.dumps(fallback).decode()

    def _render(self, record: logging.LogRecord) -> str:
        if _from_aiohttp(record) and _is_error(record):
            # the filter missing (setup_logging not called): withhold on a copy
            record = logging.makeLogRecord(record.__dict__)
            _withhold_request_text(record)
        payload: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        attrs = record.__dict__
        for key in ALLOWED_EXTRAS:
            if key in attrs:
                value = attrs[key]
                payload[key] = _error_value(value) if key == "error" else _extra_value(value)
        # Not cached on record.exc_text: another handler must not see it unscrubbed.
        exc: list[str] = []
        if record.exc_info:
            exc.append("".join(traceback.format_exception(*record.exc_info)).rstrip())
        elif record.exc_text:
            exc.append(record.exc_text)
        if record.stack_info:
            exc.append(record.stack_info)
        if exc:
            payload["exc"] = "\n".join(exc)
        # Last step: every string in the line goes through the scrubber.
        for key, value in payload.items():
            if isinstance(value, str):
                payload[key] = scrub(value)
        return orjson.dumps(payload).decode()


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class _JsonStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """StreamHandler whose errors stay silent.

    The stock ``handleError`` prints the record's raw message and arguments to
    stderr, which would bypass the scrubber.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        """Drop the line rather than print an unscrubbed record."""


def make_handler(stream: TextIO | None = None) -> logging.Handler:
    """Build a handler writing scrubbed JSON lines to ``stream`` (stderr by default)."""
    handler = _JsonStreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    return handler


def install_aiohttp_filter() -> None:
    """Put :class:`AiohttpErrorFilter` on each of aiohttp's loggers (idempotent)."""
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, AiohttpErrorFilter) for f in logger.filters):
            logger.addFilter(AiohttpErrorFilter())


def setup_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Configure the root logger with one JSON-lines handler on stderr (idempotent)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _JsonStreamHandler):
            root.removeHandler(old)
    root.addHandler(make_handler(stream))
    root.setLevel(level.upper() if isinstance(level, str) else level)
    install_aiohttp_filter()
    # warnings (an unclosed socket names its peer's address) go through the scrubber too
    logging.captureWarnings(True)
    logging.raiseExceptions = False
