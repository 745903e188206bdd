"""PostgreSQL access: the pool, tenant-scoped transactions, role checks and migrations.

Every read and write of tenant data runs inside `tenant_tx`, which sets
`app.tenant_id` with `set_config(..., true)`: transaction-local, so the pattern
survives PgBouncer in transaction mode and leaves nothing on the connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit
from uuid import UUID

import asyncpg
from asyncpg import Pool as Pool  # re-exported: the pool type of every signature


def _migrations_dir() -> Path:
    # a source checkout keeps them beside the package; an installed image in its workdir
    beside = Path(__file__).resolve().parent.parent / "migrations"
    return beside if beside.is_dir() else Path.cwd() / "migrations"


MIGRATIONS_DIR = _migrations_dir()
APP_GROUP_ROLE = "omnigate_app"
SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


class DatabaseError(Exception):
    """The database cannot be used as configured; the message is safe to print."""


def invalid_url(variable: str) -> str:
    """The one line for a PostgreSQL URL that cannot be parsed: its name, never its text."""
    return (
        f"{variable} is not a valid PostgreSQL URL "
        "(percent-encode / # ? @ : in the user name and password)"
    )


def describe_postgres_error(exc: Exception) -> str:
    """The error's class, SQLSTATE and constraint: its text and DETAIL can quote row values."""
    state = getattr(exc, "sqlstate", None) or "?"
    constraint = getattr(exc, "constraint_name", None)
    where = f", constraint {constraint}" if constraint else ""
    return f"{type(exc).__name__} (SQLSTATE {state}{where})"


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 20) -> Pool:
    """Open a pool; statement cache off would break nothing, so keep asyncpg's default."""
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            command_timeout=30,
            server_settings={"application_name": "omnigate"},
            reset=_reset,
        )
    # asyncpg's parse error can quote the password: never its text; a port out of
    # range (99999, -1) is an OverflowError
    except (ValueError, OverflowError):
        raise DatabaseError(invalid_url("OMNIGATE_DATABASE_URL")) from None
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL ({type(exc).__name__})") from None
    assert pool is not None
    return pool


@asynccontextmanager
async def tenant_tx(pool: Pool, tenant_id: UUID) -> AsyncIterator[asyncpg.Connection]:
    """A transaction in which row-level security exposes exactly one tenant.

    BEGIN and set_config travel in one round trip (a simple-query batch); the
    message path itself writes with single autocommit statements instead. The id
    is formatted into the SQL only as a uuid.UUID, whose text is hex and dashes.
    """
    # re-parsed so only a canonical UUID text can reach the SQL (asyncpg hands out its own type)
    tid = tenant_id if type(tenant_id) is UUID else UUID(str(tenant_id))
    async with pool.acquire() as conn:
        await conn.execute(f"BEGIN; SELECT set_config('app.tenant_id', '{tid}', true)")
        try:
            yield conn
        except BaseException:
            # a broken connection cannot roll back; the original error is the one to report
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")


async def _reset(conn: asyncpg.Connection) -> None:
    """Pool reset: every use keeps its state inside a transaction, so only end a stray one.

    asyncpg's default reset (RESET ALL, UNLISTEN, CLOSE ALL, unlock all) costs a
    round trip per checkout and has nothing to clean here; the same invariant is
    what keeps PgBouncer's transaction mode working.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@asynccontextmanager
async def lookup_tx(pool: Pool, secret_hash: bytes) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that may see only the rows whose secret hashes to `secret_hash`."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.lookup_hash', $1, true)", secret_hash.hex())
        yield conn


async def check_app_role(pool: Pool) -> None:
    """Refuse a role that would bypass row-level security: superuser, BYPASSRLS or owner.

    A member of the owner role counts as the owner: it can SET ROLE to it and switch
    row-level security off (a role is a member of itself).
    """
    row = await pool.fetchrow(
        """
        SELECT r.rolname, r.rolsuper, r.rolbypassrls,
               EXISTS (SELECT 1 FROM pg_tables t
                       WHERE t.schemaname = current_schema()
                         AND pg_has_role(current_user, t.tableowner, 'MEMBER')
                         AND t.tablename IN ('messages', 'sessions', 'tenants')) AS owns
        FROM pg_roles r WHERE r.rolname = current_user
        """
    )
    assert row is not None
    if row["rolsuper"] or row["rolbypassrls"] or row["owns"]:
        why = (
            "superuser"
            if row["rolsuper"]
            else "BYPASSRLS"
            if row["rolbypassrls"]
            else "the table owner or a member of the table owner role"
        )
        raise DatabaseError(
            f"refusing to serve as database role {row['rolname']!r}: it is {why} and would "
            "bypass row-level security; use an app role (see docs/operations.md)"
        )


def migration_files() -> list[Path]:
    """Migration files in the order they apply."""
    return sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


async def applied_migrations(conn: asyncpg.Connection | Pool) -> list[str]:
    """Names of applied migrations, or [] when the schema is new."""
    exists = await conn.fetchval("SELECT to_regclass('omnigate_migrations') IS NOT NULL")
    if not exists:
        return []
    return [
        r["name"] for r in await conn.fetch("SELECT name FROM omnigate_migrations ORDER BY name")
    ]


async def migrations_current(pool: Pool) -> bool:
    """True when every migration file this code knows has been applied.

    A database ahead of the code (a newer release migrated it) is fine: during a
    rolling deploy the first new instance migrates at start, and the old instances
    must not all leave rotation at that moment.
    """
    return {p.name for p in migration_files()} <= set(await applied_migrations(pool))


NOT_MIGRATED = "the database is not migrated for this release: run `omnigate migrate`"


async def require_migrations(pool: Pool, hint: str = "") -> None:
    """Raise DatabaseError (NOT_MIGRATED, then `hint`) unless every migration this code
    knows is applied."""
    if not await migrations_current(pool):
        raise DatabaseError(NOT_MIGRATED + hint)


def _role_of(url: str) -> tuple[str, str | None]:
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" (IPv6)
        raise DatabaseError(invalid_url("OMNIGATE_DATABASE_URL")) from None
    if not parts.username:
        raise DatabaseError("OMNIGATE_DATABASE_URL must name the app role (user@host)")
    return unquote(parts.username), unquote(parts.password) if parts.password else None


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 0) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, RFC 7677).

    PostgreSQL takes a verifier in place of a password and stores it as it is. The
    password is used as given (no SASLprep): PostgreSQL does the same with one that is
    not valid UTF-8 or that SASLprep leaves unchanged, as ASCII passwords are.
    """
    salt = os.urandom(16) if salt is None else salt
    iterations = iterations or SCRAM_ITERATIONS
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def migrate(admin_url: str, app_url: str | None) -> list[str]:
    """Apply pending migrations as the owner and make the app role a member of omnigate_app."""
    try:
        conn = await asyncpg.connect(admin_url)
    except (ValueError, OverflowError):  # as in create_pool: never the error's text
        raise DatabaseError(invalid_url("OMNIGATE_ADMIN_DATABASE_URL")) from None
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL as owner ({type(exc).__name__})"
        ) from None
    applied: list[str] = []
    try:
        # one migrator at a time across processes and instances
        await conn.execute("SELECT pg_advisory_lock(7243001)")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS omnigate_migrations ("
            " name text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            r["name"]: r["checksum"] for r in await conn.fetch("SELECT * FROM omnigate_migrations")
        }
        for path in migration_files():
            sql = path.read_text(encoding="utf-8")
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if path.name in done:
                if done[path.name] != checksum:
                    raise DatabaseError(f"migration {path.name} changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO omnigate_migrations (name, checksum) VALUES ($1, $2)",
                    path.name,
                    checksum,
                )
            applied.append(path.name)
        await conn.execute(f"GRANT SELECT ON omnigate_migrations TO {APP_GROUP_ROLE}")
        if app_url:
            await _ensure_app_role(conn, app_url)
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"migration failed: {describe_postgres_error(exc)}") from None
    finally:
        await conn.close()
    return applied


async def _ensure_app_role(conn: asyncpg.Connection, app_url: str) -> None:
    role, password = _role_of(app_url)
    owner = await conn.fetchval("SELECT current_user")
    if role == owner:
        raise DatabaseError(
            "OMNIGATE_DATABASE_URL and OMNIGATE_ADMIN_DATABASE_URL use the same role; "
            "the app role must not own the tables"
        )
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    # the server gets the SCRAM verifier, never the password: a statement log
    # (log_statement = ddl) or an error report would otherwise hold it in clear
    pw = f" PASSWORD {_literal(scram_verifier(password))}" if password else ""
    if not exists:
        await conn.execute(f"CREATE ROLE {_ident(role)} LOGIN NOSUPERUSER NOBYPASSRLS{pw}")
    elif password:
        await conn.execute(f"ALTER ROLE {_ident(role)}{pw}")
    dbname = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"GRANT CONNECT ON DATABASE {_ident(dbname)} TO {_ident(role)}")
    await conn.execute(f"GRANT {APP_GROUP_ROLE} TO {_ident(role)}")
