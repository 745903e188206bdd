"""Messages costly to search for PII are searched in a helper process, off the event loop.

Phone numbers are found with ``phonenumbers``, which is pure Python. A number written
"+1 415 555 2671" costs about 0.3 ms to find, but one written in national format
("(415) 555-2671", or an order number that might be one) costs a matcher pass per
region of the policy, 1-1.6 ms, and a 4,000-character message full of numbers (a
pasted order list, a table of dates and amounts, or a message written to hurt) costs
25-260 ms, during which one event loop would serve nobody else. A message whose search
would cost more than the round trip to a helper is searched there; every other
message, and the replacement of what was found, stays inline. The result is the same
either way: the helper runs the same ``Redactor.find``.

The helper is ``python -m gateway.redactpool``, started on first use, speaking over
its stdin and stdout: each frame is a 4-byte big-endian length and an orjson body, a
request ``[entities, regions, text]`` and its answer (a list of matches, or
``{"error": true}``) in the same order. ``concurrent.futures.ProcessPoolExecutor``
did the same job at 0.44-0.88 ms of this process's CPU per call (its queue threads
contend for the GIL); these pipes cost about a tenth of that (docs/performance.md).

A failure of the helper (it died, it raised) is an exception for the caller, which
fails closed: nothing is forwarded. So is a search not answered within ``timeout``
(queueing included); if the helper has answered nothing at all for that long, it is
stuck and is stopped, but a helper that is merely busy with others' searches keeps
going. A stopped or dead helper is replaced on the next use. The helper never logs
and never echoes text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import struct
import sys
from functools import lru_cache
from typing import Any, BinaryIO

import orjson

from policies import Redactor
from policies.detect import DEFAULT_PHONE_REGIONS, Match

# A message goes to a helper when its search would cost more than the round trip to one
# (~1 ms; docs/performance.md): this many matcher passes over a short window, a few
# tenths of a millisecond each (``Redactor.find``'s budget: one national phone number
# is four, 256 digits of card-like groups are four).
HEAVY_COST = 4
# A search not answered within this fails; a helper silent for this long is stopped.
TIMEOUT = 30.0
# Characters of text a helper may owe answers for. The costliest text seen takes ~65 µs
# a character (4,000 characters of "(415) 555-2671 ..." in 260 ms on the bench VM), so a
# helper's backlog stays well inside TIMEOUT; beyond it a search fails at once instead
# of waiting to time out, and the pipe's buffer stays bounded.
MAX_OWED_CHARS = 256_000

_LEN = struct.Struct(">I")


class HelperFailed(Exception):
    """A helper could not search a message; carries no text."""


_Owed = tuple[asyncio.Future[list[Any]], int]  # an answer owed, characters of its text


class _Helper:
    """One helper process and the answers it owes, oldest first."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: collections.deque[_Owed] = collections.deque()  # oldest first
        self.owed = 0  # characters of text asked and not answered yet
        self.stopped = False
        # when the helper last answered (or started): a search that times out finds the
        # helper stuck if it has been silent that long, busy with others' otherwise
        self.progress = asyncio.get_running_loop().time()
        self.reader = asyncio.create_task(self._read())

    @property
    def alive(self) -> bool:
        return not self.stopped and self.proc.returncode is None

    def ask(self, body: bytes, chars: int) -> asyncio.Future[list[Any]]:
        assert self.proc.stdin is not None
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append((fut, chars))
        self.owed += chars
        self.proc.stdin.write(_LEN.pack(len(body)) + body)
        return fut

    async def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        try:
            while True:
                (size,) = _LEN.unpack(await out.readexactly(_LEN.size))
                answer = orjson.loads(await out.readexactly(size))
                self.progress = asyncio.get_running_loop().time()
                fut, chars = self.waiting.popleft()
                self.owed -= chars
                if fut.done():
                    continue  # its caller went away; the answer is dropped
                if isinstance(answer, list):
                    fut.set_result(answer)
                else:
                    fut.set_exception(HelperFailed("the helper could not search a message"))
        except (asyncio.IncompleteReadError, OSError, orjson.JSONDecodeError, IndexError):
            pass  # the helper is gone (or spoke nonsense): everyone waiting fails
        finally:
            self.stop()

    def stop(self) -> None:
        self.stopped = True
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(HelperFailed("the redaction helper stopped"))
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class RedactionPool:
    """Helper processes for heavy searches, started on first use."""

    def __init__(
        self, processes: int, timeout: float = TIMEOUT, max_owed: int = MAX_OWED_CHARS
    ) -> None:
        self.processes = processes
        self.timeout = timeout
        self.max_owed = max_owed
        self._helpers: list[_Helper | None] = [None] * processes
        self._next = 0
        self._starting = asyncio.Lock()

    @property
    def budget(self) -> int:
        """``Redactor.find``'s budget: a search costing this much comes here (0: never)."""
        return HEAVY_COST if self.processes > 0 else 0

    async def find(self, redactor: Redactor, text: str) -> list[Match]:
        """``redactor.find(text)``, run in a helper process."""
        helper = await self._helper()
        if helper.waiting and helper.owed + len(text) > self.max_owed:
            # a flood of heavy messages: fail now rather than queue what cannot be
            # answered in time (a helper with nothing owed takes any one message)
            raise HelperFailed("the redaction helper is saturated")
        body = orjson.dumps([sorted(redactor.entities), redactor.phone_regions, text])
        try:
            async with asyncio.timeout(self.timeout):
                found = await helper.ask(body, len(text))
        except TimeoutError:
            if asyncio.get_running_loop().time() - helper.progress >= self.timeout:
                helper.stop()  # owed answers and silent that long: stuck, not busy
            raise HelperFailed("the redaction helper took too long") from None
        return [Match(*m) for m in found]

    def pids(self) -> list[int]:
        """Process ids of the running helpers (tests stop one to see the gateway recover)."""
        return [h.proc.pid for h in self._helpers if h is not None and h.alive]

    async def _helper(self) -> _Helper:
        n = self._next
        self._next = (n + 1) % self.processes
        helper = self._helpers[n]
        if helper is not None and helper.alive:
            return helper
        async with self._starting:
            helper = self._helpers[n]
            if helper is None or not helper.alive:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "gateway.redactpool",
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                except OSError:  # out of processes or file descriptors: the next one retries
                    raise HelperFailed("the redaction helper could not start") from None
                helper = self._helpers[n] = _Helper(proc)
        return helper

    async def aclose(self) -> None:
        """Stop the helpers; searches still waiting fail (their callers fail closed)."""
        helpers, self._helpers = self._helpers, [None] * self.processes
        for helper in helpers:
            if helper is not None:
                helper.stop()
                await helper.proc.wait()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper.reader


# --- in the helper process -------------------------------------------------------------


@lru_cache(maxsize=32)
def _redactor(entities: tuple[str, ...], regions: tuple[str, ...]) -> Redactor:
    return Redactor(entities, regions)


def _answer(body: bytes) -> bytes:
    try:
        entities, regions, text = orjson.loads(body)
        found = _redactor(tuple(entities), tuple(regions)).find(text)
        return orjson.dumps([[m.start, m.end, m.entity, m.rule, m.key] for m in found])
    except Exception:
        # the exception could quote the text: the answer says only that it failed
        return orjson.dumps({"error": True})


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until stdin closes (the gateway stopped or dropped this helper)."""
    _redactor(("phone",), DEFAULT_PHONE_REGIONS).find("call +1 415 555 2671 or 020 7946 0958")
    while (head := _read(stdin, _LEN.size)) is not None:
        body = _read(stdin, _LEN.unpack(head)[0])
        if body is None:
            return
        answer = _answer(body)
        stdout.write(_LEN.pack(len(answer)) + answer)
        stdout.flush()


if __name__ == "__main__":
    # Ctrl-C in a terminal reaches the whole process group: the gateway shuts down and
    # closes this helper's stdin, which ends it without a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
