"""The streaming upstream client, over real sockets against the fake upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway import netguard
from gateway.fake_upstream import FakeUpstream, fake_upstream
from gateway.upstream import (
    _RETRYABLE_KINDS,
    ERROR_KINDS,
    ChatModel,
    ChatStream,
    OfflineModel,
    SSEParser,
    UpstreamClient,
    UpstreamConfig,
    UpstreamError,
    backoff_delay,
    parse_retry_after,
    split_words,
)
from tests.support import free_port, until

KEY = "sk-secret-test-key"
TEXT = "Hello there, general Kenobi"
MESSAGES = [
    {"role": "system", "content": "be helpful"},
    {"role": "user", "content": "earlier"},
    {"role": "assistant", "content": "noted"},
    {"role": "user", "content": TEXT},
]


def make_config(base_url: str, **overrides: Any) -> UpstreamConfig:
    cfg = UpstreamConfig(
        base_url=base_url,
        api_key=KEY,
        model="gpt-test",
        first_token_timeout=2,
        idle_timeout=2,
        connect_timeout=1,
        retries=2,
        backoff_base=0.01,
        max_retry_after=2,
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    async with fake_upstream() as pair:
        yield pair


@pytest.fixture
async def client(upstream: tuple[FakeUpstream, str]) -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient(make_config(upstream[1])) as c:
        yield c


async def collect(stream: ChatStream) -> list[str]:
    return [piece async for piece in stream]


async def fail(stream: ChatStream) -> tuple[UpstreamError, list[str]]:
    """Consume until the stream raises; return the error and what arrived before it."""
    got: list[str] = []
    with pytest.raises(UpstreamError) as info:
        async for piece in stream:
            got.append(piece)
    err = info.value
    assert err.kind in ERROR_KINDS  # metric labels stay a closed set
    # Log safety: neither the key nor any message content may appear in the error text.
    for secret in (KEY, "Kenobi", "earlier"):
        assert secret not in str(err) and secret not in repr(err.args)
    return err, got


async def test_full_stream(upstream: tuple[FakeUpstream, str], client: UpstreamClient) -> None:
    fake, _ = upstream
    stream = client.stream_chat(MESSAGES)
    pieces = await collect(stream)
    # chunks that arrive in one read come out joined, so only the text is fixed
    assert "".join(pieces) == TEXT and 1 <= len(pieces) <= len(split_words(TEXT))
    assert stream.finish_reason == "stop"
    assert (stream.attempts, stream.malformed_lines, stream.retried) == (1, 0, [])
    [req] = fake.requests
    assert req["body"] == {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    assert req["authorization"] is True
    assert req["headers"]["Accept"] == "text/event-stream"
    assert KEY not in repr(fake.requests)


async def test_chunks_of_one_read_are_one_piece(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("ok", burst=True)
    stream = client.stream_chat(MESSAGES)
    assert await collect(stream) == [TEXT]
    assert stream.finish_reason == "stop"


async def test_a_body_ending_after_done_keeps_its_connection(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    # the body's last bytes come 30 ms after [DONE]: a connection released at [DONE]
    # would be closed, and every request would open a new one
    for _ in range(3):
        fake.queue("ok", eof_delay_ms=30)
        assert "".join(await collect(client.stream_chat(MESSAGES))) == TEXT
        await until(lambda: client.draining == 0)
    assert len({r["peer_port"] for r in fake.requests}) == 1


async def test_a_body_that_never_ends_after_done_is_closed_after_a_grace(
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, url = upstream
    async with UpstreamClient(make_config(url), eof_grace=0.05) as client:
        fake.queue("ok", eof_delay_ms=60_000)
        assert "".join(await collect(client.stream_chat(MESSAGES))) == TEXT
        assert client.draining == 1
        await until(lambda: client.draining == 0)
        assert "".join(await collect(client.stream_chat(MESSAGES))) == TEXT
    ports = [r["peer_port"] for r in fake.requests]
    assert len(ports) == 2 and ports[0] != ports[1]


async def test_closing_the_client_drops_connections_still_waiting_for_their_end(
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, url = upstream
    async with UpstreamClient(make_config(url), eof_grace=30) as client:
        fake.queue("ok", eof_delay_ms=60_000)
        assert "".join(await collect(client.stream_chat(MESSAGES))) == TEXT
        assert client.draining == 1
    assert client.draining == 0  # cancelled by close(), not left pending
    gc.collect()  # a connection left unclosed would warn here, in this test


async def test_a_slow_stream_yields_each_chunk_as_it_arrives(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("slow", delay_ms=30)
    assert await collect(client.stream_chat(MESSAGES)) == split_words(TEXT)


async def test_per_call_config_overrides_model_and_key(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, url = upstream
    tenant = make_config(url, api_key="sk-tenant", model="tenant-model")
    assert "".join(await collect(client.stream_chat(MESSAGES, config=tenant))) == TEXT
    await collect(client.stream_chat(MESSAGES, model="policy-model"))
    assert [r["body"]["model"] for r in fake.requests] == ["tenant-model", "policy-model"]


async def test_cookies_an_upstream_sets_are_never_sent_back(
    upstream: tuple[FakeUpstream, str],
) -> None:
    # OpenAI's edge sets cookies (__cf_bm, _cfuvid). One HTTP session serves every
    # tenant, so a kept cookie would tie one tenant's requests to the next one's.
    fake, url = upstream
    # by name, not IP: aiohttp's default jar ignores cookies from IP-address hosts
    named = url.replace("127.0.0.1", "localhost")
    cookie = {"set_cookie": "__cf_bm=tenant-a; Path=/; HttpOnly"}
    async with aiohttp.ClientSession() as plain:  # the default jar, for contrast
        for _ in range(2):
            fake.queue("ok", **cookie)
            async with plain.post(
                named + "/chat/completions", json=fake_body(), headers={"Authorization": "Bearer k"}
            ) as resp:
                assert resp.headers["Set-Cookie"].startswith("__cf_bm=tenant-a")
                await resp.read()
    assert fake.requests[1]["headers"].get("Cookie") == "__cf_bm=tenant-a"
    fake.requests.clear()
    async with UpstreamClient(make_config(named)) as client:
        fake.queue("ok", **cookie)
        fake.queue("ok", ignore_stream=True, set_cookie="_cfuvid=tenant-a; Path=/")
        tenant_b = make_config(named, api_key="sk-tenant-b")
        for config in (None, None, tenant_b):
            assert "".join(await collect(client.stream_chat(MESSAGES, config=config))) == TEXT
    assert [r["headers"].get("Cookie") for r in fake.requests] == [None] * 3


def fake_body() -> dict[str, Any]:
    return {"model": "gpt-test", "messages": MESSAGES, "stream": True}


@pytest.mark.parametrize(
    ("mode", "params"),
    [
        ("keepalive", {}),
        ("keepalive", {"crlf": True, "every": 2}),
        ("ok", {"nospace": True}),
        ("ok", {"chunks": 1}),
        ("ok", {"ignore_stream": True}),
    ],
    ids=["keepalive", "keepalive-crlf", "data-without-space", "one-chunk", "json-not-sse"],
)
async def test_stream_variants_yield_the_same_text(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient, mode: str, params: dict[str, Any]
) -> None:
    upstream[0].queue(mode, **params)
    stream = client.stream_chat(MESSAGES)
    assert "".join(await collect(stream)) == TEXT
    assert stream.finish_reason == "stop"
    assert stream.malformed_lines == 0


async def test_malformed_lines_are_skipped_and_counted(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("malformed", every=2)
    stream = client.stream_chat(MESSAGES)
    assert "".join(await collect(stream)) == TEXT
    assert stream.malformed_lines == 2
    assert stream.finish_reason == "stop"


async def test_only_malformed_lines_fail_without_retry(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("malformed", valid=False)
    err, _ = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.kind) == ("upstream_unavailable", "malformed")
    assert len(upstream[0].requests) == 1


async def test_error_event_before_any_token_is_retried(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    error_line = b'data: {"error": {"message": "overloaded", "type": "server_error"}}'
    upstream[0].queue("malformed", lines=[error_line], every=100)
    stream = client.stream_chat(MESSAGES)
    assert "".join(await collect(stream)) == TEXT
    assert stream.retried == ["stream_error"]


def test_retryable_kinds_are_error_kinds() -> None:
    assert _RETRYABLE_KINDS <= ERROR_KINDS


async def test_rate_limit_waits_retry_after_then_succeeds(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    fake.queue("rate_limit", retry_after=0.3)
    fake.queue("ok")
    started = time.monotonic()
    stream = client.stream_chat(MESSAGES)
    assert "".join(await collect(stream)) == TEXT
    assert time.monotonic() - started >= 0.3
    assert len(fake.requests) == 2
    assert (stream.attempts, stream.retried) == (2, ["status_429"])


async def test_rate_limit_exhausting_retries(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    fake.script("rate_limit", retry_after=0.05)
    err, _ = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.kind, err.status) == ("upstream_unavailable", "status_429", 429)
    assert err.retry_after == pytest.approx(0.05)
    assert len(fake.requests) == 3  # first try + retries=2


async def test_rate_limit_beyond_cap_gives_up_at_once(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    fake.queue("rate_limit", retry_after=30)
    err, _ = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.retry_after) == ("upstream_unavailable", 30)
    assert len(fake.requests) == 1


async def test_rate_limit_without_header_still_reports_retry_after(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].script("rate_limit", retry_after=None)
    err, _ = await fail(client.stream_chat(MESSAGES))
    assert err.retry_after is not None and err.retry_after > 0


async def test_quota_429_is_not_retried(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("rate_limit", code="insufficient_quota")
    err, _ = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.kind) == ("upstream_unavailable", "quota")
    assert len(upstream[0].requests) == 1


async def test_server_error_is_retried_then_unavailable(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].script("error", status=500)
    err, _ = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.kind, err.status) == ("upstream_unavailable", "status_5xx", 500)
    assert len(upstream[0].requests) == 3


async def test_server_error_then_success(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("error", status=502)
    stream = client.stream_chat(MESSAGES)
    assert "".join(await collect(stream)) == TEXT
    assert stream.retried == ["status_5xx"]


async def test_a_retry_after_an_error_reuses_the_connection(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    fake.queue("error", status=500)
    fake.queue("rate_limit", retry_after=0)
    stream = client.stream_chat(MESSAGES)
    assert "".join(await collect(stream)) == TEXT
    assert stream.attempts == 3
    # the error bodies were read to their end: one kept-alive connection for all three
    assert len({r["peer_port"] for r in fake.requests}) == 1


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "status_4xx"), (401, "auth"), (403, "auth"), (404, "status_4xx"), (422, "status_4xx")],
    ids=["400", "401", "403", "404", "422"],
)
async def test_client_errors_are_rejected_without_retry(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient, status: int, kind: str
) -> None:
    upstream[0].queue("error", status=status, message="bad Kenobi")
    err, _ = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.kind, err.status) == ("upstream_rejected", kind, status)
    assert len(upstream[0].requests) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_not_followed(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient, status: int
) -> None:
    # a 307/308 would re-send the conversation to wherever Location points, plain
    # http included (the https rule for a tenant's upstream would not hold)
    fake, url = upstream
    elsewhere = url.removesuffix("/v1") + "/chat/completions"
    fake.queue("error", status=status, location=elsewhere)
    err, got = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.kind, err.status, got) == ("upstream_unavailable", "redirect", status, [])
    assert [r["path"] for r in fake.requests] == ["/v1/chat/completions"]


async def test_missing_key_is_rejected_as_auth(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    err, _ = await fail(client.stream_chat(MESSAGES, config=make_config(upstream[1], api_key="")))
    assert (err.code, err.kind) == ("upstream_rejected", "auth")


async def test_connection_refused_is_unavailable() -> None:
    cfg = make_config(f"http://127.0.0.1:{free_port()}/v1", retries=1)
    async with UpstreamClient(cfg) as client:
        stream = client.stream_chat(MESSAGES)
        err, _ = await fail(stream)
    assert (err.code, err.kind) == ("upstream_unavailable", "connect")
    assert stream.attempts == 2


@pytest.mark.parametrize("send_headers", [False, True], ids=["no-headers", "headers-only"])
async def test_hang_before_first_token_times_out(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient, send_headers: bool
) -> None:
    fake, url = upstream
    fake.script("hang_before_first", send_headers=send_headers)
    cfg = make_config(url, first_token_timeout=0.3, retries=1)
    started = time.monotonic()
    err, _ = await fail(client.stream_chat(MESSAGES, config=cfg))
    elapsed = time.monotonic() - started
    assert (err.code, err.kind) == ("upstream_timeout", "first_token_timeout")
    # two attempts of 0.3 s plus a tiny backoff; the upper bound is loose for a busy CI box
    assert 0.6 <= elapsed < 3.0
    assert len(fake.requests) == 2
    await asyncio.wait_for(until(lambda: fake.disconnects == 2), 2)


async def test_idle_between_chunks_times_out_without_retry(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, url = upstream
    fake.queue("slow", delay_ms=400)
    cfg = make_config(url, first_token_timeout=2, idle_timeout=0.15)
    started = time.monotonic()
    err, got = await fail(client.stream_chat(MESSAGES, config=cfg))
    assert (err.code, err.kind) == ("upstream_timeout", "idle_timeout")
    assert got == ["Hello "]
    assert time.monotonic() - started < 1.0
    assert len(fake.requests) == 1


async def test_cut_after_tokens_is_not_retried(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("cut", after=2)
    err, got = await fail(client.stream_chat(MESSAGES))
    assert (err.code, err.kind) == ("upstream_unavailable", "cut")
    assert "".join(got) == "Hello there, "
    assert len(upstream[0].requests) == 1


async def test_cut_before_any_token_is_retried(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    upstream[0].queue("cut", after=0)
    stream = client.stream_chat(MESSAGES)
    assert "".join(await collect(stream)) == TEXT
    assert stream.retried == ["cut"]


async def test_cancelling_the_consumer_drops_the_upstream_request(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    fake.queue("slow", delay_ms=100)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in client.stream_chat(MESSAGES):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.disconnected.wait(), 2)
    assert fake.disconnects == 1


async def test_cancelling_while_waiting_for_first_token(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    fake.queue("hang_before_first", send_headers=True)
    task = asyncio.create_task(collect(client.stream_chat(MESSAGES)))
    await asyncio.wait_for(until(lambda: len(fake.requests) == 1), 2)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.disconnected.wait(), 2)


async def test_aclose_stops_early_and_drops_the_request(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, _ = upstream
    fake.queue("slow", delay_ms=100)
    async with client.stream_chat(MESSAGES) as stream:
        async for piece in stream:
            assert piece == "Hello "
            break
    await asyncio.wait_for(fake.disconnected.wait(), 2)
    assert stream.finish_reason is None


async def test_stream_before_start_is_an_error() -> None:
    client = UpstreamClient(make_config("http://127.0.0.1:9/v1"))
    with pytest.raises(RuntimeError):
        client.stream_chat(MESSAGES)


async def test_offline_model_echoes_last_user_message_word_by_word() -> None:
    model: ChatModel = OfflineModel()
    stream = model.stream_chat(MESSAGES)
    pieces = await collect(stream)
    assert pieces == ["Hello ", "there, ", "general ", "Kenobi"]
    assert stream.finish_reason == "stop"
    empty = model.stream_chat([{"role": "system", "content": "x"}])
    assert await collect(empty) == [] and empty.finish_reason == "stop"


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([b"data: a\n\n"], [b"a"]),
        ([b"data:a\r\n\r\n"], [b"a"]),
        ([b"data: a\r", b"\n\r\n"], [b"a"]),
        ([bytes([c]) for c in b"data: {\"x\": 1}\n\ndata: [DONE]\n\n"], [b'{"x": 1}', b"[DONE]"]),
        ([b": keep-alive\n\n\n\ndata: b\n\n"], [b"b"]),
        ([b"event: message\nid: 7\ndata: one\ndata: two\n\n"], [b"one\ntwo"]),
        ([b"data: tail-without-blank-line"], [b"tail-without-blank-line"]),
        ([b"data: caf\xc3", b"\xa9\n\n"], ["caf\u00e9".encode()]),
        ([b"data: a\rdata: b\r\r"], [b"a\nb"]),
    ],
    ids=["plain", "crlf-nospace", "crlf-split", "byte-by-byte", "comments", "multiline", "eof",
         "utf8-split", "cr-only"],
)  # fmt: skip
def test_sse_parser(chunks: list[bytes], events: list[bytes]) -> None:
    parser = SSEParser()
    got = [e for chunk in chunks for e in parser.feed(chunk)]
    assert got + parser.flush() == events


async def test_invalid_utf8_in_a_chunk_is_replaced_not_dropped(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    latin1 = b'data: {"choices":[{"index":0,"delta":{"content":"caf\xe9 "}}]}'
    upstream[0].queue("malformed", every=4, lines=[latin1])
    stream = client.stream_chat(MESSAGES)
    text = "".join(await collect(stream))
    assert text.startswith("caf\ufffd Hello ") and text.endswith("Kenobi")
    assert stream.malformed_lines == 0


def test_sse_parser_refuses_endless_lines() -> None:
    with pytest.raises(ValueError, match="too long"):
        SSEParser(max_line=8).feed(b"data: 0123456789")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": "0.5", "retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"Retry-After": "soon"}, None),
    ],
    ids=["absent", "seconds", "ms-wins", "negative", "past-date", "garbage"],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    cfg = make_config("http://x", backoff_base=0.1, max_retry_after=0.5)
    for attempt, full in [(0, 0.1), (1, 0.2), (2, 0.4), (5, 0.5)]:
        delays = [backoff_delay(attempt, cfg) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)


def test_config_repr_hides_the_key() -> None:
    assert KEY not in repr(make_config("http://x"))


# --- bounds on one reply, the tenants' shared pool, the User-Agent --------------------

LONG = " ".join(f"word{i}" for i in range(200))  # 200 pieces, 1289 characters


@pytest.mark.parametrize(
    ("mode", "params", "dropped"),
    [
        ("slow", {"delay_ms": 5}, True),
        ("ok", {"burst": True}, False),
        ("ok", {"ignore_stream": True}, False),
    ],
    ids=["piece-by-piece", "one-read", "json-not-sse"],
)
async def test_a_reply_past_max_reply_chars_is_cut_to_the_cap_and_ends_with_length(
    upstream: tuple[FakeUpstream, str],
    client: UpstreamClient,
    mode: str,
    params: dict[str, Any],
    dropped: bool,
) -> None:
    fake, url = upstream
    # a reply of exactly the cap is whole, not cut
    exact = client.stream_chat(MESSAGES, config=make_config(url, max_reply_chars=len(TEXT)))
    assert "".join(await collect(exact)) == TEXT
    assert (exact.finish_reason, exact.limited) == ("stop", None)
    fake.queue(mode, reply=LONG, **params)
    stream = client.stream_chat(MESSAGES, config=make_config(url, max_reply_chars=100))
    assert "".join(await collect(stream)) == LONG[:100]  # the last piece cut mid-word
    assert (stream.finish_reason, stream.limited) == ("length", "max_reply_chars")
    if dropped:  # the upstream, still generating, is not read to its end
        await asyncio.wait_for(fake.disconnected.wait(), 2)


# "Hello ", then chunks of valid data without text: each one resets the idle deadline
_HELLO_CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"Hello "},"finish_reason":null}]}'
_EMPTY_CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}]}'


async def test_a_trickle_of_empty_chunks_ends_at_reply_timeout_with_length(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, url = upstream
    # one line per piece of LONG, every 20 ms: 4 s of trickle, never idle for 0.5 s
    lines = [_HELLO_CHUNK] + [_EMPTY_CHUNK] * 199
    fake.queue("malformed", valid=False, lines=lines, reply=LONG, delay_ms=20)
    cfg = make_config(url, idle_timeout=0.5, reply_timeout=0.6)
    started = time.monotonic()
    stream = client.stream_chat(MESSAGES, config=cfg)
    assert await collect(stream) == ["Hello "]
    assert 0.6 <= time.monotonic() - started < 1.5
    assert (stream.finish_reason, stream.limited) == ("length", "reply_timeout")
    await asyncio.wait_for(fake.disconnected.wait(), 2)
    assert len(fake.requests) == 1


async def test_reply_timeout_before_any_text_is_a_first_token_timeout_and_ends_retries(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient
) -> None:
    fake, url = upstream
    fake.script("hang_before_first")
    cfg = make_config(url, first_token_timeout=1.5, retries=2, reply_timeout=0.4)
    started = time.monotonic()
    err, got = await fail(client.stream_chat(MESSAGES, config=cfg))
    assert (err.code, err.kind, got) == ("upstream_timeout", "first_token_timeout", [])
    assert 0.4 <= time.monotonic() - started < 1.2
    assert len(fake.requests) == 1  # no retry starts with no time left
    await asyncio.wait_for(until(lambda: fake.disconnects == 1), 2)


async def test_a_hanging_tenant_upstream_leaves_pool_room_for_other_tenants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(netguard, "ALLOW_HTTP", False)  # the guarded session, as in production
    async with fake_upstream() as (hung, hung_url), fake_upstream() as (_, fine_url):
        hung.script("hang_before_first")
        # public_only: tenants' own upstreams; IP literals skip the public-only resolver
        hanging = make_config(
            hung_url, public_only=True, first_token_timeout=10, connect_timeout=10, retries=0
        )
        other = make_config(fine_url, public_only=True, retries=0)
        async with UpstreamClient(make_config(fine_url), pool_limit=4) as client:
            # as many streams as the whole pool holds: only a quarter may connect
            tasks = [
                asyncio.create_task(collect(client.stream_chat(MESSAGES, config=hanging)))
                for _ in range(4)
            ]
            try:
                await until(lambda: len(hung.requests) >= 1)
                await asyncio.sleep(0.2)  # time for the others to connect, were they allowed
                assert "".join(await collect(client.stream_chat(MESSAGES, config=other))) == TEXT
                assert len(hung.requests) == 1
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


async def test_requests_name_omnigate_not_the_python_and_aiohttp_versions(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netguard, "ALLOW_HTTP", False)
    fake, url = upstream
    for config in (None, make_config(url, public_only=True)):  # the operator's, a tenant's
        assert "".join(await collect(client.stream_chat(MESSAGES, config=config))) == TEXT
    assert [r["headers"].get("User-Agent") for r in fake.requests] == ["omnigate"] * 2


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ('"visitor wrote: my order never arrived"', "other"),
        ('{"text": "a value"}', "other"),
        ("7", "other"),
        ('"content_filter"', "content_filter"),
        ('"length"', "length"),
    ],
    ids=["free-text", "object", "number", "content-filter", "length"],
)
async def test_finish_reason_is_one_of_a_closed_set(
    upstream: tuple[FakeUpstream, str], client: UpstreamClient, sent: str, kept: str
) -> None:
    # it is stored in a plaintext column and sent to the widget: no upstream text in either
    fake, _ = upstream
    line = '{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":' + sent + "}]}"
    fake.queue("malformed", valid=False, lines=[b"data: " + line.encode()], reply="Hi")
    stream = client.stream_chat(MESSAGES)
    assert await collect(stream) == ["Hi"]
    assert stream.finish_reason == kept
