"""Tests for gateway.logs: JSON lines, allow-listed extras, and the last-step scrubber."""

from __future__ import annotations

import contextvars
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from gateway.logs import (
    ALLOWED_EXTRAS,
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


SCRUB_CASES = [
    ("client 203.0.113.77 connected", "client 203.0.113.0 connected"),
    ("loopback 127.0.0.1", "loopback 127.0.0.0"),
    ("at 2001:db8::1.", "at 2001:db8::."),
    ("peer [2001:db8:1:2::5]:443", "peer [2001:db8:1::]:443"),
    ("mapped ::ffff:203.0.113.9", "mapped 203.0.113.0"),
    ("zone fe80::1%eth0 up", "zone fe80:: up"),
    ("not an ip 10.0.0.256 or 1.2.3.4.5", "not an ip 10.0.0.256 or 1.2.3.4.5"),
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
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.raiseExceptions = True
