"""A scriptable fake of the OpenAI Chat Completions API, streaming included.

Tests run it in-process on a real socket (`start_fake_upstream`); benchmarks run
it standalone: ``python -m gateway.fake_upstream --port 8099 --delay-ms 5``.

Every request is recorded in `FakeUpstream.requests` (body and headers, with the
Authorization value replaced by a presence flag). Behaviour is scripted per
request: `queue(mode, **params)` appends one-shot behaviours consumed in order,
`script(mode, **params)` sets the sticky behaviour used once the queue is empty.

Modes: ``ok``, ``reply`` (text=), ``error`` (status=, message=, type=, code=, location=),
``rate_limit`` (retry_after=, code=), ``hang_before_first`` (send_headers=), ``slow``
(delay_ms=), ``cut`` (after=), ``malformed`` (every=, valid=, lines=), ``keepalive``
(every=). Streaming modes also take reply=, chunks=, delay_ms=, first_delay_ms=,
crlf=, nospace=, burst= (the whole body in one write), eof_delay_ms= (a pause between
``[DONE]`` and the end of the chunked body, as when its last bytes come in a later
packet), ignore_stream= (answer a plain JSON completion) and set_cookie= (a
``Set-Cookie`` header on the answer, as OpenAI's edge sends). Each recorded request
also names its client port (``peer_port``): requests that share one were sent on one
kept-alive connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.upstream import split_words

MODES = frozenset(
    {
        "ok",
        "reply",
        "error",
        "rate_limit",
        "hang_before_first",
        "slow",
        "cut",
        "malformed",
        "keepalive",
    }
)
# Lines a sloppy or broken upstream might emit; the client must skip them.
_BAD_LINES = (b"data: {not json", b"data: hello world", b'data: {"choices": [')


@dataclass(frozen=True)
class Behaviour:
    """One scripted behaviour: a mode and its parameters."""

    mode: str
    params: dict[str, Any] = field(default_factory=dict)


def merge_pieces(pieces: list[str], n: int | None) -> list[str]:
    """Merge pieces into at most n contiguous groups (n falsy = no cap)."""
    if not n or len(pieces) <= n:
        return pieces
    size, extra = divmod(len(pieces), n)
    out: list[str] = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append("".join(pieces[start:end]))
        start = end
    return out


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """Build an OpenAI-style error body."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # multimodal parts: keep the text ones
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return ""
    return ""


class FakeUpstream:
    """Records requests and serves scripted OpenAI-compatible responses."""

    def __init__(self, *, delay_ms: float = 0.0, chunks: int | None = None) -> None:
        self.delay_ms = delay_ms
        self.chunks = chunks
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self._queue: deque[Behaviour] = deque()
        self._default = Behaviour("ok")
        self._closing = asyncio.Event()

    def queue(self, mode: str, **params: Any) -> None:
        """Append a one-shot behaviour for a coming request (FIFO)."""
        self._queue.append(self._check(mode, params))

    def script(self, mode: str, **params: Any) -> None:
        """Set the sticky behaviour used whenever the queue is empty."""
        self._default = self._check(mode, params)

    def reset(self) -> None:
        """Forget recorded requests and scripted behaviours."""
        self.requests.clear()
        self._queue.clear()
        self._default = Behaviour("ok")
        self.disconnects = 0
        self.disconnected.clear()

    @staticmethod
    def _check(mode: str, params: dict[str, Any]) -> Behaviour:
        if mode not in MODES:
            raise ValueError(f"unknown fake upstream mode {mode!r}")
        return Behaviour(mode, dict(params))

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving this fake."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        # Release handlers parked in "hang" modes so shutdown is not held up.
        self._closing.set()

    def _record(self, request: web.Request, body: Any) -> None:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            {
                "path": request.path,
                "headers": headers,
                "authorization": "Authorization" in request.headers,
                "body": body,
                "peer_port": peer[1] if peer else None,
            }
        )

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self._record(request, body)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return _json_error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        if not isinstance(body, dict) or "messages" not in body or "model" not in body:
            return _json_error(
                400,
                "Request body must be JSON with model and messages.",
                "invalid_request_error",
                None,
            )
        behaviour = self._queue.popleft() if self._queue else self._default
        return await self._respond(request, body, behaviour)

    async def _respond(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        p = b.params
        if b.mode == "error":
            status = int(p.get("status", 500))
            default_type = "server_error" if status >= 500 else "invalid_request_error"
            resp = _json_error(
                status,
                str(p.get("message", f"fake error {status}")),
                str(p.get("type", default_type)),
                p.get("code"),
            )
            if p.get("location"):
                resp.headers["Location"] = str(p["location"])
            return resp
        if b.mode == "rate_limit":
            resp = _json_error(
                429,
                "Rate limit reached for requests.",
                "requests",
                str(p.get("code", "rate_limit_exceeded")),
            )
            if p.get("retry_after", 1) is not None:
                resp.headers["Retry-After"] = str(p.get("retry_after", 1))
            return resp
        if b.mode == "hang_before_first":
            return await self._hang(request, bool(p.get("send_headers", False)))
        text = str(p["text"]) if b.mode == "reply" else p.get("reply")
        if text is None:
            text = _last_user_text(body.get("messages"))
        pieces = merge_pieces(split_words(text), p.get("chunks", self.chunks))
        model = str(body.get("model"))
        cookie = {"Set-Cookie": str(p["set_cookie"])} if p.get("set_cookie") else {}
        if not body.get("stream") or p.get("ignore_stream"):
            return web.Response(
                body=_completion(model, text), content_type="application/json", headers=cookie
            )
        return await self._stream(request, body, b, model, pieces, cookie)

    async def _hang(self, request: web.Request, send_headers: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            if send_headers:
                await resp.prepare(request)
            await self._closing.wait()
        except (asyncio.CancelledError, ConnectionResetError):
            self._note_disconnect()
            raise
        return resp

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        b: Behaviour,
        model: str,
        pieces: list[str],
        cookie: dict[str, str],
    ) -> web.StreamResponse:
        p = b.params
        eol = b"\r\n" if p.get("crlf") else b"\n"
        prefix = b"data:" if p.get("nospace") else b"data: "
        default_delay = 200.0 if b.mode == "slow" else self.delay_ms
        delay = float(p.get("delay_ms", default_delay)) / 1000
        every = int(p.get("every", 1))
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            obj = {
                "id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}],
            }  # fmt: skip
            return prefix + orjson.dumps(obj) + eol + eol

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **cookie}
        )
        # burst=True: the whole body goes out in one write, as a fast model's chunks can
        # arrive together in one read
        burst: list[bytes] = []

        async def send(data: bytes) -> None:
            if p.get("burst"):
                burst.append(data)
            else:
                await resp.write(data)

        try:
            if p.get("first_delay_ms"):
                await asyncio.sleep(float(p["first_delay_ms"]) / 1000)
            await resp.prepare(request)
            valid = b.mode != "malformed" or p.get("valid", True)
            if valid:
                await send(chunk({"role": "assistant", "content": ""}, None))
            for i, piece in enumerate(pieces):
                if delay:
                    await asyncio.sleep(delay)
                if b.mode == "cut" and i >= int(p.get("after", 1)):
                    # Abort mid-stream: no finish chunk, no [DONE], chunked body unterminated.
                    if burst:
                        await resp.write(b"".join(burst))
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if b.mode == "malformed" and i % every == 0:
                    bad = p.get("lines", _BAD_LINES)
                    await send(bad[i % len(bad)] + eol + eol)
                if b.mode == "keepalive" and i % every == 0:
                    await send(b": keep-alive" + eol + eol + eol)
                if valid:
                    await send(chunk({"content": piece}, None))
            if valid:
                await send(chunk({}, "stop"))
                opts = body.get("stream_options")
                if isinstance(opts, dict) and opts.get("include_usage"):
                    usage = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(pieces),
                    }
                    await send(prefix + orjson.dumps(usage) + eol + eol)
            await send(prefix + b"[DONE]" + eol + eol)
            if burst:
                await resp.write(b"".join(burst))
            if p.get("eof_delay_ms"):
                await asyncio.sleep(float(p["eof_delay_ms"]) / 1000)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self._note_disconnect()
            raise
        return resp


def _json_error(status: int, message: str, type_: str, code: str | None) -> web.Response:
    return web.Response(
        status=status, body=error_body(message, type_, code), content_type="application/json"
    )


def _usage(pieces: list[str]) -> dict[str, int]:
    n = len(pieces)
    return {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}


def _completion(model: str, text: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(split_words(text)),
        }
    )


def _make_runner(app: web.Application) -> web.AppRunner:
    # Cancel handlers when the client goes away: that is how a hang notices a disconnect.
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)


async def start_fake_upstream(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    delay_ms: float = 0.0,
    chunks: int | None = None,
) -> tuple[FakeUpstream, str, Callable[[], Awaitable[None]]]:
    """Serve a FakeUpstream on a real socket; returns (fake, base_url, cleanup)."""
    fake = FakeUpstream(delay_ms=delay_ms, chunks=chunks)
    runner = _make_runner(fake.make_app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]  # port=0 picks a free port; read back the real one
    return fake, f"http://{host}:{bound}/v1", runner.cleanup


@contextlib.asynccontextmanager
async def fake_upstream(
    host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> AsyncIterator[tuple[FakeUpstream, str]]:
    """Async context manager form of `start_fake_upstream`: yields (fake, base_url)."""
    fake, base_url, cleanup = await start_fake_upstream(host, port, **kwargs)
    try:
        yield fake, base_url
    finally:
        await cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the fake upstream standalone (for benchmarks and manual testing)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.fake_upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between chunks")
    parser.add_argument("--chunks", type=int, default=None, help="merge reply into N chunks")
    args = parser.parse_args(argv)
    fake = FakeUpstream(delay_ms=args.delay_ms, chunks=args.chunks)

    async def serve() -> None:
        runner = _make_runner(fake.make_app())
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"fake upstream listening on http://{args.host}:{args.port}/v1", flush=True)
        stop = asyncio.Event()
        # SIGTERM (how benchmarks and tests stop it) should shut down cleanly, like Ctrl-C.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    # Recording every request would grow without bound under benchmark load.
    fake.requests = _NullList()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


class _NullList(list[dict[str, Any]]):
    """A list that drops appends: the standalone server keeps no request log."""

    def append(self, _item: dict[str, Any]) -> None:
        return None


if __name__ == "__main__":
    main()
