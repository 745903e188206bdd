"""`python -m bench.floor` runs and reports every leg (speed is not asserted: it is the measure).

Also: the bench's CLIs answer a wrong argument with one usage line, before doing anything.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.floor import AHEAD_OF_FORWARDING, LEGS
from tests.conftest import Database
from tests.support import bench_databases

REPO = Path(__file__).resolve().parent.parent


def _run(
    args: list[str], tmp_path: Path, module: str = "bench.floor"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the fake's log stays under the test's dir
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_leg_is_measured_and_the_series_is_their_sum(
    database: Database, tmp_path: Path
) -> None:
    before = asyncio.run(bench_databases(database.owner_url))
    done = _run(["--rounds", "1", "--calls", "3", "--database-url", database.owner_url], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows: dict[str, list[float]] = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        nums = [float(m) for c in cells[1:] for m in re.findall(r"\d+\.\d+", c)[:1]]
        if len(nums) >= 2:
            rows[cells[0]] = nums
    for leg in LEGS:
        assert leg in rows, leg
        # back to back, after idle, and this process's CPU per call
        assert len(rows[leg]) == 3 and all(v > 0 for v in rows[leg]), (leg, rows[leg])
    [series] = [v for k, v in rows.items() if k.startswith("in series before forwarding")]
    for col, rounding in ((0, 0.0015), (1, 0.0015), (2, 0.15)):
        expected = sum(rows[leg][col] for leg in AHEAD_OF_FORWARDING)
        assert abs(series[col] - expected) < rounding, (series, expected)
    # the run dropped its database and left no log behind on success
    assert asyncio.run(bench_databases(database.owner_url)) == before
    assert not list(tmp_path.glob("omnigate-floor-*"))


@pytest.mark.parametrize(
    ("module", "args", "says"),
    [
        ("bench.floor", ["--calls", "0"], "--calls: must be at least 1"),
        ("bench.floor", ["--idle-ms", "-1"], "--idle-ms: must be between 0 and 60000"),
        ("bench.floor", ["--database-url", "localhost:5432"], "expected postgresql://"),
        ("bench", ["--database-url", "mysql://root@127.0.0.1/test"], "expected postgresql://"),
        ("bench", ["--sessions", "0"], "--sessions: must be at least 1"),
        ("bench", ["--messages", "-1"], "--messages: must be at least 1"),
        ("bench", ["--chunks", "many"], "--chunks: expected a whole number"),
        ("bench", ["--workers", "0"], "--workers: must be at least 1"),
        ("bench", ["--idle", "-1"], "--idle: must be at least 1"),
        ("bench", ["--delay-ms", "-5"], "--delay-ms: must be between 0 and 60000"),
        ("bench", ["--redis-url", "nonsense"], "--redis-url: expected redis://"),
    ],
)
def test_a_wrong_argument_is_one_clear_error(
    tmp_path: Path, module: str, args: list[str], says: str
) -> None:
    done = _run(args, tmp_path, module)
    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr
