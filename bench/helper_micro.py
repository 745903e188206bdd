"""Micro-benchmark of the redaction helper: inline search against the helper's round trip.

Run: ``.venv/bin/python -m bench.helper_micro``. For messages from light to the
heaviest a visitor can send (4,000 characters), sequential calls of:

* ``inline``: ``Redactor.find`` on the event loop (what every message did before);
* ``helper``: ``RedactionPool.find``, the pipes to ``python -m gateway.redactpool``;
* ``pool``: the same search through ``concurrent.futures.ProcessPoolExecutor``, the
  stdlib way, for comparison.

"wall" is the caller's wait per message; "loop CPU" is this process's CPU per message,
the time its event loop could not serve anyone else. Also prints the helper's RSS.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor

import psutil

from bench.load import heavy_text, message_text
from gateway.redactpool import HEAVY_COST, RedactionPool
from policies import ENTITIES, Redactor
from policies.detect import Match, phone_cost, phone_windows

REDACTOR = Redactor(ENTITIES)

MESSAGES = {
    "bench message": message_text(3, 7),
    "one national number": "Please call me back at (415) 555-2671 this afternoon.",
    "two phones, an order": (
        "Call me at (415) 555-2671 or my office 020 7946 0958, order 12345678 on 2026-03-04."
    ),
    "orders, 1,000 chars": heavy_text(1)[:1000],
    "orders, 4,000 chars": heavy_text(1),
    "spaced digits, 4,000": " ".join("7384019265" * 200)[:4000],
}


def _pool_find(text: str) -> list[tuple[int, int, str, str, str]]:
    return [(m.start, m.end, m.entity, m.rule, m.key) for m in REDACTOR.find(text)]


async def per_call(fn: Callable[[], Awaitable[object]], n: int) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) per call, over n sequential calls."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t0) / n * 1e3, (time.process_time() - c0) / n * 1e3


async def main() -> None:
    helper = RedactionPool(1)
    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    loop = asyncio.get_running_loop()

    async def inline(text: str) -> list[Match]:
        return REDACTOR.find(text)

    async def helped(text: str) -> list[Match]:
        return await helper.find(REDACTOR, text)

    async def pooled(text: str) -> list[Match]:
        found = await loop.run_in_executor(executor, _pool_find, text)
        return [Match(*m) for m in found]

    for text in MESSAGES.values():  # start both, load the metadata
        assert await helper.find(REDACTOR, text) == await pooled(text) == REDACTOR.find(text)
    print(
        f"{'message':<22}{'cost':>7}{'inline':>9}"
        f"{'helper wall':>13}{'loop CPU':>10}{'pool wall':>11}{'loop CPU':>10}   (ms per message)"
    )
    for name, text in MESSAGES.items():
        n = max(5, min(300, int(60 / (1 + len(text) / 100))))
        row = [await per_call(lambda f=f, t=text: f(t), n) for f in (inline, helped, pooled)]
        (iw, _), (hw, hc), (pw, pc) = row
        print(
            f"{name:<22}{phone_cost(phone_windows(text)):>7}{iw:>9.3f}{hw:>13.3f}{hc:>10.3f}{pw:>11.3f}{pc:>10.3f}"
        )

    rss = sum(psutil.Process(pid).memory_info().rss for pid in helper.pids())
    print(f"\nhelper RSS after these searches: {rss / 2**20:.1f} MB")
    print(f"gateway rule: the helper searches messages costing {HEAVY_COST} passes or more")
    await helper.aclose()
    executor.shutdown()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
