"""`omnigate` command line: serve, migrate, tenant create and the privacy jobs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import orjson

from gateway.config import ConfigError, Settings, load_settings
from gateway.db import (
    DatabaseError,
    create_pool,
    describe_postgres_error,
    invalid_url,
    migrate,
    require_migrations,
)
from gateway.embedded import APP_ROLE, start_embedded, with_user
from gateway.logs import setup_logging
from policies import PolicyError

T = TypeVar("T")

# a sane bound on `serve --workers`: each worker holds its own database pool
MAX_WORKERS = 64
# where `serve --demo` writes the demo tenant's admin key when stderr is not a terminal
DEMO_KEY_FILE = "demo-admin-key"


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = _Parser(prog="omnigate", description="Privacy-enforcing gateway for AI chat widgets")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--demo", action="store_true", help="ensure the demo tenant")
    sub.add_parser("migrate", help="apply database migrations")
    tenant = sub.add_parser("tenant", help="manage tenants")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True, parser_class=_Parser)
    create = tsub.add_parser("create", help="create a tenant")
    create.add_argument("--name", required=True)
    create.add_argument("--origin", action="append", required=True, dest="origins")
    retention = sub.add_parser("retention", help="data retention")
    rsub = retention.add_subparsers(dest="retention_command", required=True, parser_class=_Parser)
    rsub.add_parser("run", help="one retention pass over every tenant; prints a JSON summary")
    keys = sub.add_parser("keys", help="master keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    ksub.add_parser("rotate", help="re-wrap every data key under the primary master key")
    audit = sub.add_parser("audit", help="audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    asub.add_parser("verify", help="verify every tenant's hash chain; non-zero exit if broken")
    return p


def _embedded(settings: Settings) -> bool:
    """True when no database is configured: the gateway starts and runs its own."""
    return not settings.database_url and not settings.admin_database_url


def resolve_database(settings: Settings) -> tuple[Settings, str | None]:
    """Fill in the embedded server when no database is configured; returns (settings, owner URL)."""
    if settings.database_url:
        return settings, settings.admin_database_url
    owner = settings.admin_database_url or start_embedded(settings.state_dir / "pgdata")
    try:
        app_url = with_user(owner, APP_ROLE)
    except ValueError:  # an unbalanced "[" (IPv6): never the URL's text
        raise DatabaseError(invalid_url("OMNIGATE_ADMIN_DATABASE_URL")) from None
    return replace(settings, database_url=app_url), owner


async def _migrate(settings: Settings, owner: str | None) -> list[str]:
    if owner is None:
        raise ConfigError("OMNIGATE_ADMIN_DATABASE_URL is needed to migrate")
    return await migrate(owner, settings.database_url)


async def _require_migrations(url: str) -> None:
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        await require_migrations(pool)
    finally:
        await pool.close()


def _prepare_database(settings: Settings, owner: str | None, embedded: bool) -> None:
    """Before a command other than `migrate` and `serve`: migrate only the embedded server.

    The admin URL is for `omnigate migrate` and `serve` (DESIGN §2): migrating here
    would also reset the app role's password from whatever OMNIGATE_DATABASE_URL
    the operator's shell holds. With it set, the migrations are only checked.
    """
    if embedded:  # the gateway runs this server itself, as `make run` does
        asyncio.run(_migrate(settings, owner))
    elif owner is not None:
        assert settings.database_url
        asyncio.run(_require_migrations(settings.database_url))


async def _tenant_create(settings: Settings, name: str, origins: list[str]) -> dict[str, str]:
    from gateway.provision import create_tenant

    assert settings.database_url
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        return (await create_tenant(pool, name, origins)).as_json()
    finally:
        await pool.close()


# hosts whose demo page is opened as 127.0.0.1 or localhost (both always allowed)
_LOOPBACK_OR_ANY = frozenset({"", "0.0.0.0", "::", "127.0.0.1", "localhost"})  # noqa: S104


def _show_demo_key(settings: Settings, admin_key: str) -> None:
    """On a terminal, print the key; otherwise stderr is a log stream (`docker logs`):
    write the key to a 0600 file and print its path instead."""
    if sys.stderr.isatty():
        sys.stderr.write(f"demo tenant created; its admin key (shown once): {admin_key}\n")
        return
    path = _write_private(settings.state_dir, DEMO_KEY_FILE, admin_key + "\n")
    sys.stderr.write(f"demo tenant created; its admin key is in {path} (mode 0600)\n")


def _write_private(directory: Path, name: str, text: str) -> Path:
    """Write text to directory/name with mode 0600; the path written.

    When the directory cannot be written (the Docker image's user may not write its
    working directory), a 0600 file in the system's temporary directory instead: the
    key is shown once, so it must land somewhere.
    """
    path = (directory / name).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an earlier demo tenant (a link itself, never its target)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        fd, temp = tempfile.mkstemp(prefix=f"omnigate-{name}-")  # 0600
        path = Path(temp)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


async def _ensure_demo(settings: Settings, host: str, port: int) -> None:
    from gateway.provision import ensure_demo_tenant
    from gateway.server import http_address

    assert settings.database_url
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        origins = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
        if host not in _LOOPBACK_OR_ANY:  # served on a name or address of its own
            origins.append(http_address(host, port))
        created = await ensure_demo_tenant(pool, origins)
    finally:
        await pool.close()
    if created is not None:
        _show_demo_key(settings, created.admin_key)
    sys.stderr.write(f"demo widget: {http_address(host, port)}/demo\n")


async def _with_pool(settings: Settings, job: Callable[[Any], Awaitable[T]]) -> T:
    assert settings.database_url
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        return await job(pool)
    finally:
        await pool.close()


async def _audit_verify(pool: Any) -> dict[str, Any]:
    from gateway import audit
    from gateway.db import tenant_tx
    from gateway.directory import tenant_ids

    broken: list[dict[str, Any]] = []
    tenants = await tenant_ids(pool)
    entries = 0
    for tenant_id in tenants:
        async with tenant_tx(pool, tenant_id) as conn:
            ok, seq, n = await audit.verify(conn, tenant_id)
        entries += n
        if not ok:
            broken.append({"tenant_id": str(tenant_id), "first_broken_seq": seq})
    return {"ok": not broken, "tenants": len(tenants), "entries": entries, "broken": broken}


def _privacy_job(settings: Settings, args: argparse.Namespace) -> int:
    """retention run | keys rotate | audit verify, as the app role (RLS applies)."""
    embedded = _embedded(settings)
    settings, owner = resolve_database(settings)
    _prepare_database(settings, owner, embedded)
    if args.command == "retention":
        from gateway.crypto import KeyRing
        from gateway.retention import run_retention
        from gateway.vault import Vault

        # redaction maps are pruned only under the configured master keys: without them
        # (a development key lives with its serve process) they stay marked for serve's
        # own retention loop, or a run that has them
        vault = Vault(KeyRing(settings.master_keys)) if settings.master_keys else None

        async def retain(pool: Any) -> dict[str, Any]:
            return await run_retention(pool, vault)

        print(orjson.dumps(asyncio.run(_with_pool(settings, retain))).decode())
        return 0
    if args.command == "keys":
        from gateway.crypto import KeyRing
        from gateway.keys import RotationError, rotate_keys

        if not settings.master_keys:
            raise ConfigError("OMNIGATE_MASTER_KEYS is needed to rotate (new primary first)")
        keyring = KeyRing(settings.master_keys)
        redis_url = settings.redis_url

        async def rotate(pool: Any) -> dict[str, Any]:
            if not redis_url:  # single process: serve re-reads keys per subject anyway
                return await rotate_keys(pool, keyring)
            from gateway.bus import RedisBus
            from gateway.redisconn import connect

            r = connect(redis_url)
            try:  # every serving process drops its cached data keys
                return await rotate_keys(pool, keyring, publish=RedisBus(r).publish)
            finally:
                await r.aclose()

        try:
            summary = asyncio.run(_with_pool(settings, rotate))
        except RotationError as exc:
            raise ConfigError(str(exc)) from None
        print(orjson.dumps(summary).decode())
        return 0
    result = asyncio.run(_with_pool(settings, _audit_verify))
    print(orjson.dumps(result).decode())
    if not result["ok"]:
        sys.stderr.write("omnigate: error: the audit chain is broken\n")
        return 1
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Run a command; raises the typed errors that `main` turns into one line."""
    args = build_parser().parse_args(argv)
    settings = load_settings()
    if args.command == "migrate":
        settings, owner = resolve_database(settings)
        applied = asyncio.run(_migrate(settings, owner))
        print(orjson.dumps({"applied": applied}).decode())
        return 0
    if args.command == "tenant":
        name = args.name.strip()
        if not 1 <= len(name) <= 200:
            raise UsageError("--name must be 1-200 characters")
        embedded = _embedded(settings)
        settings, owner = resolve_database(settings)
        _prepare_database(settings, owner, embedded)
        print(orjson.dumps(asyncio.run(_tenant_create(settings, name, args.origins))).decode())
        return 0
    if args.command in ("retention", "keys", "audit"):
        return _privacy_job(settings, args)
    if args.command == "serve":
        from gateway.server import preflight, serve

        host = args.host or settings.host
        port = settings.port if args.port is None else args.port
        if not 0 <= port <= 65535:
            raise UsageError("--port must be 0-65535")
        if not 1 <= args.workers <= MAX_WORKERS:
            raise UsageError(f"--workers must be 1-{MAX_WORKERS}")
        if port == 0 and args.workers > 1:
            given = "--port" if args.port is not None else "OMNIGATE_PORT"
            raise UsageError(
                f"{given} 0 (any free port) needs --workers 1: each worker would listen "
                "on a port of its own"
            )
        settings = replace(settings, host=host, port=port)
        preflight(settings, args.workers)  # a busy port fails before any database work
        settings, owner = resolve_database(settings)
        if owner is not None:
            asyncio.run(_migrate(settings, owner))
        if args.demo:
            asyncio.run(_ensure_demo(settings, host, port))
        serve(settings, workers=args.workers)
        return 0
    raise UsageError(f"unknown command {args.command}")


# SQLSTATEs of a missing schema object: the database was not migrated (or not fully).
_UNMIGRATED = frozenset({"3F000", "42P01", "42703", "42704", "42883"})


def _postgres_error(exc: Exception) -> str:
    """The error's class, SQLSTATE and constraint only: its text can quote values."""
    line = f"database error: {describe_postgres_error(exc)}"
    if getattr(exc, "sqlstate", None) in _UNMIGRATED:
        line += "; is the database migrated? run `omnigate migrate`"
    return line


def _os_error(exc: OSError) -> str:
    """The system's reason (and file), not ``str(exc)``: no argument of the call it came from."""
    line = exc.strerror or type(exc).__name__
    if exc.filename is not None:
        line += f": {exc.filename}"
    return line


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user mistakes print one clear line and exit non-zero."""
    if not logging.getLogger().handlers:
        # what a library warns about goes out scrubbed, as the server's logs do
        # (`serve` sets its own level); an embedding program keeps its own handlers
        setup_logging("WARNING")
    try:
        code = run(argv)
    except UsageError as exc:
        sys.stderr.write(f"omnigate: error: {exc}\n")
        code = 2
    except PolicyError as exc:
        details = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)
        sys.stderr.write(f"omnigate: error: invalid policy: {details}\n")
        code = 2
    except (ConfigError, DatabaseError) as exc:
        sys.stderr.write(f"omnigate: error: {exc}\n")
        code = 1
    except asyncpg.PostgresError as exc:
        sys.stderr.write(f"omnigate: error: {_postgres_error(exc)}\n")
        code = 1
    except asyncpg.InterfaceError as exc:
        sys.stderr.write(f"omnigate: error: database connection failed ({type(exc).__name__})\n")
        code = 1
    except OSError as exc:  # the listen address taken (a race past check_listen), permissions
        sys.stderr.write(f"omnigate: error: {_os_error(exc)}\n")
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug or an unforeseen input: its text can quote a secret
        sys.stderr.write(
            f"omnigate: error: unexpected {type(exc).__name__} (details withheld: "
            "they can quote configuration secrets)\n"
        )
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
