"""Tests for gateway.logs: JSON lines, allow-listed extras, and the last-step scrubber."""

from __future__ import annotations

import contextvars
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from gateway.logs import (
    AIOHTTP_EVENT,
    AIOHTTP_LOGGERS,
    ALLOWED_EXTRAS,
    AiohttpErrorFilter,
    install_aiohttp_filter,
    log_secrets,
    make_handler,
    scrub,
    setup_logging,
)

REQUIRED_KEYS = {"time", "level", "logger", "event"}

IPV4 = "203.0.113.77"
IPV6 = "2001:db8:85a3:1234:5678:8a2e:370:7334"
MAPPED = "::ffff:198.51.100.23"
EMAIL = "jane.doe+chat@example.org"
BEARER = "Bearer adm1n-K3y.value"
URLSAFE_TOKEN = "Zk3Q9vR_x7LmP2aW-bN8cT5yHd1EfGj4"  # 32 chars, as from token_urlsafe(24)
PHONE = "+1 (415) 555-0132"
MESSAGE_TEXT = "my order never arrived, please call me"


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger whose only handler writes JSON lines into a StringIO."""
    stream = io.StringIO()
    logger = logging.getLogger("omnigate.test_logs")
    handler = make_handler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    """Parse every line written so far; each must be one JSON object."""
    out = []
    for line in stream.getvalue().splitlines():
        obj = orjson.loads(line)
        assert isinstance(obj, dict)
        out.append(obj)
    return out


def _fail_deep(text: str) -> None:
    # The literals on this line also reach the traceback's source excerpt.
    raise ValueError(f"visitor {text!r} from 203.0.113.77 via ::ffff:198.51.100.23")


def _handle(text: str) -> None:
    try:
        _fail_deep(text)
    except ValueError as exc:
        raise RuntimeError(
            f"upstream 2001:db8:85a3:1234:5678:8a2e:370:7334 said no to {EMAIL}, "
            f"auth {BEARER}, token {URLSAFE_TOKEN}, phone {PHONE}"
        ) from exc


def test_exception_message_and_traceback_are_scrubbed(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    with log_secrets(MESSAGE_TEXT):
        try:
            _handle(MESSAGE_TEXT)
        except RuntimeError:
            logger.exception("message_failed", extra={"request_id": "r-1", "outcome": "internal"})

    raw = stream.getvalue()
    (record,) = lines(stream)
    originals = (IPV4, IPV6, MAPPED, "198.51.100.23", EMAIL, "adm1n-K3y.value")
    originals += (URLSAFE_TOKEN, "555-0132", MESSAGE_TEXT)
    for original in originals:
        assert original not in raw, original
    exc = record["exc"]
    assert isinstance(exc, str)
    assert "Traceback" in exc and "_fail_deep" in exc  # the traceback survives, scrubbed
    assert "203.0.113.0" in exc
    assert "2001:db8:85a3::" in exc
    assert "198.51.100.0" in exc  # IPv4-mapped: unwrapped, then /24
    assert "[email]" in exc and "Bearer [token]" in exc and "[number]" in exc
    assert "[text]" in exc
    assert exc.count("[token]") >= 2
    assert record["request_id"] == "r-1" and record["outcome"] == "internal"


def test_every_line_is_json_with_required_keys(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.debug("one")
    logger.info("two %s", "args", extra={"duration_ms": 1.23456789, "count": 3})
    logger.warning("three\nwith a newline")
    try:
        raise KeyError("x")
    except KeyError:
        logger.error("four", exc_info=True)
    records = lines(stream)
    assert len(records) == 4
    for record in records:
        assert REQUIRED_KEYS <= record.keys()
        assert isinstance(record["time"], str) and record["time"].endswith("Z")
    assert [r["level"] for r in records] == ["DEBUG", "INFO", "WARNING", "ERROR"]
    assert records[1]["event"] == "two args"
    assert records[1]["duration_ms"] == 1.235  # rounded: never a 9-digit run
    assert "exc" in records[3] and "exc" not in records[0]


def test_extras_outside_allow_list_are_dropped(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    extra = {key: "v" for key in ALLOWED_EXTRAS}
    extra |= {"text": "hello there", "ip": IPV4, "session_token": "abc", "user": "u1"}
    logger.info("ctx", extra=extra)
    (record,) = lines(stream)
    assert set(record) == REQUIRED_KEYS | set(ALLOWED_EXTRAS)
    assert "hello there" not in stream.getvalue()


def test_error_connections_and_outage_fields_reach_the_line(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    # as gateway.retention, ratelimit, bus and server pass them
    logger, stream = capture
    logger.warning("redis unavailable", extra={"error": ConnectionRefusedError.__name__})
    logger.warning("redis reachable again", extra={"outage_seconds": round(12.345, 1)})
    logger.info("draining connections", extra={"connections": 7})
    first, second, third = lines(stream)
    assert first["error"] == "ConnectionRefusedError"
    assert second["outage_seconds"] == 12.3
    assert third["connections"] == 7


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("TimeoutError", "TimeoutError"),
        ("storage_unavailable", "storage_unavailable"),
        (OSError("connect to 203.0.113.77:5432 failed"), "OSError"),
        (KeyError, "KeyError"),
        ("Connect call failed ('203.0.113.77', 6379)", "[withheld]"),
        (f"bad token {URLSAFE_TOKEN}", "[withheld]"),
        (42, "[withheld]"),
    ],
    ids=["class-name", "code", "exception", "class", "str-exc", "text", "number"],
)
def test_error_field_holds_only_a_class_name_or_code(
    capture: tuple[logging.Logger, io.StringIO], value: object, shown: str
) -> None:
    logger, stream = capture
    logger.warning("failed", extra={"error": value})
    (record,) = lines(stream)
    assert record["error"] == shown
    assert "203.0.113" not in stream.getvalue()


class _Records(logging.Handler):
    """A plain handler, not ours: what any other handler would be given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _parse_error() -> ValueError:
    # as aiohttp's parser quotes a bad header line in its exception
    line = f"Cookie: omnigate_session={URLSAFE_TOKEN} {MESSAGE_TEXT}"
    try:
        raise ValueError(f"400, message:\n  Invalid header value char:\n\n    b{line!r}")
    except ValueError as exc:
        return exc


@pytest.fixture
def aiohttp_filter() -> Iterator[None]:
    install_aiohttp_filter()
    install_aiohttp_filter()
    yield
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, AiohttpErrorFilter)]:
            logger.removeFilter(f)


@pytest.mark.usefixtures("aiohttp_filter")
def test_aiohttp_error_records_reach_no_handler_with_request_text() -> None:
    assert all(
        sum(isinstance(f, AiohttpErrorFilter) for f in logging.getLogger(n).filters) == 1
        for n in AIOHTTP_LOGGERS
    )
    logger = logging.getLogger("aiohttp.server")
    plain = _Records()
    logger.addHandler(plain)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        logger.error("Error handling request from %s", IPV4, exc_info=_parse_error())
        logger.debug("Ignored premature client disconnection")
    finally:
        logger.removeHandler(plain)
        logger.setLevel(level)
    failed, debug = plain.records
    assert failed.getMessage() == AIOHTTP_EVENT
    assert failed.exc_info is None and failed.exc_text is None and failed.args == ()
    assert failed.__dict__["error"] == "ValueError"
    assert debug.getMessage() == "Ignored premature client disconnection"  # not an error


@pytest.mark.parametrize("name", ["aiohttp.server", "aiohttp.web", "aiohttp.access"])
def test_formatter_withholds_aiohttp_error_text_without_the_filter(name: str) -> None:
    stream = io.StringIO()
    logger = logging.getLogger(name)
    handler = make_handler(stream)
    logger.addHandler(handler)
    try:
        logger.error("Error handling request from %s", IPV4, exc_info=_parse_error())
        logger.warning(f"Web-handler returned {MESSAGE_TEXT!r}")
    finally:
        logger.removeHandler(handler)
    raw = stream.getvalue()
    assert URLSAFE_TOKEN not in raw and MESSAGE_TEXT not in raw and IPV4 not in raw
    failed, warned = lines(stream)
    assert failed["event"] == warned["event"] == AIOHTTP_EVENT
    assert failed["error"] == "ValueError" and "exc" not in failed
    assert failed["logger"] == name


SCRUB_CASES = [
    ("client 203.0.113.77 connected", "client 203.0.113.0 connected"),
    ("loopback 127.0.0.1", "loopback 127.0.0.0"),
    ("at 2001:db8::1.", "at 2001:db8::."),
    ("peer [2001:db8:1:2::5]:443", "peer [2001:db8:1::]:443"),
    ("mapped ::ffff:203.0.113.9", "mapped 203.0.113.0"),
    ("zone fe80::1%eth0 up", "zone fe80:: up"),
    ("not an ip 10.0.0.256 or 1.2.3.4.5", "not an ip [ip] or 1.2.3.4.5"),
    ("Authorization: Bearer abcdef123456", "Authorization: Bearer [token]"),
    ("Authorization: Session Q2x9_aB3kLm0Pz7Yt4Rw1e", "Authorization: Session [token]"),
    ("Session expired", "Session expired"),
    ("session_token=abcd1234&x=1", "session_token=[token]&x=1"),
    ("{'session_token': 'zzz'}", "{'session_token': '[token]'}"),
    ('{"admin_key": "k"}', '{"admin_key": "[token]"}'),
    ("key sk-proj-abcdEFGH1234", "key [token]"),
    ("hex 9f86d081884c7d659a2feaa0c55ad015", "hex [token]"),
    ("mail jane@example.co.uk now", "mail [email] now"),
    ("call 415.555.0132", "call [number]"),
    ("card 4111 1111 1111 1111", "card [number]"),
    ("iban-ish 123456789", "iban-ish [number]"),
    ("req 123e4567-e89b-12d3-a456-426614174000", "req 123e4567-e89b-12d3-a456-426614174000"),
    (
        "ConnectionRefusedError in handle_incoming_message",
        "ConnectionRefusedError in handle_incoming_message",
    ),
    ("at 2025-01-01T12:00:00.123Z took 12.5 ms", "at 2025-01-01T12:00:00.123Z took 12.5 ms"),
    ("slice a[::2] line 42", "slice a[::2] line 42"),
    ("Cookie: omnigate_session=Zk3Q9vR_x7LmP2aW", "Cookie: [token]"),
    ("cookie:theme=dark; lang=en", "cookie:[token]"),
    ("Set-Cookie: omnigate_session=abc; HttpOnly", "Set-Cookie: [token]"),
    ("omnigate_session=abc; Path=/", "omnigate_session=[token]; Path=/"),
    ("gauge omnigate_sessions_active 3", "gauge omnigate_sessions_active 3"),
    ("X-Forwarded-For: 203.0.113.7, 10.0.0.1", "X-Forwarded-For: [ip]"),
    ("X-Real-IP: 2001:db8::7", "X-Real-IP: [ip]"),
    ("Forwarded: for=203.0.113.7;proto=https", "Forwarded: [ip]"),
    ("Authorization: k3y", "Authorization: [token]"),
    ("Proxy-Authorization: Basic dXNlcjpwYXNz", "Proxy-Authorization: Basic [token]"),
    (
        "b'GET / HTTP/1.1\\r\\nCookie: a=b\\r\\nX-Forwarded-For: 203.0.113.7\\r\\nHost: h'",
        "b'GET / HTTP/1.1\\r\\nCookie: [token]\\r\\nX-Forwarded-For: [ip]\\r\\nHost: h'",
    ),
    ("    b'Cookie: theme=x\\x01y'", "    b'Cookie: [token]"),
    (
        "<CIMultiDict('Host': 'h', 'Cookie': 'a=\\'b', 'x-forwarded-for': '203.0.113.7')>",
        "<CIMultiDict('Host': 'h', 'Cookie': '[token]', 'x-forwarded-for': '[ip]')>",
    ),
    ('{"cookie": "a=b", "n": 1}', '{"cookie": "[token]", "n": 1}'),
    ("Cookie: ", "Cookie: "),
]


@pytest.mark.parametrize(("text", "expected"), SCRUB_CASES, ids=[c[0][:24] for c in SCRUB_CASES])
def test_scrub_table(text: str, expected: str) -> None:
    assert scrub(text) == expected


def test_log_secrets_is_scoped_and_ignores_short_strings() -> None:
    text = 'it\'s "quoted"\nand multi-line'
    with log_secrets(text, "abc"):
        assert scrub(f"got {text} and abc") == "got [text] and abc"
        assert scrub(f"got {text!r}") == "got '[text]'"  # repr form, as in f"{text!r}"
        with log_secrets("inner secret"):
            assert scrub("inner secret / " + text) == "[text] / [text]"
        assert scrub("inner secret") == "inner secret"
    assert scrub(text) == text


def test_logged_secrets_stay_in_their_block_and_context() -> None:
    def task() -> tuple[str, str]:
        with log_secrets("private words here"):
            inside = scrub("x private words here")
        return inside, scrub("x private words here")

    assert contextvars.copy_context().run(task) == ("x [text]", "x private words here")
    assert scrub("private words here") == "private words here"


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("boom 203.0.113.5")


def test_formatter_never_raises() -> None:
    # Records go straight to our handler: pytest's own capture handler would
    # (rightly) raise on the broken ones.
    stream = io.StringIO()
    handler = make_handler(stream)
    bad_args = logging.LogRecord(
        "omnigate.t", logging.INFO, __file__, 1, "bad format %d", ("not a number",), None
    )
    bad_extra = logging.makeLogRecord({"msg": "bad extra", "reason": _Unprintable()})
    handler.handle(bad_args)
    handler.handle(bad_extra)
    records = lines(stream)
    assert [r["event"] for r in records] == ["log_render_failed", "log_render_failed"]
    assert "not a number" not in stream.getvalue()


def test_handler_errors_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    handler = make_handler(stream)
    stream.close()
    logger = logging.getLogger("omnigate.test_logs.closed")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("secret %s", "from 203.0.113.77")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    captured = capsys.readouterr()
    assert "203.0.113.77" not in captured.err + captured.out


def test_setup_logging_is_idempotent() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        setup_logging("debug")
        setup_logging("INFO")
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1
        assert root.level == logging.INFO
        for name in AIOHTTP_LOGGERS:
            filters = logging.getLogger(name).filters
            assert sum(isinstance(f, AiohttpErrorFilter) for f in filters) == 1
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.raiseExceptions = True
        logging.captureWarnings(False)
        for name in AIOHTTP_LOGGERS:
            aiohttp_logger = logging.getLogger(name)
            for f in [f for f in aiohttp_logger.filters if isinstance(f, AiohttpErrorFilter)]:
                aiohttp_logger.removeFilter(f)


def test_a_retention_pass_logs_its_counts() -> None:
    import io
    import logging

    import orjson

    from gateway.logs import make_handler
    from gateway.retention import KINDS

    stream = io.StringIO()
    log = logging.getLogger("omnigate.test.retention")
    log.addHandler(make_handler(stream))
    log.setLevel(logging.INFO)
    try:
        log.info("retention pass", extra={k: n for n, k in enumerate(KINDS, start=1)})
    finally:
        log.handlers.clear()
    line = orjson.loads(stream.getvalue())
    assert {k: line.get(k) for k in KINDS} == {k: n for n, k in enumerate(KINDS, start=1)}


@pytest.mark.parametrize(
    ("text", "hidden", "shown"),
    [
        ("ip%3D198.51.100.73", "198.51.100.73", "ip%3D198.51.100.0"),
        ("%22198.51.100.73%22", "198.51.100.73", "%22198.51.100.0%22"),
        ("client_198.51.100.73", "198.51.100.73", "client_198.51.100.0"),
        ("peer:2001:db8:1:2:3:4:5:6", "3:4:5:6", "peer:2001:db8:1::"),
        ("from 198.051.100.073", "100.073", "from [ip]"),
        ("python 3.11.7 at 12:30:45", "", "python 3.11.7 at 12:30:45"),
        ("src:198.51.100.7", "198.51.100.7", "src:198.51.100.0"),
        ("id:198.51.100.7", "198.51.100.7", "id:198.51.100.0"),
        ("1:198.51.100.7", "198.51.100.7", "1:198.51.100.0"),
    ],
    ids=[
        "escaped-equals",
        "escaped-quotes",
        "underscore",
        "labelled-ipv6",
        "zeros",
        "no-ip",
        "hex-label",
        "short-label",
        "digit-label",
    ],
)
def test_scrub_finds_addresses_joined_to_other_text(text: str, hidden: str, shown: str) -> None:
    scrubbed = scrub(text)
    assert scrubbed == shown
    assert not hidden or hidden not in scrubbed


def test_warnings_are_logged_through_the_scrubber(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        logging.captureWarnings(False)  # pytest restores showwarning after each test
        setup_logging("INFO", stream)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"unclosed raddr=('{IPV4}', 443)", ResourceWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.raiseExceptions = True
    written = stream.getvalue() + "".join(capsys.readouterr())
    assert "unclosed raddr" in stream.getvalue()
    assert IPV4 not in written
