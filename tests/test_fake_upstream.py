"""The fake OpenAI upstream speaks the real protocol and follows its script."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.fake_upstream import FakeUpstream, fake_upstream, merge_pieces
from gateway.upstream import split_words
from tests.support import free_port

AUTH = {"Authorization": "Bearer sk-fake"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    async with fake_upstream() as pair:
        yield pair


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(text: str = "Hello big world", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": text},
        ],
        **extra,
    }


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Data payloads of a well-formed stream, JSON-decoded except [DONE]."""
    raw = (await resp.read()).decode()
    out: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


async def test_missing_key_is_401_with_openai_error(
    upstream: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    for headers in ({}, {"Authorization": "Bearer "}):
        async with http.post(url + "/chat/completions", json=chat(), headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert [r["authorization"] for r in fake.requests] == [False, True]


async def test_stream_follows_openai_chunk_protocol(
    upstream: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    async with http.post(url + "/chat/completions", json=chat(), headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await sse(resp)
    first, *middle, last, done = events
    assert done == "[DONE]"
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert [m["choices"][0]["delta"]["content"] for m in middle] == ["Hello ", "big ", "world"]
    assert len({e["id"] for e in events[:-1]}) == 1
    assert fake.requests[0]["body"]["model"] == "gpt-test"
    assert "Authorization" not in fake.requests[0]["headers"]


async def test_non_streaming_returns_chat_completion(
    upstream: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    _, url = upstream
    async with http.post(url + "/chat/completions", json=chat(stream=False), headers=AUTH) as r:
        body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello big world"}
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_unprefixed_path_and_usage_chunk(
    upstream: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    _, url = upstream
    root = url.removesuffix("/v1")
    body = chat(stream_options={"include_usage": True})
    async with http.post(root + "/chat/completions", json=body, headers=AUTH) as resp:
        events = await sse(resp)
    assert events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 3


async def test_bad_body_is_400(
    upstream: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    _, url = upstream
    async with http.post(url + "/chat/completions", data=b"{nope", headers=AUTH) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_queue_is_consumed_in_order_then_script_applies(
    upstream: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    fake.queue("rate_limit", retry_after=3)
    fake.queue("error", status=503)
    fake.script("reply", text="fixed answer")
    statuses = []
    for _ in range(4):
        async with http.post(url + "/chat/completions", json=chat(), headers=AUTH) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert resp.headers["Retry-After"] == "3"
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
            if resp.status == 200:
                events = await sse(resp)
                text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
                assert text == "fixed answer"
    assert statuses == [429, 503, 200, 200]
    fake.reset()
    assert fake.requests == []


async def test_chunks_setting_merges_pieces(
    upstream: tuple[FakeUpstream, str], http: aiohttp.ClientSession
) -> None:
    fake, url = upstream
    fake.queue("ok", chunks=2)
    async with http.post(url + "/chat/completions", json=chat("a b c d e"), headers=AUTH) as r:
        events = await sse(r)
    assert [e["choices"][0]["delta"]["content"] for e in events[1:-2]] == ["a b c ", "d e"]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        FakeUpstream().queue("explode")


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("", []),
        ("one", ["one"]),
        ("  lead and  trail ", ["  lead ", "and  ", "trail "]),
        ("   ", ["   "]),
        ("line\nbreak", ["line\n", "break"]),
    ],
    ids=["empty", "single", "spaces", "blank", "newline"],
)
def test_split_words_keeps_whitespace(text: str, pieces: list[str]) -> None:
    assert split_words(text) == pieces
    assert "".join(split_words(text)) == text


@pytest.mark.parametrize(
    ("n", "expected"),
    [(None, ["a", "b", "c"]), (5, ["a", "b", "c"]), (2, ["ab", "c"]), (1, ["abc"])],
    ids=["no-cap", "under-cap", "two", "one"],
)
def test_merge_pieces(n: int | None, expected: list[str]) -> None:
    assert merge_pieces(["a", "b", "c"], n) == expected


async def test_standalone_cli_serves_and_stops_on_sigterm(http: aiohttp.ClientSession) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.fake_upstream",
        "--port",
        str(port),
        "--chunks",
        "1",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert f":{port}/v1".encode() in line
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with http.post(url, json=chat("hi there"), headers=AUTH) as resp:
            events = await sse(resp)
        assert events[1]["choices"][0]["delta"]["content"] == "hi there"
        assert events[-1] == "[DONE]"
    finally:
        if proc.returncode is None:
            proc.terminate()
        code = await asyncio.wait_for(proc.wait(), 10)
    assert code == 0
