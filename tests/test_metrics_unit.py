"""Tests for gateway.metrics: closed label sets, rendering, multiprocess aggregation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics

REPO = Path(__file__).resolve().parent.parent


def sample_value(body: bytes, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and (labels or {}).items() <= sample.labels.items():
                total += sample.value
                found = True
    assert found, f"{name}{labels} not in output"
    return total


@pytest.mark.parametrize(
    ("value", "allowed", "expected"),
    [
        ("answered", metrics.OUTCOMES, "answered"),
        ("answered; DROP TABLE", metrics.OUTCOMES, "other"),
        ("jane@example.org", metrics.ENTITIES, "other"),
        ("", metrics.ERROR_CODES, "other"),
        ("internal", metrics.ERROR_CODES, "internal"),
    ],
    ids=["known", "injection", "free-text", "empty", "code"],
)
def test_label_guard(value: str, allowed: frozenset[str], expected: str) -> None:
    assert metrics.label_guard(value, allowed) == expected


def test_helpers_map_unknown_values_to_other() -> None:
    metrics.REDACTIONS.labels(entity="other")  # make the series exist before reading it
    body, _ = metrics.render_metrics()
    before = sample_value(body, "omnigate_redactions_total", {"entity": "other"})
    metrics.count_redaction("visitor said 555-0132", 2)
    metrics.count_http_request("/api/gdpr/request/9f2c-raw-id", 200)
    metrics.count_http_request(None, 404)
    body, _ = metrics.render_metrics()
    assert sample_value(body, "omnigate_redactions_total", {"entity": "other"}) == before + 2
    assert b"9f2c-raw-id" not in body and b"555-0132" not in body
    assert sample_value(body, "omnigate_http_requests_total", {"route": "unmatched"}) >= 1


def test_retention_kinds_are_what_a_pass_counts() -> None:
    """The label set of omnigate_retention_purged_total is exactly the kinds a retention
    pass reports: none missing (counted as "other"), none documented that never comes."""
    from gateway import retention

    assert set(retention._METRIC_KIND) == set(retention.KINDS)
    assert set(retention._METRIC_KIND.values()) == metrics.RETENTION_KINDS


def test_register_routes_extends_the_route_set() -> None:
    metrics.register_routes(["/api/admin/conversations/{conversation_id}"])
    metrics.count_http_request("/api/admin/conversations/{conversation_id}", 200)
    body, _ = metrics.render_metrics()
    labels = {"route": "/api/admin/conversations/{conversation_id}", "status": "200"}
    assert sample_value(body, "omnigate_http_requests_total", labels) >= 1


def test_render_metrics_text_format_contains_every_metric() -> None:
    metrics.count_message("answered")
    with metrics.timed("policy"):
        pass
    body, content_type = metrics.render_metrics()
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in (
        "omnigate_ws_connections",
        "omnigate_sessions_active",
        "omnigate_messages_total",
        "omnigate_error_frames_total",
        "omnigate_upstream_ttft_seconds",
        "omnigate_upstream_duration_seconds",
        "omnigate_upstream_errors_total",
        "omnigate_stage_seconds",
        "omnigate_redactions_total",
        "omnigate_consent_decisions_total",
        "omnigate_privacy_signals_total",
        "omnigate_privacy_requests_total",
        "omnigate_privacy_requests_overdue",
        "omnigate_retention_purged_total",
        "omnigate_db_pool_connections",
        "omnigate_redis_up",
        "omnigate_ratelimit_fallback_total",
        "omnigate_identity_unverified_total",
        "omnigate_http_requests_total",
    ):
        assert f"# TYPE {name} " in text, name
    assert sample_value(body, "omnigate_stage_seconds_count", {"stage": "policy"}) >= 1
    assert "_created" not in text  # same series in single- and multiprocess mode
    # Pre-created series read 0 instead of being absent.
    assert sample_value(body, "omnigate_error_frames_total", {"code": "session_invalid"}) >= 0


def test_timed_observes_even_when_the_block_raises() -> None:
    def count() -> float:
        body, _ = metrics.render_metrics()
        return sample_value(body, "omnigate_stage_seconds_count", {"stage": "crypto"})

    before = count()
    with pytest.raises(ValueError), metrics.timed("crypto"):
        raise ValueError
    assert count() == before + 1


def _run(code: str, multiproc_dir: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` in a fresh interpreter with PROMETHEUS_MULTIPROC_DIR set."""
    env = os.environ | {
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=30,
    )


def test_multiprocess_mode_sums_workers(tmp_path: Path) -> None:
    worker = """
        from gateway import metrics
        assert metrics.multiprocess_enabled()
        metrics.count_message("answered")
        metrics.WS_CONNECTIONS.inc()
        import os
        print(os.getpid())
    """
    pids = [int(_run(worker, tmp_path).stdout) for _ in range(2)]
    render = """
        import sys
        from gateway import metrics
        for pid in sys.argv[1:]:
            metrics.mark_process_dead(int(pid))
        sys.stdout.buffer.write(metrics.render_metrics()[0])
    """
    body = _run(render, tmp_path).stdout
    assert sample_value(body, "omnigate_messages_total", {"outcome": "answered"}) == 2
    # The workers have exited but were not marked dead: livesum still counts them.
    assert sample_value(body, "omnigate_ws_connections") == 2

    forget = render.replace("sys.argv[1:]", repr([str(p) for p in pids]))
    body = _run(forget, tmp_path).stdout
    # Counters survive a worker's death; its live gauges do not.
    assert sample_value(body, "omnigate_messages_total", {"outcome": "answered"}) == 2
    assert sample_value(body, "omnigate_ws_connections") == 0


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    assert dashboard["schemaVersion"] >= 39
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"omnigate_\w+", e)}
    body, _ = metrics.render_metrics()
    families = list(text_string_to_metric_families(body.decode()))
    # Labelled metrics without children yet have no samples: use family names too.
    exported = {s.name for f in families for s in f.samples}
    exported |= {f.name + ("_total" if f.type == "counter" else "") for f in families}
    exported |= {f.name + "_bucket" for f in families if f.type == "histogram"}
    assert used and used <= exported, used - exported


def test_upstream_error_kinds_match_the_upstream_client() -> None:
    upstream = pytest.importorskip("gateway.upstream")
    assert metrics.UPSTREAM_ERROR_KINDS == upstream.ERROR_KINDS
