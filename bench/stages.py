"""Where one session's time to first delta goes, from the gateway's own histograms.

Around each one-session run the benchmark reads the gateway's `/metrics` (loopback, so
no token) and keeps the difference: sum and count of `omnigate_stage_seconds{stage}`
and of `omnigate_upstream_ttft_seconds` over exactly those messages. The mean of each
is what one observation cost; what the stages do not cover (receiving and framing,
the SSE resume, event-loop hops, the client) is the rest of the client's mean TTFT.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

STAGES = ("policy", "redaction", "crypto", "database")  # omnigate_stage_seconds{stage}
UPSTREAM = "upstream_first_chunk"  # omnigate_upstream_ttft_seconds
_FAMILIES = ("omnigate_stage_seconds", "omnigate_upstream_ttft_seconds")

Sums = dict[str, tuple[float, float]]  # name -> (seconds, observations)


def parse(text: str) -> Sums:
    """Sum and count per stage (and of the upstream's first chunk) in Prometheus text."""
    out: Sums = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _FAMILIES:
            continue
        for s in family.samples:
            name = s.labels.get("stage", UPSTREAM)
            total, count = out.get(name, (0.0, 0.0))
            if s.name.endswith("_sum"):
                out[name] = (total + s.value, count)
            elif s.name.endswith("_count"):
                out[name] = (total, count + s.value)
    return out


async def scrape(base_url: str) -> Sums:
    """The gateway's sums (with several workers, the answering one reports them all)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(base_url + "/metrics") as resp,
    ):
        resp.raise_for_status()
        return parse(await resp.text())


def add_delta(acc: Sums, before: Sums, after: Sums) -> None:
    """Add what was observed between two scrapes to `acc`."""
    for name, (total, count) in after.items():
        t0, c0 = before.get(name, (0.0, 0.0))
        t, c = acc.get(name, (0.0, 0.0))
        acc[name] = (t + total - t0, c + count - c0)


def means_ms(acc: Sums, messages: int) -> dict[str, Any]:
    """Per stage: mean ms per observation and observations per message."""
    out: dict[str, Any] = {}
    for name in (*STAGES, UPSTREAM):
        total, count = acc.get(name, (0.0, 0.0))
        out[name] = {
            "mean_ms": total * 1000 / count if count else None,
            "per_message": count / messages if messages else None,
        }
    return out
