"""The command line: tenant create against a real database, and one clear line per mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import Database

CLI = [sys.executable, "-m", "gateway.cli"]
KEY = "test1:a2FrYWthaWthaWthaWthaWthaWthaWthaWthaWthaWs="  # 32 bytes, base64


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMNIGATE_", "OPENAI_"))}
    return subprocess.run(
        [*CLI, *args],
        env={**base, "OMNIGATE_STATE_DIR": str(tmp_path / "state"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )


def test_tenant_create_prints_its_keys(database: Database, tmp_path: Path) -> None:
    out = run(
        ["tenant", "create", "--name", "Shop", "--origin", "https://shop.example"],
        tmp_path,
        OMNIGATE_DATABASE_URL=database.app_url,
        OMNIGATE_MASTER_KEYS=KEY,
    )
    assert out.returncode == 0, out.stderr
    created = orjson.loads(out.stdout)
    assert set(created) == {"tenant_id", "site_key", "admin_key"}
    assert created["site_key"].startswith("pk_") and created["admin_key"].startswith("ak_")


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["tenant", "create", "--name", "x", "--origin", "not a url"], {}, "allowed_origins"),
        (["tenant", "create", "--name", "x"], {}, "--origin"),
        (["serve", "--port", "99999"], {}, "--port"),
        (["serve", "--workers", "2"], {}, "OMNIGATE_REDIS_URL"),
        (
            ["migrate"],
            {
                "OMNIGATE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x",
                "OMNIGATE_ADMIN_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x",
            },
            "cannot connect",
        ),
        (["migrate"], {"OMNIGATE_MASTER_KEYS": "k1:not-base64!"}, "OMNIGATE_MASTER_KEYS"),
        (["frobnicate"], {}, "invalid choice"),
    ],
    ids=[
        "bad-origin",
        "missing-origin",
        "bad-port",
        "workers-without-redis",
        "unreachable-db",
        "bad-master-key",
        "unknown-command",
    ],
)
def test_user_mistakes_get_one_line_and_no_traceback(
    database: Database, tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    env = {
        "OMNIGATE_DATABASE_URL": database.app_url,
        "OMNIGATE_MASTER_KEYS": KEY,
        "OMNIGATE_ADMIN_DATABASE_URL": database.owner_url,
        **env,
    }
    out = run(args, tmp_path, **env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omnigate: error:"), out.stderr
    assert says in lines[0]
