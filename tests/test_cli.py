"""The command line: tenant create against a real database, and one clear line per mistake."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from gateway import cli, db
from gateway.server import http_address
from tests.conftest import Database
from tests.support import free_port

CLI = [sys.executable, "-m", "gateway.cli"]
KEY = "test1:a2FrYWthaWthaWthaWthaWthaWthaWthaWthaWthaWs="  # 32 bytes, base64
# stands for the session database's owner URL in a case's environment
OWNER_URL = "<owner url>"
# Redis is not needed to start (it only accelerates); nothing listens here
NO_REDIS = "redis://127.0.0.1:1/0"
# stands for a free port in a case's arguments (several workers refuse port 0)
FREE_PORT = "<free port>"


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
        (["serve", "--workers", "65"], {}, "--workers must be 1-64"),
        (["serve", "--workers", "2", "--port", "0"], {"OMNIGATE_REDIS_URL": NO_REDIS}, "--port 0"),
        (
            ["serve", "--workers", "2"],
            {"OMNIGATE_REDIS_URL": NO_REDIS, "OMNIGATE_PORT": "0"},
            "OMNIGATE_PORT 0",
        ),
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
            ["serve", "--workers", "2", "--port", FREE_PORT],
            {
                "OMNIGATE_DATABASE_URL": OWNER_URL,
                "OMNIGATE_ADMIN_DATABASE_URL": "",
                "OMNIGATE_REDIS_URL": NO_REDIS,
            },
            "refusing to serve",
        ),
        (
            ["serve", "--workers", "2", "--port", FREE_PORT],
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
        "too-many-workers",
        "workers-on-port-0",
        "workers-on-port-0-from-env",
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
    args = [str(free_port()) if a == FREE_PORT else a for a in args]
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
        # another process's SO_REUSEPORT listener: a probe with SO_REUSEPORT (as the
        # workers' own sockets have) would bind beside it and share the port
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
            ["serve", "--port", str(free_port()), "--workers", str(workers)],
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


TENANT_CREATE = ["tenant", "create", "--name", "Shop", "--origin", "https://shop.example"]


def _url(port: str = "5432", host: str = "127.0.0.1") -> str:
    return f"postgresql://app:{BAD_PASSWORD}@{host}:{port}/test"


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["migrate"], {"OMNIGATE_ADMIN_DATABASE_URL": BAD_URL}, "OMNIGATE_ADMIN_DATABASE_URL"),
        (
            # the admin URL is not used here (only `migrate` and `serve` use it)
            ["retention", "run"],
            {"OMNIGATE_ADMIN_DATABASE_URL": BAD_URL},
            "OMNIGATE_DATABASE_URL",
        ),
        (["serve", "--port", "0"], {"OMNIGATE_ADMIN_DATABASE_URL": ""}, "OMNIGATE_DATABASE_URL"),
        (
            ["migrate"],
            {"OMNIGATE_ADMIN_DATABASE_URL": _url("99999")},
            "OMNIGATE_ADMIN_DATABASE_URL",
        ),
        (TENANT_CREATE, {"OMNIGATE_DATABASE_URL": _url("99999")}, "OMNIGATE_DATABASE_URL"),
        (TENANT_CREATE, {"OMNIGATE_DATABASE_URL": _url("-1")}, "OMNIGATE_DATABASE_URL"),
        (
            # no app URL: the app role's URL is made from the admin URL
            ["migrate"],
            {"OMNIGATE_DATABASE_URL": "", "OMNIGATE_ADMIN_DATABASE_URL": _url(host="[::1")},
            "OMNIGATE_ADMIN_DATABASE_URL",
        ),
        (
            ["migrate"],
            {"OMNIGATE_DATABASE_URL": _url(host="[::1"), "OMNIGATE_ADMIN_DATABASE_URL": OWNER_URL},
            "OMNIGATE_DATABASE_URL",
        ),
    ],
    ids=[
        "migrate",
        "retention",
        "serve",
        "admin-port-too-large",
        "port-too-large",
        "negative-port",
        "admin-unbalanced-bracket",
        "app-unbalanced-bracket",
    ],
)
def test_a_malformed_database_url_is_one_line_without_the_password(
    database: Database, tmp_path: Path, args: list[str], env: dict[str, str], names: str
) -> None:
    env = {"OMNIGATE_DATABASE_URL": BAD_URL, "OMNIGATE_ADMIN_DATABASE_URL": "", **env}
    env = {k: database.owner_url if v == OWNER_URL else v for k, v in env.items()}
    out = run(args, tmp_path, OMNIGATE_MASTER_KEYS=KEY, **env)
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


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("shop.example", "http://shop.example:8080"),
        ("::1", "http://[::1]:8080"),
        ("::", "http://[::]:8080"),
        ("[::1]", "http://[::1]:8080"),
    ],
    ids=["ipv4", "name", "ipv6", "ipv6-any", "already-bracketed"],
)
def test_printed_addresses_bracket_an_ipv6_host(host: str, url: str) -> None:
    assert http_address(host, 8080) == url


async def _owner_sql(owner_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(owner_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def test_jobs_with_the_admin_url_set_do_not_migrate_or_touch_the_app_role(
    database: Database, tmp_path: Path
) -> None:
    """Only `migrate` and `serve` use OMNIGATE_ADMIN_DATABASE_URL (DESIGN §2): another
    command checks the migrations and never resets the app role's password."""
    suffix = uuid.uuid4().hex[:8]
    name, role, password = f"omnigate_jobs_{suffix}", f"omnigate_jobs_app_{suffix}", "first-pw"
    owner_url = urlunsplit(urlsplit(database.owner_url)._replace(path=f"/{name}"))
    parts = urlsplit(database.app_url)
    netloc = f"{role}:{password}@{parts.netloc.rpartition('@')[2]}"
    app_url = urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))

    async def rolpassword() -> str:
        conn = await asyncpg.connect(database.owner_url)
        try:
            value = await conn.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role
            )
        finally:
            await conn.close()
        assert isinstance(value, str)
        return value

    env = {
        "OMNIGATE_DATABASE_URL": app_url,
        "OMNIGATE_ADMIN_DATABASE_URL": owner_url,
        "OMNIGATE_MASTER_KEYS": KEY,
    }
    asyncio.run(
        _owner_sql(
            database.owner_url,
            f'CREATE DATABASE "{name}"',
            f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'",
        )
    )
    try:
        # not migrated: refused, and left unmigrated
        unmigrated = run(["audit", "verify"], tmp_path, **env)
        assert unmigrated.returncode == 1, unmigrated.stderr
        line = _one_error_line(unmigrated)
        assert "omnigate migrate" in line and password not in line
        assert "serve migrates at start" not in line  # the admin URL is already set
        asyncio.run(db.migrate(owner_url, app_url))
        before = asyncio.run(rolpassword())
        for args in (["audit", "verify"], TENANT_CREATE):
            out = run(args, tmp_path, **env)
            assert out.returncode == 0, out.stderr
        # a fresh SCRAM salt would change the verifier even for the same password
        assert asyncio.run(rolpassword()) == before
    finally:
        asyncio.run(
            _owner_sql(
                database.owner_url,
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                f'DROP ROLE IF EXISTS "{role}"',
            )
        )


def test_serve_demo_writes_the_admin_key_to_a_private_file_when_stderr_is_a_log(
    database: Database, tmp_path: Path
) -> None:
    """`docker logs` must not hold the demo tenant's admin key; a terminal still shows it."""
    from gateway.embedded import with_user
    from tests.conftest import TEST_APP_ROLE

    # a database of its own: the session's keeps its demo tenant for test_provision
    name = f"omnigate_demo_{uuid.uuid4().hex[:8]}"
    owner_url = urlunsplit(urlsplit(database.owner_url)._replace(path=f"/{name}"))
    app_url = with_user(database.app_url, TEST_APP_ROLE, name)
    asyncio.run(_owner_sql(database.owner_url, f'CREATE DATABASE "{name}"'))
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMNIGATE_", "OPENAI_"))}
    env = {
        **base,
        "OMNIGATE_STATE_DIR": str(tmp_path / "state"),
        "OMNIGATE_DATABASE_URL": app_url,
        "OMNIGATE_ADMIN_DATABASE_URL": owner_url,
        "OMNIGATE_MASTER_KEYS": KEY,
    }
    proc = subprocess.Popen(
        [*CLI, "serve", "--demo", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        key_file = tmp_path / "state" / cli.DEMO_KEY_FILE
        status = asyncio.run(_admin_status_once_up(port, key_file, proc))
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            asyncio.run(
                _owner_sql(database.owner_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            )
    assert status == 200, err
    assert "ak_" not in err
    assert f"its admin key is in {key_file}" in err
    assert key_file.stat().st_mode & 0o777 == 0o600


async def _admin_status_once_up(port: int, key_file: Path, proc: subprocess.Popen[str]) -> int:
    """Wait for /healthz, then present the key from key_file to the admin API."""
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            assert proc.poll() is None, "serve exited"
            try:
                async with session.get(f"{base}/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /healthz"
            await asyncio.sleep(0.1)
        key = (await asyncio.to_thread(key_file.read_text)).strip()
        assert key.startswith("ak_")
        headers = {"Authorization": f"Bearer {key}"}
        async with session.get(f"{base}/api/admin/policy", headers=headers) as resp:
            return resp.status


async def test_allowing_the_same_origins_again_adds_no_policy_version(
    app_pool: asyncpg.Pool,
) -> None:
    """`serve --demo` on port 80 (or a host in capitals) starts with the same origins
    each time; given as typed, they are stored normalized."""
    from gateway import store
    from gateway.db import tenant_tx
    from gateway.provision import allow_origins, create_tenant

    t = await create_tenant(app_pool, f"origins-{uuid.uuid4().hex[:6]}", ["http://127.0.0.1:8080"])

    async def version() -> int:
        async with tenant_tx(app_pool, t.tenant_id) as conn:
            row = await store.latest_policy(conn, t.tenant_id)
        assert row is not None
        return int(row[0])

    typed = ["http://127.0.0.1:80", "http://Shop.Example:8080", "http://127.0.0.1:8080/"]
    await allow_origins(app_pool, t.tenant_id, typed)
    assert await version() == 2
    await allow_origins(app_pool, t.tenant_id, typed)
    assert await version() == 2


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "state"),
    [(True, "state"), (False, "state"), (False, "a-file/state")],
    ids=["terminal", "log", "log-state-dir-unwritable"],
)
def test_the_demo_admin_key_reaches_a_terminal_or_a_private_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tty: bool, state: str
) -> None:
    from gateway.config import Settings

    (tmp_path / "a-file").write_text("")  # a state directory below it cannot be made
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    err = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", err)
    cli._show_demo_key(Settings(state_dir=tmp_path / state), "ak_demo_secret")
    if tty:
        assert "ak_demo_secret" in err.getvalue()
        return
    assert "ak_" not in err.getvalue()
    [path] = [
        p
        for p in (tmp_path / state / cli.DEMO_KEY_FILE, *temp.iterdir())
        if p.is_file() and str(p) in err.getvalue()
    ]
    assert path.read_text().strip() == "ak_demo_secret"
    assert path.stat().st_mode & 0o777 == 0o600
