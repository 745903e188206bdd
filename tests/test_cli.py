"""The command line: tenant create against a real database, and one clear line per mistake."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from gateway import cli, db
from tests.conftest import Database

CLI = [sys.executable, "-m", "gateway.cli"]
KEY = "test1:a2FrYWthaWthaWthaWthaWthaWthaWthaWthaWthaWs="  # 32 bytes, base64
# stands for the session database's owner URL in a case's environment
OWNER_URL = "<owner url>"
# Redis is not needed to start (it only accelerates); nothing listens here
NO_REDIS = "redis://127.0.0.1:1/0"


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
        (["serve", "--port", "0"], {"OMNIGATE_REDIS_URL": "localhost:6379"}, "OMNIGATE_REDIS_URL"),
        (["serve", "--host", "host..example", "--port", "18999"], {}, "cannot listen"),
        (
            ["serve", "--workers", "2", "--port", "0"],
            {
                "OMNIGATE_DATABASE_URL": OWNER_URL,
                "OMNIGATE_ADMIN_DATABASE_URL": "",
                "OMNIGATE_REDIS_URL": NO_REDIS,
            },
            "refusing to serve",
        ),
        (
            ["serve", "--workers", "2", "--port", "0"],
            {
                "OMNIGATE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x",
                "OMNIGATE_ADMIN_DATABASE_URL": "",
                "OMNIGATE_REDIS_URL": NO_REDIS,
            },
            "cannot connect",
        ),
    ],
    ids=[
        "bad-origin",
        "missing-origin",
        "bad-port",
        "workers-without-redis",
        "unreachable-db",
        "bad-master-key",
        "unknown-command",
        "malformed-redis-url",
        "unencodable-host",
        "workers-as-owner-role",
        "workers-unreachable-db",
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
    env = {k: database.owner_url if v == OWNER_URL else v for k, v in env.items()}
    out = run(args, tmp_path, **env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omnigate: error:"), out.stderr
    assert says in lines[0]


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omnigate: error:"), out.stderr
    return lines[0]


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "supervised"])
def test_serve_on_a_busy_port_is_one_line(
    database: Database, redis_url: str, tmp_path: Path, workers: int
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = run(
            ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            tmp_path,
            OMNIGATE_DATABASE_URL=database.app_url,
            OMNIGATE_ADMIN_DATABASE_URL=database.owner_url,
            OMNIGATE_MASTER_KEYS=KEY,
            OMNIGATE_REDIS_URL=redis_url,
        )
    assert out.returncode == 1, out.stderr
    line = _one_error_line(out)
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_tenant_create_on_an_unmigrated_database_is_one_line(
    database: Database, tmp_path: Path
) -> None:
    name = f"omnigate_unmigrated_{uuid.uuid4().hex[:8]}"

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(database.owner_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(sql(f'CREATE DATABASE "{name}"'))
    try:
        url = urlunsplit(urlsplit(database.owner_url)._replace(path=f"/{name}"))
        out = run(
            ["tenant", "create", "--name", "Shop", "--origin", "https://shop.example"],
            tmp_path,
            OMNIGATE_DATABASE_URL=url,
            OMNIGATE_MASTER_KEYS=KEY,
        )
    finally:
        asyncio.run(sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    assert out.returncode == 1, out.stderr
    line = _one_error_line(out)
    assert "UndefinedTableError" in line and "omnigate migrate" in line
    password = urlsplit(url).password
    assert url not in line and name not in line and (not password or password not in line)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "supervised"])
def test_serve_on_an_unmigrated_database_is_one_line(
    database: Database, tmp_path: Path, workers: int
) -> None:
    """Checked once before any worker starts, not by each worker restarted forever."""
    name = f"omnigate_unmigrated_{uuid.uuid4().hex[:8]}"

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(database.owner_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(sql(f'CREATE DATABASE "{name}"'))
    try:
        url = urlunsplit(urlsplit(database.app_url)._replace(path=f"/{name}"))
        out = run(
            ["serve", "--port", "0", "--workers", str(workers)],
            tmp_path,
            OMNIGATE_DATABASE_URL=url,
            OMNIGATE_MASTER_KEYS=KEY,
            OMNIGATE_REDIS_URL=NO_REDIS,
        )
    finally:
        asyncio.run(sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    assert out.returncode == 1, out.stderr
    line = _one_error_line(out)
    assert "omnigate migrate" in line
    assert url not in line and name not in line


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (
            OSError(errno.EADDRINUSE, "error while attempting to bind on address: in use"),
            "in use",
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/srv/state"), "/srv/state"),
        (
            asyncpg.exceptions.UndefinedColumnError('column "x" of jane@example.org'),
            "SQLSTATE 42703",
        ),
        (asyncpg.exceptions.UniqueViolationError("Key (name)=(Jane Doe)"), "SQLSTATE 23505"),
        (asyncpg.exceptions.InterfaceError("pool closed, postgresql://u:pw@db/x"), "connection"),
        (RuntimeError("bug near postgresql://u:pw@db/x"), "RuntimeError"),
    ],
    ids=["address-in-use", "permission", "unmigrated", "postgres-text", "interface", "a-bug"],
)
def test_runtime_failures_are_one_line_without_their_text(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    says: str,
) -> None:
    def fail(argv: object = None) -> int:
        raise error

    monkeypatch.setattr(cli, "run", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("omnigate: error:") and says in err
    for private in ("jane@example.org", "Jane Doe", "pw@db"):
        assert private not in err


def test_a_commands_log_warnings_go_out_scrubbed(tmp_path: Path) -> None:
    """Outside `serve`, a warning logged while a command runs is a scrubbed JSON line,
    not Python's bare last-resort print."""
    code = (
        "import logging, gateway.cli as c\n"
        "def run(argv):\n"
        "    logging.getLogger('omnigate.job').warning(\n"
        "        'peer 203.0.113.77 sent omnigate_session=Zq8vT1xYw3kLm9Rb2Hc7Pd5Nf0Gj4Ks6')\n"
        "    return 0\n"
        "c.run = run\n"
        "c.main([])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [line] = done.stderr.strip().splitlines()
    record = orjson.loads(line)
    assert record["level"] == "WARNING"
    assert "203.0.113.77" not in line and "Zq8vT1xYw3kLm9Rb2Hc7Pd5Nf0Gj4Ks6" not in line


# a base64 password often holds a '/', which ends the URL's authority: asyncpg then
# reads the password's start as the port and its error quotes it
BAD_PASSWORD = "Kq9Zr2pW"
BAD_URL = f"postgresql://app:{BAD_PASSWORD}/tail@127.0.0.1:5432/test"


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["migrate"], {"OMNIGATE_ADMIN_DATABASE_URL": BAD_URL}, "OMNIGATE_ADMIN_DATABASE_URL"),
        (
            ["retention", "run"],
            {"OMNIGATE_ADMIN_DATABASE_URL": BAD_URL},
            "OMNIGATE_ADMIN_DATABASE_URL",
        ),
        (["serve", "--port", "0"], {"OMNIGATE_ADMIN_DATABASE_URL": ""}, "OMNIGATE_DATABASE_URL"),
    ],
    ids=["migrate", "retention", "serve"],
)
def test_a_malformed_database_url_is_one_line_without_the_password(
    tmp_path: Path, args: list[str], env: dict[str, str], names: str
) -> None:
    out = run(args, tmp_path, OMNIGATE_DATABASE_URL=BAD_URL, OMNIGATE_MASTER_KEYS=KEY, **env)
    assert out.returncode == 1, out.stderr
    line = _one_error_line(out)
    assert f"{names} is not a valid PostgreSQL URL" in line
    assert BAD_PASSWORD not in out.stderr


def test_a_crashing_worker_logs_one_scrubbed_line(tmp_path: Path) -> None:
    """A supervised worker that fails is one JSON log line with the error's type, not
    the traceback multiprocessing would print raw."""
    code = (
        "from gateway.config import Settings\n"
        "from gateway.server import _Supervisor\n"
        "if __name__ == '__main__':\n"
        f"    settings = Settings(database_url={BAD_URL!r}, port=0)\n"
        "    worker = _Supervisor(settings, 1)._spawn()\n"
        "    worker.join(50)\n"
        "    print(worker.exitcode)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "1", done.stderr
    assert "Traceback" not in done.stderr and BAD_PASSWORD not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    record = orjson.loads(line)
    assert record["event"].startswith("worker failed") and record["error"] == "DatabaseError"


async def test_a_failed_migration_does_not_quote_row_values(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's message carries PostgreSQL's DETAIL, which quotes the offending row."""
    (tmp_path / "9999_probe.sql").write_text(
        "CREATE TEMP TABLE omnigate_probe (v text CONSTRAINT probe_unique UNIQUE);"
        "INSERT INTO omnigate_probe VALUES ('jane@example.org'), ('jane@example.org');"
    )
    monkeypatch.setattr(db, "MIGRATIONS_DIR", tmp_path)
    with pytest.raises(db.DatabaseError) as failed:
        await db.migrate(database.owner_url, None)
    message = str(failed.value)
    assert "UniqueViolationError" in message and "SQLSTATE 23505" in message
    assert "probe_unique" in message and "jane" not in message


async def test_a_member_of_the_table_owner_is_refused(database: Database) -> None:
    """A member can SET ROLE to the owner and switch row-level security off."""
    from gateway.embedded import with_user

    role = f"omnigate_test_member_{uuid.uuid4().hex[:8]}"
    owner = await asyncpg.connect(database.owner_url)
    try:
        table_owner = await owner.fetchval(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'messages'"
        )
        await owner.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOBYPASSRLS')
        await owner.execute(f'GRANT "{table_owner}" TO "{role}"')
        pool = await db.create_pool(with_user(database.app_url, role), min_size=1, max_size=1)
        try:
            with pytest.raises(db.DatabaseError, match="member of the table owner"):
                await db.check_app_role(pool)
        finally:
            await pool.close()
    finally:
        await owner.execute(f'DROP ROLE IF EXISTS "{role}"')
        await owner.close()
