"""Streaming client for OpenAI-compatible Chat Completions, and the built-in offline model.

Both implement `ChatModel.stream_chat`, which returns a `ChatStream`: an async
iterator of reply pieces whose `finish_reason` is set once it is exhausted.
Failures surface as `UpstreamError` carrying one of the protocol error codes
(`upstream_unavailable`, `upstream_timeout`, `upstream_rejected`) and a short
`kind` for metrics. No error message ever contains message text or the api key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal, Protocol

import aiohttp
import orjson

from gateway import netguard

log = logging.getLogger(__name__)

ErrorCode = Literal["upstream_unavailable", "upstream_timeout", "upstream_rejected"]
_MAX_LINE = 1 << 20  # one SSE line larger than this is a broken upstream, not a reply
_MAX_ERROR_BODY = 1 << 16
_WORDS = re.compile(r"\s*\S+\s*")
#: Every `UpstreamError.kind`: a closed set, safe as a metric label.
ERROR_KINDS = frozenset(
    {
        "status_429", "status_5xx", "status_4xx", "auth", "quota", "connect",
        "first_token_timeout", "idle_timeout", "cut", "malformed", "stream_error", "redirect",
    }
)  # fmt: skip
# Transient failures; retried only while nothing has been yielded, so text is never duplicated.
_RETRYABLE_KINDS = frozenset(
    {"status_429", "status_5xx", "connect", "first_token_timeout", "cut", "stream_error"}
)


@dataclass(frozen=True)
class UpstreamConfig:
    """Where and how to reach one OpenAI-compatible upstream."""

    base_url: str
    api_key: str = field(repr=False)  # keep the key out of reprs and so out of logs
    model: str
    first_token_timeout: float = 30
    idle_timeout: float = 30
    connect_timeout: float = 10
    retries: int = 2
    backoff_base: float = 0.25
    max_retry_after: float = 10
    # a tenant-supplied upstream: connect only to the public addresses its name resolves to
    public_only: bool = False
    # Bounds on one reply, whatever the upstream does: the gateway keeps the whole reply
    # in memory, stores it and re-sends it as context, so a looping upstream must not
    # grow it without end, nor hold it open with a trickle of empty chunks. Past either
    # the reply ends with finish_reason "length" (OpenAI's word for a max_tokens cut).
    max_reply_chars: int = 64_000  # ~16k tokens, far beyond a chat answer
    reply_timeout: float = 300  # seconds from the request to the end of the reply


class UpstreamError(Exception):
    """A typed upstream failure; the message is log-safe (no content, no key)."""

    def __init__(
        self,
        code: ErrorCode,
        kind: str,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.kind = kind
        self.retry_after = retry_after
        self.status = status


class SSEParser:
    """Incremental Server-Sent Events parser returning each event's data payload.

    Works on bytes: the payloads go to orjson as they are, without a str in between.
    """

    def __init__(self, max_line: int = _MAX_LINE) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._max_line = max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        """Consume bytes from the wire; return the data of events completed by them."""
        buf = self._buf + chunk
        # A trailing CR may be the first half of a CRLF split across TCP reads.
        hold = buf.endswith(b"\r")
        if hold:
            buf = buf[:-1]
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop() + (b"\r" if hold else b"")
        if len(self._buf) > self._max_line:
            raise ValueError("SSE line too long")
        out: list[bytes] = []
        for line in lines:
            self._line(line, out)
        return out

    def flush(self) -> list[bytes]:
        """At end of stream, return any event left without its terminating blank line."""
        out: list[bytes] = []
        if self._buf.strip(b"\r"):
            self._line(self._buf.rstrip(b"\r"), out)
        self._buf = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            if self._data:
                out.append(b"\n".join(self._data))
                self._data = []
            return
        if line.startswith(b":"):  # comment, e.g. ": keep-alive"
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # event:, id:, retry: carry nothing the Chat Completions stream needs.


_Producer = Callable[["ChatStream"], AsyncGenerator[str, None]]


class ChatStream:
    """Async iterator of reply pieces; `finish_reason` is set once it is exhausted."""

    def __init__(self, producer: _Producer) -> None:
        self.finish_reason: str | None = None
        # set when the gateway ended the reply itself: "max_reply_chars" or "reply_timeout"
        self.limited: str | None = None
        self.malformed_lines = 0
        self.attempts = 0
        self.retried: list[str] = []  # kinds of the failures that were retried, for metrics
        self._gen = producer(self)

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop early and release the upstream connection."""
        await self._gen.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()


class ChatModel(Protocol):
    """Anything the gateway can stream a reply from."""

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str | None = None,
        config: UpstreamConfig | None = None,
    ) -> ChatStream:
        """Start streaming a reply to messages."""
        ...


def split_words(text: str) -> list[str]:
    """Split text into word pieces that keep their whitespace, so joining restores it."""
    pieces: list[str] = _WORDS.findall(text)
    return pieces if pieces else ([text] if text else [])


def _last_user_text(messages: Sequence[Mapping[str, str]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return str(msg.get("content", ""))
    return ""


class OfflineModel:
    """The built-in `offline` model: streams back the forwarded user text word by word."""

    name = "offline"

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str | None = None,
        config: UpstreamConfig | None = None,
    ) -> ChatStream:
        """Echo the last user message, one whitespace-preserving word at a time."""
        text = _last_user_text(messages)

        async def produce(cs: ChatStream) -> AsyncGenerator[str, None]:
            cs.attempts = 1
            for piece in split_words(text):
                yield piece
                await asyncio.sleep(0)  # let other sockets run, as a real stream would
            cs.finish_reason = "stop"

        return ChatStream(produce)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, cfg: UpstreamConfig) -> float:
    """Exponential backoff with equal jitter, capped by max_retry_after."""
    full = min(cfg.backoff_base * 2.0**attempt, cfg.max_retry_after)
    return full / 2 + random.uniform(0, full / 2)


def _retry_wait(err: UpstreamError, attempt: int, cfg: UpstreamConfig) -> float | None:
    """How long to wait before retrying err, or None when it must not be retried."""
    if err.kind not in _RETRYABLE_KINDS:
        return None
    if err.retry_after is not None:
        # Retrying sooner than the upstream asked only earns another 429; past the cap
        # we give up and hand the visitor the upstream's own estimate instead.
        if err.retry_after > cfg.max_retry_after:
            return None
        return max(err.retry_after, backoff_delay(attempt, cfg))
    return backoff_delay(attempt, cfg)


class UpstreamClient:
    """Pooled streaming client for OpenAI-compatible `/chat/completions`.

    Retries (exponential backoff with jitter) happen only before the first content
    piece: on 429 (honouring Retry-After up to max_retry_after), 5xx, connection
    errors, first-token timeouts and streams cut before any content. Once a piece
    has been yielded nothing is retried: a stream that ends before `[DONE]` or a
    finish_reason raises `upstream_unavailable` with kind "cut".

    A reply is cut at `max_reply_chars` or `reply_timeout` (retries included) with
    finish_reason "length"; a reply_timeout before any text is a first-token timeout.
    """

    def __init__(
        self, config: UpstreamConfig, *, pool_limit: int = 200, eof_grace: float = 1.0
    ) -> None:
        self.config = config
        self._pool_limit = pool_limit
        self._session: aiohttp.ClientSession | None = None
        # for `public_only` configs: made on first use, its resolver refuses private addresses.
        # Every tenant's own upstream shares it: one host may hold only a share of its
        # connections, so a tenant whose upstream hangs cannot starve the others.
        self._guarded: aiohttp.ClientSession | None = None
        self._per_host_limit = max(1, pool_limit // 4)
        # replies complete at [DONE] whose connection waits for the body's last bytes
        self._eof_grace = eof_grace
        self._draining: dict[asyncio.Task[None], aiohttp.ClientResponse] = {}

    @property
    def draining(self) -> int:
        """Connections waiting for the end of a finished reply's body, to be kept alive."""
        return len(self._draining)

    def _forget_draining(self, task: asyncio.Task[None]) -> None:
        self._draining.pop(task, None)

    def _new_session(self, **connector: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._pool_limit, keepalive_timeout=30, ttl_dns_cache=300, **connector
            ),
            timeout=aiohttp.ClientTimeout(total=None),  # our own deadlines apply per read
            raise_for_status=False,
            # one session serves every tenant: a cookie the upstream sets (OpenAI's edge
            # sets __cf_bm) must not ride along on anyone's next request
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def start(self) -> None:
        """Open the pooled HTTP session."""
        if self._session is None:
            self._session = self._new_session()

    async def close(self) -> None:
        """Close the sessions and every pooled connection."""
        # a task cancelled before it ran never reaches its `finally`: close here
        for task, resp in list(self._draining.items()):
            task.cancel()
            resp.close()
        await asyncio.gather(*self._draining, return_exceptions=True)
        for session in (self._session, self._guarded):
            if session is not None:
                await session.close()
        self._session = self._guarded = None

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str | None = None,
        config: UpstreamConfig | None = None,
    ) -> ChatStream:
        """Stream a reply; `config` overrides the upstream (a tenant's own key and URL)."""
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        cfg = config or self.config
        body = orjson.dumps(
            {
                "model": model or cfg.model,
                "messages": [m if isinstance(m, dict) else dict(m) for m in messages],
                "stream": True,
            }
        )
        session = self._session
        if cfg.public_only and not netguard.ALLOW_HTTP:
            if self._guarded is None:
                self._guarded = self._new_session(
                    resolver=netguard.PublicOnlyResolver(), limit_per_host=self._per_host_limit
                )
            session = self._guarded
        return ChatStream(lambda cs: self._with_retries(cs, session, cfg, body))

    async def _with_retries(
        self, cs: ChatStream, session: aiohttp.ClientSession, cfg: UpstreamConfig, body: bytes
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        reply_deadline = loop.time() + cfg.reply_timeout
        attempt = 0
        while True:
            cs.attempts += 1
            yielded = False
            try:
                # aclosing: leaving early (cancel, aclose) must release the response now.
                attempt_pieces = self._attempt(cs, session, cfg, body, reply_deadline)
                async with contextlib.aclosing(attempt_pieces) as pieces:
                    async for piece in pieces:
                        yielded = True
                        yield piece
                return
            except UpstreamError as err:
                wait = None if yielded or attempt >= cfg.retries else _retry_wait(err, attempt, cfg)
                if wait is not None and loop.time() + wait >= reply_deadline:
                    wait = None  # the next attempt would start with no time left
                if wait is None:
                    if err.kind == "status_429" and err.retry_after is None:
                        err.retry_after = backoff_delay(attempt, cfg)
                    raise
                log.info("upstream %s, retry %d in %.2fs", err.kind, attempt + 1, wait)
                cs.retried.append(err.kind)
            await asyncio.sleep(wait)
            attempt += 1

    async def _attempt(
        self,
        cs: ChatStream,
        session: aiohttp.ClientSession,
        cfg: UpstreamConfig,
        body: bytes,
        reply_deadline: float,
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        deadline = min(loop.time() + cfg.first_token_timeout, reply_deadline)
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {
            "Authorization": f"Bearer {cfg.api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            # not aiohttp's default, which names the Python and aiohttp versions to
            # OpenAI and to every tenant-chosen host
            "User-Agent": "omnigate",
        }
        timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout
        )
        connected = True
        try:
            async with asyncio.timeout_at(deadline):
                # never followed: a 307/308 would re-send the conversation to wherever
                # Location points, plain http included
                resp = await session.post(
                    url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                )
        except aiohttp.ClientError:  # before TimeoutError: aiohttp's timeouts are both
            connected = False
        except TimeoutError:
            raise _timeout(first=True) from None
        if not connected:
            # Raised outside the handler: neither __cause__ nor __context__ keeps
            # aiohttp's error, whose message holds the upstream URL (a tenant's
            # may carry a token in its path); the kind says what went wrong.
            raise UpstreamError("upstream_unavailable", "connect", "could not connect to upstream")
        completed = False
        try:
            if resp.status != 200:
                raise await _status_error(resp, deadline)
            if resp.content_type == "application/json":
                text = await _read_completion(resp, cs, deadline)
                completed = True
                if len(text) > cfg.max_reply_chars:
                    text = text[: cfg.max_reply_chars]
                    _limited(cs, "max_reply_chars")
                if text:
                    yield text
                return
            events = _read_events(resp, cs, cfg, deadline, reply_deadline)
            async with contextlib.aclosing(events) as pieces:
                async for piece in pieces:
                    yield piece
            # a reply cut at a limit: the upstream is still generating, drop the socket
            completed = cs.limited is None
        finally:
            if not completed:
                resp.close()  # drop the socket so the upstream stops generating
            elif resp.content.at_eof():
                resp.release()  # back to the pool for keep-alive reuse
            else:
                # [DONE] came before the end of the chunked body, whose last bytes are a
                # packet behind. Released now, the connection would be closed (and the
                # next message would pay a new connection, TLS included); it goes back
                # to the pool when they arrive, without holding up the reply.
                task = asyncio.create_task(_release_at_eof(resp, self._eof_grace))
                self._draining[task] = resp
                task.add_done_callback(self._forget_draining)


async def _release_at_eof(resp: aiohttp.ClientResponse, grace: float) -> None:
    """Return the connection to the pool once the body ends; close it if it does not in time."""
    reusable = False
    try:
        async with asyncio.timeout(grace):
            tail = 0
            while tail <= _MAX_LINE and (chunk := await resp.content.readany()):
                tail += len(chunk)  # anything after [DONE] is dropped
        reusable = resp.content.at_eof()
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    finally:
        if reusable:
            resp.release()
        else:
            resp.close()


def _timeout(*, first: bool) -> UpstreamError:
    if first:
        return UpstreamError(
            "upstream_timeout", "first_token_timeout", "upstream sent no reply in time"
        )
    return UpstreamError("upstream_timeout", "idle_timeout", "upstream stalled mid-reply")


def _cut() -> UpstreamError:
    return UpstreamError("upstream_unavailable", "cut", "upstream stream ended before completion")


def _limited(cs: ChatStream, limit: str) -> None:
    cs.finish_reason, cs.limited = "length", limit


async def _read_events(
    resp: aiohttp.ClientResponse,
    cs: ChatStream,
    cfg: UpstreamConfig,
    first_deadline: float,
    reply_deadline: float,
) -> AsyncGenerator[str, None]:
    """Yield content from an SSE body; deadlines reset only on valid data, not keep-alives.

    The pieces of every event that arrived in one read are yielded joined: a burst of
    chunks becomes one delta for the visitor (one frame, one write), while a slow
    stream still yields each chunk the moment it arrives. The text ends, with
    finish_reason "length", once it would pass max_reply_chars (cut to exactly that)
    or at reply_deadline; reply_deadline before any text is a first-token timeout.
    """
    loop = asyncio.get_running_loop()
    parser = SSEParser()
    deadline = first_deadline  # never later than reply_deadline
    room = cfg.max_reply_chars  # characters the reply may still take
    got_content = valid = False
    eof = False
    while not eof:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await resp.content.readany()
        except TimeoutError:
            if got_content and deadline >= reply_deadline:
                _limited(cs, "reply_timeout")
                return
            raise _timeout(first=not got_content) from None
        except aiohttp.ClientError:
            raise _cut() from None
        eof = not chunk
        try:
            payloads = parser.flush() if eof else parser.feed(chunk)
        except ValueError:
            raise UpstreamError(
                "upstream_unavailable", "malformed", "upstream sent an oversized line"
            ) from None
        pending: list[str] = []
        fresh = done = False
        failure: UpstreamError | None = None
        try:
            for payload in payloads:
                for obj in _decode(payload, cs):
                    if obj == "[DONE]":
                        done = True
                        break
                    valid = fresh = True
                    pending += _interpret(obj, cs)
                if done:
                    break
        except UpstreamError as exc:
            failure = exc  # what came before the error in this read is still delivered
        if pending:
            text = "".join(pending)
            if len(text) > room:  # even when [DONE] came too: this reply is cut
                if room:
                    yield text[:room]
                _limited(cs, "max_reply_chars")
                return
            room -= len(text)
            got_content = True
            yield text
        if failure is not None:
            raise failure
        if done:
            _check_valid(valid, cs)
            return
        # Time the consumer spent on the piece is not the upstream's idleness.
        now = loop.time()
        if now >= reply_deadline:
            # a read that never waits (data always buffered) never meets the timeout above
            if got_content:
                _limited(cs, "reply_timeout")
                return
            raise _timeout(first=True)
        if got_content and fresh:
            deadline = min(now + cfg.idle_timeout, reply_deadline)
    _check_valid(valid, cs)
    if cs.finish_reason is None:
        raise _cut()


def _check_valid(valid: bool, cs: ChatStream) -> None:
    if not valid and cs.malformed_lines:
        raise UpstreamError("upstream_unavailable", "malformed", "upstream sent no valid chunk")


def _decode(payload: bytes, cs: ChatStream) -> list[Any]:
    """Parse one event's data; a bad line is counted and skipped, never fatal here."""
    if payload == b"[DONE]":
        return ["[DONE]"]
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            # SSE is decoded as UTF-8 with replacement: a stray invalid byte spoils no chunk
            obj = orjson.loads(payload.decode("utf-8", "replace"))
        except orjson.JSONDecodeError:
            if b"\n" not in payload:
                cs.malformed_lines += 1
                return []
            # Some servers omit the blank line between events; read each data line alone.
            return [o for line in payload.split(b"\n") for o in _decode(line, cs)]
    if not isinstance(obj, dict) or not isinstance(obj.get("choices", []), list):
        cs.malformed_lines += 1
        return []
    return [obj]


def _interpret(obj: dict[str, Any], cs: ChatStream) -> list[str]:
    """Pull content pieces and finish_reason out of one chunk object."""
    if "error" in obj:
        raise UpstreamError("upstream_unavailable", "stream_error", "upstream reported an error")
    pieces: list[str] = []
    for choice in obj.get("choices", []):
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            # A refusal streams in its own field; the visitor should still see it.
            for key in ("content", "refusal"):
                if isinstance(delta.get(key), str) and delta[key]:
                    pieces.append(delta[key])
        if choice.get("finish_reason") is not None:
            cs.finish_reason = finish_reason(choice["finish_reason"])
    return pieces


# The finish reasons OpenAI documents; anything else an upstream sends is "other".
FINISH_REASONS: Final = frozenset(
    {"stop", "length", "content_filter", "tool_calls", "function_call"}
)


def finish_reason(value: object) -> str:
    """The upstream's finish_reason as one of a closed set: it is stored in plaintext
    and sent to the widget, so an upstream's free text never reaches either."""
    return value if isinstance(value, str) and value in FINISH_REASONS else "other"


async def _read_limited(resp: aiohttp.ClientResponse, deadline: float, limit: int) -> bytes:
    buf = b""
    async with asyncio.timeout_at(deadline):
        while len(buf) < limit:
            chunk = await resp.content.readany()
            if not chunk:
                break
            buf += chunk
    return buf


async def _read_completion(resp: aiohttp.ClientResponse, cs: ChatStream, deadline: float) -> str:
    """Handle an upstream that ignored stream=true and sent one chat.completion object."""
    try:
        raw = await _read_limited(resp, deadline, _MAX_LINE)
        obj = orjson.loads(raw)
        choice = obj["choices"][0]
        text = choice["message"].get("content") or ""
        cs.finish_reason = finish_reason(choice.get("finish_reason") or "stop")
    except TimeoutError:
        raise _timeout(first=True) from None
    except aiohttp.ClientError:
        raise _cut() from None
    except (orjson.JSONDecodeError, LookupError, TypeError, AttributeError):
        cs.malformed_lines += 1
        raise UpstreamError(
            "upstream_unavailable", "malformed", "upstream sent an unreadable completion"
        ) from None
    return str(text)


async def _status_error(resp: aiohttp.ClientResponse, deadline: float) -> UpstreamError:
    """Map a non-200 answer to an UpstreamError; only the error code is read from the body."""
    status = resp.status
    err_code = None
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
        obj = orjson.loads(await _read_limited(resp, deadline, _MAX_ERROR_BODY))
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            err_code = obj["error"].get("code")
    msg = f"upstream answered HTTP {status}"
    if status == 429:
        if err_code == "insufficient_quota":  # a billing problem: waiting will not fix it
            return UpstreamError("upstream_unavailable", "quota", msg, status=status)
        retry_after = parse_retry_after(resp.headers)
        return UpstreamError(
            "upstream_unavailable", "status_429", msg, retry_after=retry_after, status=status
        )
    if status >= 500:
        return UpstreamError("upstream_unavailable", "status_5xx", msg, status=status)
    if 300 <= status < 400:  # a moved or misconfigured upstream URL: not retried
        return UpstreamError("upstream_unavailable", "redirect", msg, status=status)
    if status in (401, 403):
        return UpstreamError("upstream_rejected", "auth", msg, status=status)
    return UpstreamError("upstream_rejected", "status_4xx", msg, status=status)
