"""The benchmark's TTFT breakdown reads the gateway's histograms right (bench/stages.py).

The input is real Prometheus text from prometheus_client, with the same metric names
and labels as gateway/metrics.py, in a registry of its own.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from bench import stages


def _registry() -> tuple[CollectorRegistry, Histogram, Histogram]:
    reg = CollectorRegistry()
    stage = Histogram("omnigate_stage_seconds", "s", ["stage"], registry=reg)
    ttft = Histogram("omnigate_upstream_ttft_seconds", "t", registry=reg)
    # a family with a `stage`-like shape that must be ignored
    Counter("omnigate_messages", "m", ["stage"], registry=reg).labels(stage="database").inc(7)
    return reg, stage, ttft


def _scrape(reg: CollectorRegistry) -> stages.Sums:
    return stages.parse(generate_latest(reg).decode())


def test_parse_keeps_sum_and_count_per_stage_and_the_upstream() -> None:
    reg, stage, ttft = _registry()
    stage.labels(stage="database").observe(0.002)
    stage.labels(stage="database").observe(0.004)
    stage.labels(stage="redaction").observe(0.0005)
    ttft.observe(0.0015)
    got = _scrape(reg)
    assert got["database"] == pytest.approx((0.006, 2))
    assert got["redaction"] == pytest.approx((0.0005, 1))
    assert got[stages.UPSTREAM] == pytest.approx((0.0015, 1))
    assert "policy" not in got  # never observed, never created


def test_only_what_happened_between_two_scrapes_counts() -> None:
    reg, stage, ttft = _registry()
    stage.labels(stage="database").observe(1.0)  # before: must not count
    acc: stages.Sums = {}
    for db_seconds in (0.001, 0.003):
        before = _scrape(reg)
        stage.labels(stage="database").observe(db_seconds)
        stage.labels(stage="crypto").observe(0.0001)
        stage.labels(stage="crypto").observe(0.0001)
        ttft.observe(0.002)
        stages.add_delta(acc, before, _scrape(reg))
    stage.labels(stage="database").observe(1.0)  # after: must not count either
    means = stages.means_ms(acc, messages=2)
    assert means["database"]["mean_ms"] == pytest.approx(2.0)
    assert means["database"]["per_message"] == pytest.approx(1.0)
    assert means["crypto"]["mean_ms"] == pytest.approx(0.1)
    assert means["crypto"]["per_message"] == pytest.approx(2.0)
    assert means[stages.UPSTREAM]["mean_ms"] == pytest.approx(2.0)
    assert means["policy"] == {"mean_ms": None, "per_message": 0.0}


def test_the_rest_is_what_no_stage_covers() -> None:
    from bench import report

    stages_ms = {"policy": 0.1, "redaction": 0.5, "crypto": 0.2, "database": 1.0}
    st = {k: {"mean_ms": v, "per_message": 1.0} for k, v in stages_ms.items()}
    st[stages.UPSTREAM] = {"mean_ms": 1.5, "per_message": 1.0}
    runs = {"baseline_1": {"ttft_mean_ms": 1.0}, "ws_1": {"ttft_mean_ms": 5.0, "stages": st}}
    table = report.stages_table({"runs": runs})
    rest = next(line for line in table.splitlines() if line.startswith("| rest"))
    assert rest.split("|")[2].strip() == "0.70"  # 5.0 - 1.0 - (0.1 + 0.5 + 0.2 + 1.0 + 1.5)
    assert "sse" not in table.splitlines()[0]  # no sse run, no sse column
    st["policy"]["mean_ms"] = None  # a stage never observed: no rest to speak of
    rest = next(line for line in report.stages_table({"runs": runs}).splitlines()
                if line.startswith("| rest"))  # fmt: skip
    assert rest.split("|")[2].strip() == "—"
