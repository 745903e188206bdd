"""`python -m bench` still runs end to end: a small run, its JSON checked for what it measured.

Speed is not asserted here (docs/performance.md is the measure); what is asserted is
that every scenario of the run completed its messages without errors and recorded
the numbers the report is built from, so the benchmark cannot rot unseen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil

from tests.conftest import Database
from tests.support import bench_databases

REPO = Path(__file__).resolve().parent.parent


def test_a_small_bench_run_measures_every_scenario(database: Database, tmp_path: Path) -> None:
    sessions, messages = 3, 3
    argv = [
        sys.executable, "-m", "bench", "--quick",
        "--database-url", database.owner_url,
        "--sessions", str(sessions), "--messages", str(messages),
        "--idle", "20", "--retention-rows", "2000", "--export-messages", "50",
        "--only", "baseline", "--only", "ws", "--only", "sse",
        "--only", "idle", "--only", "slow-jobs",
        "--out", str(tmp_path),
    ]  # fmt: skip
    logs = tmp_path / "logs"  # the run's child logs, kept out of the machine's /tmp
    logs.mkdir()
    env = {**os.environ, "TMPDIR": str(logs)}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [result_file] = tmp_path.glob("*.json")
    res = orjson.loads(result_file.read_bytes())
    runs = res["runs"]

    for key in ("baseline", "ws", "sse"):
        assert runs[key]["ok"] == sessions * messages, key
        assert runs[key]["errors"] == 0, runs[key]["error_kinds"]
        assert runs[key]["ttft_p50_ms"] > 0
    for key in ("ws", "sse"):
        assert runs[key]["gateway_cpu_ms_per_msg"] > 0
        assert runs[key]["frames_per_msg"] >= 3  # ack, at least one delta, done
        one = runs[key + "_1"]
        assert one["ok"] > 0 and one["errors"] == 0
        # every answered message went through each stage before its first delta
        for stage in ("policy", "redaction", "crypto", "database", "upstream_first_chunk"):
            assert one["stages"][stage]["mean_ms"] > 0, (key, stage)
            assert one["stages"][stage]["per_message"] >= 1, (key, stage)

    for key in ("idle", "idle_sse"):  # WebSockets, then the fallback's keep-alives
        idle = res[key]
        assert idle["held"] == 20 and idle["failed"] == 0, (key, idle)
        assert idle["rss_per_conn_kb"] is not None

    retention = res["slow_jobs"]["retention"]
    assert retention["available"], retention["reason"]
    assert retention["after"] == {"messages": 0, "conversations_anonymized": 20, "subjects_left": 0}
    export = res["slow_jobs"]["export"]
    assert export["available"], export.get("reason")
    assert export["messages_in_export"] == 50

    # the report printed the tables the docs quote
    assert "where TTFT @1 goes" in done.stdout
    assert "| target" in done.stdout
    assert (tmp_path / result_file.with_suffix(".png").name).exists()


def test_sigterm_stops_a_run_and_leaves_nothing_behind(database: Database, tmp_path: Path) -> None:
    before = asyncio.run(bench_databases(database.owner_url))
    argv = [
        sys.executable, "-m", "bench", "--quick", "--database-url", database.owner_url,
        "--sessions", "2", "--messages", "2000", "--only", "ws", "--out", str(tmp_path),
    ]  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "bench.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, "TMPDIR": str(logs)}, stdout=sink, stderr=sink
        )
        try:
            deadline = time.monotonic() + 60
            while b"gateway pid" not in out.read_bytes():  # mid-run: gateway and fake up
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.1)
            kids = psutil.Process(proc.pid).children(recursive=True)
            assert len(kids) >= 2  # the fake upstream and the gateway
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 143, out.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, alive
    assert asyncio.run(bench_databases(database.owner_url)) == before
